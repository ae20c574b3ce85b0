"""`checkpoint.pt`: everything a run needs to continue exactly where it stopped.

The data stream needs no state of its own: batch `step` of rank `r` is a function of
`(seed, r, step)`, so the step is the stream's position. The RNG states are saved anyway, for
whatever draws random numbers later (none of today's models do in training).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

CHECKPOINT = "checkpoint.pt"


def save(run: Path, *, model, optimizer, scheduler, scaler, step: int, world_size: int,
         loss_window: tuple[torch.Tensor, int]) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "step": step,
        # The data stream's position: the next batch is `step + 1` of each of `world_size` ranks.
        "data": {"next_step": step + 1, "world_size": world_size},
        # The train loss summed over the steps since the last log line, and their number.
        "loss_window": {"sum": loss_window[0].cpu(), "count": loss_window[1]},
        "rng": {"cpu": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
    }
    # Written aside and renamed: a run killed while saving keeps its previous checkpoint.
    partial = run / (CHECKPOINT + ".partial")
    torch.save(state, partial)
    os.replace(partial, run / CHECKPOINT)


def load(run: Path, *, model, optimizer, scheduler, scaler, device: torch.device) -> dict:
    """Restores the states in place; returns the checkpoint (its `step`, `data`, ...)."""
    state = torch.load(run / CHECKPOINT, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"]["cpu"].cpu())
    if torch.cuda.is_available():
        for index, rng in enumerate(state["rng"]["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(rng.cpu(), index)
    return state


def load_model_weights(run: Path, model, device: torch.device) -> int:
    """Loads the model's weights alone (for evaluation); returns the checkpoint's step."""
    state = torch.load(run / CHECKPOINT, map_location=device, weights_only=True)
    model.load_state_dict(state["model"])
    return state["step"]
