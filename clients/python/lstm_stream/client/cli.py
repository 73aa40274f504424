"""`lstm-stream`: talk to an lstm-serve server from the shell (no TensorFlow needed).

Exit codes: 0 ok; 1 the server refused the request (any other status); 2 usage error, unreadable or
malformed input file, or a value the server rejects as invalid (INVALID_ARGUMENT: a bad stream id, the
wrong number of features); 3 the server could not be reached or did not answer within the deadline;
4 the stream is not where the command expected it (FAILED_PRECONDITION: use --resume, or reset it);
5 the server refused the credentials (UNAUTHENTICATED, PERMISSION_DENIED); `health` exits 1 when the
server answers but is not SERVING.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from lstm_stream.client import defaults
from lstm_stream.client.errors import (
    ClientError,
    InvalidInput,
    OutputsLost,
    RequestRejected,
    ServerUnavailable,
    StreamPositionError,
)
from lstm_stream.client.sync import Client
from lstm_stream.client.types import ModelVersionStatus, StreamState

EXIT_OK = 0
EXIT_REFUSED = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_POSITION = 4
EXIT_AUTH = 5

EXAMPLES = """\
examples:
  lstm-stream model                                  # the hosted model, as JSON
  lstm-stream --target gateway:50051 health
  lstm-stream info sensor-42                         # offset, last update, expiry
  lstm-stream predict sensor-42 samples.csv --chunk 20 --out forecasts.csv
  lstm-stream predict sensor-42 more.npy --resume    # continue the stream where the server stands
  lstm-stream predict --stream-column sensor ticks.csv --chunk 5   # many streams, one column names each
  lstm-stream reset sensor-42
  lstm-stream state get sensor-42 --out state.npz    # the stream's recurrent state, arrays named by tensor
  lstm-stream state set sensor-43 state.npz          # continue sensor-43 from it (--offset N: from offset N)
  lstm-stream models                                 # every model version: name, version, state, reason
  lstm-stream predict sensor-42 samples.csv --model pump --model-version 2
  lstm-stream models unload pump --version 1         # version 1 drains, then is dropped
  lstm-stream models load pump                       # read pump's folder again, load what its policy serves
  LSTM_STREAM_API_KEY=... lstm-stream --tls-ca ca.pem --target serve.example:443 model

