"""Span recording, cheap enough to leave on.

A span is ``(name, category, start_ns, duration_ns, args)``. On the step path it costs
one ``extend`` of an int64 array by three numbers (start, duration, and the (name,
category) pair as a small id; ``args`` kept apart, only for the spans that have them): no
object kept per span, no locks, no I/O until :meth:`SpanRecorder.dump` at the end. Code
that records the same spans every step looks their ids up once
(:meth:`SpanRecorder.kinds`) and stores with :meth:`SpanRecorder.put`.
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

#: The span of a forward run without gradients (``torch.no_grad``, ``inference_mode``): a
#: user's or the trainer's evaluation, which the profiler's report counts apart from the
#: training step's forward (a worker that evaluates is not a straggler).
EVAL_SPAN = ("evaluate", "eval")


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
        self.rec.put(self.kind, t0 + self.rec.offset_ns, time.time_ns() - t0, self.args)
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
        # Span storage: (start, duration, kind id) triples, and args by span index.
        self._spans = array("q")
        self._args: dict[int, dict] = {}
        self._kind_of: dict[tuple[str, str], int] = {}
        self._kind_names: list[tuple[str, str]] = []
        self._groups: dict[tuple, tuple[int, ...]] = {}

    def now(self) -> int:
        return time.time_ns() + self.offset_ns

    def _kind(self, name: str, cat: str) -> int:
        kind = self._kind_of.get((name, cat))
        if kind is None:
            kind = self._kind_of[(name, cat)] = len(self._kind_names)
            self._kind_names.append((name, cat))
        return kind

    def kinds(self, pairs: tuple[tuple[str, str], ...]) -> tuple[int, ...]:
        """The ids of ``pairs`` of (name, category), for :meth:`put` (looked up once)."""
        ids = self._groups.get(pairs)
        if ids is None:
            ids = self._groups[pairs] = tuple(self._kind(name, cat) for name, cat in pairs)
        return ids

    def put(self, kind: int, start_ns: int, dur_ns: int, args: Optional[dict] = None) -> None:
        """Record a span of a kind from :meth:`kinds` (``start_ns`` on the aligned clock)."""
        self._spans.extend((start_ns, dur_ns, kind))
        if args:
            self._args[len(self._spans) // 3 - 1] = args

    def span(self, name: str, cat: str = "", **args: Any) -> _Span:
        return _Span(self, self._kind(name, cat), args)

    def add(self, name: str, cat: str, start_ns: int, dur_ns: int, **args: Any) -> None:
        """Record a span measured elsewhere (``start_ns`` already on the aligned clock)."""
        self.put(self._kind(name, cat), start_ns, dur_ns, args)

    def instant(self, name: str, cat: str = "", **args: Any) -> None:
        self.put(self._kind(name, cat), self.now(), 0, args)

    def count(self, key: str, value: float = 1.0) -> None:
        self.counters[key] = self.counters.get(key, 0.0) + value

    @property
    def spans(self) -> list[tuple]:
        """Every span recorded so far, ``(name, cat, start_ns, dur_ns, args or None)``."""
        names, spans, args = self._kind_names, self._spans, self._args
        return [(*names[spans[3 * i + 2]], spans[3 * i], spans[3 * i + 1], args.get(i))
                for i in range(len(spans) // 3)]

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

    def span(self, name: str, cat: str = "", **args: Any):
        return _NO_SPAN

    def add(self, *a, **k) -> None:
        pass

    def put(self, *a, **k) -> None:
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
