"""--verify as the load runs: every answer checked against Keras in a verifier process, within seconds.

The load processes hand each answered chunk (stream, sequence, inputs, outputs, the server's offset) to a
`LiveFeed`, which ships them in batches to one verifier process every FEED_INTERVAL_S. The verifier keeps,
per sequence, only its reference state (Keras recurrent states carried from batch to batch) and the
inputs and answers not yet checked; so its memory is bounded by the streams, not by the run's length.

Each round runs every sequence with something pending through a stateful copy of the model (same weights,
every recurrent layer returning sequences, batch of `batch` rows): the states of the round's sequences
are written into the layers' state variables, the model runs on their next timesteps, and the states are
read back. A round takes the same number of timesteps from each of its sequences (while the load runs, the
median backlog from every sequence that has that much; after it, everything), so no padding enters a
state; the verifier's boundaries are its own, not the server's chunks. A self-check before the load
proves that carrying states this way equals the unmodified model on whole sequences.

The independent check stays: a sample of streams (`LoadConfig.verify_sample`) also keeps the first
`verify_sample_timesteps` of each sequence, recomputed after the run from zero state in one pass
(loadtest/verify.py), so the two checks share no chunking.

Model versions: each chunk comes with the model version that answered it, and a sequence is checked against
the model file of its version (`LoadConfig.model_file_for`: DIR/<model>/<version>/model.keras of
`--verify-repository`, or the one `--model` file), each version's reference built when its first chunk
arrives. A sequence whose chunks were answered by two versions (without a migration, which the load
tester records as a new sequence) is an error of its own (`version_changes`), and is not checked further.

A process that runs many loads (the test suite) can keep the verifier between runs
(`keep_verifiers_warm`): its TensorFlow start-up and a model's self-check are paid once, not per run.
"""

from __future__ import annotations

import multiprocessing
import os
import queue as queue_module
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from loadtest.config import LoadConfig
from loadtest.recorder import Segment, StreamLog
from loadtest.verify import (
    CLONE_TOLERANCE,
    KerasReference,
    VerifyError,
    every_timestep_copy,
    fingerprint_matches,
    first_mismatch,
    row_differences,
    verify_streams,
)
from lstm_stream.client.types import ModelInfo

FEED_INTERVAL_S = 0.25  # how often a load process ships its answered chunks to the verifier
CHECK_INTERVAL_S = 1.0  # how often the verifier runs what arrived: long rounds cost less per timestep
READY_TIMEOUT_S = 180.0  # the verifier imports TensorFlow and self-checks: slow on a busy machine
RESULT_TIMEOUT_S = 600.0  # after the load, for the backlog the verifier still has to check
SELF_CHECK_TIMESTEPS = 37
# What the report's verify.whole keeps of the sample's whole-sequence check (docs/loadtest.md).
WHOLE_FIELDS = ("streams", "sequences", "timesteps", "rows_compared", "max_abs_diff", "mismatches", "seconds")


class _Stop(Exception):
    pass


@dataclass
class _Sequence:
    """One sequence of one stream, as far as the verifier has it: the reference state at `checked`, and
    what arrived after it."""

    stream_id: str
    segment: int
    version: int = 0  # the model version that answered its first chunk
    version_change: dict[str, Any] | None = None  # set when another version answered a later chunk
    states: list[np.ndarray] | None = None  # None: zero state (the sequence's start)
    checked: int = 0  # timesteps run through the reference so far
    received: int = 0  # timesteps received (the server's offset after the last chunk should equal it)
    inputs: list[np.ndarray] = field(default_factory=list)  # pending inputs, timesteps [checked, received)
    row_times: list[np.ndarray] = field(default_factory=list)  # the timestep of each pending answered row
    rows: list[np.ndarray] = field(default_factory=list)  # the pending answered rows
    compared: int = 0
    over: int = 0
    worst: float = 0.0
    first_bad: dict[str, Any] | None = None
    offset_drift: dict[str, int] | None = None

    @property
    def pending(self) -> int:
        return self.received - self.checked

    def take_inputs(self, length: int) -> np.ndarray:
        x = np.concatenate(self.inputs) if len(self.inputs) > 1 else self.inputs[0]
        self.inputs = [x[length:]] if x.shape[0] > length else []
        return x[:length]

    def take_rows(self, before: int) -> tuple[np.ndarray, np.ndarray]:
        """The pending rows at timesteps < before, removed from the pending ones."""
        if not self.rows:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 0), dtype=np.float32)
        times = np.concatenate(self.row_times)
        rows = np.concatenate(self.rows)
        ready = times < before
        self.row_times, self.rows = ([times[~ready]], [rows[~ready]]) if not ready.all() else ([], [])
        return times[ready], rows[ready]