exit codes: 0 ok; 1 the server refused the request; 2 usage error, bad input file, or a value the server
rejects as invalid (e.g. a bad stream id); 3 server unreachable or no answer within the deadline; 4 the
stream is not where expected (use --resume or reset); 5 credentials refused. health: 1 when not SERVING.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lstm-stream",
        description="Client of lstm-serve: model and health, stream info and reset, a stream's state out and "
        "in (.npz), and exactly-once streaming of a CSV or .npy file (offsets, retries, resume).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", default=os.environ.get("LSTM_STREAM_TARGET", defaults.TARGET),
                        metavar="HOST:PORT", help=f"server address (default: $LSTM_STREAM_TARGET or {defaults.TARGET})")
    parser.add_argument("--deadline", type=float, default=defaults.DEADLINE_S, metavar="S",
                        help=f"seconds one request may take with its retries (default {defaults.DEADLINE_S:g})")
    parser.add_argument("--attempt-timeout", type=float, default=defaults.ATTEMPT_TIMEOUT_S, metavar="S",
                        help="seconds one attempt may take before it is retried "
                        f"(default {defaults.ATTEMPT_TIMEOUT_S:g})")
    parser.add_argument("--tls-ca", metavar="PEM", help="connect with TLS, verifying the server against this CA")
    parser.add_argument("--client-cert", metavar="PEM", help="client certificate for mutual TLS (with --client-key)")
    parser.add_argument("--client-key", metavar="PEM", help="private key of --client-cert")
    parser.add_argument("--api-key", default=os.environ.get("LSTM_STREAM_API_KEY"), metavar="KEY",
                        help="sent as `authorization: Bearer KEY` (default: $LSTM_STREAM_API_KEY)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    model = commands.add_parser("model", help="print the hosted model (JSON)")
    _model_option(model, "the model to describe (default: the server's only model)")
    _version_option(model, "the version to describe (default: the newest)")
    health = commands.add_parser("health", help="print the health status; exit 1 unless SERVING")
    health.add_argument("--service", default="", help="service name to check (default: the server)")
    info = commands.add_parser("info", help="print where a stream stands (JSON)")
    info.add_argument("stream_id", metavar="ID")
    _model_option(info)
    reset = commands.add_parser("reset", help="forget a stream's state")
    reset.add_argument("stream_id", metavar="ID")
    _model_option(reset)
    _models_commands(commands)
    state = commands.add_parser(
        "state", help="read or set a stream's recurrent state (.npz)",
        description="A stream's recurrent state as a .npz file: one array per state tensor, named "
        "<recurrent layer>/<index> (LSTM: 0 = h, 1 = c; GRU and SimpleRNN: 0 = h), each one stream's [units], "
        "plus `offset`, `model` and `model_version` as 0-d arrays. `set` writes it in one atomic step; the "
        "stream's next chunk continues from it, at its offset.",
    )
    state_commands = state.add_subparsers(dest="state_command", required=True, metavar="get|set")
    state_get = state_commands.add_parser("get", help="write a stream's state to a .npz file")
    state_get.add_argument("stream_id", metavar="ID")
    state_get.add_argument("--out", type=Path, required=True, metavar="FILE.npz", help="where to write it")
    _model_option(state_get)
    state_set = state_commands.add_parser("set", help="set a stream's state from a .npz file")
    state_set.add_argument("stream_id", metavar="ID")
    state_set.add_argument("file", type=Path, metavar="FILE.npz", help="as `state get` writes it")
    state_set.add_argument("--offset", type=int, metavar="N",
                           help="the offset the stream's next chunk starts at (default: the file's `offset`)")
    _model_option(state_set, "the model whose stream it sets (default: the file's `model`)")
    predict = commands.add_parser(
        "predict", help="stream a CSV or .npy file through the model; outputs as CSV",
        usage="lstm-stream predict [options] ID FILE\n       lstm-stream predict [options] --stream-column NAME FILE",
        description="Send FILE's rows (timesteps; columns are features) in chunks, exactly once, and write one "
        "CSV line per output row. By default the file starts a new sequence (the stream is reset by its first "
        "chunk); with --resume it continues the stream from where the server stands. With --stream-column, "
        "FILE holds many streams: a CSV with a header line whose column NAME names each row's stream (the "
        "other columns are its features); each row is the next timestep of its stream. The streams go through "
        "one gateway connection: each message carries the next --chunk timesteps of every stream, in file "
        "order per stream, and the output lines begin with the stream's id (after a header line). A stream "
        "that fails does not stop the others: its error is printed, and the exit code is its.",
    )
    predict.add_argument("targets", nargs="+", metavar="ID FILE",
                         help="the stream's id and the file: CSV (comma-separated, optional header line) or .npy; "
                         "FILE alone with --stream-column")
    predict.add_argument("--stream-column", metavar="NAME",
                         help="many streams in one CSV: the header column that names each row's stream")
    predict.add_argument("--chunk", type=int, default=20, metavar="T",
                         help="timesteps per chunk, per stream with --stream-column (default 20)")
    predict.add_argument("--resume", action="store_true",
                         help="continue the stream(s) at the server's offset instead of starting a new sequence")
    predict.add_argument("--window", type=int, default=defaults.PIPE_WINDOW, metavar="N",
                         help=f"chunks (messages with --stream-column) in flight on one streaming call (default "
                         f"{defaults.PIPE_WINDOW}, the server's default --replay-window: every output survives a "
                         "broken connection while N is at most the server's --replay-window)")
    predict.add_argument("--out", type=Path, metavar="PATH", help="write the outputs here instead of stdout")
    _model_option(predict)
    _version_option(predict, "the version a new sequence starts on (default: the newest); a sequence stays on "
                    "the version that started it")
    return parser


def _model_option(command: argparse.ArgumentParser, help: str = "") -> None:
    command.add_argument("--model", default="", metavar="NAME",
                         help=help or "the model the stream belongs to, with a model repository (each model has "
                         "its own stream ids; default: the server's only model)")


def _version_option(command: argparse.ArgumentParser, help: str) -> None:
    command.add_argument("--model-version", type=int, default=0, metavar="V", help=help)


def _models_commands(commands: Any) -> None:
    """`models`, `models load NAME`, `models unload NAME [--version V]`: a model repository's versions."""
    models = commands.add_parser(
        "models", help="list every model version (name, version, state, reason); load or unload a model",
        description="Without an action: a table of every model version the server knows (ListModels) and "
        "where it stands: READY, DRAINING (serves only the sequences pinned to it), LOADING or UNAVAILABLE, with "
        "the reason. `load` and `unload` act on a server's --model-repository (Triton's repository RPCs).")
    actions = models.add_subparsers(dest="models_action", metavar="ACTION")
    load = actions.add_parser("load", help="read the model's folder again and load what its version policy serves "
                              "(also brings back versions unloaded on request)")
    load.add_argument("name", metavar="NAME")
    unload = actions.add_parser("unload", help="retire a model's versions (or one): they drain, then are dropped")
    unload.add_argument("name", metavar="NAME")
    unload.add_argument("--version", type=int, default=0, metavar="V", help="only this version (default: every one)")


def load_values(path: Path) -> np.ndarray:
    """A [timesteps, features] float32 array from a .npy or CSV file; InvalidInput says what is wrong."""
    try:
        values = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else _read_csv(path)
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidInput(f"{path}: not a numeric CSV or .npy file: {exc}") from None
    try:
        values = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{path}: values are not numbers: {exc}") from None
    if values.ndim == 1:
        values = values.reshape(-1, 1)
    if values.ndim != 2 or values.shape[0] == 0:
        raise InvalidInput(f"{path}: expected rows of timesteps and columns of features, got shape {values.shape}")
    bad = np.argwhere(~np.isfinite(values))
    if bad.size:
        row, column = bad[0]
        raise InvalidInput(f"{path}: row {row + 1}, column {column + 1} is not a finite number")
    return values


# The .npz entries that are not tensors (a tensor's name always holds a "/").
STATE_FIELDS = ("offset", "model", "model_version")


def save_state(state: StreamState, path: Path) -> None:
    """`state get`'s file: the tensors as arrays named by tensor name, and the other fields as 0-d arrays."""
    arrays: dict[str, Any] = {name: np.asarray(values, dtype=np.float32) for name, values in state.tensors.items()}
    arrays.update(offset=np.array(state.offset, dtype=np.uint64), model=np.array(state.model),
                  model_version=np.array(state.model_version, dtype=np.uint32))
    with path.open("wb") as out:  # savez would add ".npz" to a name without it
        np.savez(out, **arrays)


def load_state(path: Path, offset: int | None) -> StreamState:
    """A state from a .npz file as `state get` writes it; InvalidInput says what is wrong."""
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidInput(f"{path}: not a .npz file of arrays: {exc}") from None
    tensors = {name: array for name, array in arrays.items() if name not in STATE_FIELDS}
    if not tensors:
        raise InvalidInput(f"{path}: no state tensors in it (arrays named <layer>/<index>)")
    for name, array in tensors.items():
        if array.dtype.kind not in "fiu":
            raise InvalidInput(f"{path}: {name!r} is not numbers ({array.dtype})")
    if offset is None:
        if "offset" not in arrays:
            raise InvalidInput(f"{path}: no `offset` in it; give --offset N")
        offset = int(arrays["offset"])
    model = str(arrays["model"]) if "model" in arrays else ""
    version = int(arrays["model_version"]) if "model_version" in arrays else 0
    return StreamState(offset, {name: array.astype(np.float32) for name, array in tensors.items()}, model, version)


def _read_csv(path: Path) -> np.ndarray:
    lines = path.read_text().splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        try:
            rows.append([float(cell) for cell in cells])
        except ValueError:
            if not rows and number == 1:
                continue  # a header line
            raise ValueError(f"line {number}: {line[:80]!r} is not comma-separated numbers") from None
        if len(rows[-1]) != len(rows[0]):
            raise ValueError(f"line {number} has {len(rows[-1])} columns, the first row {len(rows[0])}")
    if not rows:
        raise ValueError("no rows of numbers")
    return np.array(rows, dtype=np.float32)


def load_streams(path: Path, column: str) -> dict[str, np.ndarray]:
    """Many streams from one CSV file: the header's column `column` names each row's stream, the other
    columns are its features; each stream's rows in file order, the streams in order of first appearance."""
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InvalidInput(f"{path}: cannot read: {exc.strerror or exc}") from None
    header = [cell.strip() for cell in lines[0].split(",")] if lines else []
    if column not in header:
        raise InvalidInput(f"{path}: the header line has no column {column!r} (--stream-column); it has {header}")
    where = header.index(column)
    rows: dict[str, list[list[float]]] = {}
    for number, line in enumerate(lines[1:], 2):
        if not line.strip():
            continue
        cells = [cell.strip() for cell in line.split(",")]
        if len(cells) != len(header):
            raise InvalidInput(f"{path}: line {number} has {len(cells)} columns, the header {len(header)}")
        try:
            values = [float(cell) for index, cell in enumerate(cells) if index != where]
        except ValueError:
            raise InvalidInput(f"{path}: line {number}: {line[:80]!r}: the features are not numbers") from None
        if not all(np.isfinite(values)):
            raise InvalidInput(f"{path}: line {number}: a feature is not a finite number")
        rows.setdefault(cells[where], []).append(values)
    if not rows:
        raise InvalidInput(f"{path}: no rows after the header line")
    return {stream_id: np.array(values, dtype=np.float32) for stream_id, values in rows.items()}


def _write_rows(rows: np.ndarray, out: TextIO, prefix: str = "") -> None:
    for row in rows:
        out.write(prefix + ",".join(f"{value:.9g}" for value in row) + "\n")


def _csv_cell(text: str) -> str:
    return '"' + text.replace('"', '""') + '"' if any(c in text for c in ',"\n') else text


def _chunks(values: np.ndarray, size: int) -> Iterator[np.ndarray]:
    for start in range(0, values.shape[0], size):
        yield values[start:start + size]


def _print_models(rows: list[ModelVersionStatus], out: TextIO) -> None:
    """`lstm-stream models`: one line per model version, in columns."""
    table = [("NAME", "VERSION", "STATE", "REASON")] + [(r.name, str(r.version), r.state, r.reason) for r in rows]
    widths = [max(len(row[column]) for row in table) for column in range(3)]
    for row in table:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)] + [row[3]]
        out.write("  ".join(cells).rstrip() + "\n")


