"""GPU paths checked without a GPU: the device decision from fakes, transfers, arithmetic, shapes, plans."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
from torch import nn

from hcdlib.config import ScoreConfig, TrainConfig
from hcdlib.errors import UserError
from hcdlib.model.architectures import build_model
from hcdlib.model.device import DeviceError, DeviceFacts, autocast_dtype, choose
from hcdlib.model.infer import Predictor, compiled, infer_batch, to_device
from hcdlib.model.transforms import Preprocess, dihedral, train_preset
from hcdlib.raykit.cluster import plan_actors

A100, T4 = (8, 0), (7, 5)


def test_an_actor_runs_where_ray_put_it_not_where_torch_looks():
    # asked for no GPU on a GPU node: the CPU, not a CUDA context on GPU 0 beside the GPU actors
    assert choose(DeviceFacts((), True, A100)).device == "cpu"
    assert choose(DeviceFacts(("3",), True, A100)).device == "cuda"
    # outside Ray (user code, tests): what torch sees
    assert choose(DeviceFacts(None, True, A100)).device == "cuda"
    assert choose(DeviceFacts(None, False)).device == "cpu"
    # given a GPU that torch cannot use: an error that says why, never one CPU thread without a word
    with pytest.raises(DeviceError, match=r"Ray assigned GPU 0 to this process, but torch is a CPU-only build"):
        choose(DeviceFacts(("0",), False, None, torch_cuda=None))
    with pytest.raises(DeviceError, match=r"built for CUDA 13\.0 and cannot start it: is the node.s NVIDIA driver"):
        choose(DeviceFacts(("0",), False, None, torch_cuda="13.0"))


def test_bf16_only_where_native_and_fp16_only_where_checked():
    a100, t4 = DeviceFacts(("0",), True, A100), DeviceFacts(("0",), True, T4)
    assert choose(a100).autocast == "bf16"
    assert choose(t4).autocast == "fp16"  # bf16 is emulated on a T4 (torch calls it "supported")
    assert choose(t4, fp16_fallback=False).autocast is None  # training: fp32, no loss scaling needed
    assert choose(t4, "bf16").autocast == "bf16" and choose(a100, "fp32").autocast is None
    amx, avx2 = DeviceFacts(None, False, cpu_native_bf16=True), DeviceFacts(None, False, cpu_native_bf16=False)
    assert [autocast_dtype(amx, "cpu", p, fp16_fallback=True) for p in ("auto", "bf16", "fp32")] == \
        ["bf16", "bf16", None]
    assert [autocast_dtype(avx2, "cpu", p, fp16_fallback=True) for p in ("auto", "bf16", "fp32")] == \
        [None, "bf16", None]  # no fp16 on a CPU: auto is fp32 where bf16 is not native


def test_only_cpu_tensors_are_pinned(monkeypatch):
    """A batch already on the GPU (Ray Train's) was pinned: a RuntimeError at the first validation."""
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: pinned.append(self.device.type) or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)  # no CUDA here: the copy is a no-op
    on_gpu = torch.empty(2, 3, device="meta")
    to_device(on_gpu, torch.device("cuda"))
    assert pinned == []
    to_device(torch.zeros(2, 3), torch.device("cuda"))
    assert pinned == ["cpu"]
    x = torch.zeros(2)
    assert to_device(x, torch.device("cpu")) is x


class Counting(nn.Module):
    """Records the batch size of every forward pass; a fixed random projection to one logit."""

    def __init__(self):
        super().__init__()
        self.calls: list[int] = []
        self.w = nn.Parameter(torch.randn(3 * 96 * 96, 1, generator=torch.Generator().manual_seed(0)) / 300)

    def forward(self, x):
        self.calls.append(len(x))
        return x.flatten(1) @ self.w


def _pixels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)


