"""The engine throughput figure (``perf/benchmark_engine.py --figure``, docs/performance.md).

One panel per architecture: seconds per full paper-protocol run for one run at a time (R = 1) and for R
runs stacked, each bar with the matmul floor at the speed measured around it (short black line) and its
ratio to it; the floor at the invocation's best matmul speed dashed; an earlier checkout's engines in grey
where they were timed (``--baseline-src``). Input: the JSON the benchmark writes.
"""

from __future__ import annotations

from matplotlib.figure import Figure

from ewcstab.figures import style

BASELINE_COLOR = "#999999"
ENGINE_COLOR = "#D55E00"


def _label(row: dict) -> str:
    if row["engine"] != "engine":
        return row["engine"].replace(" ", "\n") + (f"\nR={row['runs']}" if row["runs"] > 1 else "")
    return "one at a time\nR=1" if row["runs"] == 1 else f"stacked\nR={row['runs']}"


def plot_throughput(result: dict) -> Figure:
    """Bar chart of seconds per run per row and architecture, with the matmul floors marked."""
    archs = list(dict.fromkeys(r["arch"] for r in result["rows"]))
    width = max(len([r for r in result["rows"] if r["arch"] == a]) for a in archs)
    fig, axes = style.new_figure(1, len(archs), panel=(max(3.2, 0.8 * width + 1.2), 3.4))
    best = result["matmul_flops"]["best"]
    for ax, arch in zip(axes[0], archs):
        rows = [r for r in result["rows"] if r["arch"] == arch]
        seconds = [r["seconds_per_run"] for r in rows]
        colors = [ENGINE_COLOR if r["engine"] == "engine" else BASELINE_COLOR for r in rows]
        ax.bar([_label(r) for r in rows], seconds, color=colors)
        for x, (s, r) in enumerate(zip(seconds, rows)):
            if "floor_seconds" in r:
                ax.hlines(r["floor_seconds"], x - 0.4, x + 0.4, color="black", lw=1.5,
                          label="matmul floor around the row" if x == 0 else None)
            ratio = r.get("floor_ratio", r.get("floor_ratio_best"))
            if ratio is not None:
                ax.annotate(f"{ratio:.2f}x", (x, s), ha="center", va="bottom", fontsize="x-small")
        flops = next((r["flops_per_run"] for r in rows if "flops_per_run" in r), None)
        if flops is not None:
            ax.axhline(flops / best, color="black", lw=1, ls="--",
                       label=f"floor at the best matmul speed ({flops / best:.1f} s)")
        ax.set(ylabel="seconds per full protocol run", title=style.ARCH_NAMES.get(arch, arch))
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), fontsize="x-small")
        ax.tick_params(axis="x", labelsize="x-small")
    fig.suptitle(f"Training engine on {result['device']} ({result['device_type']}, {result['threads']} thread(s)); "
                 f"matmul {best / 1e9:.0f} GFLOP/s at best; bars: x the floor around the row")
    return fig


__all__ = ["plot_throughput"]