def _models(args: argparse.Namespace, client: Client) -> int:
    if args.models_action == "load":
        client.load_model(args.name)
        print(f"model {args.name!r} loaded", file=sys.stderr)
    elif args.models_action == "unload":
        client.unload_model(args.name, args.version)
        which = f"version {args.version}" if args.version else "every version"
        print(f"model {args.name!r}: {which} unloaded (draining, then dropped)", file=sys.stderr)
    rows = client.models()
    _print_models([row for row in rows if row.name == args.name] if args.models_action else rows, sys.stdout)
    return EXIT_OK


def run(args: argparse.Namespace, client: Client) -> int:
    if args.command == "model":
        print(json.dumps(asdict(client.model(args.model, args.model_version)), indent=1))
    elif args.command == "models":
        return _models(args, client)
    elif args.command == "health":
        status = client.health(args.service)
        print(status)
        return EXIT_OK if status == "SERVING" else EXIT_REFUSED
    elif args.command == "info":
        print(json.dumps(asdict(client.stream_info(args.stream_id, model=args.model)), indent=1))
    elif args.command == "reset":
        existed = client.reset_stream(args.stream_id, model=args.model)
        print(f"stream {args.stream_id!r} reset" + ("" if existed else " (it had no state)"))
    elif args.command == "state" and args.state_command == "get":
        state = client.get_state(args.stream_id, model=args.model)
        save_state(state, args.out)
        print(f"stream {args.stream_id!r}: state at offset {state.offset} ({len(state.tensors)} tensors: "
              f"{', '.join(state.tensors)}) written to {args.out}")
    elif args.command == "state":
        offset = client.set_state(args.stream_id, load_state(args.file, args.offset), model=args.model or None)
        print(f"stream {args.stream_id!r}: state set from {args.file}; its next chunk starts at offset {offset}")
    elif args.command == "predict" and args.stream_column is not None:
        return _predict_streams(args, client)
    elif args.command == "predict":
        values = load_values(args.file)
        stream = client.stream(args.stream_id, model=args.model, version=args.model_version)
        if args.resume:
            stream.resume()
        else:
            stream.start_new()
        start = stream.offset
        out = sys.stdout if args.out is None else args.out.open("w")
        try:
            for outputs in stream.pipe(_chunks(values, args.chunk), window=args.window):
                _write_rows(outputs, out)
        finally:
            if args.out is not None:
                out.close()
        print(f"stream {args.stream_id!r}: {values.shape[0]} timesteps sent from offset {start}; "
              f"the stream is at offset {stream.offset}" + _answered_by(stream.model, stream.model_version),
              file=sys.stderr)
    return EXIT_OK