def test_tta_views_go_through_the_gpu_in_one_pass_and_average_as_eight():
    pre, cpu, px = Preprocess(), torch.device("cpu"), _pixels(6)
    model = Counting()
    stacked = Predictor(model, pre, device=cpu, tta=8, forward_rows=4096)(px)
    assert model.calls == [48]  # 8 views x 6 patches, one call (the GPU default)
    model.calls.clear()
    one_by_one = Predictor(model, pre, device=cpu, tta=8)(px)  # the CPU default: a view at a time
    assert model.calls == [6] * 8
    from hcdlib.model.transforms import to_input

    x = to_input(torch.from_numpy(px), pre)
    with torch.no_grad():
        want = torch.stack([torch.sigmoid(model(dihedral(x, k))).view(-1) for k in range(8)]).mean(0).numpy()
    np.testing.assert_allclose(stacked, want, atol=1e-6)
    np.testing.assert_allclose(one_by_one, want, atol=1e-6)
    model.calls.clear()
    Predictor(model, pre, device=cpu, tta=8, forward_rows=24)(px)  # memory caps a pass: 4 views of 6
    assert model.calls == [24, 24]


def test_a_compiled_model_compiles_once_for_views_and_a_short_last_batch():
    """Odd dihedral views (other strides) and the short last batch each made torch.compile compile again."""
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    counter = CompileCounter()
    model, pre = build_model("hcdnet")
    predict = Predictor(compiled(model.eval(), backend=counter), pre, device=torch.device("cpu"), tta=8,
                        fixed_batch=16, forward_rows=4096)
    for n in (16, 16, 5):
        out = predict(_pixels(n, seed=n))
        assert out.shape == (n,) and np.isfinite(out).all()
    assert counter.frame_count == 1
    torch._dynamo.reset()


class Overflowing(nn.Module):
    """Finite in fp32; +inf/NaN under autocast for patches whose first pixel is bright (an fp16 overflow)."""

    def forward(self, x):
        bright = x[:, 0, 0, 0] > 1.5
        if torch.is_autocast_enabled(x.device.type):
            return torch.where(bright, torch.tensor(float("nan")), x.mean((1, 2, 3))).view(-1, 1)
        return x.mean((1, 2, 3)).view(-1, 1)


class Broken(nn.Module):
    def forward(self, x):
        return torch.full((len(x), 1), float("nan"))


def test_non_finite_probabilities_are_scored_again_in_fp32_then_recorded_as_errors():
    px = _pixels(8)
    px[:3, 0, 0] = 255  # overflows under autocast
    px[3:, 0, 0] = 0
    pre, cpu = Preprocess(), torch.device("cpu")
    got = Predictor(Overflowing(), pre, device=cpu, autocast="bf16")(px)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, infer_batch(Overflowing(), px, device=cpu, preprocess=pre), atol=1e-6)

    from hcdlib.commands.score.actor import NON_FINITE, Scorer

    scorer = Scorer.__new__(Scorer)  # the batch path needs no artifact: only these attributes
    scorer.predict = Predictor(Broken(), pre, device=cpu, autocast="bf16")
    scorer.batch_size, scorer.model_id = 4, "m"
    from ray.data.extensions import ArrowTensorArray  # the pixels as Ray Data hands them to the actor

    n = 6
    batch = pa.table({"id": [f"p{i}" for i in range(n)], "status": ["ok"] * 5 + ["error"],
                      "error": pa.nulls(n), "pixels": ArrowTensorArray.from_numpy(_pixels(n))})
    out = Scorer.__call__(scorer, batch)
    assert out["status"].to_pylist() == ["error"] * 6  # never a NaN with status ok
    assert out["error"].to_pylist()[:5] == [NON_FINITE] * 5 and out["error"][5].as_py() is None
    assert np.isnan(out["prob"].to_numpy(zero_copy_only=False)).all()


def test_augmentation_draws_views_without_syncing_on_indices(monkeypatch):
    """nonzero() made the host wait for the GPU at every training step; the views are now masks."""
    x = torch.randn(64, 3, 8, 8)
    monkeypatch.setattr(torch.Tensor, "nonzero", lambda *a, **k: pytest.fail("nonzero() syncs a GPU"))
    y = train_preset(x, generator=torch.Generator().manual_seed(0), stain_jitter=0, brightness=0)
    views = [[k for k in range(8) if torch.equal(y[i], dihedral(x[i:i + 1], k)[0])] for i in range(64)]
    assert all(views) and {v[0] for v in views} == set(range(8))  # each image is one view; all eight drawn