class CarriedReference:
    """The model file, run chunk after chunk on up to `batch` sequences with their states carried."""

    def __init__(self, model_path: Path, features: int, batch: int) -> None:
        os.environ.setdefault("KERAS_BACKEND", "tensorflow")
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import keras
        import tensorflow as tf

        self.whole = KerasReference(model_path, features)  # loads the file and proves the stateless copy
        self.batch = batch
        self.features = features

        try:
            self.model = every_timestep_copy(self.whole.model, keras.Input(batch_shape=(batch, None, features)),
                                             stateful=True)
        except Exception as exc:
            raise VerifyError(f"cannot rebuild the model with carried states: {exc}") from exc
        self.state_variables = [v for layer in self.model.layers if isinstance(layer, keras.layers.RNN)
                                for v in layer.states]
        if not self.state_variables:
            raise VerifyError("the model has no recurrent layer whose states the verifier can carry")
        self.state_shapes = [tuple(v.shape[1:]) for v in self.state_variables]
        self._call = tf.function(lambda x: self.model(x, training=False),
                                 input_signature=[tf.TensorSpec([batch, None, features], tf.float32)])
        self._self_check()

    def run(self, x: np.ndarray, states: list[list[np.ndarray] | None]) -> tuple[np.ndarray, list[list[np.ndarray]]]:
        """x [n <= batch, time, features] from the given states (None: zero) -> outputs [n, time, out] and
        the states after the last timestep, per sequence."""
        n = x.shape[0]
        for index, variable in enumerate(self.state_variables):
            value = np.zeros((self.batch, *self.state_shapes[index]), dtype=np.float32)
            for row, state in enumerate(states):
                if state is not None:
                    value[row] = state[index]
            variable.assign(value)
        padded = x if n == self.batch else np.concatenate(
            [x, np.zeros((self.batch - n, *x.shape[1:]), dtype=np.float32)])
        y = self._call(padded).numpy()[:n]
        after = [np.asarray(variable.numpy())[:n] for variable in self.state_variables]
        return y, [[layer_state[row].copy() for layer_state in after] for row in range(n)]

    def _self_check(self) -> None:
        rng = np.random.default_rng(1)
        n = min(self.batch, 3)
        x = rng.normal(size=(n, SELF_CHECK_TIMESTEPS, self.features)).astype(np.float32)
        expected = self.whole(x)  # already proven equal to the unmodified model
        pieces, states, at = [], [None] * n, 0
        for length in (1, 7, 13, SELF_CHECK_TIMESTEPS - 21):
            y, states = self.run(x[:, at:at + length], states)  # type: ignore[arg-type]
            pieces.append(y)
            at += length
        got = np.concatenate(pieces, axis=1)
        if got.shape != expected.shape or not float(np.max(np.abs(got - expected))) <= CLONE_TOLERANCE:
            raise VerifyError("the model run with carried states does not reproduce it on whole sequences; "
                              "verify this model with --verify-sample all")


