"""lstm-loadtest --soak: the server's /metrics sampled through a run, and a verdict on memory growth and p99 drift.

A short soak against a real server collects samples from its real /metrics (RSS, open streams, Redis memory,
its latency per interval), churns short-lived streams beside the load and draws the soak panels. Beside a real
load, a fake metrics endpoint whose RSS grows fast and whose p99 drifts fails the run with exit code 5 and
the figures; a flat one (with failed scrapes among its answers) passes. The slope, the drift and the
histogram-delta percentiles are checked on hand-built numbers.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from devkit import ROOT
from devkit.processes import ServerProcess
from loadtest import EXIT_OK, EXIT_SOAK_FAILED, ConfigError, LoadConfig, run_load
from loadtest.soak import (
    MIB,
    bucket_delta,
    bucket_quantile,
    bucket_sum,
    memory_slope_mib_h,
    parse_metrics,
    verdict,
)

pytestmark = pytest.mark.timeout(120)
# The report's soak section as docs/loadtest.md documents it ("Soak mode").
SOAK_FIELDS = {"soak", "metrics_url", "interval_s", "scrapes", "gaps", "passed", "failures", "memory", "p99_drift",
               "churn", "samples"}
SAMPLE_FIELDS = {"t_s", "rss_bytes", "redis_used_memory_bytes", "open_streams", "in_flight_calls", "server_p50_ms",
                 "server_p99_ms", "client_p99_ms", "error"}
BOUNDS = (0.001, 0.005, 0.025, 0.1, 0.25, 1.0)


def run_cli(*args: str) -> tuple[int, str, str]:
    done = subprocess.run([sys.executable, "-m", "loadtest", "--no-progress", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=90)
    return done.returncode, done.stdout, done.stderr


def exposition(rss_bytes: float, fast: float, slow: float) -> str:
    """A /metrics page as lstm-serve writes one: RSS, the gauges, and lstm_serve_request_seconds whose
    observations are `fast` (in the 5 ms bucket) and `slow` (in the 250 ms bucket), plus health checks that
    the soak must leave out."""
    lines = ["# HELP process_resident_memory_bytes Resident memory size in bytes.",
             "# TYPE process_resident_memory_bytes gauge", f"process_resident_memory_bytes {rss_bytes:.1f}",
             "# HELP lstm_serve_open_streams Bidirectional streams open now", "# TYPE lstm_serve_open_streams gauge",
             'lstm_serve_open_streams{protocol="native"} 3.0', 'lstm_serve_open_streams{protocol="triton"} 1.0',
             "# HELP lstm_serve_redis_used_memory_bytes Redis", "# TYPE lstm_serve_redis_used_memory_bytes gauge",
             "lstm_serve_redis_used_memory_bytes 2097152.0",
             "# HELP lstm_serve_request_seconds Server-side time", "# TYPE lstm_serve_request_seconds histogram"]
    for method, fast_n, slow_n in (("PredictStream", fast, slow), ("Check", 1000 * (fast + slow), 0.0)):
        protocol = "health" if method == "Check" else "native"
        for bound in (*BOUNDS, math.inf):
            count = (fast_n if bound >= 0.005 else 0.0) + (slow_n if bound >= 0.25 else 0.0)
            le = "+Inf" if math.isinf(bound) else repr(bound)
            lines.append(f'lstm_serve_request_seconds_bucket{{protocol="{protocol}",method="{method}",le="{le}"}} '
                         f"{count:.1f}")
        labels = f'protocol="{protocol}",method="{method}"'
        lines.append(f"lstm_serve_request_seconds_count{{{labels}}} {fast_n + slow_n:.1f}")
        lines.append(f"lstm_serve_request_seconds_sum{{{labels}}} 1.0")
    return "\n".join(lines) + "\n"


class FakeMetrics:
    """An HTTP endpoint on 127.0.0.1 serving `page(seconds since its first request, request number)`; a page of
    None answers 503."""

    def __init__(self, page: Callable[[float, int], str | None]) -> None:
        lock, served, first = threading.Lock(), [0], [0.0]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with lock:
                    served[0] += 1
                    number = served[0]
                    if number == 1:
                        first[0] = time.monotonic()
                body = page(time.monotonic() - first[0], number)
                if body is None:
                    self.send_error(503)
                    return
                data = body.encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/metrics"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def fake_metrics() -> Iterator[Callable[[Callable[[float, int], str | None]], FakeMetrics]]:
    started: list[FakeMetrics] = []

    def serve(page: Callable[[float, int], str | None]) -> FakeMetrics:
        started.append(FakeMetrics(page))
        return started[-1]

    yield serve
    for endpoint in started:
        endpoint.close()


def test_a_short_soak_samples_the_real_servers_metrics_and_draws_them(default_server: ServerProcess,
                                                                      tmp_path: Path) -> None:
    json_path, plot_path = tmp_path / "soak.json", tmp_path / "soak.png"
    # Limits no short run can reach: this test is about the samples; the verdict is the fake endpoint's.
    code, out, err = run_cli(
        "--target", default_server.address, "--streams", "4", "--chunk", "5", "--api", "stream", "--duration", "4",
        "--warmup", "0.5", "--soak", "--soak-metrics", f"http://127.0.0.1:{default_server.metrics_port}/metrics",
        "--soak-interval", "0.4", "--soak-churn", "2", "--soak-churn-every", "0.5", "--max-memory-slope", "1e9",
        "--max-p99-drift", "1e9", "--json", str(json_path), "--plot", str(plot_path),
    )
    assert code == EXIT_OK, out + err
    soak = json.loads(json_path.read_text())["soak"]
    assert set(soak) >= SOAK_FIELDS - {"soak"}
    samples = soak["samples"]
    assert len(samples) >= 8 and soak["gaps"] == 0
    assert all(set(sample) == SAMPLE_FIELDS for sample in samples)
    assert [s["t_s"] for s in samples] == sorted(s["t_s"] for s in samples)
    assert all(s["rss_bytes"] > 100 * MIB for s in samples)  # a TensorFlow process
    assert max(s["open_streams"] for s in samples) >= 4  # the load's four PredictStream calls at least
    assert max(s["in_flight_calls"] for s in samples) >= 4
    assert all(s["redis_used_memory_bytes"] > 100_000 for s in samples)  # read by the health tracker every second
    latencies = [s["server_p99_ms"] for s in samples if s["server_p99_ms"] is not None]
    assert len(latencies) >= 5 and all(0 < p99 < 10_000 for p99 in latencies)
    assert any(s["client_p99_ms"] is not None for s in samples)
    assert soak["passed"] is True and soak["memory"]["slope_mib_per_h"] is not None
    assert soak["p99_drift"]["drift"] is not None
    churn = soak["churn"]
    assert churn["streams_completed"] >= 4 and churn["streams_failed"] == 0
    assert churn["chunks"] == 3 * churn["streams_completed"]
    assert "soak: OK" in out and "short-lived streams started" in out
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(plot_path).shape
    assert width > 600 and height > 1200  # four panels: the load's two and the soak's two


def test_memory_growth_and_p99_drift_fail_the_run_with_exit_code_5(default_server: ServerProcess, fake_metrics,
                                                                  tmp_path: Path) -> None:
    # 50 MiB a second is 175,000 MiB/h; after 1.5 s every request lands in the 250 ms bucket instead of the 5 ms one.
    def growing(elapsed: float, number: int) -> str:
        fast = 100.0 * min(elapsed, 1.5)
        slow = 100.0 * max(0.0, elapsed - 1.5)
        return exposition(300 * MIB + 50 * MIB * elapsed, fast, slow)

    endpoint = fake_metrics(growing)
    json_path = tmp_path / "soak.json"
    code, out, err = run_cli(
        "--target", default_server.address, "--streams", "2", "--chunk", "5", "--duration", "3", "--warmup", "0.3",
        "--soak", "--soak-metrics", endpoint.url, "--soak-interval", "0.2", "--json", str(json_path),
    )
    assert code == EXIT_SOAK_FAILED, out + err
    report = json.loads(json_path.read_text())
    soak = report["soak"]
    assert report["exit_code"] == EXIT_SOAK_FAILED and soak["passed"] is False
    memory, drift = soak["memory"], soak["p99_drift"]
    assert memory["slope_mib_per_h"] > 100_000 and memory["passed"] is False
    assert drift["first_p99_ms"] < 10 and drift["last_p99_ms"] > 100 and drift["drift"] > 10
    assert drift["passed"] is False
    assert len(soak["failures"]) == 2
    text = " ".join(out.split())
    assert f"soak: FAILED: server memory grew {memory['slope_mib_per_h']:,.1f} MiB/h" in text
    assert "past the limit of 64 MiB/h" in text
    assert f"server p99 drifted x{drift['drift']:.2f}" in text and "past the limit of x2" in text


def test_a_flat_server_passes_and_failed_scrapes_are_gaps(default_server: ServerProcess, fake_metrics) -> None:
    # Steady memory and latency (0.2 % of the requests slow, well inside the p99); every fourth scrape answers 503
    # (a gap), which must not stop or fail the soak.
    endpoint = fake_metrics(lambda elapsed, number: None if number % 4 == 0 else
                            exposition(300 * MIB, 100.0 * elapsed, 0.2 * elapsed))
    config = LoadConfig(target=default_server.address, streams=2, chunk_timesteps=5, duration_s=2.5, warmup_s=0.3,
                        soak=True, soak_metrics=endpoint.url, soak_interval_s=0.2)
    report = run_load(config)
    soak = report["soak"]
    assert report["exit_code"] == EXIT_OK, soak["failures"]
    assert soak["passed"] is True and soak["failures"] == []
    assert soak["memory"]["slope_mib_per_h"] == pytest.approx(0.0, abs=1e-6)
    assert soak["p99_drift"]["drift"] == pytest.approx(1.0, abs=0.05)
    assert soak["gaps"] >= 2
    gaps = [s for s in soak["samples"] if s["error"] is not None]
    assert len(gaps) == soak["gaps"] and all("503" in s["error"] and s["rss_bytes"] is None for s in gaps)


def test_a_metrics_url_that_never_answers_gives_no_verdict(default_server: ServerProcess, fake_metrics) -> None:
    endpoint = fake_metrics(lambda elapsed, number: None)
    report = run_load(LoadConfig(target=default_server.address, streams=1, duration_s=1.0, warmup_s=0, soak=True,
                                 soak_metrics=endpoint.url, soak_interval_s=0.2))
    assert report["exit_code"] == EXIT_OK
    assert report["soak"]["passed"] is None and report["soak"]["gaps"] == report["soak"]["scrapes"] >= 4


# --- the figures, on hand-built numbers ------------------------------------------------------------------------

def test_percentiles_from_bucket_deltas_interpolate_as_prometheus_does() -> None:
    buckets = ((0.01, 50.0), (0.1, 100.0), (math.inf, 100.0))
    assert bucket_quantile(0.5, buckets) == pytest.approx(0.01)
    assert bucket_quantile(0.99, buckets) == pytest.approx(0.01 + 0.09 * 49 / 50)
    assert bucket_quantile(0.25, buckets) == pytest.approx(0.005)
    # In the +Inf bucket: the highest finite bound. Nothing observed: no percentile.
    assert bucket_quantile(0.99, ((0.01, 10.0), (math.inf, 100.0))) == pytest.approx(0.01)
    assert bucket_quantile(0.99, ((0.01, 0.0), (math.inf, 0.0))) is None
    assert bucket_quantile(0.99, ()) is None
    before = ((0.01, 40.0), (0.1, 50.0), (math.inf, 50.0))
    after = ((0.01, 40.0), (0.1, 150.0), (math.inf, 150.0))
    delta = bucket_delta(before, after)
    assert delta == ((0.01, 0.0), (0.1, 100.0), (math.inf, 100.0))  # the interval's 100 were all slow
    assert bucket_quantile(0.5, delta) == pytest.approx(0.01 + 0.09 * 0.5)
    # A server restarted between two scrapes: its counts start again, and all of them are the interval's.
    assert bucket_delta(after, before) == before
    assert bucket_sum([delta, (), delta]) == ((0.01, 0.0), (0.1, 200.0), (math.inf, 200.0))


def test_parse_metrics_sums_gauges_and_leaves_health_checks_out() -> None:
    scrape = parse_metrics(exposition(123 * MIB, 10.0, 5.0))
    assert scrape.rss_bytes == 123 * MIB and scrape.open_streams == 4.0 and scrape.in_flight_calls is None
    assert scrape.redis_used_memory_bytes == 2 * MIB
    assert dict(scrape.latency)[math.inf] == 15.0  # PredictStream's 15, not the health checks' 15,000
    assert dict(scrape.latency)[0.005] == 10.0


def test_memory_slope_is_a_least_squares_line_in_mib_per_hour() -> None:
    assert memory_slope_mib_h([0, 1800, 3600], [100 * MIB, 110 * MIB, 120 * MIB]) == pytest.approx(20.0)
    # Noise around a flat line fits flat; a step fits its least-squares slope, not its end points.
    assert memory_slope_mib_h([0, 1, 2, 3], [5 * MIB, 7 * MIB, 5 * MIB, 7 * MIB]) == pytest.approx(0.4 * 3600)


def _samples(rss_mib: list[float], start_s: float = 0.0) -> list[dict[str, object]]:
    return [{"t_s": start_s + 60.0 * n, "rss_bytes": mib * MIB, "redis_used_memory_bytes": None}
            for n, mib in enumerate(rss_mib)]


def test_the_verdict_judges_after_the_warm_up_and_names_its_figures() -> None:
    fast = ((0.005, 100.0), (0.25, 100.0), (math.inf, 100.0))
    slow = ((0.005, 0.0), (0.25, 100.0), (math.inf, 100.0))
    # A minute apart: 1 MiB a minute is 60 MiB/h, just under the limit. The warm-up (61 s) is left out: its jump
    # in memory, and the latency of the interval that straddles its end (60 -> 120 s).
    samples = _samples([50, 150, 200, 201, 202, 203, 204, 205, 206, 207, 208, 209, 210])
    deltas = [(), slow, slow, fast, fast, fast, fast, fast, fast, fast, fast, slow, slow]
    judged = verdict(samples, deltas, warmup_s=61.0, max_memory_slope_mib_h=64.0, max_p99_drift=2.0)
    assert judged["memory"]["slope_mib_per_h"] == pytest.approx(60.0) and judged["memory"]["passed"] is True
    assert (judged["memory"]["first_mib"], judged["memory"]["last_mib"], judged["memory"]["samples"]) == (200, 210, 11)
    drift = judged["p99_drift"]
    assert drift["intervals"] == 10 and drift["intervals_per_fifth"] == 2
    assert drift["first_p99_ms"] == pytest.approx(5.0 * 99 / 100, rel=1e-3)
    assert drift["last_p99_ms"] == pytest.approx(5.0 + 245.0 * 99 / 100, rel=1e-3)
    assert drift["passed"] is False and judged["passed"] is False
    assert judged["failures"] == [f"server p99 drifted x{drift['drift']:.2f} ({drift['first_p99_ms']:.3g} ms over the "
                                  f"first fifth of the intervals -> {drift['last_p99_ms']:.3g} ms over the last), past "
                                  "the limit of x2"]
    growing = verdict(samples, deltas, warmup_s=61.0, max_memory_slope_mib_h=50.0, max_p99_drift=100.0)
    assert growing["passed"] is False and growing["failures"][0].startswith("server memory grew 60.0 MiB/h")
    flat = verdict(_samples([200] * 8), [(), *[fast] * 7], warmup_s=0.0, max_memory_slope_mib_h=1.0,
                   max_p99_drift=1.01)
    assert flat["passed"] is True and flat["failures"] == [] and flat["p99_drift"]["drift"] == pytest.approx(1.0)
    # Too few samples after the warm-up: no verdict, and no failure.
    short = verdict(_samples([100, 500, 900, 1300]), [(), fast, slow, slow], warmup_s=0.0,
                    max_memory_slope_mib_h=1.0, max_p99_drift=1.01)
    assert short["passed"] is None and short["failures"] == []
    assert short["memory"]["slope_mib_per_h"] is None and short["p99_drift"]["drift"] is None


def test_soak_flags_need_soak_and_the_metrics_url_follows_the_target() -> None:
    with pytest.raises(ConfigError, match="add --soak"):
        LoadConfig(soak_churn=2).check()
    with pytest.raises(ConfigError, match="http"):
        LoadConfig(soak=True, soak_metrics="127.0.0.1:9464").check()
    with pytest.raises(ConfigError, match="p99 drift above 1"):
        LoadConfig(soak=True, max_p99_drift=1.0).check()
    assert LoadConfig(target="10.0.0.7:50051", soak=True).check().metrics_url == "http://10.0.0.7:9464/metrics"


def test_the_load_test_page_documents_soak_mode() -> None:
    page = (ROOT / "docs" / "loadtest.md").read_text()
    missing = sorted(f for f in SOAK_FIELDS | SAMPLE_FIELDS if f"`{f}`" not in page)
    assert not missing, f"docs/loadtest.md does not name: {missing}"
    for flag in ("--soak", "--soak-metrics", "--soak-interval", "--soak-churn", "--soak-churn-every",
                 "--soak-churn-chunks", "--max-memory-slope", "--max-p99-drift"):
        assert f"`{flag}" in page, flag
    assert "| 5 |" in page
