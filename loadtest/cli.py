"""`lstm-loadtest`: a fleet of simulated sensors that measures the server and checks its answers.

Exit codes: 0 ok; 1 verification failed; 2 usage error, connection error, or nothing answered;
3 the tool itself failed (a traceback is printed); 4 a chunk failed for good, so a sequence broke
(--no-fail-on-errors turns this one off); 5 --soak: the server's memory or p99 did not hold steady.
A chunk answered after retries is not a failure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from loadtest.config import DEFAULT_MODEL, ConfigError, LoadConfig, default_prefix
from loadtest.run import EXIT_CRASH, EXIT_OK, EXIT_USAGE, run_load

EXAMPLES = """\
examples:
  lstm-loadtest --target 127.0.0.1:50051 --streams 64 --chunk 20 --duration 30 --plot load.png
  lstm-loadtest --streams 200 --rate 10 --api stream --duration 60 --json report.json
  lstm-loadtest --streams 16 --chunks 4000 --verify
  lstm-loadtest --model-name pump --sequence-chunks 50 --verify --verify-repository /models --duration 60
  lstm-loadtest --streams 64 --chunk 20 --api stream --duration 600 --soak --soak-churn 4 --plot soak.png
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-loadtest",
        description="Drive an lstm-serve server with simulated sensors (seeded, reproducible), measure "
        "throughput and latency, and optionally verify every answer against Keras.",
        epilog=EXAMPLES + "\nexit codes: 0 ok, 1 verification failed, 2 usage or connection error, 3 the tool failed, "
        "4 a chunk failed for good (a sequence broke), 5 --soak: memory or p99 did not hold steady",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    defaults = LoadConfig(stream_prefix="x")
    _load_options(parser.add_argument_group("load"), defaults)
    _security_options(parser.add_argument_group("security (as lstm-stream and lstm_stream.client take them)"))
    _verify_options(parser.add_argument_group("verification"), defaults)
    _soak_options(parser.add_argument_group("soak (the server's /metrics sampled through the run)"), defaults)
    _output_options(parser.add_argument_group("output"), defaults)
    return parser


def _soak_options(soak: argparse._ArgumentGroup, d: LoadConfig) -> None:
    soak.add_argument("--soak", action="store_true",
                      help="sample the server's memory, open streams, calls in flight, Redis memory and p50/p99 "
                      "from its /metrics through the run; exit 5 when memory grows or p99 drifts past the limits")
    soak.add_argument("--soak-metrics", dest="soak_metrics", metavar="URL",
                      help="the server's metrics URL (default http://<--target's host>:9464/metrics)")
    soak.add_argument("--soak-interval", type=float, default=d.soak_interval_s, dest="soak_interval_s", metavar="S",
                      help=f"seconds between scrapes (default {d.soak_interval_s:g})")
    soak.add_argument("--soak-churn", type=int, default=d.soak_churn, dest="soak_churn", metavar="N",
                      help="beside the load, start N short-lived streams every --soak-churn-every seconds; each "
                      f"sends --soak-churn-chunks chunks and is reset (default {d.soak_churn}: none)")
    soak.add_argument("--soak-churn-every", type=float, default=d.soak_churn_every_s, dest="soak_churn_every_s",
                      metavar="S", help=f"seconds between rounds of churned streams (default {d.soak_churn_every_s:g})")
    soak.add_argument("--soak-churn-chunks", type=int, default=d.soak_churn_chunks, dest="soak_churn_chunks",
                      metavar="N", help=f"chunks of each churned stream (default {d.soak_churn_chunks})")
    soak.add_argument("--max-memory-slope", type=float, default=d.max_memory_slope_mib_h,
                      dest="max_memory_slope_mib_h", metavar="MIB_PER_H",
                      help="fail when the server's RSS grows faster than this, a least-squares line over the samples "
                      f"after the warm-up (default {d.max_memory_slope_mib_h:g} MiB/h)")
    soak.add_argument("--max-p99-drift", type=float, default=d.max_p99_drift, dest="max_p99_drift", metavar="X",
                      help="fail when the server's p99 over the last fifth of the samples is more than X times its p99 "
                      f"over the first fifth after the warm-up (default {d.max_p99_drift:g})")


