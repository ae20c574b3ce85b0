"""Figures of the committed GPU results, for docs/benchmarks.md: how tree construction time
grows with the cloud (CuPy, Numba, Erwin) and where ball attention stands between the memory
floor and Erwin's way. Reads bench/results/{tree_gpu,triton_ops}_<gpu>.json; needs matplotlib
(`pip install '.[plots]'`).

    python3 bench/plot_results.py            # writes docs/img/*_h200.png
    python3 bench/plot_results.py --gpu h100
"""

from __future__ import annotations

import argparse
import json
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def tree_growth(results: dict, out: pathlib.Path, plt) -> None:
    rows = results["growth"]
    points = [r["points"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    numba = f"sparseball, Numba ({results['numba_threads']} CPU threads)"
    for key, label, style in (("cupy_ms", "sparseball, CuPy (GPU)", "o-"), ("numba_ms", numba, "s-"),
                              ("erwin_ms", "balltree-erwin (CPU)", "^-")):
        if all(key in r for r in rows):
            ax.plot(points, [r[key] for r in rows], style, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("points in one cloud")
    ax.set_ylabel("build time (ms)")
    ax.set_title(f"Ball tree construction, ball 128 ({results['gpu']}, {results['date']})", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def ball_attention(results: dict, out: pathlib.Path, plt) -> None:
    rows = results["ball_attention"]
    labels = [f"{r['clouds']}\nD={r['head_dim']}" for r in rows]
    series = (("fwd_bwd_ms", "sparseball (Triton)"), ("erwin_fwd_bwd_ms", "Erwin: SDPA + dense bias"))
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(series)
    for i, (key, label) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r[key] / r["floor_fwd_bwd_ms"] for r in rows], width, label=label)
    ax.axhline(1.0, color="black", linewidth=1, label="memory floor")
    ax.axhline(4.5, color="gray", linestyle="--", linewidth=1, label="goal (1M, D=64): 4.5x")
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_ylabel("forward + backward time / memory floor")
    ax.set_title(f"Ball attention with distance bias, H={results['heads']}, {results['dtype']} "
                 f"({results['gpu']}, {results['date'][:10]})", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=pathlib.Path, default=ROOT / "bench" / "results")
    parser.add_argument("--out", type=pathlib.Path, default=ROOT / "docs" / "img")
    parser.add_argument("--gpu", default="h200", help="the results' suffix: h200 or h100")
    args = parser.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    tree = json.loads((args.results / f"tree_gpu_{args.gpu}.json").read_text())
    tree_growth(tree, args.out / f"tree_growth_{args.gpu}.png", plt)
    triton = json.loads((args.results / f"triton_ops_{args.gpu}.json").read_text())
    ball_attention(triton, args.out / f"ball_attention_{args.gpu}.png", plt)
    print("wrote", *sorted(p.name for p in args.out.glob("*.png")))


if __name__ == "__main__":
    main()
