"""The tree far field (docs/contract.md, section 3.1) against its float64 oracle
(`reference.far_field`): the level layout, the tokens, the descent and far-field attention,
outputs and every gradient, on random trees with odd cloud sizes, padding anywhere and rotated
orderings, with enough levels (small blocks, small `top_blocks`) that the descent has work at
each; then the mixture `sparseball.attention(far_field="tree")`, padding, and bad arguments.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import (
    BACKENDS,
    DTYPES,
    assert_matches,
    attention_magnitudes,
    call,
    chunk_budget,
    grads,
    leaves,
    powers_of_two,
    problems,
    random_tree,
    selection_slack,
)
from hypothesis import given
from hypothesis import strategies as st

import reference.far_field as oracle
import reference.ops as flat_oracle
import sparseball

dtypes = pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
# The backends under test that implement the far field (CuPy serves the flat ops only).
backends = pytest.mark.parametrize(
    "backend", [name for name in BACKENDS
                if set(sparseball.backends.FAR_FIELD_OPS) <= set(sparseball.BACKENDS[name].ops)])


def _far_field_sizes(data, P, min_group=1):
    """(c, f, top_blocks, g, top_k): small blocks and tops, so that several levels exist;
    groups of at least `min_group` (at most P) slots."""
    return (data.draw(powers_of_two(P), label="compress_size"),
            data.draw(st.sampled_from([2, 4]), label="fanout"),
            data.draw(st.integers(1, 5), label="top_blocks"),
            data.draw(powers_of_two(P).filter(lambda g: g >= min(min_group, P)),
                      label="group_size"),
            data.draw(st.integers(1, 3), label="top_k"))


def _magnitudes(problem, q, k, v, grad_out, sigma, levels):
    """`attention_magnitudes` with the log-count term in the logits' bound."""
    size = attention_magnitudes(q, k, v, grad_out, problem.scale, sigma, problem.tree.pos)
    extra = math.log(max(int(levels.count.max()), 1))
    factor = (1 + size["logits"] + extra) / (1 + size["logits"])
    return {name: value * factor for name, value in size.items()}


# The layout


@given(data=st.data())
def test_levels_follow_the_contract(data):
    """Token numbering, counts, centers, children and the top level of `tree.levels` are the
    oracle's, which lists tokens as slot ranges straight from the contract."""
    problem = data.draw(problems(torch.float64))
    tree = problem.tree
    c, f, top, _, top_k = _far_field_sizes(data, tree.ball_size)
    levels = tree.levels(c, f, top)
    tokens = oracle.tokens_of(tree, c, f, top)
    assert levels.num_tokens == len(tokens)
    for number, token in enumerate(tokens):
        level = token.level
        assert levels.level_start[level] <= number < levels.level_start[level + 1]
    assert levels.top_level == max(t.level for t in tokens)
    assert max(levels.cloud_blocks[-1]) <= top
    assert levels.top_level == 0 or max(levels.cloud_blocks[-2]) > top
    count, center = oracle.counts_and_centers(tree, tokens)
    assert torch.equal(levels.count.cpu(), count)
    torch.testing.assert_close(levels.center.double().cpu(), center,
                               rtol=2 * torch.finfo(tree.pos.dtype).eps, atol=1e-6)
    for level, children in enumerate(levels.children, start=1):
        for local, row in enumerate(children.tolist()):
            number = levels.level_start[level] + local
            assert sorted(w for w in row if w >= 0) == oracle._children(tokens, number)
    for cloud, row in enumerate(levels.top_tokens.tolist()):
        want = [u for u, t in enumerate(tokens) if t.level == levels.top_level and t.cloud == cloud]
        assert [u for u in row if u >= 0] == want
    # The widest cut a descent can leave.
    widest = max(0, max(levels.cloud_blocks[-1]) - top_k) + levels.top_level * top_k * (f - 1)
    assert levels.max_cut(top_k) == widest
    # Level 0 is the aligned c-blocks: the same centers as the tree's.
    base = count[:levels.level_start[1]] > 0
    torch.testing.assert_close(levels.center[:levels.level_start[1]].double()[base],
                               tree.centers(c).double()[base])


# The ops against the oracle


