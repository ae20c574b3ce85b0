"""What a run measures and where it goes: relative L2 error, `log.jsonl`, `loss.png`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch

from sparseball.tasks import PointCloudBatch

from . import distributed
from .config import Config
from .data import model_inputs

LOG = "log.jsonl"
PLOT = "loss.png"


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[PointCloudBatch], cfg: Config,
             precision) -> dict:
    """Errors of `model` on `batches`, summed over every rank's share of them:

    - `rel_l2`: `||prediction - y|| / ||y||` over all points and components of the batches,
      the headline number (1 for a model that predicts zeros); it weighs points as the MSE
      loss does;
    - `cloud_rel_l2`: the same per cloud, averaged over clouds (clouds of weak fields count as
      much as those of strong ones);
    - `mse`: the mean squared error per component, in target units (as the train loss).
    """
    was_training = model.training
    model.eval()
    # Sums of squared errors, of squared targets and of per-cloud relative errors.
    sums = torch.zeros(3, dtype=torch.float64, device=next(model.parameters()).device)
    clouds = components = 0
    for batch in batches:
        with precision():
            prediction = model(*model_inputs(cfg, batch)).float()
        error, norm = (prediction - batch.y).square().sum(1), batch.y.square().sum(1)
        count = int(batch.batch.max()) + 1
        cloud_error = error.new_zeros(count).index_add_(0, batch.batch, error)
        cloud_norm = error.new_zeros(count).index_add_(0, batch.batch, norm)
        sums += torch.stack([error.sum(), norm.sum(), (cloud_error / cloud_norm).sqrt().sum()])
        clouds, components = clouds + count, components + batch.y.numel()
    model.train(was_training)
    totals = distributed.all_reduce_sum(torch.cat([sums, sums.new_tensor([clouds, components])]))
    error, norm, cloud_rel_l2, clouds, components = totals.tolist()
    return {"rel_l2": (error / norm) ** 0.5, "cloud_rel_l2": cloud_rel_l2 / clouds,
            "mse": error / components}


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors, or on the CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # kB on Linux


class MetricsLog:
    """`log.jsonl`: one JSON object per line, each with its `step`."""

    def __init__(self, run: Path, keep_until: int | None = None):
        """Appends to the run's log; `keep_until` first drops lines past that step (a resumed
        run repeats the steps after its checkpoint)."""
        self.path = run / LOG
        if keep_until is not None and self.path.exists():
            rows = [row for row in read_log(run) if row["step"] <= keep_until]
            self.path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def write(self, row: dict) -> None:
        with self.path.open("a") as file:
            file.write(json.dumps(row) + "\n")


def read_log(run: Path) -> list[dict]:
    path = Path(run) / LOG
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot(run: Path) -> Path | None:
    """`loss.png`: train loss and validation error against step; None (with a note) when
    matplotlib is not installed (`pip install sparseball[plots]`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss.png skipped: matplotlib is not installed (pip install 'sparseball[plots]')")
        return None
    rows = read_log(run)
    figure, loss_axis = plt.subplots(figsize=(7, 4))
    error_axis = loss_axis.twinx()
    for axis, key, style, label in [
            (loss_axis, "loss", "-", "train loss (MSE, mean since the previous line)"),
            (loss_axis, "eval_mse", "s-", "validation MSE"),
            (error_axis, "eval_rel_l2", "o--", "validation rel. L2 (right)")]:
        points = [(row["step"], row[key]) for row in rows if key in row]
        if points:
            axis.plot(*zip(*points, strict=True), style, label=label,
                      color={"loss": "tab:blue", "eval_mse": "navy"}.get(key, "tab:orange"))
    loss_axis.set(xlabel="step", ylabel="MSE (target units)", yscale="log")
    error_axis.set_ylabel("validation relative L2 error")
    figure.legend(loc="upper right", bbox_to_anchor=(0.88, 0.88), fontsize=8)
    figure.suptitle(Path(run).name, fontsize=9)
    figure.tight_layout()
    path = Path(run) / PLOT
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
