"""`python -m sparseball train` and `eval`: a tiny run learns; resume is exact; DDP on two gloo
processes equals one process on the union of their batches; config.json reproduces a run;
eval reports held-out test metrics; bad options get errors naming the option."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sparseball.__main__ import build_parser, main
from sparseball.tasks import PointCloudBatch
from sparseball.training import Config, evaluate_run, train
from sparseball.training.checkpoint import CHECKPOINT
from sparseball.training.config import ConfigError, config_from_arguments
from sparseball.training.data import STREAMS, draw, stream_seed
from sparseball.training.loop import autocast, build_model, build_optimizer, train_step
from sparseball.training.metrics import read_log

# A model of ~10k parameters on 2 clouds of 64 points: a step takes a few tens of ms.
TINY = dict(clouds=2, points=64, dim=16, depth=1, heads=2, ball_size=16, compress_size=4,
            select_size=8, group_size=8, top_k=2, frequencies=4, lr=3e-3,
            eval_batches=2, log_every=1, eval_every=0, save_every=0, backend="torch",
            device="cpu")


def tiny(out: Path, **settings) -> Config:
    return Config(**{**TINY, "out": str(out), **settings})


def parameters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def losses(run: Path) -> list[tuple[int, float, float]]:
    return [(row["step"], row["loss"], row["lr"]) for row in read_log(run) if "loss" in row]


def untimed_log(run: Path) -> list[dict]:
    """The log without what depends on the machine's speed."""
    timing = ("step_time_s", "points_per_s", "peak_memory_mb")
    return [{k: v for k, v in row.items() if k not in timing} for row in read_log(run)]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, torch.nn.Module]:
    """A finished 30-step run."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    result = train(tiny(run, steps=30, eval_every=15), progress=False)
    return run, result.model


def test_tiny_run_learns(tiny_run):
    run, _ = tiny_run
    assert {"config.json", "log.jsonl", CHECKPOINT} <= {p.name for p in run.iterdir()}
    assert json.loads((run / "config.json").read_text()) == {**Config().__dict__, **TINY,
                                                             "steps": 30, "eval_every": 15,
                                                             "out": str(run)}
    rows = read_log(run)
    train_losses = [row["loss"] for row in rows if "loss" in row]
    assert len(train_losses) == 30
    assert sum(train_losses[-5:]) / 5 < 0.6 * sum(train_losses[:5]) / 5
    evals = [row["eval_mse"] for row in rows if "eval_mse" in row]
    assert [row["step"] for row in rows if "eval_mse" in row] == [0, 15, 30]
    assert evals[-1] < evals[0]
    for key in ("lr", "grad_norm", "step_time_s", "points_per_s", "peak_memory_mb"):
        assert rows[-1][key] > 0, key
    pytest.importorskip("matplotlib")
    assert (run / "loss.png").stat().st_size > 0


def test_resume_is_exact(tmp_path):
    """Six steps in one go equal three, a stop, and three more from the checkpoint: the same
    parameters and logged losses, bit for bit (the log window of 2 steps spans the stop)."""
    settings = dict(steps=6, log_every=2, eval_every=3)
    whole = train(tiny(tmp_path / "whole", **settings), progress=False, plot=False)
    train(tiny(tmp_path / "split", **settings), stop_after=3, progress=False, plot=False)
    assert max(row["step"] for row in read_log(tmp_path / "split")) == 3
    main(["train", "--resume", str(tmp_path / "split"), "--no-progress"])
    state = torch.load(tmp_path / "split" / CHECKPOINT, weights_only=True)
    assert state["step"] == 6
    for name, value in parameters(whole.model).items():
        assert torch.equal(state["model"][name], value), name
    assert untimed_log(tmp_path / "split") == untimed_log(tmp_path / "whole")


def _ddp_worker(rank: int, port: int, settings: dict, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result = train(Config(**settings), progress=False, plot=False)
    torch.save(parameters(result.model), Path(out) / f"rank{rank}.pt")


def _union(batches: list[PointCloudBatch]) -> PointCloudBatch:
    """One batch of the clouds of `batches`: what a single process sees of several ranks."""
    first_cloud = [0]
    for batch in batches[:-1]:
        first_cloud.append(first_cloud[-1] + int(batch.batch.max()) + 1)
    return dataclasses.replace(
        batches[0], pos=torch.cat([b.pos for b in batches]), x=torch.cat([b.x for b in batches]),
        y=torch.cat([b.y for b in batches]),
        batch=torch.cat([b.batch + first for b, first in zip(batches, first_cloud, strict=True)]))


def test_ddp_equals_one_process_on_the_union(tmp_path):
    """Two gloo processes, each on its own data stream, end with the same parameters, equal to
    one process stepping on both ranks' batches at once (the clouds have equal sizes, so the
    mean of the two ranks' mean losses is the union's mean loss)."""
    cfg = tiny(tmp_path / "ddp", steps=4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    mp.spawn(_ddp_worker, args=(port, dataclasses.asdict(cfg), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    optimizer, scheduler = build_optimizer(cfg, model)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    union_losses = []
    for step in range(1, cfg.steps + 1):
        union = _union([draw(cfg, "train", step, rank=rank) for rank in (0, 1)])
        out = train_step(model, union, optimizer, scheduler, scaler, cfg, autocast(cfg, torch.device("cpu")))
        union_losses.append(out["loss"].item())
    for name, value in parameters(model).items():
        assert torch.equal(rank0[name], rank1[name]), name
        tolerance = torch.full_like(value, 1e-6)
        if name.endswith("attention.qkv.bias"):
            # The key bias adds q.b to all logits of a query, which the softmax ignores: its
            # exact gradient is 0 (no padding here), so it gets rounding noise, which Adam
            # scales up to steps of about lr. Both runs keep it within that.
            tolerance[cfg.dim:2 * cfg.dim] = cfg.lr * cfg.steps
        assert ((rank0[name] - value).abs() <= tolerance).all(), name
    logged = [loss for _, loss, _ in losses(tmp_path / "ddp")]
    torch.testing.assert_close(logged, union_losses, rtol=1e-6, atol=0)


def test_config_round_trip(tmp_path, tiny_run):
    cfg = tiny(tmp_path / "x", points=[32, 96], screening=0.5, message_passing=True)
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg
    args = build_parser().parse_args(
        ["train", "--points", "32-96", "--screening", "0.5", "--message-passing",
         "--model", "ball", "--lr", "1e-4"])
    assert config_from_arguments(args) == Config(points=[32, 96], screening=0.5,
                                                 message_passing=True, model="ball", lr=1e-4)
    args = build_parser().parse_args(
        ["train", "--far-field", "tree", "--compress-size", "32", "--select-size", "32",
         "--fanout", "8", "--top-blocks", "64"])
    assert config_from_arguments(args) == Config(far_field="tree", compress_size=32,
                                                 select_size=32, fanout=8, top_blocks=64)
    with pytest.raises(ConfigError, match="--select-size must equal --compress-size = 16"):
        Config(far_field="tree").validate()
    with pytest.raises(ConfigError, match="--fanout must be >= 2"):
        Config(far_field="tree", select_size=16, fanout=1).validate()
    # A run reproduces from its config.json: the same losses and weights.
    run, model = tiny_run
    again = tmp_path / "again"
    main(["train", "--config", str(run / "config.json"), "--out", str(again), "--no-progress"])
    assert losses(again) == losses(run)
    state = torch.load(again / CHECKPOINT, weights_only=True)
    assert all(torch.equal(state["model"][name], p) for name, p in parameters(model).items())


def test_eval_reports_held_out_test_metrics(tiny_run, capsys):
    run, _ = tiny_run
    cfg = Config.load(run / "config.json")
    assert len({stream_seed(cfg.seed, stream) for stream in STREAMS}) == len(STREAMS)
    test_pos = draw(cfg, "test", 0).pos
    assert not any(torch.equal(draw(cfg, "train", step).pos, test_pos) for step in range(1, 31))
    main(["eval", str(run), "--batches", "2", "--no-progress"])
    printed = capsys.readouterr().out
    assert "rel. L2" in printed and "per cloud" in printed and "held-out" in printed
    report = json.loads((run / "eval.json").read_text())
    assert report["step"] == 30 and report["batches"] == 2
    assert all(0 < report[key] < float("inf") for key in ("rel_l2", "cloud_rel_l2", "mse"))
    # More points per cloud than in training: the same weights, another test set.
    assert evaluate_run(run, batches=1, points=128, progress=False)["points"] == 128


@pytest.mark.parametrize("argv, message", [
    (["--points", "1"], "--points must be >= 2, got 1"),
    (["--points", "9-4"], "--points must be N or LOW-HIGH with 2 <= LOW <= HIGH"),
    (["--points", "many"], "argument --points: expected N or LOW-HIGH"),
    (["--heads", "3"], "--heads must divide --dim"),
    (["--ball-size", "48"], "--ball-size must be a power of two, got 48"),
    (["--compress-size", "128"], "--compress-size must be <= --ball-size = 64"),
    (["--steps", "0"], "--steps must be >= 1"),
    (["--warmup", "1"], "--warmup must be in [0, 1)"),
    (["--lr", "-1"], "--lr must be a finite number > 0"),
    (["--model", "dense"], "argument --model: invalid choice"),
    (["--precision", "fp16", "--device", "cpu"], "--precision fp16 needs a CUDA device"),
    (["--device", "tpu"], "--device must be cpu, cuda, cuda:N or auto"),
    (["--stop-after", "0"], "--stop-after must be >= 1"),
])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", *argv])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_runs(tmp_path, tiny_run, capsys):
    run, _ = tiny_run
    for argv, message in [
        (["train", "--resume", str(tmp_path)], f"--resume {tmp_path}: no {CHECKPOINT} in"),
        (["train", "--resume", str(run), "--lr", "1"], "--lr cannot change"),
        (["train", "--out", str(run)], "already holds a run"),
        (["train", "--config", str(tmp_path / "missing.json")], "--config"),
        (["eval", str(tmp_path)], f"no config.json in {tmp_path}"),
    ]:
        with pytest.raises(SystemExit):
            main(argv)
        assert message in capsys.readouterr().err, argv