def _answered_by(model: str, version: int) -> str:
    """What the predict summary says of the model version that answered (nothing from a server before 0.2.0)."""
    if not version:
        return ""
    return f" (model {model!r} version {version})" if model else f" (model version {version})"


def _predict_streams(args: argparse.Namespace, client: Client) -> int:
    """`predict --stream-column`: every stream of the file through one gateway, a tick of --chunk timesteps
    of each stream a message; a failed stream's error is printed and the others go on."""
    streams = load_streams(args.file, args.stream_column)
    gateway = client.gateway(model=args.model, version=args.model_version)
    failed: dict[str, ClientError] = {}
    for stream_id in streams:
        if not args.resume:
            gateway.start_new(stream_id)
            continue
        try:
            gateway.resume(stream_id)
        except RequestRejected as error:  # this stream's own (a bad id): the others go on
            failed[stream_id] = error
    starts = {stream_id: gateway.offset(stream_id) for stream_id in streams}
    sending = {stream_id: values for stream_id, values in streams.items() if stream_id not in failed}
    longest = max((len(values) for values in sending.values()), default=0)
    ticks = ({stream_id: values[start:start + args.chunk] for stream_id, values in sending.items()
              if start < len(values)} for start in range(0, longest, args.chunk))
    out = sys.stdout if args.out is None else args.out.open("w")
    try:
        outputs = client.model(args.model).output_size
        out.write(",".join([_csv_cell(args.stream_column)] + [f"output_{n}" for n in range(outputs)]) + "\n")
        for result in gateway.pipe(ticks, window=args.window):
            for stream_id, rows in result.outputs.items():
                if stream_id not in failed:
                    _write_rows(rows, out, _csv_cell(stream_id) + ",")
            for stream_id, error in result.errors.items():
                failed.setdefault(stream_id, error)
    finally:
        if args.out is not None:
            out.close()
    timesteps = sum(len(values) for stream_id, values in streams.items() if stream_id not in failed)
    print(f"{len(streams) - len(failed)} of {len(streams)} streams: {timesteps} timesteps sent "
          f"(from offsets {min(starts.values())}..{max(starts.values())})", file=sys.stderr)
    for error in failed.values():
        print(f"lstm-stream: error: {explain(error)}", file=sys.stderr)
    return exit_code(next(iter(failed.values()))) if failed else EXIT_OK