@backends
@dtypes
@given(data=st.data())
def test_far_field_tokens(backend, dtype, data):
    problem = data.draw(problems(dtype))
    tree = problem.tree
    c, f, top, _, _ = _far_field_sizes(data, tree.ball_size)
    levels = tree.levels(c, f, top)
    x = problem.randn(tree.num_slots // c, problem.heads, problem.head_dim)
    grad_out = problem.randn(levels.num_tokens, problem.heads, problem.head_dim)
    (x_in,) = leaves(x)
    out = call(backend, "far_field_tokens", x_in, tree, c, f, top)
    (dx,) = grads(out, [x_in], grad_out)
    (x_ref,) = leaves(x.double())
    expected = oracle.far_field_tokens(x_ref, tree, c, f, top)
    (dx_ref,) = grads(expected, [x_ref], grad_out.double())
    assert out.dtype == dtype
    reduction = c * f ** levels.top_level  # children summed, weighted by counts
    assert_matches(out, expected, reduction, "far_field_tokens", magnitude=float(x.abs().max()))
    assert_matches(dx, dx_ref, levels.top_level + 1, "far_field_tokens dx",
                   magnitude=float(grad_out.abs().max()))


@backends
@dtypes
@given(data=st.data())
def test_far_field_attention(backend, dtype, data):
    check_far_field_attention(backend, data.draw(problems(dtype)), data)


def check_far_field_attention(backend, problem, data, min_group=1):
    """far_field_attention on `problem`, with the oracle's cut for drawn sizes: output and
    every gradient against the oracle; an empty cut gives 0."""
    dtype = problem.dtype
    tree = problem.tree
    c, f, top, g, top_k = _far_field_sizes(data, tree.ball_size, min_group)
    levels = tree.levels(c, f, top)
    T, H, D = levels.num_tokens, problem.heads, problem.head_dim
    q, k_tok, v_tok, sigma = (problem.slot_tensor(), problem.randn(T, H, D),
                              problem.randn(T, H, D), problem.sigma())
    _, cut = oracle.far_field_select(q, k_tok, tree, c, f, top, g, top_k, sigma, problem.scale)
    grad_out = problem.slot_tensor()
    inputs = leaves(q, k_tok, v_tok, sigma)
    with chunk_budget(backend, problem.budget):
        out = call(backend, "far_field_attention", *inputs[:3], tree, cut, c, g, f, top,
                   inputs[3], problem.scale)
        got = grads(out, inputs, grad_out)
    inputs_ref = leaves(*[None if t is None else t.double() for t in (q, k_tok, v_tok, sigma)])
    expected = oracle.far_field_attention(*inputs_ref[:3], tree, c, f, top, cut, g,
                                          inputs_ref[3], problem.scale)
    want = grads(expected, inputs_ref, grad_out.double())
    size = _magnitudes(problem, q, k_tok, v_tok, grad_out, sigma, levels)
    assert out.dtype == dtype
    keys, M = max(cut.shape[-1], 1), tree.num_slots
    assert_matches(out, expected, keys, "far_field_attention", magnitude=size["out"])
    empty = (cut < 0).all(-1).repeat_interleave(g, 0)
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "an empty cut must give 0"
    for name, grad, grad_ref, n in zip("qkv", got, want, (keys, M, M), strict=False):
        assert_matches(grad, grad_ref, n, f"far_field_attention d{name}", magnitude=size[name])
    if sigma is not None:
        assert_matches(got[3], want[3], M * keys, "far_field_attention dsigma",
                       magnitude=size["sigma"])


def _frontiers(selected, cut, levels):
    """The frontiers a descent walked, rebuilt from what it returned: at level 0 the selected
    blocks and the cut's level-0 tokens; above, the parents of the frontier below and the cut's
    tokens of that level. Returns `[(frontier, expanded)]` from level 0 up."""
    parent = {}
    for level, children in enumerate(levels.children, start=1):
        for local, row in enumerate(children.tolist()):
            for w in row:
                if w >= 0:
                    parent[w] = levels.level_start[level] + local
    left = [u for u in cut if u >= 0]
    expanded = sorted(b for b in selected if b >= 0)
    walked = []
    for level in range(levels.top_level + 1):
        start, end = levels.level_start[level], levels.level_start[level + 1]
        frontier = sorted(expanded + [u for u in left if start <= u < end])
        walked.append((frontier, expanded))
        expanded = sorted({parent[u] for u in frontier}) if level < levels.top_level else []
    return walked


@backends
@dtypes
@given(data=st.data())
def test_far_field_select(backend, dtype, data):
    check_far_field_select(backend, data.draw(problems(dtype)), data)


def check_far_field_select(backend, problem, data, min_group=1):
    """The descent is a valid one for the oracle's importances: the frontiers start at the
    cloud's top-level tokens, each level expands a top-k of its frontier (within the rounding
    slack of the compute dtype), the cut and the selected blocks cover the cloud's real slots
    once. In float64 it is exactly the oracle's."""
    dtype = problem.dtype
    tree = problem.tree
    c, f, top, g, top_k = _far_field_sizes(data, tree.ball_size, min_group)
    levels = tree.levels(c, f, top)
    T, H, D = levels.num_tokens, problem.heads, problem.head_dim
    q, k_tok, sigma = problem.slot_tensor(), problem.randn(T, H, D), problem.sigma()
    with chunk_budget(backend, problem.budget):
        selected, cut = call(backend, "far_field_select", q, k_tok, tree, c, g, top_k, f, top,
                             sigma, problem.scale)
    assert selected.dtype == cut.dtype == torch.int32
    assert selected.shape == (tree.num_slots // g, H, top_k)
    assert cut.shape == (tree.num_slots // g, H, levels.max_cut(top_k))
    if dtype == torch.float64:
        want = oracle.far_field_select(q, k_tok, tree, c, f, top, g, top_k, sigma, problem.scale)
        assert torch.equal(selected, want[0]) and torch.equal(cut, want[1])
        return
    tokens = oracle.tokens_of(tree, c, f, top)
    count, center = oracle.counts_and_centers(tree, tokens)
    logits = oracle._logits(q, k_tok, tree, center, count, sigma, problem.scale)
    size = _magnitudes(problem, q, k_tok, k_tok, q, sigma, levels)
    members = oracle._members(tree, tokens)
    for group in range(tree.num_slots // g):
        rows = slice(group * g, (group + 1) * g)
        cloud = int(tree.slot_cloud[group * g])
        real_query = tree.mask[rows]
        top_tokens = [u for u, t in enumerate(tokens) if t.level == levels.top_level
                      and t.cloud == cloud and count[u] > 0]
        for head in range(H):
            sel, left = selected[group, head].tolist(), cut[group, head].tolist()
            where = f"group {group} head {head}: selected {sel}, cut {left}"
            for row in (sel, left):
                kept = [u for u in row if u >= 0]
                assert row == kept + [-1] * (len(row) - len(kept)), f"-1 not last, {where}"
                assert kept == sorted(set(kept)), f"not ascending and distinct, {where}"
            cover = members[[u for u in sel + left if u >= 0]].sum(0)
            in_cloud = tree.mask & (tree.slot_cloud == cloud)
            assert torch.equal(cover, in_cloud.long()), f"not a cover of the cloud, {where}"
            walked = _frontiers(sel, left, levels)
            assert walked[-1][0] == top_tokens, f"does not start at the top, {where}"
            for frontier, expanded in walked:
                assert len(expanded) == min(top_k, len(frontier)), f"expanded count, {where}"
                if not real_query.any():
                    assert expanded == frontier[:len(expanded)], f"ties not low, {where}"
                    continue
                z = logits[rows, head][:, frontier]
                score = oracle.frontier_importance(z, real_query)
                slack = selection_slack(score, int(real_query.sum()), size["logits"],
                                        size["logits"] + math.log(len(frontier)), D)
                kept = torch.tensor([frontier.index(u) for u in expanded], dtype=torch.long)
                rest = torch.tensor([a for a, u in enumerate(frontier) if u not in expanded],
                                    dtype=torch.long)
                if rest.numel():
                    assert float((score[kept] + slack[kept]).min()) >= \
                        float((score[rest] - slack[rest]).max()), f"not a top-k, {where}"


# The mixture


@backends
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@given(data=st.data())
def test_attention_tree_mixture(backend, dtype, data):
    check_tree_mixture(backend, data.draw(problems(dtype)), data)


def check_tree_mixture(backend, problem, data, min_group=1):
    """`sparseball.attention(far_field="tree")` is the gated sum of far-field attention over
    the descent's cut, selection attention over its selected blocks and ball attention, with
    tokens from `compress(k)`, `compress(v)`: against the oracle, outputs and gradients."""
    dtype = problem.dtype
    tree = problem.tree
    c, f, top, g, top_k = _far_field_sizes(data, tree.ball_size, min_group)
    b = data.draw(powers_of_two(tree.ball_size), label="ball_size")
    q, k, v, sigma = (problem.slot_tensor(), problem.slot_tensor(), problem.slot_tensor(),
                      problem.sigma())
    gates = torch.rand(*q.shape[:2], 3, generator=problem.generator, dtype=torch.float64).to(dtype)
    grad_out = problem.slot_tensor()
    inputs = leaves(q, k, v, sigma, gates)
    with chunk_budget(backend, problem.budget):
        out = sparseball.attention(*inputs[:3], tree, gates=inputs[4], sigma=inputs[3],
                                   ball_size=b, compress_size=c, group_size=g, top_k=top_k,
                                   scale=problem.scale, backend=backend, far_field="tree",
                                   fanout=f, top_blocks=top)
        got = grads(out, inputs, grad_out)
        # The descent the mixture ran (deterministic: the same inputs give the same one).
        k_tok = call(backend, "far_field_tokens", sparseball.ops.compress(k, tree, c,
                     backend=backend), tree, c, f, top)
        selected, cut = call(backend, "far_field_select", q, k_tok, tree, c, g, top_k, f, top,
                             sigma, problem.scale)
    x = leaves(*[None if t is None else t.double() for t in (q, k, v, sigma, gates)])
    k_ref = oracle.far_field_tokens(flat_oracle.compress(x[1], tree, c), tree, c, f, top)
    v_ref = oracle.far_field_tokens(flat_oracle.compress(x[2], tree, c), tree, c, f, top)
    if dtype == torch.float64:
        want_sel, want_cut = oracle.far_field_select(x[0], k_ref, tree, c, f, top, g, top_k,
                                                     x[3], problem.scale)
        assert torch.equal(selected, want_sel) and torch.equal(cut, want_cut)
    far = oracle.far_field_attention(x[0], k_ref, v_ref, tree, c, f, top, cut, g, x[3],
                                     problem.scale)
    sel = flat_oracle.selection_attention(x[0], x[1], x[2], tree, selected, c, g, x[3],
                                          problem.scale)
    ball = flat_oracle.ball_attention(x[0], x[1], x[2], tree, b, x[3], problem.scale)
    expected = x[4][..., 0:1] * far + x[4][..., 1:2] * sel + x[4][..., 2:3] * ball
    want = grads(expected, x, grad_out.double())
    levels = tree.levels(c, f, top)
    size = _magnitudes(problem, q, k, v, grad_out, sigma, levels)
    M = tree.num_slots
    assert_matches(out, expected, M, "attention(far_field=tree)", magnitude=size["out"])
    for name, grad, grad_ref in zip(("q", "k", "v", "sigma", "gates"), got, want, strict=True):
        if grad is not None:
            assert_matches(grad, grad_ref, M * M, f"attention(far_field=tree) d{name}",
                           magnitude=max(size.get(name, 0.0), size["out"] * size["v"]))


@backends
@given(data=st.data())
def test_padding_never_acts_in_the_tree_far_field(backend, data):
    check_padding_never_acts_in_the_tree(backend, data.draw(problems(torch.float32)), data)


def check_padding_never_acts_in_the_tree(backend, problem, data, min_group=1):
    """NaN in every padding slot of q, k and v changes no real slot's output of the mixture."""
    tree = problem.tree
    c, f, top, g, top_k = _far_field_sizes(data, tree.ball_size, min_group)
    q, k, v, sigma = (problem.slot_tensor(), problem.slot_tensor(), problem.slot_tensor(),
                      problem.sigma())

    def run(q, k, v):
        return sparseball.attention(q, k, v, tree, sigma=sigma, compress_size=c, group_size=g,
                                    top_k=top_k, backend=backend, far_field="tree", fanout=f,
                                    top_blocks=top)

    clean = run(q, k, v)
    padding = ~tree.mask
    poisoned = [x.masked_fill(padding[:, None, None], math.nan) for x in (q, k, v)]
    dirty = run(*poisoned)
    assert torch.equal(dirty[tree.mask], clean[tree.mask])


# Bad arguments


def _small():
    pos = torch.randn(300, 3)
    batch = torch.cat([torch.zeros(100), torch.ones(200)]).long()
    tree = sparseball.build_tree(pos, batch, ball_size=16)
    q = torch.randn(tree.num_slots, 2, 8)
    return tree, q


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"fanout": 3}, "fanout must be a power of two"),
    ({"fanout": 1}, "fanout must be a power of two >= 2"),
    ({"top_blocks": 0}, "top_blocks must be >= 1"),
    ({"far_field": "deep"}, 'far_field must be "flat" or "tree"'),
    ({"compress_size": 8, "select_size": 16}, "select_size must equal compress_size = 8"),
])
def test_attention_tree_rejects_bad_arguments(kwargs, message):
    tree, q = _small()
    kwargs = {"far_field": "tree", **kwargs}
    with pytest.raises(ValueError, match=message):
        sparseball.attention(q, q, q, tree, backend="torch", **kwargs)


