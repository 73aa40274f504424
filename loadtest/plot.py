"""The PNG: throughput and latency over time on top, the latency distribution below.

Drawn from the report dict alone, so a saved JSON report can be plotted again later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def plot_report(report: dict[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    path = Path(path)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [1.1, 1]})
    fig.suptitle(
        f"{report['streams']} streams x {report['chunk_timesteps']} timesteps/chunk, {report['api']}, "
        f"{report['mode']} loop  |  {report['chunks_per_s']:,.0f} chunks/s, {report['timesteps_per_s']:,.0f} "
        f"timesteps/s  |  p50 {_num(report['latency_ms']['p50'])} ms, p99 {_num(report['latency_ms']['p99'])} ms",
        fontsize=11,
    )
    _plot_timeline(top, report)
    _plot_latency_distribution(bottom, report)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_timeline(top: Any, report: dict[str, Any]) -> None:
    """Throughput (left axis) and p50 / p99 latency (right axis) per bucket of the timeline."""
    line = report["timeline"]
    t = np.asarray(line["t_s"], dtype=float) + line["bucket_s"] / 2
    top.step(t, line["chunks_per_s"], where="mid", color="tab:blue", linewidth=1.8, label="chunks/s")
    if report["open_loop"]:
        top.axhline(report["open_loop"]["target_chunks_per_s"], color="tab:blue", linestyle=":", linewidth=1,
                    label="offered chunks/s")
    top.set_ylabel("chunks/s", color="tab:blue")
    top.set_xlabel("seconds since start")
    top.set_ylim(bottom=0)
    top.grid(alpha=0.3)
    if report["warmup_s"] > 0:
        top.axvspan(0, report["warmup_s"], color="0.85", alpha=0.6, label="warm-up (excluded)")
    errors = np.asarray(line["errors"])
    if errors.any():
        hit = errors > 0
        top.scatter(t[hit], np.zeros(hit.sum()), marker="x", color="red", zorder=5, label="errors",
                    clip_on=False)
    latency_axis = top.twinx()
    p50 = np.asarray([np.nan if v is None else v for v in line["latency_p50_ms"]], dtype=float)
    p99 = np.asarray([np.nan if v is None else v for v in line["latency_p99_ms"]], dtype=float)
    latency_axis.plot(t, p50, color="tab:green", linewidth=1.2, label="p50 latency")
    latency_axis.plot(t, p99, color="tab:orange", linewidth=1.2, label="p99 latency")
    latency_axis.set_ylabel("latency (ms)")
    latency_axis.set_ylim(bottom=0)
    handles = top.get_legend_handles_labels()
    more = latency_axis.get_legend_handles_labels()
    # Above the axes, so the legend never hides the lines.
    top.legend(handles[0] + more[0], handles[1] + more[1], loc="lower center", bbox_to_anchor=(0.5, 1.0),
               fontsize=8, ncol=6, frameon=False)


def _plot_latency_distribution(bottom: Any, report: dict[str, Any]) -> None:
    from matplotlib import ticker

    hist = report["latency_histogram"]
    if hist["counts"]:
        edges = np.asarray(hist["edges_ms"])
        bottom.bar(edges[:-1], hist["counts"], width=np.diff(edges), align="edge", color="tab:blue", alpha=0.7,
                   edgecolor="none")
        bottom.set_xscale("log")
        # Plain numbers (0.5, 2, 10) instead of powers of ten: latencies are read, not computed.
        bottom.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        bottom.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        bottom.xaxis.set_minor_formatter(ticker.NullFormatter())
        colors = {"p50": "tab:green", "p90": "tab:olive", "p99": "tab:orange", "p99.9": "tab:red"}
        for name, color in colors.items():
            value = report["latency_ms"][name]
            if value is not None:
                bottom.axvline(value, color=color, linestyle="--", linewidth=1.2, label=f"{name} {value:.3g} ms")
        bottom.legend(fontsize=8)
    else:
        bottom.text(0.5, 0.5, "no measured chunks", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_xlabel("latency per chunk (ms, log scale)")
    bottom.set_ylabel("chunks")
    bottom.grid(alpha=0.3)
    bottom.set_title(f"latency distribution ({report['chunks']:,} measured chunks)", fontsize=10)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