def explain(error: ClientError) -> str:
    """The error in this command's terms: the flags and commands to use, not the Python API's methods."""
    if not isinstance(error, StreamPositionError):
        return str(error)
    stream_id = shlex.quote(error.stream_id)
    resume = f"`lstm-stream predict {stream_id} FILE --resume`"
    if isinstance(error, OutputsLost):
        return (f"stream {error.stream_id!r}: the connection broke with several chunks in flight (--window); the "
                f"chunks for timesteps {error.lost_from}..{error.lost_to - 1} were applied, but their outputs were "
                f"lost (the server keeps the answers of its last --replay-window chunks only). The stream is at "
                f"offset {error.server_offset}: send the rest of the data with {resume}, and use a --window no "
                "larger than the server's --replay-window (--window 1 is always safe) where every output must "
                "reach the file")
    start_over = (f"`lstm-stream predict {stream_id} FILE` without --resume to start a new sequence, or "
                  f"`lstm-stream reset {stream_id}` to forget the stream")
    if error.server_offset is None:
        return (f"stream {error.stream_id!r}: the server cannot continue it from offset {error.client_offset} "
                f"({error.detail}); run {start_over}")
    return (f"stream {error.stream_id!r}: the data was sent from offset {error.client_offset}, but the server's "
            f"stream is at offset {error.server_offset} ({error.detail}); run {resume} to continue from offset "
            f"{error.server_offset}, or {start_over}")


