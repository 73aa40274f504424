"""The report: figures from a recording (a plain dict, the same in JSON), and the final table.

A chunk is measured when it was sent after the warm-up; throughput is measured chunks over the time
from the end of the warm-up to the last measured answer.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

import numpy as np
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from loadtest.config import LoadConfig
from loadtest.recorder import error_counts
from lstm_stream.client.types import ModelInfo

REPORT_VERSION = 1
PERCENTILES = {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p99.9": 99.9}
HISTOGRAM_BINS = 60
# What the report says of the server's model (docs/loadtest.md, "The JSON report", `server.model`): GetModel's name,
# fingerprint and shapes.
MODEL_FIELDS = ("name", "fingerprint", "input_features", "output_size", "per_timestep_outputs", "max_chunk_timesteps")


def _ms(seconds: float) -> float:
    return round(float(seconds) * 1000.0, 4)


def latency_summary(latency_s: np.ndarray) -> dict[str, float | None]:
    if latency_s.size == 0:
        return {**dict.fromkeys(PERCENTILES), "mean": None, "min": None, "max": None}
    values = np.percentile(latency_s, list(PERCENTILES.values()))
    summary: dict[str, float | None] = {name: _ms(v) for name, v in zip(PERCENTILES, values, strict=True)}
    summary.update(mean=_ms(latency_s.mean()), min=_ms(latency_s.min()), max=_ms(latency_s.max()))
    return summary


def histogram(latency_s: np.ndarray) -> dict[str, list[float] | list[int]]:
    """Log-spaced latency bins, so that a 0.5 ms median and a 200 ms tail both stay readable."""
    if latency_s.size == 0:
        return {"edges_ms": [], "counts": []}
    low = max(float(latency_s.min()) * 1000.0, 1e-3)
    high = max(float(latency_s.max()) * 1000.0, low * 1.01)
    edges = np.logspace(math.log10(low * 0.95), math.log10(high * 1.05), HISTOGRAM_BINS + 1)
    counts, _ = np.histogram(latency_s * 1000.0, bins=edges)
    return {"edges_ms": [round(float(e), 5) for e in edges], "counts": [int(c) for c in counts]}


def bucket_seconds(span_s: float) -> float:
    for bucket in (0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0):
        if span_s / bucket <= 60:
            return bucket
    return 60.0


def timeline(done: np.ndarray, latency: np.ndarray, timesteps: np.ndarray, error_times: np.ndarray,
             span_s: float) -> dict[str, Any]:
    """Throughput, latency and errors per time bucket, warm-up included (the plot shades it)."""
    bucket = bucket_seconds(span_s)
    # Whole buckets only: the answers that trail in after the last one are counted in it, over its real
    # width, so a sliver of a bucket never shows as a spike.
    n = max(1, int(span_s / bucket))
    index = np.clip((done / bucket).astype(np.int64), 0, n - 1)
    counts = np.bincount(index, minlength=n)
    steps = np.bincount(index, weights=timesteps, minlength=n)
    errors = np.bincount(np.clip((error_times / bucket).astype(np.int64), 0, n - 1), minlength=n)
    order = np.argsort(index, kind="stable")
    bounds = np.searchsorted(index[order], np.arange(n + 1))
    p50, p99 = [], []
    for b in range(n):
        values = latency[order[bounds[b] : bounds[b + 1]]]
        if values.size:
            q = np.percentile(values, [50, 99])
            p50.append(_ms(q[0]))
            p99.append(_ms(q[1]))
        else:
            p50.append(None)
            p99.append(None)
    widths = np.full(n, bucket)
    widths[-1] = max(span_s - bucket * (n - 1), bucket)
    return {
        "bucket_s": bucket,
        "t_s": [round(bucket * b, 3) for b in range(n)],
        "chunks_per_s": [round(float(c / w), 2) for c, w in zip(counts, widths, strict=True)],
        "timesteps_per_s": [round(float(s / w), 2) for s, w in zip(steps, widths, strict=True)],
        "latency_p50_ms": p50,
        "latency_p99_ms": p99,
        "errors": [int(e) for e in errors],
    }


def build_report(config: LoadConfig, model: ModelInfo, recording: dict[str, Any], started_at: dt.datetime,
                 wall_s: float) -> dict[str, Any]:
    sent, latency = recording["sent"], recording["latency"]
    timesteps, lag = recording["timesteps"], recording["lag"]
    done = sent + latency
    measured = sent >= config.warmup_s
    window = float(done[measured].max() - config.warmup_s) if measured.any() else 0.0
    chunks = int(measured.sum())
    steps = int(timesteps[measured].sum())
    span = float(max(done.max() if done.size else 0.0, config.warmup_s + (config.duration_s or 0.0), 1e-3))
    measured_errors = recording["error_times"] >= config.warmup_s
    codes = recording["error_codes"]
    report: dict[str, Any] = {
        "tool": "lstm-loadtest",
        "report_version": REPORT_VERSION,
        "started_at": started_at.isoformat(timespec="seconds"),
        "wall_s": round(wall_s, 3),
        "config": config.as_dict(),
        "server": {"target": config.target, "model": {name: getattr(model, name) for name in MODEL_FIELDS}},
        "mode": "open" if config.open_loop else "closed",
        "api": config.api,
        "streams": config.streams,
        "chunk_timesteps": config.chunk_timesteps,
        "warmup_s": config.warmup_s,
        "duration_s": round(window, 4),
        "chunks": chunks,
        "timesteps": steps,
        "chunks_per_s": round(chunks / window, 2) if window > 0 else 0.0,
        "timesteps_per_s": round(steps / window, 2) if window > 0 else 0.0,
        "latency_ms": latency_summary(latency[measured]),
        "errors": error_counts([c for c, m in zip(codes, measured_errors, strict=True) if m]),
        "errors_total": int(measured_errors.sum()),
        "retries": recording["retries"],
        "replays": recording["replays"],
        "failed_chunks": recording["failed_chunks"],
        "broken_streams": recording["broken"],
        # Answered chunks (warm-up included) per model version that answered them, and the chunks that moved
        # their stream off a retired version (--on-retired-version reset: each started a new sequence).
        "model_versions": {str(version): count for version, count in sorted(recording["version_chunks"].items())},
        "migrations": recording["migrations"],
        "totals": {
            "chunks": int(sent.size),
            "timesteps": int(timesteps.sum()),
            "errors": error_counts(codes),
            "warmup_chunks": int(sent.size - chunks),
        },
        "open_loop": None,
        # --gateways: the sensors' chunks went through this many gateway connections, many per message.
        "gateways": {
            "connections": config.gateways,
            "messages": recording["gateway_messages"],
            "chunks_per_message": round(int(sent.size) / recording["gateway_messages"], 2)
            if recording["gateway_messages"] else 0.0,
        } if config.gateways else None,
        "latency_histogram": histogram(latency[measured]),
        "timeline": timeline(done, latency, timesteps, recording["error_times"], span),
        "verify": None,
    }
    if config.open_loop:
        assert config.rate is not None
        target = config.rate * config.streams
        period = 1.0 / config.rate
        late = int((lag[measured] > 0.1 * period).sum())
        response = latency[measured] + lag[measured]  # from the scheduled send: no coordinated omission
        kept_up = chunks > 0 and report["chunks_per_s"] >= 0.95 * target and late <= 0.01 * chunks
        report["open_loop"] = {
            "target_chunks_per_s": round(target, 2),
            "late_chunks": late,
            "lag_ms": latency_summary(lag[measured]),
            "latency_from_schedule_ms": latency_summary(response),
            "kept_up": bool(kept_up),
        }
    return report


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render(report: dict[str, Any], console: Console) -> None:
    """The final table, readable at a glance."""
    lat = report["latency_ms"]
    title = (f"lstm-loadtest: {report['streams']} streams x {report['chunk_timesteps']} timesteps/chunk, "
             f"{report['api']}, {report['mode']} loop, {report['duration_s']:.1f} s measured")
    console.print(title, style="bold", highlight=False)
    table = Table(show_header=True, header_style="bold")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_row("chunks/s", _fmt(report["chunks_per_s"], 1))
    table.add_row("timesteps/s", _fmt(report["timesteps_per_s"], 1))
    for name in ("p50", "p90", "p99", "p99.9", "max"):
        table.add_row(f"latency {name} (ms)", _fmt(lat[name], 3))
    table.add_row("chunks measured", f"{report['chunks']:,}")
    table.add_row("warm-up chunks (excluded)", f"{report['totals']['warmup_chunks']:,}")
    errors = report["errors"]
    table.add_row("errors", ", ".join(f"{code} {count:,}" for code, count in errors.items()) or "0",
                  style="red" if errors else None)
    table.add_row("retries", f"{report['retries']:,}")
    table.add_row("replays (retries answered, not applied twice)", f"{report['replays']:,}")
    if report["gateways"]:
        table.add_row("chunks per gateway message", _fmt(report["gateways"]["chunks_per_message"], 1))
    if len(report["model_versions"]) > 1 or report["migrations"]:
        table.add_row("chunks per model version", ", ".join(f"v{version} {count:,}" for version, count
                                                             in report["model_versions"].items()))
        table.add_row("migrations (moved off a retired version)", f"{report['migrations']:,}")
    broken = report["broken_streams"]
    table.add_row("broken sequences", f"{len(broken):,}", style="red" if broken else None)
    open_loop = report["open_loop"]
    if open_loop:
        table.add_row("offered chunks/s", _fmt(open_loop["target_chunks_per_s"], 1))
        table.add_row("late chunks (sent >10% of a period behind)", f"{open_loop['late_chunks']:,}",
                      style=None if open_loop["kept_up"] else "yellow")
        table.add_row("latency from schedule p99 (ms)", _fmt(open_loop["latency_from_schedule_ms"]["p99"], 3))
    console.print(table)
    if open_loop and not open_loop["kept_up"]:
        console.print("[yellow]could not keep up with the offered rate: the client or the server fell behind "
                      "the sensors' schedule[/yellow]")
    for item in broken[:10]:
        message = item["message"].splitlines()[0][:200] if item["message"] else ""
        console.print(f"[red]stream {escape(item['stream_id'])} (sequence {item['segment']}) broke at timestep "
                      f"{item['timestep']}: {item['code']}: {escape(message)}[/red]")
    if len(broken) > 10:
        console.print(f"[red]... and {len(broken) - 10} more broken sequences[/red]")
