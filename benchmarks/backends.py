"""CPU scoring backends side by side, one run: torch fp32, torch bf16, torch.compile, ONNX Runtime, OpenVINO, int8.

    python jobs/bench_backends.py --model bench-out/train/run/model --valid ../shared/data/pcam-real/valid

The same exported model, the same patches, batch and threads (every core, one process) for each
model-only row, each the best of ``--rounds``; every row also scores the labelled ``--valid``
split, for its AUC and its largest |dp| against torch fp32. Then ``hcd score`` end to end over
``--n-score`` packed patches with ``--precision fp32`` and with the default, side by side.
ONNX Runtime, OpenVINO and NNCF (int8) come with ``pip install -e '.[bench]'``; a row whose
package is missing says so.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np

from benchmarks.config import BenchBackendsConfig, BenchScoreConfig
from benchmarks.data import ensure_data
from benchmarks.doc import publish
from hcdlib.commands.score.run import score
from hcdlib.config import ScoreConfig
from hcdlib.model.artifact import load_model
from hcdlib.model.transforms import Preprocess, to_input
from hcdlib.raykit.cluster import init_ray
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]


def _wrapped(model, pre):
    """``model`` behind its preprocessing: uint8 NHWC in, P(tumour) out (what ONNX and OpenVINO get)."""
    import torch


    class Scored(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, x):
            return torch.sigmoid(self.model(to_input(x, pre, channels_last=False))).view(-1)

    return Scored().eval()


def torch_rows(model, pre) -> dict[str, Predict]:
    """The forward pass hcd score runs (:class:`~hcdlib.model.infer.Predictor`): fp32, bf16 autocast, compiled."""
    import torch

    from hcdlib.model.infer import Predictor, compiled

    cpu = torch.device("cpu")
    rows = {"torch fp32 (eager)": Predictor(model, pre, device=cpu),
            "torch bf16 autocast (eager)": Predictor(model, pre, device=cpu, autocast="bf16")}
    rows["torch.compile bf16 autocast"] = Predictor(compiled(model), pre, device=cpu, autocast="bf16")
    return rows


def onnx_row(model, pre, work: str, threads: int) -> Predict:
    """ONNX Runtime on the CPU, fp32 (the model exported once, batch dimension dynamic)."""
    import onnxruntime as ort
    import torch

    path = os.path.join(work, "model.onnx")
    example = torch.zeros(2, pre.size, pre.size, 3, dtype=torch.uint8)
    torch.onnx.export(_wrapped(model, pre), (example,), path, input_names=["x"], output_names=["p"],
                      dynamic_axes={"x": {0: "n"}, "p": {0: "n"}}, dynamo=False)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"x": x})[0]


def openvino_rows(model, pre, threads: int, calibration: np.ndarray) -> dict[str, Predict]:
    """OpenVINO with its default precision hint (bf16 where the CPU does it natively), and NNCF int8."""
    import openvino as ov
    import torch

    example = torch.zeros(2, pre.size, pre.size, 3, dtype=torch.uint8)
    ov_model = ov.convert_model(_wrapped(model, pre), example_input=example,
                                input=[(ov.PartialShape([-1, pre.size, pre.size, 3]), ov.Type.u8)])
    core = ov.Core()
    config = {"INFERENCE_NUM_THREADS": threads}
    default = core.compile_model(ov_model, "CPU", config)
    hint = default.get_property("INFERENCE_PRECISION_HINT")  # what this CPU runs by default (bf16 where native)
    rows = {f"OpenVINO (its default: {getattr(hint, 'get_type_name', lambda: hint)()})": lambda x: default(x)[0]}
    try:
        import nncf
    except ImportError:
        log.warning("nncf is not installed: no int8 row (pip install -e '.[bench]')")
        return rows
    int8 = nncf.quantize(ov_model, nncf.Dataset([calibration[i:i + 32] for i in range(0, len(calibration), 32)]))
    compiled_int8 = core.compile_model(int8, "CPU", config)
    rows["OpenVINO int8 (NNCF, post-training)"] = lambda x: compiled_int8(x)[0]
    return rows


def _rate(predict: Predict, pixels: np.ndarray, batch: int, rounds: int) -> float:
    """Patches/s over ``pixels`` in batches, the best of ``rounds`` (after one warm-up batch)."""
    predict(pixels[:batch])
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(0, len(pixels), batch):
            predict(pixels[i:i + batch])
        best = max(best, len(pixels) / (time.perf_counter() - t0))
    return best


def _scores(predict: Predict, pixels: np.ndarray, batch: int) -> np.ndarray:
    return np.concatenate([np.asarray(predict(pixels[i:i + batch]), dtype=np.float32).reshape(-1)
                           for i in range(0, len(pixels), batch)])


def _labelled(uri: str) -> tuple[np.ndarray, np.ndarray]:
    """Every patch of a labelled source, decoded, with its labels."""
    src = open_source(uri)
    check_labelled(src, "validation")
    pixels, labels = [], []
    for chunk in src.chunks(1024):
        rows = chunk.read()
        ok = rows["status"] == "ok"
        pixels.append(rows["pixels"][ok])
        labels.append(np.asarray(rows["label"][ok], dtype=np.int64))
    return np.concatenate(pixels), np.concatenate(labels)


def model_rows(cfg: BenchBackendsConfig) -> list[dict]:
    """Every backend's patches/s, AUC on ``--valid`` and largest |dp| against torch fp32."""
    import torch
    from sklearn.metrics import roc_auc_score

    from hcdlib.model.infer import for_inference

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model, meta = load_model(cfg.model)
    model, pre = for_inference(model), Preprocess.from_dict(meta["preprocess"])
    pixels, labels = _labelled(cfg.valid)
    timed = pixels[: cfg.n]
    backends: dict[str, Callable[[], dict[str, Predict]]] = {
        "torch": lambda: torch_rows(model, pre),
        "onnxruntime": lambda: {"ONNX Runtime fp32": onnx_row(model, pre, cfg.work, threads)},
        "openvino": lambda: openvino_rows(model, pre, threads, pixels[:300]),
    }
    rows, ref = [], None
    for package, make in backends.items():
        try:
            predicts = make()
        except ImportError as exc:
            rows.append({"backend": package, "skipped": f"{exc.name or package} is not installed"})
            continue
        for name, predict in predicts.items():
            probs = _scores(predict, pixels, cfg.batch_size)
            ref = probs if ref is None else ref
            rows.append({"backend": name, "patches_per_s": _rate(predict, timed, cfg.batch_size, cfg.rounds),
                         "auc": float(roc_auc_score(labels, probs)), "max_abs_dp": float(np.abs(probs - ref).max()),
                         "finite": bool(np.isfinite(probs).all())})
            log.info("%s", rows[-1])
    return rows


