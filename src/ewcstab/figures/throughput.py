"""The throughput figure of ``ewcstab benchmark-batched --figure`` (issue 8, README "Throughput").

Left: seconds per full paper-protocol MLP run for each engine row (textbook, autograd single-run
path, an earlier checkout's path when timed with ``--baseline-src``, the stacked engine with one run, as
``ewcstab run`` trains the MLP, and batched at each R), each bar with the matmul floor at the speed measured
around it (short line) and its ratio to it (in brackets: to the floor at the sitting's best speed, the dashed
line), and the matmul + memory bound dotted. Right: the same as runs per hour per core. Input: the JSON the
benchmark writes (``benchmark_batched``'s result).
"""

from __future__ import annotations

from matplotlib.figure import Figure

from ewcstab.figures import style

ENGINE_COLORS = {"textbook": "#999999", "autograd": "#0072B2", "batched": "#D55E00"}


def _label(row: dict) -> str:
    if row["engine"] == "batched":
        return "stacked R=1\n(ewcstab run)" if row["runs"] == 1 else f"batched\nR={row['runs']}"
    return row["engine"].replace(" ", "\n")  # "baseline <commit>" (--baseline-src): two short lines


def plot_throughput(result: dict) -> Figure:
    """Bar chart of seconds per run and runs per hour per engine row, floor and bound marked."""
    rows = result["rows"]
    labels = [_label(r) for r in rows]
    colors = [style.color_of(r["engine"], ENGINE_COLORS) for r in rows]
    floor = result["floor_seconds"]
    fig, axes = style.new_figure(1, 2, panel=(max(3.8, 0.75 * len(rows) + 1.0), 3.4))
    left, right = axes[0]
    seconds = [r["full_run_seconds"] for r in rows]
    left.bar(labels, seconds, color=colors)
    for x, (s, r) in enumerate(zip(seconds, rows)):
        text = f"{r['floor_ratio']:.2f}x floor"
        if "floor_ratio_sitting_best" in r:  # floor at the matmul speed measured around the row; strictest
            text += f"\n({r['floor_ratio_sitting_best']:.2f}x)"
            left.hlines(r["floor_seconds"], x - 0.4, x + 0.4, color="black", lw=1.5,
                        label="matmul floor around the row" if x == 0 else None)
        left.annotate(text, (x, s), ha="center", va="bottom", fontsize="x-small")
    left.axhline(floor, color="black", lw=1, ls="--",
                 label=f"matmul floor {floor:.0f} s" + (" (sitting's best)" if "floor_seconds" in rows[0] else ""))
    bounds = [r.get("memory_floor_seconds") for r in rows]
    if all(b is not None for b in bounds):
        best = min(bounds)
        left.axhline(floor + best, color="black", lw=1, ls=":",
                     label=f"+ optimizer memory traffic {floor + best:.0f} s")
    left.set(ylabel="seconds per full protocol run", title="One paper-protocol MLP run")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small", ncol=2)
    right.bar(labels, [3600.0 / s for s in seconds], color=colors)
    right.axhline(3600.0 / floor, color="black", lw=1, ls="--", label="matmul floor")
    right.set(ylabel="runs per hour", title=f"Throughput ({result['threads']} thread(s), {result['device']})")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize="small")
    for ax in (left, right):
        ax.tick_params(axis="x", labelsize="small")
    samples = [m / 1e9 for m in result["matmul_flops"].get("sitting_samples", [result["matmul_flops"]["best"]])]
    speed = f"{samples[0]:.0f}" if len(samples) == 1 else f"{min(samples):.0f}-{max(samples):.0f}"
    fig.suptitle(f"Paper-protocol MLP (10 tasks x 6 epochs x 600 steps), extrapolated from "
                 f"{result['measured']['tasks']} measured task(s); matmul {speed} GFLOP/s in this sitting")
    return fig


__all__ = ["plot_throughput"]