def exit_code(error: ClientError) -> int:
    if isinstance(error, InvalidInput) or error.code == grpc.StatusCode.INVALID_ARGUMENT:
        return EXIT_USAGE
    if isinstance(error, ServerUnavailable):
        return EXIT_UNREACHABLE
    if isinstance(error, StreamPositionError) or error.code == grpc.StatusCode.FAILED_PRECONDITION:
        return EXIT_POSITION
    if error.code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
        return EXIT_AUTH
    return EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)  # exits 2 on a usage error
    if extra and args.command == "predict" and not any(arg.startswith("-") for arg in extra):
        args.targets += extra  # `predict ID --chunk 5 FILE`: argparse stops a "+" positional at an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if (args.client_cert is None) != (args.client_key is None):
        parser.error("--client-cert and --client-key go together")
    if args.command == "predict":
        if not (args.chunk >= 1 and args.window >= 1):
            parser.error("--chunk and --window must be at least 1")
        if len(args.targets) != (1 if args.stream_column is not None else 2):
            parser.error("predict takes ID FILE, or FILE with --stream-column NAME")
        args.stream_id = None if args.stream_column is not None else args.targets[0]
        args.file = Path(args.targets[-1])
        if args.stream_column is not None and args.file.suffix.lower() == ".npy":
            parser.error("--stream-column reads a CSV file with a header line, not .npy")
    if args.command == "state" and args.state_command == "set" and args.offset is not None and args.offset < 0:
        parser.error("--offset must be 0 or more")
    if getattr(args, "model_version", 0) < 0 or getattr(args, "version", 0) < 0:
        parser.error("--model-version and --version must not be negative (0: the newest, or every version)")
    if not (args.deadline > 0 and args.attempt_timeout > 0):
        parser.error("--deadline and --attempt-timeout must be positive")
    settings: dict[str, Any] = {"tls_ca": args.tls_ca, "api_key": args.api_key, "deadline": args.deadline,
                                "attempt_timeout": args.attempt_timeout}
    if args.client_cert:
        settings["client_cert"] = (args.client_cert, args.client_key)
    try:
        with Client(args.target, **settings) as client:
            return run(args, client)
    except ClientError as error:
        print(f"lstm-stream: error: {explain(error)}", file=sys.stderr)
        return exit_code(error)
    except OSError as error:  # a certificate file that cannot be read
        print(f"lstm-stream: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("lstm-stream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