def _load_options(load: argparse._ArgumentGroup, d: LoadConfig) -> None:
    load.add_argument("--target", default=d.target, metavar="HOST:PORT",
                      help=f"server address HOST:PORT (default {d.target})")
    load.add_argument("--streams", type=int, default=d.streams, metavar="N",
                      help=f"simulated sensors (default {d.streams})")
    load.add_argument("--chunk", type=int, default=d.chunk_timesteps, dest="chunk_timesteps", metavar="T",
                      help=f"timesteps per chunk (default {d.chunk_timesteps})")
    load.add_argument("--api", choices=("unary", "stream"), default=d.api,
                      help="unary Predict, or one bidirectional PredictStream per sensor (default unary)")
    loop = load.add_mutually_exclusive_group()
    loop.add_argument("--rate", type=float, metavar="R",
                      help="open loop: each sensor sends this many chunks/s on a schedule")
    loop.add_argument("--in-flight", type=int, dest="in_flight", metavar="K",
                      help="closed loop: chunks in flight in all (default: one per stream)")
    load.add_argument("--duration", type=float, dest="duration_s", metavar="S",
                      help="measured seconds after the warm-up (default 10 unless --chunks is given)")
    load.add_argument("--chunks", type=int, dest="total_chunks", metavar="N",
                      help="total chunks of all streams, warm-up included (with --duration: whichever ends first)")
    load.add_argument("--warmup", type=float, default=d.warmup_s, dest="warmup_s", metavar="S",
                      help=f"seconds at the start excluded from the figures (default {d.warmup_s:g})")
    load.add_argument("--channels", type=int, default=d.channels, metavar="N",
                      help=f"gRPC channels (TCP connections) per process (default {d.channels})")
    load.add_argument("--gateways", type=int, default=d.gateways, metavar="G",
                      help="spread the sensors over G gateway connections, each forwarding many sensors' chunks "
                      "per message (PredictBatch; with --api stream one PredictBatchStream each); 0: every sensor "
                      "sends its own (default)")
    load.add_argument("--processes", type=int, default=d.processes, metavar="N",
                      help="client processes; streams are split between them and the reports merged (default 1)")
    load.add_argument("--seed", type=int, default=d.seed, metavar="S",
                      help="sensor i uses signal seed S+i (default 0)")
    load.add_argument("--stream-prefix", dest="stream_prefix", default=None, metavar="PREFIX",
                      help="stream ids are PREFIX-0, PREFIX-1, ... (default: run-unique, lt-<random>)")
    load.add_argument("--timeout", type=float, default=d.timeout_s, dest="timeout_s", metavar="S",
                      help=f"deadline of one attempt of one chunk (default {d.timeout_s:g} s)")
    load.add_argument("--max-retries", type=int, default=d.max_retries, dest="max_retries", metavar="N",
                      help="resends of a chunk failing with UNAVAILABLE, DEADLINE_EXCEEDED, ABORTED or "
                      "RESOURCE_EXHAUSTED, or whose call the transport or a proxy ended (a break, e.g. INTERNAL "
                      f"'Stream removed' from Envoy) (default {d.max_retries})")
    load.add_argument("--max-restarts", type=int, default=d.max_restarts, dest="max_restarts", metavar="N",
                      help="after an error that ends a stream's sequence, start a new one this often, then stop "
                      f"the stream (default {d.max_restarts})")
    load.add_argument("--model-name", dest="model_name", default=d.model_name, metavar="NAME",
                      help="send every chunk to this model of the server's repository (default: the server's only "
                      "model)")
    load.add_argument("--sequence-chunks", type=int, dest="sequence_chunks", metavar="N",
                      help="end each stream's sequence after N chunks; its next chunk starts a new one (with "
                      "reset, on the newest model version) (default: one sequence per stream)")
    load.add_argument("--no-offsets", action="store_false", dest="use_offsets",
                      help="send no start_offset (append where the stream stands); retries stay safe by request_id")
    load.add_argument("--no-cleanup", action="store_false", dest="cleanup",
                      help="leave the streams' state on the server after the run (default: ResetStream each)")
    load.add_argument("--fail-on-errors", action=argparse.BooleanOptionalAction, default=d.fail_on_errors,
                      dest="fail_on_errors",
                      help="exit 4 when any chunk failed for good (refused, or still failing after its retries), "
                      "so a sequence broke; chunks answered after a retry are not failures (default on)")


