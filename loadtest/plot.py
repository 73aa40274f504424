"""The PNG: throughput and latency over time on top, the latency distribution below; with a `soak` section,
two more panels: the server's and Redis' memory over time, then open streams, calls in flight and p99.

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
    soak = report.get("soak")
    if soak:
        fig, (top, bottom, memory, load) = plt.subplots(4, 1, figsize=(11, 14),
                                                        gridspec_kw={"height_ratios": [1.1, 1, 1, 1]})
    else:
        fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7.5), gridspec_kw={"height_ratios": [1.1, 1]})
    fig.suptitle(
        f"{report['streams']} streams x {report['chunk_timesteps']} timesteps/chunk, {report['api']}, "
        f"{report['mode']} loop  |  {report['chunks_per_s']:,.0f} chunks/s, {report['timesteps_per_s']:,.0f} "
        f"timesteps/s  |  p50 {_num(report['latency_ms']['p50'])} ms, p99 {_num(report['latency_ms']['p99'])} ms",
        fontsize=11,
    )
    _plot_timeline(top, report)
    _plot_latency_distribution(bottom, report)
    if soak:
        _plot_soak_memory(memory, soak)
        _plot_soak_load(load, soak)
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


def _series(samples: list[dict[str, Any]], name: str, scale: float = 1.0) -> np.ndarray:
    """One figure of every soak sample, NaN where the scrape failed or the server does not export it."""
    return np.asarray([np.nan if s[name] is None else s[name] / scale for s in samples], dtype=float)


def _shade_soak(axis: Any, soak: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    if soak["warmup_s"] > 0:
        axis.axvspan(0, soak["warmup_s"], color="0.85", alpha=0.6, label="warm-up (not judged)")
    gaps = [s["t_s"] for s in samples if s["error"] is not None]
    if gaps:
        axis.scatter(gaps, np.zeros(len(gaps)), marker="x", color="red", zorder=5, label="failed scrapes",
                     clip_on=False)
    axis.set_xlabel("seconds since start")
    axis.grid(alpha=0.3)


def _legend_below(axis: Any, handles: list[Any], labels: list[str]) -> None:
    # Under the time axis: over two twin axes full of samples there is no empty corner to put it in.
    axis.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=6, frameon=False)


def _plot_soak_memory(axis: Any, soak: dict[str, Any]) -> None:
    """The server's RSS (with its fitted slope) and Redis' used memory, in MiB."""
    samples = soak["samples"]
    t = np.asarray([s["t_s"] for s in samples], dtype=float)
    rss = _series(samples, "rss_bytes", 1024 * 1024)
    memory = soak["memory"]
    axis.plot(t, rss, color="tab:purple", marker=".", linewidth=1.4, label="server RSS")
    judged = np.isfinite(rss) & (t >= soak["warmup_s"])
    if memory["slope_mib_per_h"] is not None and judged.sum() >= 2:
        # The line the verdict fitted (the same least squares), so a reader sees what was judged.
        slope, intercept = np.polyfit(t[judged], rss[judged], 1)
        axis.plot(t[judged], intercept + slope * t[judged], color="tab:purple", linestyle=":", linewidth=1.2,
                  label="fitted line")
    _shade_soak(axis, soak, samples)
    # Not from zero: a leak of a few MiB must show beside hundreds.
    axis.set_ylabel("server RSS (MiB)", color="tab:purple")
    handles, labels = axis.get_legend_handles_labels()
    redis = _series(samples, "redis_used_memory_bytes", 1024 * 1024)
    if np.isfinite(redis).any():
        # Its own axis: Redis holds a few MiB where the server holds hundreds, and its growth must show too.
        redis_axis = axis.twinx()
        redis_axis.plot(t, redis, color="tab:red", marker=".", linewidth=1.2, label="Redis used memory")
        redis_axis.set_ylabel("Redis used memory (MiB)", color="tab:red")
        redis_axis.set_ylim(bottom=0)
        more_handles, more_labels = redis_axis.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    slope = memory["slope_mib_per_h"]
    verdict = {True: "OK", False: "FAILED", None: "no verdict"}[memory["passed"]]
    axis.set_title(f"memory: server RSS slope {'-' if slope is None else f'{slope:,.1f}'} MiB/h after the warm-up "
                   f"(limit {memory['max_slope_mib_per_h']:g}): {verdict}", fontsize=10)
    _legend_below(axis, handles, labels)


def _plot_soak_load(axis: Any, soak: dict[str, Any]) -> None:
    """Open streams and calls in flight (left axis); the server's and the load's p99 per interval (right axis)."""
    samples = soak["samples"]
    t = np.asarray([s["t_s"] for s in samples], dtype=float)
    axis.plot(t, _series(samples, "open_streams"), color="tab:blue", linewidth=1.4, label="open streams")
    axis.plot(t, _series(samples, "in_flight_calls"), color="tab:cyan", linewidth=1.2, linestyle="--",
              label="calls in flight")
    axis.set_ylabel("streams, calls")
    axis.set_ylim(bottom=0)
    _shade_soak(axis, soak, samples)
    latency = axis.twinx()
    latency.plot(t, _series(samples, "server_p99_ms"), color="tab:orange", marker=".", linewidth=1.2,
                 label="server p99")
    latency.plot(t, _series(samples, "client_p99_ms"), color="tab:brown", linewidth=1.0, alpha=0.7,
                 label="load tester p99")
    latency.set_ylabel("p99 per interval (ms)")
    latency.set_ylim(bottom=0)
    drift = soak["p99_drift"]
    ratio = "-" if drift["drift"] is None else f"x{drift['drift']:.2f}"
    verdict = {True: "OK", False: "FAILED", None: "no verdict"}[drift["passed"]]
    axis.set_title(f"streams and latency: server p99 drift {ratio}, last fifth over first (limit "
                   f"x{drift['max_drift']:g}): {verdict}", fontsize=10)
    handles, labels = axis.get_legend_handles_labels()
    more_handles, more_labels = latency.get_legend_handles_labels()
    _legend_below(axis, handles + more_handles, labels + more_labels)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
