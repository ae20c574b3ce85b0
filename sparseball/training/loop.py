"""The training loop of `python -m sparseball train`.

Per step: draw this rank's batch, forward under autocast, MSE on the targets (a mean over this
rank's points; DistributedDataParallel averages the gradients over ranks), clip, AdamW step,
warmup + cosine schedule. Rank 0 writes the run directory: `config.json`, `log.jsonl`,
`checkpoint.pt` and `loss.png`.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from sparseball.models import ErwinNSA

from . import checkpoint, distributed, metrics
from .config import Config, ConfigError
from .data import draw, model_inputs

CONFIG = "config.json"


@dataclass
class TrainResult:
    model: ErwinNSA
    run: Path
    eval: dict  # the last validation metrics: rel_l2, mse


def train(cfg: Config, *, resume: bool = False, stop_after: int | None = None,
          progress: bool = True, plot: bool = True) -> TrainResult:
    """Trains `cfg` (from scratch, or continuing the run in `cfg.out` when `resume`), on every
    process torchrun started. `stop_after` ends this call after that step, as if the job were
    stopped there: `--resume` continues it exactly."""
    cfg = resolve(cfg.validate())
    run = Path(cfg.out)
    if resume and not (run / checkpoint.CHECKPOINT).exists():
        raise ConfigError(f"--resume {run}: no {checkpoint.CHECKPOINT} in {run}")
    if not resume and (run / checkpoint.CHECKPOINT).exists():
        raise ConfigError(f"--out {run} already holds a run ({checkpoint.CHECKPOINT}): continue "
                          f"it with --resume {run}, or choose another --out")
    world = distributed.init(cfg.device)
    try:
        result = _train(cfg, run, world, resume, stop_after, progress, plot)
        # The other ranks finish before rank 0 has saved and plotted; tearing the group down
        # while a peer still holds its connections aborts a process (gloo: "terminate called
        # without an active exception", seen in CI). Leave together.
        distributed.barrier()
        return result
    finally:
        distributed.shutdown()


def resolve(cfg: Config) -> Config:
    """`cfg` with its run directory made explicit (`runs/<time>-<task>-<model>` by default)."""
    if cfg.out is not None:
        return cfg
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, suffix = Path("runs") / f"{stamp}-{cfg.task}-{cfg.model}", 1
    while out.exists():
        suffix += 1
        out = Path("runs") / f"{stamp}-{cfg.task}-{cfg.model}-{suffix}"
    return replace(cfg, out=str(out))


def build_model(cfg: Config) -> ErwinNSA:
    probe = draw(cfg, "validation", 0, clouds=1, points=2)  # the task's feature and target sizes
    x, pos, _ = model_inputs(cfg, probe)
    return ErwinNSA(
        x.shape[1], probe.y.shape[1], dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
        attention=cfg.model, ball_size=cfg.ball_size, compress_size=cfg.compress_size,
        select_size=cfg.select_size, group_size=cfg.group_size, top_k=cfg.top_k,
        pos_dim=pos.shape[1], frequencies=cfg.frequencies,
        # The Fourier features resolve the unit cube of the task, in model units, downwards.
        position_scale=1 / cfg.length_unit, message_passing=cfg.message_passing,
        checkpoint=cfg.activation_checkpointing, backend=cfg.backend, far_field=cfg.far_field,
        fanout=cfg.fanout, top_blocks=cfg.top_blocks)


def build_optimizer(cfg: Config, model: nn.Module):
    """AdamW; the learning rate rises linearly over the warmup, then follows a cosine to 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    warmup = int(cfg.warmup * cfg.steps)

    def factor(done: int) -> float:  # `done` optimizer steps taken before this one
        if done < warmup:
            return (done + 1) / (warmup + 1)
        return 0.5 * (1 + math.cos(math.pi * (done - warmup) / max(1, cfg.steps - warmup)))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast(cfg: Config, device: torch.device):
    """A factory of autocast contexts for `cfg.precision` (none for "32")."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    if dtype is None:
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=dtype)


def train_step(model, batch, optimizer, scheduler, scaler, cfg: Config, precision) -> dict:
    """One optimizer step on `batch`; returns this rank's loss (a tensor: no device sync), the
    gradient norm before clipping and the learning rate used."""
    with precision():
        prediction = model(*model_inputs(cfg, batch))
    loss = F.mse_loss(prediction.float(), batch.y)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
    lr = optimizer.param_groups[0]["lr"]
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return {"loss": loss.detach(), "grad_norm": grad_norm, "lr": lr}


class Window:
    """The train loss, steps and points since the last log line. The loss sum and count go
    into checkpoints, so that a resumed run's next line averages the same steps; the clock
    (step times, throughput) restarts."""

    def __init__(self, device: torch.device, loss_sum: torch.Tensor | None = None, count: int = 0):
        self.loss_sum = torch.zeros((), dtype=torch.float64) if loss_sum is None else loss_sum
        self.loss_sum, self.count = self.loss_sum.to(device), count
        self._restart_clock()

    def add(self, loss: torch.Tensor, points: int) -> None:
        self.loss_sum += loss
        self.count, self.steps, self.points = self.count + 1, self.steps + 1, self.points + points

    def pause(self, seconds: float) -> None:
        self.start += seconds

    def row(self, world: distributed.World) -> dict:
        """The line's loss (averaged over the steps and the ranks) and speed; restarts."""
        mean_loss = distributed.all_reduce_sum(self.loss_sum.clone()) / (world.size * self.count)
        seconds = time.perf_counter() - self.start
        row = {"loss": mean_loss.item(), "step_time_s": seconds / self.steps,
               "points_per_s": self.points * world.size / seconds,
               "peak_memory_mb": metrics.peak_memory_mb(world.device)}
        self.loss_sum.zero_()
        self.count = 0
        self._restart_clock()
        return row

    def _restart_clock(self) -> None:
        self.start, self.steps, self.points = time.perf_counter(), 0, 0


