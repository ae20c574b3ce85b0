"""The public API's argument checks and backend dispatch: every bad input gets an error that
names the argument; a forced backend never falls back silently."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import sparseball
from sparseball import ops
from sparseball.backends import BACKENDS, default_backend, select_backend

P = 16
H, D = 2, 8


@pytest.fixture(scope="module")
def tree():
    generator = torch.Generator().manual_seed(0)
    pos = torch.randn(53, 3, generator=generator)
    batch = torch.tensor([0] * 30 + [2] * 23)
    return sparseball.build_tree(pos, batch, ball_size=P)


@pytest.fixture
def qkv(tree):
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(tree.num_slots, H, D, generator=generator) for _ in range(3)]


def _compressed(tree, qkv, compress_size=4):
    k_cmp = ops.compress(qkv[1], tree, compress_size)
    v_cmp = ops.compress(qkv[2], tree, compress_size)
    return k_cmp, v_cmp


def test_public_ops_run(tree, qkv):
    q, k, v = qkv
    k_cmp, v_cmp = _compressed(tree, qkv)
    out, lse = ops.compressed_attention(q, k_cmp, v_cmp, tree, 4)
    indices = ops.select_blocks(q, k_cmp, lse, tree, 4, 8, 8, 2)
    assert indices.dtype == torch.int32 and indices.shape == (tree.num_slots // 8, H, 2)
    assert ops.selection_attention(q, k, v, tree, indices, 8, 8).shape == q.shape
    assert ops.ball_attention(q, k, v, tree, 8).shape == q.shape
    assert sparseball.attention(q, k, v, tree, top_k=2).shape == q.shape


@pytest.mark.parametrize(
    ("mutate", "error", "match"),
    [
        (lambda q, k, v: (q[0], k, v), ValueError, r"q must have shape \(M, H, D\)"),
        (lambda q, k, v: (q[:-1], k, v), ValueError, "q must have one row per slot"),
        (lambda q, k, v: (q, k[:, :1], v), ValueError, "k must have shape"),
        (lambda q, k, v: (q, k, v[..., :-1]), ValueError, "v must have shape"),
        (lambda q, k, v: (q, k, v.double()), TypeError, "v must have the dtype of q"),
        (lambda q, k, v: (q.long(), k, v), TypeError, "q must be float64, float32"),
        (lambda q, k, v: (q.numpy(), k, v), TypeError, "q must be a torch.Tensor"),
        (lambda q, k, v: (q[:, :0], k[:, :0], v[:, :0]), ValueError, "q must have H >= 1"),
    ],
)
def test_bad_qkv(tree, qkv, mutate, error, match):
    q, k, v = mutate(*qkv)
    with pytest.raises(error, match=match):
        ops.ball_attention(q, k, v, tree, P)
    with pytest.raises(error, match=match):
        sparseball.attention(q, k, v, tree)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"ball_size": 6}, ValueError, "ball_size must be a power of two"),
        ({"ball_size": 2 * P}, ValueError, "ball_size must be <= tree.ball_size"),
        ({"ball_size": 4.0}, TypeError, "ball_size must be an int"),
        ({"compress_size": 3}, ValueError, "compress_size must be a power of two"),
        ({"compress_size": 8, "select_size": 4}, ValueError, "select_size must be a multiple"),
        ({"group_size": 12}, ValueError, "group_size must be a power of two"),
        ({"top_k": 0}, ValueError, "top_k must be >= 1"),
        ({"sigma": torch.ones(H + 1)}, ValueError, "sigma must have shape"),
        ({"sigma": torch.ones(H, dtype=torch.float64)}, TypeError,
         r"sigma must be float32 or the dtype of q \(torch.float32\), got torch.float64"),
        ({"gates": lambda m: torch.ones(m, H, 3, dtype=torch.float16)}, TypeError,
         "gates must be float32 or the dtype of q"),
        ({"gates": lambda m: torch.ones(m - 1, H, 3)}, ValueError, "gates must have shape"),
        ({"gates": lambda m: torch.ones(m, H, 2)}, ValueError, "gates must have shape"),
        ({"scale": float("nan")}, ValueError, "scale must be finite"),
        ({"scale": "big"}, TypeError, "scale must be a float"),
        ({"k_cmp": torch.ones(1)}, ValueError, "k_cmp and v_cmp must be given together"),
        ({"backend": "tensorflow"}, ValueError, "backend must be one of"),
    ],
)
def test_bad_attention_arguments(tree, qkv, kwargs, error, match):
    kwargs = {name: value(tree.num_slots) if callable(value) else value
              for name, value in kwargs.items()}
    with pytest.raises(error, match=match):
        sparseball.attention(*qkv, tree, **kwargs)


# Mixed precision and the one validation of `attention`


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_mixed_precision_under_autocast(device, dtype):
    """As a model runs: sigma and the gate projection float32, q, k, v from a projection under
    `torch.autocast` in half precision, on a rotated ordering. The output comes back in q's
    dtype, every parameter's gradient in float32, and both match the same model run in float32
    to within the half-precision rounding of q, k and v: 2 eps of the dtype relative to the
    largest value (measured on CPU: 0.7 eps for bfloat16, 0.76 eps for float16), which a wrong
    branch or a dropped bias (logits off by O(1)) fails."""
    generator = torch.Generator().manual_seed(3)
    pos = torch.randn(100, 3, generator=generator)
    batch = torch.tensor([0] * 60 + [1] * 40)
    tree = sparseball.build_tree(pos.to(device), batch.to(device), ball_size=16,
                                 rotations=1).rotated_tree(0)
    M, width = tree.num_slots, 32
    x = torch.randn(M, width, generator=generator).to(device)
    torch.manual_seed(0)
    project = torch.nn.Linear(width, 3 * H * D).to(device)
    gate = torch.nn.Linear(width, 3 * H).to(device)
    sigma = torch.nn.Parameter(torch.linspace(-1.0, -0.2, H, device=device))
    parameters = [*project.parameters(), *gate.parameters(), sigma]

    def step(autocast: bool):
        for p in parameters:
            p.grad = None
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            q, k, v = project(x).view(M, 3, H, D).unbind(1)
            gates = torch.sigmoid(gate(x.float()).float()).view(M, H, 3)
            # top_k covers every block of a cloud: the selection cannot differ between dtypes.
            out = sparseball.attention(q, k, v, tree, gates=gates, sigma=sigma, compress_size=4,
                                       select_size=16, group_size=16, top_k=4)
        out.float().square().sum().backward()
        return out, [p.grad.clone() for p in parameters]

    half, half_grads = step(True)
    half = half.detach()
    single, single_grads = step(False)
    single = single.detach()
    assert half.dtype == dtype and single.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in half_grads)
    bound = 2 * torch.finfo(dtype).eps
    real = tree.mask
    for name, got, want in [("out", half[real], single[real]),
                            *zip(["weight", "bias", "gate weight", "gate bias", "sigma"],
                                 half_grads, single_grads, strict=True)]:
        error = float((got.float() - want).abs().max())
        assert error <= bound * float(want.abs().max()), f"{name}: {error}"


def test_attention_validates_once(tree, qkv, monkeypatch):
    """`attention` checks its arguments itself and runs the branches unchecked: neither the
    public ops' checks nor the index check (a sort and a host sync) run inside it."""
    def fail(*args, **kwargs):
        raise AssertionError("attention ran a public op's validation")

    monkeypatch.setattr(ops, "check_qkv", fail)
    monkeypatch.setattr(ops, "_check_indices", fail)
    monkeypatch.setattr(ops, "_check_lse", fail)
    out = sparseball.attention(*qkv, tree, sigma=torch.full((H,), -0.5), compress_size=4,
                               select_size=8, group_size=8, top_k=2)
    assert out.shape == qkv[0].shape and torch.isfinite(out).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_attention_step_never_syncs(backend):
    """An eager forward and backward of `attention` (bf16 q, k, v; float32 sigma and gates; a
    fresh tree's rotated ordering, whose cached fields are filled inside) makes no host sync."""
    generator = torch.Generator().manual_seed(0)
    pos = torch.randn(5000, 3, generator=generator).cuda()
    batch = torch.randint(0, 3, (5000,), generator=generator).cuda()

    def inputs(tree):
        M = tree.num_slots
        q, k, v = (torch.randn(M, 4, 32, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
        gates = torch.rand(M, 4, 3, device="cuda", requires_grad=True)
        sigma = torch.full((4,), -1.0, device="cuda", requires_grad=True)
        return q, k, v, gates, sigma

    def step(tree, q, k, v, gates, sigma):
        out = sparseball.attention(q, k, v, tree.rotated_tree(0), gates=gates, sigma=sigma,
                                   top_k=4, backend=backend)
        out.float().sum().backward()

    warm = sparseball.build_tree(pos, batch, ball_size=64, rotations=1)
    step(warm, *inputs(warm))  # kernels compile here
    tree = sparseball.build_tree(pos[1:], batch[1:], ball_size=64, rotations=1)
    args = inputs(tree)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step(tree, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_bad_tree(qkv):
    with pytest.raises(TypeError, match="tree must be a BallTree"):
        ops.ball_attention(*qkv, tree={"perm": None}, ball_size=4)


def test_bad_compressed_inputs(tree, qkv):
    q = qkv[0]
    k_cmp, v_cmp = _compressed(tree, qkv)
    with pytest.raises(ValueError, match="k_cmp must have shape"):
        ops.compressed_attention(q, k_cmp, v_cmp, tree, 8)
    with pytest.raises(ValueError, match="v_cmp must have shape"):
        ops.compressed_attention(q, k_cmp, v_cmp[:-1], tree, 4)
    _, lse = ops.compressed_attention(q, k_cmp, v_cmp, tree, 4)
    with pytest.raises(TypeError, match="lse must be float32"):
        ops.select_blocks(q, k_cmp, lse.double(), tree, 4, 8, 8, 2)
    with pytest.raises(ValueError, match=r"lse must have shape \(M, H\)"):
        ops.select_blocks(q, k_cmp, lse[:, :1], tree, 4, 8, 8, 2)
    with pytest.raises(ValueError, match="exclude_ball_size must be <= tree.ball_size"):
        ops.select_blocks(q, k_cmp, lse, tree, 4, 8, 8, 2, exclude_ball_size=2 * P)


def test_bad_indices(tree, qkv):
    q, k, v = qkv
    groups, blocks = tree.num_slots // 8, tree.num_slots // 8
    good = torch.full((groups, H, 2), -1, dtype=torch.int32)
    good[:, :, 0] = torch.arange(groups, dtype=torch.int32)[:, None]  # every group: own block
    ops.selection_attention(q, k, v, tree, good, 8, 8)

    cases = [
        (good.float(), TypeError, "indices must be int32"),
        (good[:-1], ValueError, r"indices must have shape \(M / group_size, H, top_k\)"),
        (good.clone().fill_(blocks), ValueError, r"indices must be block ids in \[0, M / select_size\)"),
        (good.clone().fill_(-2), ValueError, "indices must be block ids"),
    ]
    repeated = good.clone()
    repeated[:, :, 1] = repeated[:, :, 0]
    cases.append((repeated, ValueError, "indices must not repeat a block"))
    other_cloud = good.clone()
    other_cloud[0, :, 0] = blocks - 1  # the first group is in cloud 0, the last block in cloud 2
    cases.append((other_cloud, ValueError, "indices must select blocks of the group's own cloud"))
    for indices, error, match in cases:
        with pytest.raises(error, match=match):
            ops.selection_attention(q, k, v, tree, indices, 8, 8)


def test_gpu_only_backend_on_cpu_tensors(tree, qkv):
    for name in ("triton", "cupy"):
        with pytest.raises(ValueError, match=f"backend '{name}' cannot run ball_attention.*cuda"):
            ops.ball_attention(*qkv, tree, P, backend=name)


def test_auto_picks_a_backend_that_serves(qkv):
    assert select_backend("ball_attention", "auto", qkv[0]) is BACKENDS["torch"].kernels()


def test_use_backend_sets_a_forced_default(tree, qkv):
    assert default_backend() == "auto"
    with sparseball.use_backend("torch"):
        assert default_backend() == "torch"
        ops.ball_attention(*qkv, tree, P)
        with sparseball.use_backend("triton"):
            with pytest.raises(ValueError, match="backend 'triton' cannot run"):
                ops.ball_attention(*qkv, tree, P)
        assert default_backend() == "torch"
    assert default_backend() == "auto"
    with pytest.raises(ValueError, match="name must be one of"):
        with sparseball.use_backend("jax"):
            pass


def test_environment_variable_sets_the_default(tree, qkv, monkeypatch):
    monkeypatch.setenv("SPARSEBALL_BACKEND", "cupy")
    with pytest.raises(ValueError, match="backend 'cupy' cannot run"):
        ops.ball_attention(*qkv, tree, P)
    with sparseball.use_backend("torch"):  # the context manager wins over the environment
        ops.ball_attention(*qkv, tree, P)
    monkeypatch.setenv("SPARSEBALL_BACKEND", "fastest")
    with pytest.raises(ValueError, match="SPARSEBALL_BACKEND must be one of"):
        ops.ball_attention(*qkv, tree, P)


def test_import_without_optional_backends():
    # Block triton and cupy imports entirely: `import sparseball` and the torch path must work.
    code = (
        "import sys; sys.modules['triton'] = None; sys.modules['cupy'] = None\n"
        "import torch, sparseball\n"
        "tree = sparseball.build_tree(torch.randn(41, 2), ball_size=8)\n"
        "q = torch.randn(tree.num_slots, 1, 4)\n"
        "print(sparseball.attention(q, q, q, tree, top_k=2).shape)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert "torch.Size([48, 1, 4])" in result.stdout


def test_auto_never_picks_the_interpreter(qkv, monkeypatch):
    # Under the interpreter triton can serve CPU tensors when asked for by name, but "auto"
    # must still take torch: the interpreter is a checking tool, far too slow for a default.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert BACKENDS["triton"].in_auto
    assert BACKENDS["triton"].not_supported_reasons("ball_attention", qkv[0].device,
                                                    qkv[0].dtype, D) == []
    assert select_backend("ball_attention", "auto", qkv[0]) is BACKENDS["torch"].kernels()


def test_auto_skips_backends_not_validated_on_hardware(qkv, monkeypatch):
    monkeypatch.setitem(BACKENDS, "torch", dataclasses.replace(BACKENDS["torch"], in_auto=False))
    with pytest.raises(ValueError, match="no backend can run"):
        select_backend("ball_attention", "auto", qkv[0])


@given(seed=st.integers(0, 2**31 - 1), sizes=st.lists(st.integers(1, 70), min_size=1, max_size=3))
def test_attention_does_not_depend_on_the_order_of_the_input_points(seed, sizes):
    # Distinct random points give the same tree whatever their input order, so per-point
    # outputs of the whole pipeline (to_slots -> attention -> from_slots) follow the points.
    generator = torch.Generator().manual_seed(seed)
    num_points = sum(sizes)
    pos = torch.randn(num_points, 3, generator=generator, dtype=torch.float64)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(num_points, H, D, generator=generator, dtype=torch.float64)
    sigma = -torch.rand(H, generator=generator, dtype=torch.float64)
    shuffle = torch.randperm(num_points, generator=generator)

    def per_point(pos, batch, x):
        tree = sparseball.build_tree(pos, batch, ball_size=8)
        q = tree.to_slots(x)
        out = sparseball.attention(q, q.flip(-1), q * 2, tree, sigma=sigma, top_k=2,
                                   compress_size=2, select_size=4, group_size=4)
        return tree.from_slots(out)

    expected = per_point(pos, batch, x)[shuffle]
    torch.testing.assert_close(per_point(pos[shuffle], batch[shuffle], x[shuffle]), expected,
                               rtol=1e-12, atol=1e-12)