# hcd score's runs end to end: torch in fp32, then the defaults, then OpenVINO (where installed).
E2E_RUNS = (("torch", "fp32"), ("torch", "auto"), ("openvino", "auto"))


def end_to_end(cfg: BenchBackendsConfig) -> list[dict]:
    """``hcd score`` over ``--n-score`` packed patches, one run per :data:`E2E_RUNS` row, in that order."""
    from hcdlib.model import openvino

    _, shards = ensure_data(BenchScoreConfig(work=cfg.work), cfg.n_score, f"n{cfg.n_score}")
    out = []
    for backend, precision in E2E_RUNS:
        if backend == "openvino" and not openvino.available():
            continue
        m = score(ScoreConfig(model=cfg.model, input=shards, out=os.path.join(cfg.work, f"e2e-{backend}-{precision}"),
                              precision=precision, backend=backend, overwrite=True))
        out.append({"backend": backend, "precision": precision, "patches_per_s": m["rows"] / m["wall_seconds"],
                    "rows": m["rows"]})
    return out


def format_table(models: list[dict], e2e: list[dict], cfg: BenchBackendsConfig) -> str:
    """Both tables and their ratios as Markdown."""
    done = [r for r in models if "patches_per_s" in r]
    best = max(done, key=lambda r: r["patches_per_s"])
    lines = [f"Model only: {cfg.n} patches in memory, batch {cfg.batch_size}, {os.cpu_count()} threads in one process, "
             f"best of {cfg.rounds}; AUC over the {cfg.valid.rstrip('/').split('/')[-1]} split", "",
             "| backend | patches/s | AUC | max abs dp against torch fp32 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['patches_per_s']:.0f} | {r['auc']:.4f} | {r['max_abs_dp']:.4f} |" for r in done]
    lines += [f"| {r['backend']} | {r['skipped']} | | |" for r in models if "skipped" in r]
    rate = {(r["backend"], r["precision"]): r["patches_per_s"] for r in e2e}
    lines += ["", f"`hcd score` end to end, {e2e[0]['rows']} packed patches, default actors:", "",
              "| --backend | --precision | patches/s | / torch fp32 |", "|---|---|---:|---:|"]
    for (b, p), v in rate.items():
        default = " (the default)" if (b, p) == ("torch", "auto") else ""
        lines.append(f"| {b} | {p}{default} | {v:.0f} | {v / rate['torch', 'fp32']:.2f} |")
    said = [f"fastest end to end / fastest model-only row ({best['backend']}): "
            f"{max(rate.values()) / best['patches_per_s']:.2f}"]
    own = {("torch", "auto"): "torch bf16 autocast (eager)",
           ("openvino", "auto"): next((r["backend"] for r in done if r["backend"].startswith("OpenVINO (")), None)}
    for (b, p), name in own.items():
        row = next((r for r in done if r["backend"] == name), None)
        if (b, p) in rate and row:
            said.append(f"{b} end to end / its model-only row ({name}): {rate[b, p] / row['patches_per_s']:.2f}")
    lines += ["", "; ".join(said)]
    return "\n".join(lines)


def run(cfg: BenchBackendsConfig) -> dict:
    """Every row, logged, and published with ``--markdown``."""
    os.makedirs(cfg.work, exist_ok=True)
    models = model_rows(cfg)
    init_ray()
    e2e = end_to_end(cfg)
    table = format_table(models, e2e, cfg)
    log.info("\n%s", table)
    if cfg.markdown:

        publish(cfg.markdown, "backends", "CPU backends: the same model in torch, ONNX Runtime and OpenVINO", table,
                job="bench_backends", cfg=cfg)
    return {"models": models, "end_to_end": e2e}
