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
from benchmarks.data import ensure_data, replicated
from benchmarks.doc import publish
from hcdlib.commands.score.run import score
from hcdlib.config import ScoreConfig
from hcdlib.model.artifact import load_model
from hcdlib.model.openvino import with_preprocessing
from hcdlib.model.transforms import Preprocess
from hcdlib.raykit.cluster import init_ray
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled

log = logging.getLogger(__name__)

Predict = Callable[[np.ndarray], np.ndarray]


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
    torch.onnx.export(with_preprocessing(model, pre), (example,), path, input_names=["x"], output_names=["p"],
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
    ov_model = ov.convert_model(with_preprocessing(model, pre), example_input=example,
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


def _scored(cfg: BenchBackendsConfig, source: str, backend: str, precision: str, name: str) -> tuple[int, float]:
    m = score(ScoreConfig(model=cfg.model, input=source, out=os.path.join(cfg.work, name),
                          precision=precision, backend=backend, overwrite=True))
    if m["errors"]:
        raise RuntimeError(f"benchmark input {source}: {m['errors']} rows failed; the numbers would be wrong")
    return m["rows"], m["wall_seconds"]


def end_to_end(cfg: BenchBackendsConfig) -> list[dict]:
    """``hcd score`` over ``--n-score`` packed patches, one run per :data:`E2E_RUNS` row, in that order.

    With ``--steady-factor`` k > 1 each row also scores k times as many and reports the actors'
    steady rate, (k-1)N / (T(kN) - T(N)): the rate once the command's start-up is paid. A small
    run first starts Ray Data's own actors, so the first row's T(N) does not hold them.
    """
    from hcdlib.model import openvino

    _, shards = ensure_data(BenchScoreConfig(work=cfg.work), cfg.n_score, f"n{cfg.n_score}")
    k = cfg.steady_factor
    big = replicated(shards, k, os.path.join(cfg.work, f"n{cfg.n_score}x{k}")) if k > 1 else None
    _scored(cfg, ensure_data(BenchScoreConfig(work=cfg.work), 1024, "n1024")[1], "torch", "auto", "e2e-warm-up")
    out = []
    for backend, precision in E2E_RUNS:
        if backend == "openvino" and not openvino.available():
            continue
        n1, t1 = _scored(cfg, shards, backend, precision, f"e2e-{backend}-{precision}")
        row = {"backend": backend, "precision": precision, "patches_per_s": n1 / t1, "rows": n1}
        if big:
            nk, tk = _scored(cfg, big, backend, precision, f"e2e-{backend}-{precision}-x{k}")
            row["steady"] = (nk - n1) / (tk - t1)
            row["startup"] = t1 - n1 / row["steady"]
        out.append(row)
        log.info("%s", row)
    return out


def _e2e_lines(e2e: list[dict], k: int) -> list[str]:
    """The end-to-end table: each run's rate, its ratio to torch fp32 and, with k > 1, its steady rate."""
    steady = all("steady" in r for r in e2e)
    head = f"`hcd score` end to end, {e2e[0]['rows']} packed patches, default actors"
    if steady:
        head += f"; steady: the actors' rate once start-up is paid, (k-1)N / (T(kN) - T(N)), k = {k}"
    lines = [head + ":", "", "| --backend | --precision | patches/s | / torch fp32 |"
             + (" steady patches/s | start-up s |" if steady else ""), "|---|---|---:|---:|" + ("---:|---:|" * steady)]
    fp32 = next(r for r in e2e if (r["backend"], r["precision"]) == ("torch", "fp32"))
    for r in e2e:
        default = " (the default)" if (r["backend"], r["precision"]) == ("torch", "auto") else ""
        cells = (f"| {r['backend']} | {r['precision']}{default} | {r['patches_per_s']:.0f} | "
                 f"{r['patches_per_s'] / fp32['patches_per_s']:.2f} |")
        lines.append(cells + (f" {r['steady']:.0f} | {r['startup']:.1f} |" if steady else ""))
    return lines


def _ratios(done: list[dict], e2e: list[dict]) -> str:
    """The scoring runs (steady where measured) against the fastest model-only row and against their own."""
    key, said = ("steady", "steady") if all("steady" in r for r in e2e) else ("patches_per_s", "end to end")
    best = max(done, key=lambda r: r["patches_per_s"])
    out = [f"fastest {said} / fastest model-only row ({best['backend']}): "
           f"{max(r[key] for r in e2e) / best['patches_per_s']:.2f}"]
    own = {("torch", "auto"): "torch bf16 autocast (eager)",
           ("openvino", "auto"): next((r["backend"] for r in done if r["backend"].startswith("OpenVINO (")), None)}
    for r in e2e:
        name = own.get((r["backend"], r["precision"]))
        row = next((m for m in done if m["backend"] == name), None)
        if row:
            out.append(f"{r['backend']} {said} / its model-only row ({name}): {r[key] / row['patches_per_s']:.2f}")
    return "; ".join(out)


def format_table(models: list[dict], e2e: list[dict], cfg: BenchBackendsConfig) -> str:
    """Both tables and their ratios as Markdown."""
    done = [r for r in models if "patches_per_s" in r]
    lines = [f"Model only: {cfg.n} patches in memory, batch {cfg.batch_size}, {os.cpu_count()} threads in one process, "
             f"best of {cfg.rounds}; AUC over the {cfg.valid.rstrip('/').split('/')[-1]} split", "",
             "| backend | patches/s | AUC | max abs dp against torch fp32 |", "|---|---:|---:|---:|"]
    lines += [f"| {r['backend']} | {r['patches_per_s']:.0f} | {r['auc']:.4f} | {r['max_abs_dp']:.4f} |" for r in done]
    lines += [f"| {r['backend']} | {r['skipped']} | | |" for r in models if "skipped" in r]
    return "\n".join([*lines, "", *_e2e_lines(e2e, cfg.steady_factor), "", _ratios(done, e2e)])


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
