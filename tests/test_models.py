"""The layers of `sparseball.nn` and the `ErwinNSA` model: shapes, gradients, permutation
equivariance, cloud isolation, padding, mixed precision and argument errors, for the model and
its two baselines."""

from __future__ import annotations

import pytest
import torch

import sparseball
from sparseball.models import ATTENTIONS, ErwinNSA
from sparseball.nn import BallNSA, LeafMessagePassing

SMALL = dict(dim=32, heads=2, depth=2, ball_size=16, compress_size=4, select_size=8,
             group_size=8, top_k=2)
devices = pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])


def _clouds(sizes, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    pos = torch.rand(n, 3, generator=generator)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    shuffle = torch.randperm(n, generator=generator)
    x = torch.rand(n, 2, generator=generator)
    return x[shuffle].to(device), pos[shuffle].to(device), batch[shuffle].to(device)


def _model(attention, seed=0, **kwargs):
    torch.manual_seed(seed)
    return ErwinNSA(2, 3, attention=attention, message_passing=True, **{**SMALL, **kwargs})


@devices
@pytest.mark.parametrize("attention", ATTENTIONS)
def test_forward_backward(attention, device):
    x, pos, batch = _clouds([37, 1, 60], device=device)
    model = _model(attention).to(device)
    out = model(x, pos, batch)
    assert out.shape == (x.shape[0], 3) and torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # The learned compression starts at zero (mean pooling) but learns from the first step.
    if attention == "nsa":
        assert model.blocks[0].attention.compressor.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_permutation_equivariance(attention):
    """Shuffling the input points shuffles the outputs the same way: the tree puts the points
    into the same slots whatever their input order (distinct positions)."""
    x, pos, batch = _clouds([50, 29])
    model = _model(attention).eval()
    shuffle = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x, pos, batch)
        moved = model(x[shuffle], pos[shuffle], batch[shuffle])
    torch.testing.assert_close(moved, out[shuffle], rtol=0, atol=0)


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_clouds_are_isolated(attention):
    """Changing every point of one cloud changes no output of another."""
    x, pos, batch = _clouds([40, 33, 17])
    model = _model(attention).eval()
    other = batch == 1
    x2, pos2 = x.clone(), pos.clone()
    x2[other] = torch.rand(int(other.sum()), 2)
    pos2[other] = torch.rand(int(other.sum()), 3)
    with torch.no_grad():
        out, out2 = model(x, pos, batch), model(x2, pos2, batch)
    torch.testing.assert_close(out2[~other], out[~other], rtol=0, atol=0)


TREE = dict(far_field="tree", compress_size=4, select_size=4, fanout=2, top_blocks=3)


def test_tree_far_field_model():
    """`far_field="tree"`: every parameter learns, clouds stay isolated, and the model is a
    different one from flat NSA with the same weights (its global branches see other keys)."""
    x, pos, batch = _clouds([37, 1, 60, 150])
    model = _model("nsa", **TREE)
    out = model(x, pos, batch)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    flat = _model("nsa", **{**TREE, "far_field": "flat"})
    with torch.no_grad():
        assert not torch.allclose(flat(x, pos, batch), out)
        other = batch == 3
        x2 = x.clone()
        x2[other] = torch.rand(int(other.sum()), 2)
        torch.testing.assert_close(model(x2, pos, batch)[~other], out[~other], rtol=0, atol=0)
    with pytest.raises(ValueError, match="select_size must equal compress_size"):
        _model("nsa", **{**TREE, "select_size": 8})


def test_parameter_counts_within_ten_percent():
    """The baselines get the model's budget: parameter counts within 10% at the defaults and
    at the small test size."""
    for kwargs in ({}, SMALL):
        counts = {a: sum(p.numel() for p in ErwinNSA(1, 3, attention=a, **kwargs).parameters())
                  for a in ATTENTIONS}
        assert max(counts.values()) <= 1.1 * min(counts.values()), counts