def _security_options(security: argparse._ArgumentGroup) -> None:
    security.add_argument("--tls-ca", dest="tls_ca", metavar="PEM",
                          help="connect with TLS, verifying the server against this CA certificate")
    security.add_argument("--client-cert", dest="client_cert", metavar="PEM",
                          help="client certificate chain for mutual TLS (with --client-key)")
    security.add_argument("--client-key", dest="client_key", metavar="PEM", help="private key of --client-cert")
    security.add_argument("--api-key", dest="api_key", metavar="KEY", default=os.environ.get("LSTM_STREAM_API_KEY"),
                          help="sent as `authorization: Bearer KEY` (default: $LSTM_STREAM_API_KEY)")


def _verify_options(check: argparse._ArgumentGroup, d: LoadConfig) -> None:
    check.add_argument("--verify", action="store_true",
                       help="check every answer against Keras as the load runs (a verifier process carries each "
                       "stream's state), and exit 1 on any difference above the tolerance")
    check.add_argument("--model", dest="model_path", default=None, metavar="PATH",
                       help=f"the server's model file, for --verify (default {DEFAULT_MODEL})")
    check.add_argument("--verify-repository", dest="verify_repository", metavar="DIR",
                       help="for --verify instead of --model: the server's model repository; each sequence is "
                       "checked against DIR/<model>/<version>/model.keras of the version that answered it (the "
                       "model: --model-name, or DIR's only one)")
    check.add_argument("--tolerance", type=float, default=d.tolerance, metavar="X",
                       help=f"largest accepted absolute difference (default {d.tolerance:g})")
    check.add_argument("--verify-sample", type=_count_or_all, default=d.verify_sample, dest="verify_sample",
                       metavar="N|all",
                       help="streams also recomputed whole from zero state after the run, independently of any "
                       f"chunking (default {d.verify_sample}; all: every stream, memory grows with the run)")
    check.add_argument("--verify-sample-timesteps", type=int, default=d.verify_sample_timesteps,
                       dest="verify_sample_timesteps", metavar="T",
                       help=f"timesteps of each sampled sequence kept for that (default {d.verify_sample_timesteps:,})")
    check.add_argument("--verify-threads", type=int, default=d.verify_threads, dest="verify_threads", metavar="N",
                       help=f"TensorFlow threads of the verifier process (default {d.verify_threads}; 0: all cores)")


