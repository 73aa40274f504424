"""The live display: elapsed, chunks/s, p50/p99 latency and errors, over the last couple of seconds."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

import numpy as np
from rich.console import Console, Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from loadtest.config import LoadConfig
from loadtest.recorder import Snapshot

WINDOW_S = 2.0
REFRESH_S = 0.5


class LiveView:
    """Folds snapshots of one or more processes into one line, redrawn at most every REFRESH_S."""

    def __init__(self, config: LoadConfig, console: Console | None = None) -> None:
        self.config = config
        self.console = console or Console(stderr=True)
        self.latest: dict[int, Snapshot] = {}
        self.recent: deque[tuple[float, np.ndarray]] = deque()
        self.totals: deque[tuple[float, int]] = deque()
        self._live: Live | None = None
        self._drawn = 0.0

    def __enter__(self) -> LiveView:
        self._live = Live(self._render(), console=self.console, auto_refresh=False, transient=False)
        self._live.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._live is not None:
            self._live.update(self._render(), refresh=True)
            self._live.__exit__(*exc)
            self._live = None

    def update(self, snapshot: Snapshot) -> None:
        self.latest[snapshot.source] = snapshot
        now = max(s.time for s in self.latest.values())
        self.recent.append((snapshot.time, snapshot.latencies))
        self.totals.append((now, sum(s.chunks for s in self.latest.values())))
        while self.recent and self.recent[0][0] < now - WINDOW_S:
            self.recent.popleft()
        while len(self.totals) > 1 and self.totals[0][0] < now - WINDOW_S:
            self.totals.popleft()
        if self._live is not None and time.monotonic() - self._drawn >= REFRESH_S:
            self._drawn = time.monotonic()
            self._live.update(self._render(), refresh=True)

    def _render(self) -> Group:
        config = self.config
        snaps = list(self.latest.values())
        elapsed = max((s.time for s in snaps), default=0.0)
        chunks = sum(s.chunks for s in snaps)
        errors = sum(s.errors for s in snaps)
        retries = sum(s.retries for s in snaps)
        late = sum(s.late for s in snaps)
        active = sum(s.active_streams for s in snaps)
        rate = 0.0
        if len(self.totals) > 1 and self.totals[-1][0] > self.totals[0][0]:
            rate = (self.totals[-1][1] - self.totals[0][1]) / (self.totals[-1][0] - self.totals[0][0])
        latencies = np.concatenate([a for _, a in self.recent]) if self.recent else np.empty(0)
        p50, p99 = (np.percentile(latencies, [50, 99]) * 1000.0) if latencies.size else (float("nan"),) * 2
        phase = "warm-up" if elapsed < config.warmup_s else "measuring"
        if config.duration_s is not None:
            total: float = config.warmup_s + config.duration_s
            done, where = min(elapsed, total), f"{elapsed:5.1f} / {total:g} s"
        else:
            total = float(config.total_chunks or 1)
            done, where = min(chunks, total), f"{chunks:,} / {total:,.0f} chunks, {elapsed:.1f} s"
        head = Table.grid(padding=(0, 1))
        head.add_row(ProgressBar(total=total, completed=done, width=40), Text(phase, style="cyan"), where,
                     f"{active} streams")
        line = Text.assemble(
            (f"{rate:,.0f} chunks/s", "bold"),
            f"  p50 {p50:.2f} ms  p99 {p99:.2f} ms  {chunks:,} chunks  ",
            (f"errors {errors:,}", "red" if errors else ""),
            f"  retries {retries:,}",
        )
        if config.open_loop and late:
            line.append(f"  behind schedule: {late:,} late chunks", style="yellow")
        return Group(head, line)
