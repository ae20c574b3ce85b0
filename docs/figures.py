"""The figure of docs/concepts.md: the balls of a ball tree on a 2-D cloud, at two levels and
in one rotated ordering. Runs on the CPU (Numba builder); needs matplotlib (extra `plots`).

    python3 docs/figures.py        # writes docs/img/tree_balls.png
"""

from __future__ import annotations

import argparse
import pathlib

import torch

import sparseball

ROOT = pathlib.Path(__file__).resolve().parents[1]
NUM_POINTS = 300  # not a multiple of BALL_SIZE, so the tree has padding (320 slots)
BALL_SIZE = 64
SMALL_BALL = 16


def clustered_cloud_2d(num_points: int, seed: int = 3) -> torch.Tensor:
    """`[num_points, 2]` float32 points in four Gaussian clusters of different sizes and widths."""
    generator = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [7.0, 0.5], [2.5, 6.0], [8.5, 6.5]])
    widths = torch.tensor([1.6, 0.8, 1.1, 0.5])
    share = torch.tensor([0.4, 0.25, 0.2, 0.15])
    which = torch.multinomial(share, num_points, replacement=True, generator=generator)
    return centers[which] + widths[which, None] * torch.randn(num_points, 2, generator=generator)


def draw_balls(ax, pos: torch.Tensor, mask: torch.Tensor, block_size: int, title: str, cmap) -> None:
    """Points of slot-ordered `pos` coloured by their aligned `block_size`-block, with the convex
    hull of each block's real points; padding slots ringed."""
    from matplotlib.patches import Polygon

    for b in range(pos.shape[0] // block_size):
        rows = slice(b * block_size, (b + 1) * block_size)
        real = pos[rows][mask[rows]]
        colour = cmap(b % cmap.N)
        ax.add_patch(Polygon(convex_hull(real), closed=True, facecolor=colour, alpha=0.15,
                             edgecolor=colour, linewidth=1.0))
        ax.scatter(real[:, 0], real[:, 1], s=8, color=colour, linewidths=0)
    padding = pos[~mask]
    ax.scatter(padding[:, 0], padding[:, 1], s=36, facecolors="none", edgecolors="black",
               linewidths=0.8, label=f"padding slot ({int((~mask).sum())})")
    ax.set_title(title, fontsize=9)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])


def convex_hull(points: torch.Tensor) -> list[tuple[float, float]]:
    """Corners of the convex hull of `[n, 2]` points, counter-clockwise (monotone chain)."""
    ordered = sorted({(float(x), float(y)) for x, y in points.tolist()})
    if len(ordered) < 3:
        return ordered

    def half(sequence):
        chain = []
        for p in sequence:
            while len(chain) >= 2 and _cross(chain[-2], chain[-1], p) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return half(ordered) + half(reversed(ordered))


def _cross(o, a, b) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "img" / "tree_balls.png")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = clustered_cloud_2d(NUM_POINTS)
    tree = sparseball.build_tree(pos, ball_size=BALL_SIZE, rotations=1)
    rotated = tree.rotated(0)
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.5), sharex=True, sharey=True)
    n, m = tree.num_points, tree.num_slots
    draw_balls(axes[0], tree.pos, tree.mask, BALL_SIZE,
               f"balls of {BALL_SIZE} slots ({n} points, {m} slots)", plt.get_cmap("tab10"))
    draw_balls(axes[1], tree.pos, tree.mask, SMALL_BALL,
               f"blocks of {SMALL_BALL} slots (two levels down)", plt.get_cmap("tab20"))
    draw_balls(axes[2], tree.pos[rotated], tree.mask[rotated], BALL_SIZE,
               f"balls of {BALL_SIZE} in rotated ordering 0", plt.get_cmap("tab10"))
    axes[0].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    print("wrote", args.out, f"({args.out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
