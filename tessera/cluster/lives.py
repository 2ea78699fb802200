"""A worker's counters across its lives (``--max-restarts``).

A restarted worker is a new process: whatever the dead one counted in memory is
gone with it, so ``summary.json`` used to report only the last life (the
acknowledged pushes of the dead life missing from ``pushes_acked``; ``wall_s`` and
``samples_per_s`` of a life that ran no step). Each worker keeps its running totals
in a small file-backed memory map, ``<run dir>/cursors/worker-<rank>.tally``: a
store into the map is a memory write (no system call per step), and the page stays
in the kernel's cache when the process is killed with SIGKILL, so the replacement,
started by the same launcher on the same machine, reads what its predecessor had
counted up to its last completed step and goes on from there.

A fresh job (incarnation 0) starts the file anew.
"""

from __future__ import annotations

import math
import mmap
import struct
import time
from pathlib import Path
from typing import Optional

from tessera.errors import UsageError

#: The slots, in file order (float64 each).
SLOTS = ("started_unix", "steps", "samples", "eval_s", "acked", "last_loss", "lives",
         "open", "unanswered")
_FORMAT = "<" + "d" * len(SLOTS)
_SIZE = struct.calcsize(_FORMAT)


class _MappedFile:
    """A small file of ``size`` bytes mapped into memory: written anew as ``empty`` for a
    fresh job (or when its size is not ``size``), else kept as a predecessor left it."""

    def __init__(self, path: Path, size: int, empty: bytes, *, fresh: bool):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh or not self.path.exists() or self.path.stat().st_size != size:
            self.path.write_bytes(empty)
        self._file = open(self.path, "r+b")
        self._map = mmap.mmap(self._file.fileno(), size)

    def close(self) -> None:
        if self._map is not None:
            self._map.flush()
            self._map.close()
            self._file.close()
            self._map = None


class LifeTally(_MappedFile):
    """Running totals of one worker over all its lives, kept in ``path``."""

    def __init__(self, path: Path, *, fresh: bool):
        empty = [math.nan if slot == "last_loss" else 0.0 for slot in SLOTS]
        super().__init__(path, _SIZE, struct.pack(_FORMAT, *empty), fresh=fresh)
        #: What the earlier lives had counted when this one began.
        self.before = dict(zip(SLOTS, struct.unpack(_FORMAT, self._map[:_SIZE])))
        self._acked_base = self.before["acked"]
        self._set("lives", self.before["lives"] + 1)
        # A predecessor killed inside a step had pushes out whose answers it never saw:
        # the servers may have applied them (sync: the clock completes with them).
        self._set("unanswered", self.before["unanswered"] + self.before["open"])
        self._set("open", 0)
        if not self.before["started_unix"]:
            self._set("started_unix", time.time())

    def _set(self, slot: str, value: float) -> None:
        struct.pack_into("<d", self._map, SLOTS.index(slot) * 8, float(value))

    def get(self, slot: str) -> float:
        return struct.unpack_from("<d", self._map, SLOTS.index(slot) * 8)[0]

    @property
    def started_unix(self) -> float:
        """When the first life began (its training loop, or its joining)."""
        return self.get("started_unix")

    def restart_clock(self) -> None:
        """The job's training starts now (the first life's loop), not at process start."""
        if self.before["lives"] == 0:
            self._set("started_unix", time.time())

    def open_step(self, pushes: int) -> None:
        """A step that sends ``pushes`` pushes begins (closed by :meth:`step`)."""
        self._set("open", pushes)

    def step(self, *, acked: int) -> None:
        """After a completed step: this life's acknowledged pushes so far."""
        self._set("steps", self.get("steps") + 1)
        self._set("acked", self._acked_base + acked)
        self._set("open", 0)

    @property
    def unanswered(self) -> int:
        """Pushes that earlier lives sent in the step they died in, unanswered to them:
        ``pushes_applied - pushes_acked`` lies between 0 and this."""
        return int(self.get("unanswered"))

    def trained(self, samples: int, loss) -> None:
        """The trainer's figures of a completed step (samples over all replicas)."""
        self._set("samples", self.get("samples") + samples)
        if loss is not None and math.isfinite(loss):
            self._set("last_loss", loss)

    def add_eval(self, seconds: float) -> None:
        self._set("eval_s", self.get("eval_s") + seconds)

    def total_acked(self, acked_now: int) -> int:
        """Acknowledged pushes over every life: the earlier lives' and ``acked_now``."""
        return int(self._acked_base) + int(acked_now)


class CursorMap(_MappedFile):
    """A worker's data position (each tracked sampler's epoch and count), kept after
    every applied step where a replacement of it finds it, in a memory map like
    :class:`LifeTally`'s: ``<run dir>/cursors/worker-<rank>.cursor``.

    A store is a few memory writes, not a file written and renamed per step (which cost
    a recipe's all-reduce worker about 0.5 ms a step, 3-5% of a small model's step:
    benchmarks/recipe_throughput.py). A kill can land between two stores, so the map
    holds two records and a step writes the older one: ``(version, clock, n, (epoch,
    taken) * n, version)``; a record whose two versions differ was torn, and the
    replacement takes the newest whole one (the step before, at worst, as when the
    kill lands before the write).
    """

    #: Samplers a worker may track (each a (epoch, taken) pair).
    MAX_SAMPLERS = 64
    _RECORD = 8 * (3 + 2 * MAX_SAMPLERS + 1)

    def __init__(self, path: Path, *, fresh: bool):
        super().__init__(path, 2 * self._RECORD, bytes(2 * self._RECORD), fresh=fresh)
        # Go on from the newest whole record, so that the next write goes to the other one
        # (a torn record's own version may be higher: writing past it could overwrite the
        # only whole record).
        whole = self._newest()
        self._version = whole[0] if whole else 0

    def save(self, clock: int, positions: list[tuple[int, int]]) -> None:
        """After an applied step: each tracked sampler's (epoch, taken)."""
        if len(positions) > self.MAX_SAMPLERS:
            raise UsageError(f"a worker can keep the position of at most {self.MAX_SAMPLERS} "
                             f"tessera.DistributedSamplers for restarts, not {len(positions)}: "
                             f"make fewer of them")
        self._version += 1
        at = (self._version % 2) * self._RECORD
        m = self._map
        struct.pack_into("<qqq", m, at, self._version, clock, len(positions))
        for i, (epoch, taken) in enumerate(positions):
            struct.pack_into("<qq", m, at + 24 + 16 * i, epoch, taken)
        struct.pack_into("<q", m, at + self._RECORD - 8, self._version)

    def load(self) -> Optional[tuple[int, list[tuple[int, int]]]]:
        """The newest whole record, ``(clock, [(epoch, taken), ...])``; None if none."""
        best = self._newest()
        return None if best is None else (best[1], best[2])

    def _newest(self) -> Optional[tuple[int, int, list[tuple[int, int]]]]:
        best = None
        for r in (0, 1):
            at = r * self._RECORD
            version, clock, n = struct.unpack_from("<qqq", self._map, at)
            end = struct.unpack_from("<q", self._map, at + self._RECORD - 8)[0]
            if version <= 0 or version != end or not 0 <= n <= self.MAX_SAMPLERS:
                continue
            if best is None or version > best[0]:
                pairs = [struct.unpack_from("<qq", self._map, at + 24 + 16 * i)
                         for i in range(n)]
                best = (version, clock, pairs)
        return best