def _setup(cfg: Config, run: Path, world: distributed.World, resume: bool):
    """Model, optimizer, schedule, scaler and loss window: new, or as `run` saved them."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg).to(world.device)
    optimizer, scheduler = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler(world.device.type, enabled=cfg.precision == "fp16")
    if not resume:
        if world.is_main:
            run.mkdir(parents=True, exist_ok=True)
            cfg.save(run / CONFIG)
        return model, optimizer, scheduler, scaler, 0, Window(world.device)
    state = checkpoint.load(run, model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, device=world.device)
    if world.is_main and state["data"]["world_size"] != world.size:
        print(f"warning: {run} ran on {state['data']['world_size']} processes and resumes on "
              f"{world.size}: its data streams differ from an uninterrupted run's")
    window = Window(world.device, state["loss_window"]["sum"], state["loss_window"]["count"])
    return model, optimizer, scheduler, scaler, state["step"], window


def _train(cfg, run, world, resume, stop_after, progress, plot) -> TrainResult:
    main = world.is_main
    model, optimizer, scheduler, scaler, start, window = _setup(cfg, run, world, resume)
    log = metrics.MetricsLog(run, keep_until=start) if main else None
    stepped = DistributedDataParallel(model) if world.size > 1 else model
    if cfg.compile:
        stepped = torch.compile(stepped)
    precision = autocast(cfg, world.device)
    validation = [draw(cfg, "validation", i, device=world.device)
                  for i in range(world.rank, cfg.eval_batches, world.size)]
    last_eval = {}

    def evaluate() -> dict:
        nonlocal last_eval
        last_eval = metrics.evaluate(model, validation, cfg, precision)
        return {f"eval_{name}": value for name, value in last_eval.items()}

    if not resume:
        row = {"step": 0, **evaluate()}  # the untrained model's error
        if main:
            log.write(row)
    stop = min(cfg.steps, stop_after or cfg.steps)
    bar = tqdm(total=cfg.steps, initial=start, desc=run.name, unit="step", dynamic_ncols=True,
               disable=not (progress and main))
    postfix = {}
    for step in range(start + 1, stop + 1):
        batch = draw(cfg, "train", step, rank=world.rank, device=world.device)
        out = train_step(stepped, batch, optimizer, scheduler, scaler, cfg, precision)
        window.add(out["loss"], batch.num_points)
        row = {"step": step}
        if step % cfg.log_every == 0 or step == cfg.steps:
            row.update(lr=out["lr"], grad_norm=out["grad_norm"].item(),
                       **window.row(world))
        if (cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps:
            eval_start = time.perf_counter()
            row.update(evaluate())
            window.pause(time.perf_counter() - eval_start)  # step times leave evaluation out
        postfix.update({k: f"{row[k]:.4g}" for k in ("loss", "eval_rel_l2") if k in row})
        bar.set_postfix(postfix, refresh=False)
        if main and len(row) > 1:
            log.write(row)
        if main and (step == stop or (cfg.save_every and step % cfg.save_every == 0)):
            checkpoint.save(run, model=model, optimizer=optimizer, scheduler=scheduler,
                            scaler=scaler, step=step, world_size=world.size,
                            loss_window=(window.loss_sum, window.count))
        bar.update()
    bar.close()
    if main:
        if plot:
            metrics.plot(run)
        summary = f", validation rel. L2 {last_eval['rel_l2']:.4f}" if last_eval else ""
        print(f"{run}: step {max(start, stop)} of {cfg.steps}{summary}")
    return TrainResult(model, run, last_eval)