class LiveChecker:
    """Every sequence's pending chunks, checked round by round (the verifier process's work)."""

    def __init__(self, reference: CarriedReference, per_timestep: bool, tolerance: float,
                 sampled: set[str], sample_timesteps: int,
                 references: Callable[[int], CarriedReference] | None = None) -> None:
        self.reference = reference  # every version's, unless `references` gives each version its own
        self.references = references
        self.per_timestep = per_timestep
        self.tolerance = tolerance
        self.sequences: dict[tuple[str, int], _Sequence] = {}
        self.sampled = sampled
        self.sample_timesteps = sample_timesteps
        self.logs: dict[str, StreamLog] = {}  # the sample's whole sequences (their first timesteps)
        self.log_versions: dict[tuple[str, int], int] = {}  # the version of each of them, by stream and sequence
        self.worst = 0.0
        self.rows_compared = 0
        self.rounds = 0
        self.backlog_max = 0
        self.held_bytes_max = 0

    def reference_for(self, version: int) -> CarriedReference:
        return self.reference if self.references is None else self.references(version)

    def _same_model(self, version: int, other: int) -> bool:
        """Whether two versions are checked against one model file (always, without a repository)."""
        if self.references is None:
            return True
        try:
            return self.reference_for(version) is self.reference_for(other)
        except (OSError, VerifyError):  # no file for one of them (a repository has no version 0)
            return False

    def add(self, stream_id: str, segment: int, x: np.ndarray, y: np.ndarray, server_offset: int,
            version: int = 0) -> None:
        key = (stream_id, segment)
        sequence = self.sequences.get(key)
        if sequence is None:
            sequence = self.sequences[key] = _Sequence(stream_id, segment, version)
            self.reference_for(version)  # built now, so a version whose file cannot be read fails the run early
        if sequence.version_change is not None:
            return
        if version != sequence.version:  # a sequence runs on the version that started it (invariant 14)
            if not version:
                # No version named: a server of a release before versions (0.1.0, during a rolling upgrade), or a
                # replayed answer of a version that server never loaded. The sequence's own, as far as known.
                version = sequence.version
            elif not sequence.version and self._same_model(0, version):
                sequence.version = version  # the first server to name it; one model file serves every version
            else:
                sequence.version_change = {"stream_id": stream_id, "segment": segment,
                                           "timestep": sequence.received, "from_version": sequence.version,
                                           "to_version": version}
                return
        start = sequence.received
        sequence.received += x.shape[0]
        sequence.inputs.append(x)
        sequence.row_times.append(np.arange(start, sequence.received) if self.per_timestep
                                  else np.array([sequence.received - 1]))
        sequence.rows.append(y)
        if server_offset != sequence.received and sequence.offset_drift is None:
            sequence.offset_drift = {"after_timestep": sequence.received - 1, "server_offset": int(server_offset),
                                     "expected_offset": sequence.received}
        if stream_id in self.sampled:
            self._keep_whole(stream_id, segment, x, y, server_offset, start, version)

    def _keep_whole(self, stream_id: str, segment: int, x: np.ndarray, y: np.ndarray, offset: int,
                    start: int, version: int) -> None:
        log = self.logs.setdefault(stream_id, StreamLog(stream_id, 0, []))
        self.log_versions[(stream_id, segment)] = version
        while len(log.segments) <= segment:
            log.segments.append(Segment())
        if start + x.shape[0] <= self.sample_timesteps:  # whole chunks only, so rows line up with inputs
            kept = log.segments[segment]
            kept.inputs.append(x)
            kept.outputs.append(y)
            kept.server_offsets.append(offset)

    def check_pending(self, drain: bool = False) -> None:
        """Run pending timesteps through the reference in rounds of up to `batch` sequences, each round the
        same length for all. While the load runs a round takes the median backlog from every sequence that
        has that much (one or two rounds per call, each long: the model's cost is per timestep and row);
        the rest waits for more. `drain` (the load is over) runs everything."""
        self.backlog_max = max(self.backlog_max, sum(s.pending for s in self.sequences.values()))
        self.held_bytes_max = max(self.held_bytes_max, self.held_bytes())
        for version in sorted({s.version for s in self.sequences.values() if s.pending > 0}):
            # Each version's sequences through its own reference.
            self._check_version([s for s in self.sequences.values() if s.version == version],
                                self.reference_for(version), drain)

    def _check_version(self, sequences: list[_Sequence], reference: CarriedReference, drain: bool) -> None:
        waiting = [s for s in sequences if s.pending > 0]
        if not drain and waiting:
            length = int(np.median([s.pending for s in waiting]))
            while True:
                ready = [s for s in sequences if s.pending >= length]
                if not ready:
                    break
                for at in range(0, len(ready), reference.batch):
                    self._round(ready[at:at + reference.batch], length, reference)
            return
        while waiting:
            waiting.sort(key=lambda s: s.pending)
            for at in range(0, len(waiting), reference.batch):
                group = waiting[at:at + reference.batch]
                self._round(group, group[0].pending, reference)  # similar backlogs together; each gives the smallest
            waiting = [s for s in waiting if s.pending > 0]

    def held_bytes(self) -> int:
        """The bytes of every array the checker holds: states, pending chunks, the sample's sequences."""
        held = 0
        for sequence in self.sequences.values():
            held += sum(a.nbytes for a in (*(sequence.states or ()), *sequence.inputs, *sequence.row_times,
                                           *sequence.rows))
        for log in self.logs.values():
            held += sum(a.nbytes for segment in log.segments for a in (*segment.inputs, *segment.outputs))
        return held

    def _round(self, group: list[_Sequence], length: int, reference: CarriedReference) -> None:
        x = np.stack([s.take_inputs(length) for s in group])
        y, states = reference.run(x, [s.states for s in group])
        self.rounds += 1
        for row, sequence in enumerate(group):
            sequence.states = states[row]
            times, got = sequence.take_rows(sequence.checked + length)
            if times.size:
                self._compare(sequence, times, got, y[row, times - sequence.checked])
            sequence.checked += length

    def _compare(self, sequence: _Sequence, times: np.ndarray, got: np.ndarray, expected: np.ndarray) -> None:
        diff = row_differences(sequence.stream_id, got, expected)
        self.rows_compared += diff.size
        sequence.compared += diff.size
        worst = float(diff.max())
        sequence.worst = max(sequence.worst, worst)
        self.worst = max(self.worst, worst)
        bad = diff > self.tolerance
        if bad.any():
            sequence.over += int(bad.sum())
            if sequence.first_bad is None:
                sequence.first_bad = first_mismatch(times, diff, bad, got, expected)

    def result(self) -> dict[str, Any]:
        mismatches = []
        for sequence in self.sequences.values():
            if sequence.first_bad is not None:
                mismatches.append({"stream_id": sequence.stream_id, "segment": sequence.segment,
                                   **sequence.first_bad, "max_abs_diff": sequence.worst,
                                   "rows_over_tolerance": sequence.over, "rows": sequence.compared,
                                   "offset_drift": sequence.offset_drift})
        mismatches.sort(key=lambda m: (m["stream_id"], m["segment"]))
        versions: dict[str, dict[str, int]] = {}
        for sequence in self.sequences.values():
            entry = versions.setdefault(str(sequence.version), {"sequences": 0, "timesteps": 0})
            entry["sequences"] += 1
            entry["timesteps"] += sequence.checked
        changes = [s.version_change for s in self.sequences.values() if s.version_change is not None]
        return {
            "versions": dict(sorted(versions.items(), key=lambda item: int(item[0]))),
            "version_changes": sorted(changes, key=lambda c: (c["stream_id"], c["segment"])),
            "max_abs_diff": self.worst,
            "streams": len({stream for stream, _ in self.sequences}),
            "sequences": len(self.sequences),
            "timesteps": int(sum(s.checked for s in self.sequences.values())),
            "rows_compared": self.rows_compared,
            "mismatches": mismatches,
            "rounds": self.rounds,
            "backlog_max_timesteps": self.backlog_max,
            "held_bytes_max": self.held_bytes_max,
        }


