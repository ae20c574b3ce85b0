"""`python -m sparseball eval RUN`: a run's errors on fresh test clouds, drawn from the test
stream (held-out seeds that neither training nor validation ever drew)."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from . import checkpoint, metrics
from .config import Config, ConfigError, resolve_device
from .data import draw
from .loop import CONFIG, autocast, build_model

RESULT = "eval.json"


def evaluate_run(run: str | Path, *, batches: int = 8, clouds: int | None = None,
                 points: int | list[int] | None = None, device: str | None = None,
                 progress: bool = True) -> dict:
    """Test metrics of the last checkpoint of `run` on `batches` test batches (of the run's
    clouds and points unless given), printed as a table and written to `run/eval.json`."""
    run = Path(run)
    for needed in (CONFIG, checkpoint.CHECKPOINT):
        if not (run / needed).exists():
            raise ConfigError(f"eval {run}: no {needed} in {run}")
    if batches < 1:
        raise ConfigError(f"--batches must be >= 1, got {batches}")
    cfg = Config.load(run / CONFIG)
    cfg = replace(cfg, clouds=clouds or cfg.clouds, points=points or cfg.points,
                  device=device or cfg.device).validate()
    where = resolve_device(cfg.device)
    model = build_model(cfg).to(where)
    step = checkpoint.load_model_weights(run, model, where)
    test = (draw(cfg, "test", i, device=where) for i in range(batches))
    start = time.perf_counter()
    result = metrics.evaluate(model, tqdm(test, total=batches, desc="eval", unit="batch",
                                          disable=not progress), cfg, autocast(cfg, where))
    report = {
        "run": str(run), "step": step, "steps": cfg.steps, "task": cfg.task, "model": cfg.model,
        "parameters": sum(p.numel() for p in model.parameters()),
        "batches": batches, "clouds": cfg.clouds, "points": cfg.points,
        "target_unit": cfg.target_unit, "device": str(where),
        **result,
        "seconds": time.perf_counter() - start,
    }
    (run / RESULT).write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return report


def print_report(report: dict) -> None:
    points = report["points"]
    points = f"{points[0]}-{points[1]}" if isinstance(points, list) else points
    rows = [
        ("run", f"{report['run']} (step {report['step']} of {report['steps']})"),
        ("model", f"{report['model']}, {report['parameters']:,} parameters"),
        ("test set", f"{report['batches']} batches x {report['clouds']} clouds x {points} points "
                     f"of {report['task']}, held-out seeds"),
        ("rel. L2", f"{report['rel_l2']:.4f}  (|prediction - y| / |y| over all test points)"),
        ("per cloud", f"{report['cloud_rel_l2']:.4f}  (the same per cloud, mean over clouds)"),
        ("MSE", f"{report['mse']:.4g}  (per component, targets in units of "
                f"{report['target_unit']:g})"),
        ("time", f"{report['seconds']:.1f} s on {report['device']}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