def test_far_field_ops_reject_bad_tokens_and_cuts():
    tree, q = _small()
    levels = tree.levels(4, 2, 4)
    k_tok = torch.randn(levels.num_tokens, 2, 8)
    with pytest.raises(ValueError, match=rf"k_tok must have shape \({levels.num_tokens}, 2, 8\)"):
        sparseball.ops.far_field_select(q, k_tok[1:], tree, 4, 8, 2, 2, 4)
    with pytest.raises(ValueError, match=r"x_cmp must have shape \(M / compress_size, H, D\)"):
        sparseball.ops.far_field_tokens(q, tree, 4, 2, 4)
    _, cut = sparseball.ops.far_field_select(q, k_tok, tree, 4, 8, 2, 2, 4)
    attend = sparseball.ops.far_field_attention
    assert attend(q, k_tok, k_tok, tree, cut, 4, 8, 2, 4).shape == q.shape
    bad = cut.clone()
    bad[0, 0, 0] = levels.num_tokens
    with pytest.raises(ValueError, match=r"cut must hold token numbers in \[0, T\)"):
        attend(q, k_tok, k_tok, tree, bad, 4, 8, 2, 4)
    bad = cut.clone()
    bad[0, 0, 0] = levels.num_tokens - 1  # a top-level token of the second cloud
    with pytest.raises(ValueError, match="cut must hold tokens of the group's own cloud"):
        attend(q, k_tok, k_tok, tree, bad, 4, 8, 2, 4)
    bad = cut.clone()
    bad[0, 0, 1] = bad[0, 0, 0]
    with pytest.raises(ValueError, match="cut must not repeat a token"):
        attend(q, k_tok, k_tok, tree, bad, 4, 8, 2, 4)
    with pytest.raises(TypeError, match="cut must be int32 token numbers"):
        attend(q, k_tok, k_tok, tree, cut.float(), 4, 8, 2, 4)


def test_levels_are_cached_and_need_no_sync():
    """The layout is computed once per tree and argument triple."""
    tree, _ = _small()
    assert tree.levels(4, 2, 4) is tree.levels(4, 2, 4)
    assert tree.levels(4, 4, 4) is not tree.levels(4, 2, 4)


def test_far_field_attention_rejects_tokens_without_a_real_slot():
    """A cut holds only tokens that stand for points (as the descent leaves it): a padding-only
    block in it is an error, not a key of count 0."""
    tree = random_tree([5], 16, 3, torch.float32, np.random.default_rng(0))  # 11 padding slots
    levels = tree.levels(1, 2, 16)
    q = torch.randn(tree.num_slots, 1, 4)
    k_tok = torch.randn(levels.num_tokens, 1, 4)
    cut = torch.full((tree.num_slots // 16, 1, 1), -1, dtype=torch.int32)
    cut[0, 0, 0] = int(torch.nonzero(levels.count == 0)[0])
    with pytest.raises(ValueError, match="cut must hold tokens with a real slot"):
        sparseball.ops.far_field_attention(q, k_tok, k_tok, tree, cut, 1, 16, 2, 16)

