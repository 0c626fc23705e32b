"""Where a model runs and in what arithmetic, decided from plain facts so that tests need no GPU.

    facts = probe()                          # what Ray assigned and what torch sees, in this process
    plan = choose(facts, precision="auto")   # -> DevicePlan(device="cuda", autocast="bf16", ...)

:func:`choose` is a pure function of :class:`DeviceFacts`: the GPU ids Ray gave this process
(None outside Ray), whether torch can use CUDA, the GPU's compute capability, and whether the
CPU does bf16 in hardware. Scoring actors, training workers and the GPU check all decide here.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

from hcdlib.config import PRECISIONS

log = logging.getLogger(__name__)

# bf16 tensor cores start with Ampere (compute capability 8.0). Older GPUs (T4 7.5, V100 7.0)
# report bf16 "supported" through emulation, slower than fp16 there.
BF16_MIN_CAPABILITY = (8, 0)


class DeviceError(RuntimeError):
    """Ray gave this process a GPU that torch cannot use (a CPU-only wheel, a driver too old for its CUDA)."""


@dataclass(frozen=True)
class DeviceFacts:
    """What decides a process's device: Ray's assignment and what torch sees."""

    ray_gpu_ids: tuple[str, ...] | None  # None: not inside a Ray task or actor
    cuda_available: bool
    capability: tuple[int, int] | None = None  # of the first visible GPU
    cpu_native_bf16: bool = False
    torch_cuda: str | None = None  # the CUDA version torch was built for (None: a CPU build)


@dataclass(frozen=True)
class DevicePlan:
    """The decision: a torch device string and the autocast dtype (None: plain fp32)."""

    device: str
    autocast: str | None
    reason: str

    def to_dict(self) -> dict:
        """JSON-ready form (the GPU check, logs)."""
        return asdict(self)


def native_bf16(facts: DeviceFacts, device: str) -> bool:
    """Whether ``device`` ("cuda" or "cpu") does bf16 matrix arithmetic in hardware, not emulated."""
    if device == "cuda":
        return facts.capability is not None and tuple(facts.capability) >= BF16_MIN_CAPABILITY
    return facts.cpu_native_bf16


def autocast_dtype(facts: DeviceFacts, device: str, precision: str, *, fp16_fallback: bool) -> str | None:
    """The autocast dtype for ``--precision`` on ``device``: "bf16", "fp16" or None (fp32).

    auto: bf16 where native; on a GPU without it, fp16 where the caller can take its risks
    (``fp16_fallback``: scoring, which checks every output is finite), else fp32 (training,
    which would need loss scaling for fp16).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp32":
        return None
    if precision == "bf16" or native_bf16(facts, device):
        return "bf16"
    return "fp16" if device == "cuda" and fp16_fallback else None


def choose(facts: DeviceFacts, precision: str = "auto", *, fp16_fallback: bool = True) -> DevicePlan:
    """The device and arithmetic for one process.

    Inside Ray the assignment decides, not what torch happens to see: a process given no GPU
    runs on the CPU even on a GPU node (else it opens a CUDA context on GPU 0 beside the
    actors that own it), and a process given a GPU that torch cannot use is an error, never a
    silent fall back to one CPU thread.
    """
    if facts.ray_gpu_ids is not None and not facts.ray_gpu_ids:
        device, reason = "cpu", "Ray assigned no GPU to this process"
    elif facts.ray_gpu_ids:
        if not facts.cuda_available:
            why = (f"torch is built for CUDA {facts.torch_cuda} and cannot start it: is the node's NVIDIA driver "
                   "older than that CUDA?" if facts.torch_cuda else "torch is a CPU-only build")
            raise DeviceError(f"Ray assigned GPU {','.join(facts.ray_gpu_ids)} to this process, but {why}; install "
                              "the torch build for the node's driver, or ask for no GPU (--gpus-per-actor 0, "
                              "--gpus-per-worker 0)")
        device, reason = "cuda", f"Ray assigned GPU {','.join(facts.ray_gpu_ids)}"
    elif facts.cuda_available:
        device, reason = "cuda", "outside Ray, CUDA available"
    else:
        device, reason = "cpu", "no CUDA"
    return DevicePlan(device, autocast_dtype(facts, device, precision, fp16_fallback=fp16_fallback), reason)


def cpu_native_bf16() -> bool:
    """Whether this CPU does bf16 convolutions natively (AVX512-BF16 or AMX; oneDNN emulates them elsewhere)."""
    import torch  # torch only where a model runs

    # torch.cpu has only private probes for these (torch 2.14)
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(p is not None and p() for p in probes)


def probe() -> DeviceFacts:
    """The facts of this process: Ray's GPU ids (if inside Ray), CUDA, capability, the CPU's bf16."""
    import torch  # torch only where a model runs

    ids: tuple[str, ...] | None = None
    try:
        import ray

        if ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE:
            ids = tuple(str(i) for i in ray.get_gpu_ids())
    except ImportError:  # the GPU check runs where Ray may be missing
        pass
    cuda = torch.cuda.is_available()
    cap = tuple(torch.cuda.get_device_capability(0)) if cuda else None
    return DeviceFacts(ids, cuda, cap, cpu_native_bf16(), torch.version.cuda)


def torch_dtype(name: str | None):
    """"bf16" / "fp16" / None -> the torch dtype (None stays None)."""
    import torch  # torch only where a model runs

    return {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def pick(precision: str = "auto", *, fp16_fallback: bool = True, facts: DeviceFacts | None = None) -> DevicePlan:
    """:func:`choose` on this process's :func:`probe`, logged once."""
    plan = choose(facts or probe(), precision, fp16_fallback=fp16_fallback)
    log.debug("device: %s", plan)
    return plan