def sampled_streams(config: LoadConfig) -> set[str]:
    """The streams whose whole sequences are also recomputed after the run: evenly spread over the run."""
    count = config.streams if config.verify_sample is None else min(config.verify_sample, config.streams)
    if count == 0:
        return set()
    return {config.stream_id(i * config.streams // count) for i in range(count)}


class LiveFeed:
    """A load process's side: answered chunks gathered here, shipped to the verifier in batches."""

    def __init__(self, inbox: Any, source: int) -> None:
        self.inbox = inbox
        self.source = source
        self.batch: list[tuple[str, int, np.ndarray, np.ndarray, int, int]] = []

    def chunk(self, stream_id: str, segment: int, x: np.ndarray, y: np.ndarray, server_offset: int,
              version: int = 0) -> None:
        """An answered chunk of sequence `segment` of the stream; `version`: the model version that answered."""
        self.batch.append((stream_id, segment, x, y, server_offset, version))

    def flush(self) -> None:
        if self.batch:
            self.inbox.put(("chunks", self.batch))
            self.batch = []

    def done(self) -> None:
        self.flush()
        self.inbox.put(("done", self.source))


def _verifier_main(config: LoadConfig, model: ModelInfo, producers: int, inbox: Any, outbox: Any) -> None:
    """The verifier process: set up once, then one run after another. Each run: its reference (built and
    self-checked, or the one an earlier run of the same model file and batch built), then check what
    arrives until every producer said done. After a run's result it waits for the next ("run", ...)
    message, which only a caller that keeps verifiers warm (`keep_verifiers_warm`) sends."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when the run ends
    # The load (and a server on the same machine) comes first; the verifier takes what CPU is left and
    # catches up after the load if it must (its backlog is in the report).
    os.nice(config.verify_nice)
    parent = os.getppid()
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if config.verify_threads > 0:
        # The verifier shares the machine with the load and often the server: one core is its share. Set
        # before TensorFlow runs anything (it refuses afterwards), which in this fresh process holds.
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(config.verify_threads)
        tf.config.threading.set_inter_op_parallelism_threads(config.verify_threads)
    references: dict[tuple[Any, ...], CarriedReference] = {}
    cpu_before = 0.0  # the first run's CPU includes the process's start-up, as with a verifier of its own
    while True:
        if not _verify_one_run(config, model, producers, inbox, outbox, parent, references, cpu_before):
            return
        while True:  # the next run, if the caller keeps this process warm
            try:
                kind, payload = inbox.get(timeout=1.0)
            except queue_module.Empty:
                if os.getppid() != parent:
                    return
                continue
            if kind == "run":
                config, model, producers = payload
                cpu_before = _cpu_seconds()
                break


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _reference_key(config: LoadConfig, model: ModelInfo, path: Path) -> tuple[Any, ...]:
    """What a carried reference depends on: the model file (as it is now), its features and the batch."""
    stat = path.stat()
    return (str(path.resolve()), stat.st_mtime_ns, stat.st_size, model.input_features,
            min(config.streams, config.verify_batch))


def _whole_check(config: LoadConfig, model: ModelInfo, checker: LiveChecker) -> dict[str, Any] | None:
    """The sample's whole sequences recomputed from zero state, each version's with its own model file."""
    if not checker.logs:
        return None
    parts = []
    for version in sorted(set(checker.log_versions.values())):
        # This version's sequences of each sampled stream (the others left empty: they are not checked here).
        logs = [StreamLog(log.stream_id, 0, [segment if checker.log_versions.get((log.stream_id, n)) == version
                                             else Segment() for n, segment in enumerate(log.segments)])
                for log in checker.logs.values()]
        reference = checker.reference_for(version)
        parts.append(verify_streams(config.model_file_for(version), model, logs, [], config.tolerance,
                                    reference.whole))
    whole = {key: parts[0][key] for key in WHOLE_FIELDS}
    for part in parts[1:]:
        for key in ("sequences", "timesteps", "rows_compared", "seconds"):
            whole[key] += part[key]
        whole["max_abs_diff"] = max(whole["max_abs_diff"], part["max_abs_diff"])
        whole["mismatches"] = whole["mismatches"] + part["mismatches"]
    whole["streams"] = len(checker.logs)
    return whole


def _verify_one_run(config: LoadConfig, model: ModelInfo, producers: int, inbox: Any, outbox: Any, parent: int,
                    references: dict[tuple[Any, ...], CarriedReference], cpu_before: float) -> bool:
    """One run's verification, its verdict put on `outbox`; False when the process should end instead of
    waiting for another run (the reference could not be built, or the parent is gone)."""
    def reference_for(version: int) -> CarriedReference:
        path = config.model_file_for(version)
        try:
            key = _reference_key(config, model, path)
        except OSError as exc:
            raise VerifyError(f"no model file for version {version}: {exc}") from None
        if key not in references:
            references[key] = CarriedReference(path, model.input_features,
                                               batch=min(config.streams, config.verify_batch))
        return references[key]

    try:
        reference = reference_for(model.version)
    except (OSError, VerifyError) as exc:
        outbox.put(("error", str(exc)))
        return False
    outbox.put(("ready", None))
    checker = LiveChecker(reference, model.per_timestep_outputs, config.tolerance, sampled_streams(config),
                          config.verify_sample_timesteps, reference_for)
    done: set[int] = set()
    check_cpu = 0.0  # CPU seconds of checking (all threads), start-up and the whole check apart
    next_check = time.monotonic() + CHECK_INTERVAL_S
    try:
        while len(done) < producers:
            try:
                messages = [inbox.get(timeout=1.0)]
            except queue_module.Empty:
                if os.getppid() != parent:
                    return False  # the parent is gone: nobody will read a verdict
                continue
            while True:
                try:
                    messages.append(inbox.get_nowait())
                except queue_module.Empty:
                    break
            for kind, payload in messages:
                if kind == "chunks":
                    for stream_id, segment, x, y, offset, version in payload:
                        checker.add(stream_id, segment, x, y, offset, version)
                elif kind == "done":
                    done.add(payload)
            if time.monotonic() >= next_check or len(done) == producers:
                next_check = time.monotonic() + CHECK_INTERVAL_S
                started = time.process_time()
                checker.check_pending(drain=len(done) == producers)
                check_cpu += time.process_time() - started
        last_done = time.monotonic()
        live = checker.result()
        whole = _whole_check(config, model, checker)  # the rest is the live section's to say
        usage = resource.getrusage(resource.RUSAGE_SELF)
        outbox.put(("result", {
            **live,
            "fingerprint_matches": fingerprint_matches(reference.whole.model, model.fingerprint),
            "whole": whole,
            "check_cpu_s": round(check_cpu, 3),
            "cpu_s": round(_cpu_seconds() - cpu_before, 3),  # a warm process's earlier runs not counted
            "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),  # the process's peak
            "after_last_chunk_s": round(time.monotonic() - last_done, 3),
        }))
    except VerifyError as exc:
        outbox.put(("error", str(exc)))
        return False
    return True


# Verifier processes kept between runs by a caller that runs many loads in one process (the test suite:
# each start imports TensorFlow, seconds of a 2-core machine). Off by default: a one-run command gains nothing.
_keep_warm = False
_idle: list[tuple[Any, Any, Any, tuple[int, int]]] = []  # (process, inbox, outbox, (nice, threads)), each idle
_idle_lock = threading.Lock()  # loads may run in threads (devkit.loads.VerifiedLoad)


def keep_verifiers_warm() -> None:
    """From now on a verifier whose run ended with its verdict stays alive, idle, and the next run in this
    process with the same verify_nice and verify_threads uses it: no second TensorFlow start-up, and no
    second self-check of a reference already built for the same model file and batch. A run that ended any
    other way still ends its verifier."""
    global _keep_warm
    _keep_warm = True


class LiveVerifier:
    """The verifier process, as the run sees it: started and self-checked before the load, fed during it,
    asked for its verdict after it. Always `close()` it (a context manager)."""

    def __init__(self, config: LoadConfig, model: ModelInfo, producers: int) -> None:
        self._setup = (config.verify_nice, config.verify_threads)
        self._answered = False
        with _idle_lock:
            warm = next((entry for entry in _idle if entry[3] == self._setup and entry[0].is_alive()), None)
            if warm is not None:
                _idle.remove(warm)
        if warm is not None:
            self._process, self.inbox, self._outbox, _ = warm
            self.inbox.put(("run", (config, model, producers)))
            return
        context = multiprocessing.get_context("spawn")
        self.inbox = context.Queue()
        self._outbox = context.Queue()
        self._process = context.Process(target=_verifier_main, args=(config, model, producers, self.inbox,
                                                                     self._outbox),
                                        name="lstm-loadtest-verifier", daemon=True)
        self._process.start()

    def __enter__(self) -> LiveVerifier:
        try:
            self._expect("ready", READY_TIMEOUT_S)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def verdict(self) -> dict[str, Any]:
        """The checker's result, once every producer said done (their last chunks are checked first)."""
        result = self._expect("result", RESULT_TIMEOUT_S)
        self._answered = True
        return result

    def _expect(self, wanted: str, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                kind, payload = self._outbox.get(timeout=0.5)
            except queue_module.Empty:
                if not self._process.is_alive():
                    raise VerifyError(f"the verifier process died (exit code {self._process.exitcode})") from None
                continue
            if kind == "error":
                raise VerifyError(payload)
            if kind == wanted:
                return payload
        raise VerifyError(f"the verifier gave no {wanted!r} within {timeout_s:.0f} s")

    def close(self) -> None:
        if _keep_warm and self._answered and self._process.is_alive():
            # Its run ended with the verdict: nothing of it is left in either queue, so the next run starts clean.
            with _idle_lock:
                _idle.append((self._process, self.inbox, self._outbox, self._setup))
            return
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(10)
        for channel in (self.inbox, self._outbox):
            channel.cancel_join_thread()
            channel.close()


def live_section(config: LoadConfig, result: dict[str, Any], broken: Iterable[dict[str, Any]],
                 load_ended: float) -> dict[str, Any]:
    """The report's `verify` section from the verifier's result."""
    whole = result["whole"]
    state_lost = [item for item in broken if item.get("state_lost")]
    passed = not result["mismatches"] and not state_lost and not result["version_changes"] and \
        (whole is None or not whole["mismatches"])
    return {
        "passed": passed,
        "tolerance": config.tolerance,
        "max_abs_diff": max(result["max_abs_diff"], whole["max_abs_diff"] if whole else 0.0),
        "streams": result["streams"],
        "sequences": result["sequences"],
        "timesteps": result["timesteps"],
        "rows_compared": result["rows_compared"],
        "mismatches": result["mismatches"],
        "state_lost": state_lost,
        # Per model version that answered: its sequences and timesteps checked; sequences answered by two.
        "versions": result["versions"],
        "version_changes": result["version_changes"],
        "model_file": str(config.verify_repository or config.model_file),
        "model_fingerprint_matches": result["fingerprint_matches"],
        "seconds": round(time.monotonic() - load_ended, 3),  # from the load's end to the verdict
        "verifier": {
            **{key: result[key] for key in ("check_cpu_s", "cpu_s", "peak_rss_mib", "rounds",
                                            "backlog_max_timesteps", "held_bytes_max", "after_last_chunk_s")},
            # The process that ran the load (with --processes, the parent): it holds no history now.
            "load_process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        },
        "whole": whole,
    }