@pytest.mark.parametrize("layer", ["nsa", "message_passing"])
def test_padding_never_acts(layer):
    """Whatever padding slots hold, the outputs of real slots stay the same (a layer sees
    features in slot order, padding included)."""
    _, pos, batch = _clouds([37, 21])
    tree = sparseball.build_tree(pos, batch, ball_size=16, rotations=1).rotated_tree(0)
    torch.manual_seed(0)
    module = (BallNSA(32, 2, ball_size=16, compress_size=4, select_size=8, group_size=8, top_k=2)
              if layer == "nsa" else LeafMessagePassing(32, leaf_size=8, neighbours=3))
    if layer == "nsa":  # a compressor that acts from the start
        torch.nn.init.normal_(module.compressor.weight)
    h = torch.randn(tree.num_slots, 32)
    poisoned = torch.where(tree.mask[:, None], h, torch.randn_like(h) * 100)
    with torch.no_grad():
        real = tree.mask
        torch.testing.assert_close(module(poisoned, tree)[real], module(h, tree)[real],
                                   rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
def test_autocast(dtype):
    x, pos, batch = _clouds([45, 20])
    model = _model("nsa")
    with torch.autocast("cpu", dtype=dtype):
        out = model(x, pos, batch)
    out.float().square().mean().backward()
    assert model.blocks[0].attention.sigma.grad.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_prebuilt_tree_gives_the_same_output():
    x, pos, batch = _clouds([30, 30])
    model = _model("nsa").eval()
    tree = sparseball.build_tree(pos, batch, ball_size=32, rotations=1)
    with torch.no_grad():
        assert torch.isfinite(model(x, pos, batch, tree=tree)).all()
        torch.testing.assert_close(model(x, pos, batch, tree=model.build_tree(pos, batch)),
                                   model(x, pos, batch), rtol=0, atol=0)


def test_bad_arguments():
    x, pos, batch = _clouds([30])
    model = _model("nsa")
    with pytest.raises(ValueError, match="attention must be one of"):
        ErwinNSA(2, 3, attention="linear")
    with pytest.raises(ValueError, match="select_size must be <= ball_size"):
        ErwinNSA(2, 3, ball_size=16, compress_size=8, select_size=32)
    with pytest.raises(ValueError, match=r"dim must be a multiple of heads"):
        ErwinNSA(2, 3, dim=30, heads=4)
    with pytest.raises(ValueError, match=r"x must have shape \(N, in_dim\) = \(30, 2\)"):
        model(x[:, :1], pos, batch)
    with pytest.raises(ValueError, match=r"pos must have shape \(N, pos_dim\)"):
        model(x, pos[:, :2], batch)
    with pytest.raises(ValueError, match="tree must have a rotated ordering"):
        model(x, pos, batch, tree=sparseball.build_tree(pos, batch, ball_size=16))
    with pytest.raises(ValueError, match="tree must have ball_size >= 16"):
        model(x, pos, batch, tree=sparseball.build_tree(pos, batch, ball_size=8, rotations=1))
    with pytest.raises(ValueError, match="compression must be 'mlp' or 'mean'"):
        BallNSA(32, 2, compression="max")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compile_builds_the_tree_inside_without_recompiles(device):
    """`torch.compile(model)` with the tree built inside `forward` (a deliberate graph break
    around the builder: CuPy on CUDA, Numba on the CPU): a second batch of the same cloud sizes
    compiles nothing new, and the outputs and gradients are those of the eager model. On the
    CPU the graphs run through `aot_eager` (dynamo and autograd tracing, no code generation:
    seconds instead of minutes)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    model = _model("nsa", depth=2).to(device)
    compiled = torch.compile(model, backend="aot_eager" if device == "cpu" else "inductor")
    frames = []
    for seed in (1, 2):
        x, pos, batch = _clouds([40, 33], seed=seed, device=device)
        model.zero_grad()
        out = compiled(x, pos, batch)
        out.square().sum().backward()
        frames.append(counters["frames"]["total"])
    assert frames[0] == frames[1], f"recompiled on a new batch: {frames}"
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = model(x, pos, batch)
    expected.square().sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, (p.grad for p in model.parameters()), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3 * float(want.abs().max()))


@pytest.mark.gpu
def test_training_step_never_syncs():
    """An eager forward, backward and optimizer step of the model on a prebuilt tree (bf16
    autocast) makes no host sync: `from_slots` gathers by `tree.point_slot`, the ops take
    their sizes from the host-side offsets."""
    x, pos, batch = _clouds([300, 200], device="cuda")
    model = _model("nsa").cuda()
    optimizer = torch.optim.AdamW(model.parameters(), fused=True)

    def step(tree):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, pos, batch, tree=tree).float().square().mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    step(model.build_tree(pos, batch))  # kernels compile here
    tree = model.build_tree(pos, batch)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(tree)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_import_stays_light():
    """Importing the model, layers and tasks imports neither dynamo nor triton: the Triton
    tests must import the kernels first, under TRITON_INTERPRET=1, and a CPU user pays for
    neither."""
    import subprocess
    import sys

    code = ("import sys, sparseball.models, sparseball.nn, sparseball.tasks; "
            "print(sorted(m for m in ('triton', 'torch._dynamo') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.mark.parametrize("bias_elements", [1 << 28, 50])
def test_cloud_attention_is_exact(bias_elements):
    """CloudAttention against a dense float64 softmax over each cloud's real points with the
    distance bias, in whole clouds or in query blocks (a budget of 50 bias elements: blocks of
    one to a few queries)."""
    from sparseball.nn import CloudAttention

    _, pos, batch = _clouds([37, 21, 8])
    tree = sparseball.build_tree(pos.double(), batch, ball_size=16)
    torch.manual_seed(0)
    layer = CloudAttention(32, 2, ball_size=16, bias_elements=bias_elements).double()
    with torch.no_grad():
        layer.sigma.copy_(torch.tensor([-0.7, 0.4]))
    h = torch.randn(tree.num_slots, 32, dtype=torch.float64)
    with torch.no_grad():
        got = layer(h, tree)
        q, k, v = (t.transpose(0, 1) for t in layer._qkv(h, tree))         # [H, M, D]
        same_cloud = tree.slot_cloud[:, None] == tree.slot_cloud[None, :]
        allowed = same_cloud & tree.mask[None, :]
        logits = q @ k.transpose(1, 2) / 4 + layer.sigma.view(-1, 1, 1) * torch.cdist(
            tree.pos.double(), tree.pos.double())
        weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
        want = layer.proj((weights @ v).transpose(0, 1).reshape(tree.num_slots, 32))
    # cdist's matrix-product form: distances to ~1e-8 in float64.
    torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-7)