def test_fractional_gpus_per_worker_are_refused_with_several_workers():
    with pytest.raises(UserError, match=r"--gpus-per-worker 0\.5 with 2 workers would put two training ranks"):
        TrainConfig(data="d", out="o", workers=2, gpus_per_worker=0.5)
    from hcdlib.commands.train.run import _scaling

    with pytest.raises(UserError, match=r"--gpus-per-worker 0\.5 makes 4 workers"):
        _scaling(TrainConfig(data="d", out="o", gpus_per_worker=0.5), {"CPU": 16, "GPU": 2})
    scaling, _ = _scaling(TrainConfig(data="d", out="o", gpus_per_worker=0.5, workers=1), {"CPU": 16, "GPU": 2})
    assert scaling.num_workers == 1
    scaling, _ = _scaling(TrainConfig(data="d", out="o"), {"CPU": 8}, gpus=4.0)  # GPU nodes still to join
    assert (scaling.num_workers, scaling.use_gpu) == (4, True)


def test_learning_rate_follows_the_global_batch():
    from hcdlib.commands.train.schedule import scaled_lr

    assert scaled_lr(3e-3, 128) == pytest.approx(3e-3)  # one worker at the defaults: --lr itself
    assert scaled_lr(3e-3, 8 * 128) == pytest.approx(3e-3 * 8 ** 0.5)
    assert scaled_lr(3e-3, 32) == pytest.approx(1.5e-3)


def test_scoring_precision_is_part_of_the_run():
    from hcdlib.commands.score.run import run_spec

    meta = {"sha256": "a" * 64, "arch": "hcdnet"}
    cfg = ScoreConfig(model="m", input="i", out="o")
    assert run_spec(cfg, meta, "f")["precision"] == "auto"
    assert run_spec(cfg, meta, "f") != run_spec(cfg.replace(precision="fp32"), meta, "f")


def test_a_training_step_does_not_wait_for_the_device(monkeypatch):
    """An all-reduce + .item() for the clock and loss.item() made every step wait for the GPU."""
    import collections
    from types import SimpleNamespace

    import hcdlib.commands.train.loop as tl

    torch.manual_seed(0)
    model, pre = build_model("hcdnet")
    loop = tl.TrainLoop.__new__(tl.TrainLoop)  # train_epoch needs no Ray: only these attributes
    loop.cfg = TrainConfig(data="d", out="o", batch_size=4, swa_from=1.0)
    loop.model, loop.pre, loop.device, loop.world, loop.bf16, loop.ema = model, pre, torch.device("cpu"), 2, False, None
    loop.loss_fn, loop.recent = nn.BCEWithLogitsLoss(), collections.deque(maxlen=1)
    loop.opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loop.step, loop.elapsed, loop.budget_s, loop.val_s, loop.total_steps, loop.peak_lr = 0, 0.0, 3600.0, 0.0, 100, 1e-3
    synced = []
    monkeypatch.setattr(tl, "agreed_max", lambda value, device: synced.append(value) or value)
    item = torch.Tensor.item  # the optimiser reads its own step counter (a CPU tensor): allowed

    def no_loss_item(self):
        if self.grad_fn is not None:
            pytest.fail("loss.item() syncs the host with the GPU at every step")
        return item(self)

    monkeypatch.setattr(torch.Tensor, "item", no_loss_item)
    px, labels = torch.from_numpy(_pixels(4 * 17)), torch.arange(4 * 17) % 2
    shard = SimpleNamespace(iter_torch_batches=lambda batch_size, **_: (
        {"pixels": px[i:i + batch_size], "label": labels[i:i + batch_size]} for i in range(0, len(px), batch_size)))
    stats = loop.train_epoch(shard)
    assert loop.step == 17 and len(synced) == 3  # steps 0, 8 and 16 agree on the clock
    assert stats["train_loss"] > 0 and np.isfinite(stats["train_loss"])


def test_gpu_actors_take_larger_batches_and_keep_their_constants_on_the_device(monkeypatch):
    """A GPU idles on batches of 256, and two host-to-device copies of the normalisation per batch."""
    import hcdlib.model.infer as infer
    from hcdlib.commands.score.stream import default_batch

    assert default_batch(plan_actors({"CPU": 16, "GPU": 2})) == 1024
    assert default_batch(plan_actors({"CPU": 2})) == 256
    made = []
    real = infer.norm_stats
    monkeypatch.setattr(infer, "norm_stats", lambda pre, device: made.append(device) or real(pre, device))
    predict = Predictor(Counting(), Preprocess(), device=torch.device("cpu"))
    for _ in range(3):
        predict(_pixels(4))
    assert len(made) == 1  # made once, with the predictor
