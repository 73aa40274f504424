"""The XLA-compiled shapes of the model's call: which batch sizes and chunk lengths, compiled when.

XLA is 1.3 to 2.5 times faster per call here than the traced TensorFlow call, but compiles once per
concrete shape; server/model/runner.py asks `lookup` for each batch and runs uncompiled meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import tensorflow as tf

from server import metrics

log = logging.getLogger(__name__)


class XlaShapes:
    """XLA-compiled calls, one per (masked, batch bucket, timesteps), compiled in the background.

    XLA recompiles for every concrete shape (0.3 to 0.8 s each on 2 cores), so a request never waits
    for it: a shape seen for the first time runs on the generic traced call while a background thread
    compiles it; later batches of that shape use XLA. Chunk lengths are not padded (padding costs more
    than it saves); batch sizes are, to buckets, so a few executables cover every batch:

    - powers of two, compiled at start-up for the --warmup-timesteps lengths, except the shapes whose
      batches all run on the NumPy twin (bucket x timesteps <= --numpy-max-batch-timesteps: with the
      defaults, none for one-timestep chunks and 32 and 64 rows for 20);
    - for those lengths, above 16, four buckets per doubling (20, 24, 28, 32, 40, 48, 56, 64, ...), so
      padding adds at most a quarter: with powers of two alone a batch of 33 ran as 64 rows, 3.0 ms
      against 1.9 for 40 (T=20, 2 cores), and under 64 streams half the batches were over 32. They are
      compiled on first use, meanwhile their batches run on the compiled power of two, so start-up
      compiles no more. Other lengths keep powers of two: up to four times fewer compiles while serving.
    """

    MAX_TIMESTEPS = 64  # longer chunks gain little from XLA and would multiply the shapes to compile
    MAX_SHAPES = 96
    FINE_ABOVE = 16  # batch buckets above this are a quarter of a doubling apart

    def __init__(self, forward, features: int, state_size: int, max_batch: int, twin_serves: int) -> None:
        # Calling the tf.function (not a concrete function) measured faster: 0.55 against 1.25 ms.
        self.function = tf.function(forward, jit_compile=True)
        self._features = features
        self._state_size = state_size
        self._max_batch = 1 << max(0, (max_batch - 1).bit_length())
        self._ready: set[tuple[bool, int, int]] = set()
        self._queued: set[tuple[bool, int, int]] = set()
        self._lock = threading.Lock()
        self._compiler = ThreadPoolExecutor(max_workers=1, thread_name_prefix="xla-compile")
        self._warm_up: set[tuple[bool, int, int]] = set()  # shapes asked for at start-up
        self._fine_lengths: set[int] = set()  # chunk lengths that get the finer buckets
        self._twin_serves = twin_serves  # batches of at most this many chunks x timesteps never come here
        self._closed = False

    @staticmethod
    def power_bucket(batch: int) -> int:
        return 1 << (batch - 1).bit_length()

    @classmethod
    def bucket(cls, batch: int) -> int:
        """The batch size a batch of `batch` chunks is padded to, once that shape is compiled."""
        power = cls.power_bucket(batch)
        if power <= cls.FINE_ABOVE:
            return power
        step = power // 8  # four buckets per doubling
        return -(-batch // step) * step

    def lookup(self, masked: bool, batch: int, timesteps: int) -> int | None:
        """The batch bucket to pad to: the batch's own when compiled, else its power of two when that is
        compiled (the batch's own is compiled meanwhile); None (run uncompiled) when neither is."""
        if timesteps > self.MAX_TIMESTEPS or batch > self._max_batch:
            return None
        power = self.power_bucket(batch)
        bucket = self.bucket(batch) if timesteps in self._fine_lengths else power
        if (masked, bucket, timesteps) in self._ready:
            return bucket
        self._schedule((masked, bucket, timesteps))
        if power != bucket and (masked, power, timesteps) in self._ready:
            return power
        return None

    def prepare(self, timesteps: tuple[int, ...]) -> None:
        for steps in timesteps:
            self._fine_lengths.add(steps)
            bucket = 1
            while bucket <= self._max_batch and steps <= self.MAX_TIMESTEPS:
                # A batch reaches XLA only when its chunks x steps is over the twin's limit, and a batch
                # padded to this bucket has at most `bucket` chunks: within the limit, never used.
                if bucket * steps > self._twin_serves:
                    self._warm_up.add((False, bucket, steps))
                    self._schedule((False, bucket, steps))
                bucket *= 2

    def _schedule(self, key: tuple[bool, int, int]) -> None:
        with self._lock:
            if self._closed or key in self._queued or len(self._queued) >= self.MAX_SHAPES:
                return
            self._queued.add(key)
        self._compiler.submit(self._compile, key)

    def _compile(self, key: tuple[bool, int, int]) -> None:
        masked, batch, timesteps = key
        args = [tf.zeros([batch, timesteps, self._features]), tf.zeros([batch, self._state_size])]
        if masked:
            args.append(tf.ones([batch, timesteps], tf.bool))
        started = time.perf_counter()
        self.function(*args)  # the first call of a shape traces and compiles it
        seconds = time.perf_counter() - started
        with self._lock:
            if self._closed:  # finished after close(): nobody will run it, and the server's last line is said
                return
            self._ready.add(key)
            labels = (str(masked).lower(), str(batch), str(timesteps))
            metrics.COMPILES.labels(*labels).inc()
            metrics.COMPILE_SECONDS.labels(*labels).inc(seconds)
            # One line per compile: a run that is slow at first and fast the second time shows why here. A chunk
            # length compiled while serving belongs in --warmup-timesteps (docs/operations.md, "Compiled shapes").
            log.info("compiled", extra={"fields": {
                "masked": masked, "batch": batch, "timesteps": timesteps, "seconds": round(seconds, 3),
                "cause": self._cause(key), "compiled_shapes": len(self._ready)}})

    def _cause(self, key: tuple[bool, int, int]) -> str:
        """warm-up; batch size (a finer bucket of a shape already served compiled); traffic (a new shape)."""
        if key in self._warm_up:
            return "warm-up"
        masked, batch, timesteps = key
        if batch != self.power_bucket(batch) and (masked, self.power_bucket(batch), timesteps) in self._ready:
            return "batch size"
        return "traffic"

    def close(self) -> None:
        """Drop the queued shapes and do not wait for the one compiling, if any: it cannot be interrupted
        (0.3 to 0.8 s), and nothing will run it. It finishes unannounced (no "compiled" line after close, so
        the server's last log line stays last); a stopping server exits without waiting for it
        (server/app/main.py)."""
        with self._lock:
            self._closed = True
        self._compiler.shutdown(wait=False, cancel_futures=True)
