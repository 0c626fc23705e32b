"""Training benchmarks on real PatchCamelyon patches.

    python jobs/bench_train.py --train ../shared/data/pcam-real/train --valid ../shared/data/pcam-real/valid
    python jobs/bench_train.py --train ... --valid ... --test <labelled test source>
    python jobs/bench_train.py --train ... --valid ... --throughput

Accuracy: ``hcd train`` with its defaults and a time budget, then the exported model scores
the validation split with ``hcd score`` (TTA 1 and 8), and with ``--test`` a held-out test
source (TTA 8); prints minutes vs validation AUC and each AUC with the data it comes from.
Throughput: two epochs of Ray Train (1 worker; the patches decoded once into Ray's object store,
``--cache auto``, and read and decoded every epoch, ``--cache off``) against a plain PyTorch loop
over the same files and model, images/s of each epoch side by side.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import numpy as np

from benchmarks.config import BenchTrainConfig
from benchmarks.data import FileDataset
from benchmarks.doc import publish
from hcdlib.commands.score.run import ScoreConfig, score
from hcdlib.model.device import pick
from hcdlib.model.transforms import to_input, train_preset
from hcdlib.outputs.readers import read_predictions
from hcdlib.raykit.cluster import init_ray
from hcdlib.sources.factory import open_source
from hcdlib.sources.labels import check_labelled
from hcdlib.storage import uri as urimod

log = logging.getLogger(__name__)


def accuracy(cfg: BenchTrainConfig) -> dict:
    """Train with the defaults under the budget, then score the validation split with TTA 1 and 8."""
    from sklearn.metrics import roc_auc_score

    from hcdlib.commands.train.run import TrainConfig, train

    if cfg.test:  # refused now, not after the training budget is spent
        check_labelled(open_source(cfg.test), "test")
    t0 = time.perf_counter()
    meta = train(TrainConfig(data=cfg.train, val_data=cfg.valid, out=urimod.join(cfg.out, "run"),
                             time_budget_min=cfg.minutes))
    train_min = (time.perf_counter() - t0) / 60
    result = {"train_wall_min": train_min, "best_epoch": meta["metrics"]["best_epoch"],
              "curve": [(h["elapsed_s"] / 60, h["val_auc"]) for h in meta["history"]]}
    # The validation split chose the exported epoch, so its AUC is slightly optimistic; --test is not.
    scored = [("valid", cfg.valid, 1), ("valid", cfg.valid, 8)] + ([("test", cfg.test, 8)] if cfg.test else [])
    for name, uri, tta in scored:
        out = urimod.join(cfg.out, f"{name}-tta{tta}")
        score(ScoreConfig(model=urimod.join(cfg.out, "run", "model"), input=uri, out=out, tta=tta, overwrite=True))
        truth = check_labelled(open_source(uri), name).to_pandas().set_index("id")["label"]
        t = read_predictions(out, ["id", "prob"]).to_pandas()
        result[f"{name}_auc_tta{tta}"] = float(roc_auc_score(truth.loc[t["id"]].to_numpy(), t["prob"]))
    ips = [h["images_per_s"] for h in meta["history"]]
    lines = [f"`hcd train` defaults, budget {cfg.minutes:g} min: trained {train_min:.1f} min, "
             f"{len(result['curve'])} epochs at {min(ips):.0f}-{max(ips):.0f} images/s, best epoch "
             f"{result['best_epoch']} ({meta['history'][0].get('arithmetic', '')})", "",
             "| AUC | source | value |", "|---|---|---:|"]
    lines += [f"| {name}, hcd score TTA {tta} | {uri} | {result[f'{name}_auc_tta{tta}']:.4f} |"
              for name, uri, tta in scored]
    lines += ["", "| minutes | validation AUC (TTA 1) |", "|---:|---:|"]
    lines += [f"| {m:.1f} | {a:.4f} |" for m, a in result["curve"]]
    log.info("\n%s", "\n".join(lines))
    if cfg.markdown:

        publish(cfg.markdown, "train-accuracy", "Training on real PatchCamelyon patches", "\n".join(lines),
                job="bench_train", cfg=cfg)
    return result


def _plain_loop(files: list[Path], labels: list[int], *, batch_size: int, lr: float, crop: int,
                precision: str, epochs: int) -> list[float]:
    """Images/s of each epoch of the loop a user writes: DataLoader, AdamW, same model, crop, arithmetic.

    On the device Ray Train's worker gets on this machine (its GPU if it has one), in the same arithmetic.
    """
    import torch
    from torch.utils.data import DataLoader

    from hcdlib.commands.train.schedule import training_autocast, trains_in_bf16
    from hcdlib.model.architectures import build_model
    from hcdlib.model.infer import to_device

    device = torch.device(pick(precision, fp16_fallback=False).device)
    bf16 = trains_in_bf16(device, precision)
    torch.set_num_threads(os.cpu_count() or 1)
    model, pre = build_model("hcdnet", crop=crop)
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    loader = DataLoader(FileDataset(files, labels), batch_size=batch_size, shuffle=True, num_workers=1, drop_last=False)
    rates = []
    for _ in range(epochs):
        seen, t0 = 0, time.perf_counter()
        for x, y in loader:
            with training_autocast(device, bf16):
                logits = model(train_preset(to_input(to_device(x, device), pre))).float()
            y = to_device(y, device).float().view(-1, 1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += len(y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        rates.append(seen / (time.perf_counter() - t0))
    return rates


# Epoch 1 of each loop includes one-time start-up (Ray's read-task workers, the DataLoader's
# first fork, allocator warm-up); epoch 2 is the steady state a long run sees.
THROUGHPUT_EPOCHS = 2


def throughput(cfg: BenchTrainConfig) -> dict:
    """Ray Train (1 worker) vs a plain PyTorch loop: two epochs each over the same patch files."""
    import shutil

    from hcdlib.commands.train.run import TrainConfig, train

    items = open_source(cfg.train).items
    rng = np.random.default_rng(0)
    pick = rng.choice(items.num_rows, min(cfg.throughput_n, items.num_rows), replace=False)
    subset = Path(cfg.out) / "throughput-data"
    shutil.rmtree(subset, ignore_errors=True)
    for i in pick:  # class folders of the same files for both loops (hcd follows no links out of a folder)
        src, label = items["source"][int(i)].as_py(), items["label"][int(i)].as_py()
        d = subset / str(label)
        d.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, d / os.path.basename(src))
        except OSError:  # another file system
            shutil.copyfile(src, d / os.path.basename(src))
    files = sorted(subset.glob("*/*"))
    defaults = TrainConfig(data="", out="")
    plain = _plain_loop(files, [int(f.parent.name) for f in files], batch_size=defaults.batch_size, lr=defaults.lr,
                        crop=defaults.crop, precision=defaults.precision, epochs=THROUGHPUT_EPOCHS)
    ray_ips, cache_s = {}, 0.0
    for cache in ("auto", "off"):  # decoded once into the object store (the default here), and every epoch
        run = urimod.join(cfg.out, f"throughput-run-{cache}")
        shutil.rmtree(run, ignore_errors=True)
        meta = train(TrainConfig(data=str(subset), val_data=cfg.valid, out=run, epochs=THROUGHPUT_EPOCHS, workers=1,
                                 cache=cache))
        ray_ips[cache] = [h["images_per_s"] for h in meta["history"]]
        if cache == "auto":
            cache_s = meta["data_cache_s"]
            if not cache_s:  # the row below says the data was kept: it must have been
                raise RuntimeError("--cache auto did not keep these patches (object store too small?)")
        if len(ray_ips[cache]) != THROUGHPUT_EPOCHS or not all(ray_ips[cache]) or not all(plain):
            raise RuntimeError(f"a loop trained on no images (plain {plain} images/s, Ray Train {ray_ips}): "
                               "the ratio would be meaningless")
    ratios = {k: [r / p for r, p in zip(v, plain, strict=True)] for k, v in ray_ips.items()}
    result = {"plain_images_per_s": plain, "ray_train_images_per_s": ray_ips, "ratio": ratios, "n": len(files),
              "cache_s": cache_s}
    cols = " | ".join(f"epoch {e + 1}" for e in range(THROUGHPUT_EPOCHS))
    row = " | ".join(["{:.0f}"] * THROUGHPUT_EPOCHS)
    lines = [f"| loop ({len(files)} patches, hcdnet, batch {defaults.batch_size}), images/s | {cols} |",
             "|---|" + "---:|" * THROUGHPUT_EPOCHS, "| plain PyTorch + DataLoader | " + row.format(*plain) + " |"]
    for cache, name in (("auto", "decoded once into the object store (--cache auto)"),
                        ("off", "read and decoded every epoch (--cache off)")):
        lines += [f"| Ray Train, 1 worker, {name} | " + row.format(*ray_ips[cache]) + " |",
                  "| ratio Ray/plain | " + " | ".join(f"{r:.2f}" for r in ratios[cache]) + " |"]
    lines.append(f"\n(--cache auto decoded the patches in {cache_s:.1f} s before Ray Train's epoch 1; the plain loop "
                 "decodes in its DataLoader worker during each epoch)")
    log.info("\n%s", "\n".join(lines))
    if cfg.markdown:

        publish(cfg.markdown, "train-throughput", "Training throughput: Ray Train against a plain PyTorch loop",
                "\n".join(lines), job="bench_train", cfg=cfg)
    return result


def run(cfg: BenchTrainConfig) -> dict:
    """The accuracy benchmark, or the throughput one with ``throughput``."""
    init_ray(dashboard=True)
    return throughput(cfg) if cfg.throughput else accuracy(cfg)