def _count_or_all(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of streams or all, not {text!r}") from None


def _output_options(out: argparse._ArgumentGroup, d: LoadConfig) -> None:
    out.add_argument("--json", type=Path, dest="json_path", metavar="PATH", help="write the report as JSON")
    out.add_argument("--plot", type=Path, dest="plot_path", metavar="PATH",
                     help="write a PNG: throughput over time and the latency distribution")
    progress = out.add_mutually_exclusive_group()
    progress.add_argument("--progress", action="store_true", default=None, help="live display (default on a terminal)")
    progress.add_argument("--no-progress", action="store_false", dest="progress")
    out.add_argument("--connect-timeout", type=float, default=d.connect_timeout_s, dest="connect_timeout_s",
                     metavar="S", help=f"wait this long for the server (default {d.connect_timeout_s:g} s)")


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    duration = args.duration_s
    if duration is None and args.total_chunks is None:
        duration = 10.0
    return LoadConfig(
        target=args.target,
        streams=args.streams,
        chunk_timesteps=args.chunk_timesteps,
        api=args.api,
        rate=args.rate,
        in_flight=args.in_flight,
        duration_s=duration,
        total_chunks=args.total_chunks,
        warmup_s=args.warmup_s,
        channels=args.channels,
        gateways=args.gateways,
        processes=args.processes,
        seed=args.seed,
        stream_prefix=args.stream_prefix or default_prefix(),
        timeout_s=args.timeout_s,
        max_retries=args.max_retries,
        use_offsets=args.use_offsets,
        max_restarts=args.max_restarts,
        model_name=args.model_name,
        sequence_chunks=args.sequence_chunks,
        verify=args.verify,
        model_path=args.model_path,
        verify_repository=args.verify_repository,
        tolerance=args.tolerance,
        verify_sample=args.verify_sample,
        verify_sample_timesteps=args.verify_sample_timesteps,
        verify_threads=args.verify_threads,
        fail_on_errors=args.fail_on_errors,
        cleanup=args.cleanup,
        progress=sys.stderr.isatty() if args.progress is None else args.progress,
        connect_timeout_s=args.connect_timeout_s,
        tls_ca=args.tls_ca,
        client_cert=args.client_cert,
        client_key=args.client_key,
        api_key=args.api_key,
        soak=args.soak,
        soak_metrics=args.soak_metrics,
        soak_interval_s=args.soak_interval_s,
        soak_churn=args.soak_churn,
        soak_churn_every_s=args.soak_churn_every_s,
        soak_churn_chunks=args.soak_churn_chunks,
        max_memory_slope_mib_h=args.max_memory_slope_mib_h,
        max_p99_drift=args.max_p99_drift,
    ).check()


def print_verify(result: dict[str, Any], console: Console) -> None:
    summary = (f"{result['streams']} streams, {result['sequences']} sequences, {result['timesteps']:,} timesteps, "
               f"{result['rows_compared']:,} output rows; max abs diff {result['max_abs_diff']:.3g} "
               f"(tolerance {result['tolerance']:g})")
    if result["model_fingerprint_matches"] is False:
        console.print(f"[yellow]warning: {escape(result['model_file'])} is not the model the server runs (the "
                      "fingerprints differ); pass the server's model file with --model[/yellow]")
    whole, verifier = result["whole"], result["verifier"]
    checked = (f"checked as the load ran; the verdict {result['seconds']:.1f} s after it, verifier CPU "
               f"{verifier['check_cpu_s']:.1f} s, peak memory {verifier['peak_rss_mib']:.0f} MiB")
    if whole is not None:
        checked += (f"; {whole['streams']} streams also whole from zero state ({whole['timesteps']:,} timesteps, "
                    f"max abs diff {whole['max_abs_diff']:.3g})")
    if len(result["versions"]) > 1:
        checked += "; per model version: " + ", ".join(
            f"v{version} {entry['sequences']} sequences" for version, entry in result["versions"].items())
    if result["passed"]:
        console.print(f"[green]verify: OK[/green]: {summary}")
        console.print(f"    {checked}")
        return
    console.print(f"[red bold]verify: FAILED[/red bold]: {summary}")
    console.print(f"    {checked}")
    if whole is not None and whole["mismatches"]:
        streams = ", ".join(sorted({m["stream_id"] for m in whole["mismatches"]}))
        console.print(f"[red]the whole-sequence check (the sample) failed for: {escape(streams)}[/red]")
    for item in result["mismatches"][:20]:
        console.print(
            f"[red]stream {escape(item['stream_id'])}[/red] (sequence {item['segment']}): first mismatch at timestep "
            f"{item['timestep']}: abs diff {item['abs_diff']:.3g}, expected {_values(item['expected'])}, got "
            f"{_values(item['got'])}; max abs diff {item['max_abs_diff']:.3g}, {item['rows_over_tolerance']:,} of "
            f"{item['rows']:,} rows over the tolerance"
        )
        drift = item["offset_drift"]
        if drift:
            console.print(f"    the server reported offset {drift['server_offset']} after timestep "
                          f"{drift['after_timestep']} (expected {drift['expected_offset']}): its state was reset")
    if len(result["mismatches"]) > 20:
        console.print(f"[red]... and {len(result['mismatches']) - 20} more streams with mismatches[/red]")
    for item in result["version_changes"][:20]:
        console.print(f"[red]stream {escape(item['stream_id'])}[/red] (sequence {item['segment']}): answered by "
                      f"version {item['to_version']} at timestep {item['timestep']}, its sequence started on version "
                      f"{item['from_version']} (no migration said so)")
    for item in result["state_lost"][:20]:
        where = "" if item["server_offset"] is None else f" (the server says the stream is at {item['server_offset']})"
        console.print(f"[red]stream {escape(item['stream_id'])}[/red] (sequence {item['segment']}): the server lost "
                      f"its state at timestep {item['timestep']}{where}: {item['code']}")
    if len(result["state_lost"]) > 20:
        console.print(f"[red]... and {len(result['state_lost']) - 20} more streams whose state was lost[/red]")


def _values(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.5g}" for v in values) + "]"


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on a usage error
    # Off a terminal rich assumes 80 columns; the table and the verify lines read better wider.
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 120, highlight=False, markup=False)
    out = Console(width=None if sys.stdout.isatty() else 120, highlight=False)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        parser.error(str(exc))
    err.print(f"lstm-loadtest: {config.streams} streams ({config.stream_prefix}-*) -> {config.target}, "
              f"{config.api}, chunks of {config.chunk_timesteps}, "
              + (f"open loop {config.rate:g} chunks/s per stream" if config.open_loop else "closed loop"))
    report, failed = _run(config, err)
    if report is None:
        return failed
    _write_outputs(report, args, out, err)
    if report["totals"]["chunks"] == 0:
        err.print("lstm-loadtest: no chunk was answered")
    return int(report["exit_code"])


