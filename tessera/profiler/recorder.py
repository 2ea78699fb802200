"""Span recording, cheap enough to leave on.

A span is ``(name, category, start_ns, duration_ns, args)`` appended to a Python
list: no locks on the hot path, no I/O until the end. Timestamps are this
process's ``time.time_ns()`` plus its estimated offset to the coordinator's clock
(:func:`estimate_offset`), so spans from every process line up in one trace.

When profiling is off, :data:`OFF` is a recorder whose methods do nothing, so
instrumented code needs no ``if profiling:`` branches.

Clock alignment follows NTP's offset estimate (RFC 5905 section 8): the client
stamps t0, the coordinator stamps t1, the client stamps t2 on receipt; the
offset is ``t1 - (t0 + t2) / 2`` with error at most ``(t2 - t0) / 2``. Of several
exchanges the one with the smallest round trip is kept.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Optional


class SpanRecorder:
    enabled = True

    def __init__(self, role: str, rank: int, offset_ns: int = 0, error_ns: int = 0):
        self.role, self.rank = role, rank
        self.offset_ns, self.error_ns = offset_ns, error_ns
        self.spans: list[tuple] = []
        self.counters: dict[str, float] = {}
        #: Further JSON-able fields for this process's profile (e.g. torch operator events).
        self.extra: dict[str, Any] = {}

    def now(self) -> int:
        return time.time_ns() + self.offset_ns

    @contextmanager
    def span(self, name: str, cat: str = "", **args: Any):
        t0 = time.time_ns()
        try:
            yield
        finally:
            self.spans.append((name, cat, t0 + self.offset_ns, time.time_ns() - t0, args or None))

    def add(self, name: str, cat: str, start_ns: int, dur_ns: int, **args: Any) -> None:
        """Record a span measured elsewhere (``start_ns`` already on the aligned clock)."""
        self.spans.append((name, cat, start_ns, dur_ns, args or None))

    def instant(self, name: str, cat: str = "", **args: Any) -> None:
        self.spans.append((name, cat, self.now(), 0, args or None))

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    def dump(self, path: Path, extra: Optional[dict] = None) -> None:
        """Write this process's spans (JSON; nothing executable, nothing pickled)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"role": self.role, "rank": self.rank, "offset_ns": self.offset_ns,
               "clock_error_ns": self.error_ns, "counters": self.counters,
               "spans": [[n, c, s, d, a] for n, c, s, d, a in self.spans], **self.extra,
               **(extra or {})}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)


class _Off(SpanRecorder):
    """The recorder when profiling is off: every method is a no-op."""

    enabled = False

    def __init__(self):
        super().__init__("", 0)

    @contextmanager
    def span(self, name: str, cat: str = "", **args: Any):
        yield

    def add(self, *a, **k) -> None:
        pass

    def instant(self, *a, **k) -> None:
        pass

    def count(self, *a, **k) -> None:
        pass

    def dump(self, *a, **k) -> None:
        pass


OFF = _Off()


def estimate_offset(exchange: Callable[[int], int], samples: int = 8) -> tuple[int, int]:
    """NTP-style offset of the remote clock to ours: ``(offset_ns, error_ns)``.

    ``exchange(t0)`` sends our time and returns the remote's time at receipt.
    """
    best: Optional[tuple[int, int]] = None
    for _ in range(samples):
        t0 = time.time_ns()
        t1 = exchange(t0)
        t2 = time.time_ns()
        rtt = t2 - t0
        if best is None or rtt < best[1] * 2:
            best = (t1 - (t0 + t2) // 2, rtt // 2)
    return best
