"""Span recording, cheap enough to leave on.

A span is ``(name, category, start_ns, duration_ns, args)``. On the step path it costs
a few stores into preallocated arrays (start and duration as int64, the (name,
category) pair as a small id; ``args`` kept apart, only for the spans that have them):
no tuple or list per span, no locks, no I/O until :meth:`SpanRecorder.dump` at the
end. The arrays double when full (amortised, rare: 4,096 spans to start with).
Timestamps are this process's ``time.time_ns()`` plus its estimated offset to the
coordinator's clock (:func:`estimate_offset`), so spans from every process line up in
one trace.

When profiling is off, :data:`OFF` is a recorder whose methods do nothing (its
``span`` hands back one shared no-op context), so instrumented code needs no
``if profiling:`` branches.

Clock alignment follows NTP's offset estimate (RFC 5905 section 8): the client
stamps t0, the coordinator stamps t1, the client stamps t2 on receipt; the
offset is ``t1 - (t0 + t2) / 2`` with error at most ``(t2 - t0) / 2``. Of several
exchanges the one with the smallest round trip is kept.
"""

from __future__ import annotations

import json
import time
from array import array
from pathlib import Path
from typing import Any, Callable, Optional

#: Spans a recorder has room for before its arrays first grow.
INITIAL_SPANS = 4096


class _Span:
    """``with recorder.span(name, cat):`` records the block's duration on exit."""

    __slots__ = ("rec", "kind", "args", "t0")

    def __init__(self, rec: "SpanRecorder", kind: int, args: Optional[dict]):
        self.rec, self.kind, self.args = rec, kind, args

    def __enter__(self) -> "_Span":
        self.t0 = time.time_ns()
        return self

    def __exit__(self, *exc) -> bool:
        t0 = self.t0
        self.rec._put(self.kind, t0 + self.rec.offset_ns, time.time_ns() - t0, self.args)
        return False


class _NoSpan:
    __slots__ = ()

    def __enter__(self) -> "_NoSpan":
        return self

    def __exit__(self, *exc) -> bool:
        return False


_NO_SPAN = _NoSpan()


class SpanRecorder:
    enabled = True

    def __init__(self, role: str, rank: int, offset_ns: int = 0, error_ns: int = 0):
        self.role, self.rank = role, rank
        self.offset_ns, self.error_ns = offset_ns, error_ns
        self.counters: dict[str, float] = {}
        #: Further JSON-able fields for this process's profile (e.g. torch operator events).
        self.extra: dict[str, Any] = {}
        # Span storage: (start, duration) pairs, kind ids, and args by span index.
        self._times = array("q", bytes(16 * INITIAL_SPANS))
        self._kinds = array("i", bytes(4 * INITIAL_SPANS))
        self._args: dict[int, dict] = {}
        self._n = 0
        self._kind_of: dict[tuple[str, str], int] = {}
        self._kind_names: list[tuple[str, str]] = []

    def now(self) -> int:
        return time.time_ns() + self.offset_ns

    def _kind(self, name: str, cat: str) -> int:
        kind = self._kind_of.get((name, cat))
        if kind is None:
            kind = self._kind_of[(name, cat)] = len(self._kind_names)
            self._kind_names.append((name, cat))
        return kind

    def _put(self, kind: int, start_ns: int, dur_ns: int, args: Optional[dict]) -> None:
        n = self._n
        if n == len(self._kinds):  # full: double (amortised; never on most steps)
            self._times.extend(array("q", bytes(16 * n)))
            self._kinds.extend(array("i", bytes(4 * n)))
        self._times[2 * n] = start_ns
        self._times[2 * n + 1] = dur_ns
        self._kinds[n] = kind
        if args:
            self._args[n] = args
        self._n = n + 1

    def span(self, name: str, cat: str = "", **args: Any) -> _Span:
        return _Span(self, self._kind(name, cat), args)

    def add(self, name: str, cat: str, start_ns: int, dur_ns: int, **args: Any) -> None:
        """Record a span measured elsewhere (``start_ns`` already on the aligned clock)."""
        self._put(self._kind(name, cat), start_ns, dur_ns, args)

    def instant(self, name: str, cat: str = "", **args: Any) -> None:
        self._put(self._kind(name, cat), self.now(), 0, args)

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    @property
    def spans(self) -> list[tuple]:
        """Every span recorded so far, ``(name, cat, start_ns, dur_ns, args or None)``."""
        names, times, kinds, args = self._kind_names, self._times, self._kinds, self._args
        return [(*names[kinds[i]], times[2 * i], times[2 * i + 1], args.get(i))
                for i in range(self._n)]

    def dump(self, path: Path, extra: Optional[dict] = None) -> None:
        """Write this process's spans (JSON; nothing executable, nothing pickled)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"role": self.role, "rank": self.rank, "offset_ns": self.offset_ns,
               "clock_error_ns": self.error_ns, "counters": self.counters,
               "spans": [list(s) for s in self.spans], **self.extra,
               **(extra or {})}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(path)


class _Off(SpanRecorder):
    """The recorder when profiling is off: every method is a no-op."""

    enabled = False

    def __init__(self):
        super().__init__("", 0)
        self._times, self._kinds = array("q"), array("i")  # nothing is ever stored

    def span(self, name: str, cat: str = "", **args: Any):
        return _NO_SPAN

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