def _run(config: LoadConfig, err: Console) -> tuple[dict[str, Any] | None, int]:
    """The report, or None with the exit code of why there is none (the reason printed to `err`)."""
    from loadtest.transports import ConnectError
    from loadtest.verify import VerifyError

    try:
        if config.progress:
            from loadtest.progress import LiveView

            with LiveView(config, err) as view:
                return run_load(config, view.update, lambda line: err.print(line)), EXIT_OK
        return run_load(config, on_phase=lambda line: err.print(line)), EXIT_OK
    except ConfigError as exc:
        err.print(f"lstm-loadtest: error: {exc}")
    except ConnectError as exc:
        err.print(f"lstm-loadtest: cannot connect: {exc}")
    except VerifyError as exc:
        err.print(f"lstm-loadtest: cannot verify: {exc}")
    except KeyboardInterrupt:
        err.print("lstm-loadtest: interrupted twice: aborted without a report")
        return None, 130
    except Exception:
        # Not 1: a script must never read a crash of the tool as "the server's answers were wrong".
        err.print_exception()
        return None, EXIT_CRASH
    return None, EXIT_USAGE


def _write_outputs(report: dict[str, Any], args: argparse.Namespace, out: Console, err: Console) -> None:
    from loadtest.report import render

    render(report, out)
    if report["verify"] is not None:
        print_verify(report["verify"], out)
    if report["soak"] is not None:
        from loadtest.soak import print_soak

        print_soak(report["soak"], out)
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps(_finite(report), indent=1, allow_nan=False) + "\n")
        err.print(f"report written to {args.json_path}")
    if args.plot_path:
        from loadtest.plot import plot_report

        plot_report(report, args.plot_path)
        err.print(f"plot written to {args.plot_path}")


def _finite(value: Any) -> Any:
    """JSON has no Infinity or NaN (a NaN output gives an infinite difference): write them as strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
