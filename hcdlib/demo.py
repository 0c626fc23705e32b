"""``hcd demo``: the whole product end to end on an embedded synthetic archive, no downloads.

    hcd demo --out hcd-demo

1. synthesize a training archive and a separate test archive (other slides) of H&E patches;
2. train the default CNN with Ray Train for a couple of minutes;
3. batch-score the test archive with Ray Data (committed Parquet predictions);
4. evaluate against the test labels: metrics.json, figures and report.html.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from hcdlib import uri as urimod

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo does."""

    out: str = "hcd-demo"
    n: int = 3000
    minutes: float = 2.0


def run_demo(cfg: DemoConfig) -> dict:
    """Run every stage; return where each output went."""
    from hcdlib.evaluate import EvalConfig, evaluate
    from hcdlib.rayutil import init_ray
    from hcdlib.score import ScoreConfig, score
    from hcdlib.synth import SynthConfig, write_synth
    from hcdlib.train import TrainConfig, train

    paths = {k: urimod.join(cfg.out, k) for k in ("train_data", "test_data", "run", "predictions", "report")}
    log.info("[1/4] synthesizing %d training and %d test patches", cfg.n, cfg.n // 3)
    write_synth(SynthConfig(out=paths["train_data"], n=cfg.n, slides=8, seed=1))
    write_synth(SynthConfig(out=paths["test_data"], n=cfg.n // 3, slides=4, seed=2))
    init_ray()
    log.info("[2/4] training for up to %.1f minutes", cfg.minutes)
    meta = train(TrainConfig(data=paths["train_data"], out=paths["run"], epochs=6, batch_size=64,
                             time_budget_min=cfg.minutes))
    log.info("[3/4] scoring the test archive")
    model_uri = urimod.join(paths["run"], "model")
    scored = score(ScoreConfig(model=model_uri, input=paths["test_data"], out=paths["predictions"], overwrite=True))
    log.info("[4/4] evaluating")
    labels = urimod.join(paths["test_data"], "labels.csv")
    metrics = evaluate(EvalConfig(predictions=paths["predictions"], labels=labels,
                                  out=paths["report"]))
    log.info("\n== hcd demo done ==\n model        %s (validation AUC %.4f)\n predictions  %s (%d rows, manifest %s)\n"
             " test AUC     %.4f (95%% CI %.4f-%.4f)\n report       %s",
             model_uri, meta["metrics"].get("val_auc", float("nan")), paths["predictions"], scored["rows"],
             scored["manifest_uri"], metrics["patch"]["roc_auc"], *metrics["patch"]["roc_auc_ci95"],
             urimod.join(paths["report"], "report.html"))
    return {**paths, "model": model_uri, "report_html": urimod.join(paths["report"], "report.html")}
