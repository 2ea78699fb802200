"""Row storage for an embedding shard: slots handed out and reused, and an id index.

A shard stores rows in growable arrays (values, optimizer state) addressed by
*slot*. :class:`Slots` hands slot numbers out and takes them back when rows are
evicted, so storage stays as large as the live rows (plus doubling slack).
:class:`IdIndex` maps int64 ids to slots and remembers the clock each id was last
touched, which is what admission (Monolith's frequency filter: an id is stored only
after ``admit_after`` lookups) and expiry (Monolith's expirable embeddings: rows
untouched for ``evict_after`` clocks, or the least recently touched beyond
``max_rows``, are dropped) need. The index works on whole batches of ids, never with
a Python loop per id: an open-addressing hash table probed id by id in a compiled loop
(:mod:`tessera.ps.kernels`), or, without numba, a batch at a time with numpy.
"""

from __future__ import annotations

import math
import mmap
import os
import sys
import threading
import weakref

import numpy as np
import torch

from tessera.ps import kernels

#: Rows of storage allocated at first growth; later growth doubles (amortised O(1)).
_MIN_CAPACITY = 64
#: Row storage (a tensor) at least this large is an anonymous memory map: the kernel
#: hands out its pages, zeroed, only when first touched, so capacity not used yet
#: costs address space, not memory. It does not ask for transparent huge pages
#: (``MADV_HUGEPAGE``): on the 2-core test VM the first touch of each 2 MiB page cost
#: up to 4.5 ms, and a table growing by 7k rows a step spent 4x longer creating them
#: (``sparse_embedding.py``'s 50k-id case: 6.2 against 2.0 ms a lookup).
_MAPPED_BYTES = 8 << 20
#: Address space a growable mapped array reserves (``MAP_NORESERVE``: no memory and no
#: swap is committed until a page is written), so that it grows in place: a larger view
#: of the same pages, no copy. Growing a 112 MiB table by copying took 55 ms, and the
#: pause grows with the table; in place it is a few microseconds at any size. Where
#: the kernel refuses the reservation (``vm.overcommit_memory = 2``, a ``ulimit -v``), or
#: past it, storage is copied into a mapping 8x larger (each growth then copies the rows
#: held, so 8x copies a seventh as much as doubling does).
_RESERVE_BYTES = 1 << 38  # 256 GiB of address space per array; x86-64 has 128 TiB
_MAPPED_GROWTH = 8
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Linux's value; 3.11 lacks it


def _mapping(nbytes: int, reserve: bool) -> mmap.mmap:
    """An anonymous private mapping of at least ``nbytes`` (``_RESERVE_BYTES`` of address
    space when ``reserve`` and the kernel allows it)."""
    if reserve and nbytes < _RESERVE_BYTES:
        try:
            return mmap.mmap(-1, _RESERVE_BYTES, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                             | _MAP_NORESERVE)
        except (OSError, OverflowError, ValueError):
            pass  # refused: a mapping of the size asked for, copied when it grows
    return mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def _view(area: mmap.mmap, rows: int, tail: tuple, dtype: torch.dtype) -> torch.Tensor:
    """The first ``rows`` rows of ``area`` as a tensor that remembers its mapping."""
    t = torch.frombuffer(area, dtype=dtype, count=rows * math.prod(tail)).view(rows, *tail)
    t._tessera_area = area  # grown() extends it in place
    return t


def zero_rows(rows: int, tail: tuple, dtype: torch.dtype, growable: bool = False
              ) -> torch.Tensor:
    """A zeroed tensor ``[rows, *tail]``; big ones mapped (see ``_MAPPED_BYTES``), and
    with ``growable`` within a reservation :func:`grown` extends without copying."""
    nbytes = rows * math.prod(tail) * dtype.itemsize
    if nbytes < _MAPPED_BYTES:
        return torch.zeros((rows, *tail), dtype=dtype)
    area = _mapping(nbytes, growable)  # zero; unmapped when the last tensor on it is freed
    return _view(area, rows, tail, dtype)


def return_freed_memory() -> None:
    """Make this process give freed temporaries back to the kernel at once (glibc).

    By default glibc raises its mmap threshold (up to 32 MiB) after the first large
    block is freed, and its trim threshold with it: the request path's temporaries
    (ids, rows and gradients of a batch) then come from the heap and their pages stay
    in the process after use, tens of MiB the byte cap of a table cannot see. Fixing
    the thresholds (blocks >= 128 KiB mapped and unmapped on free; heap trimmed above
    1 MiB) keeps the resident memory at the table plus one request's buffers.
    Without glibc this does nothing."""
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 17)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 20)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


#: ``madvise`` advice that write-faults a range's pages in one call (Linux 5.14+).
_MADV_POPULATE_WRITE = 23


def _libc_madvise():
    """libc's ``madvise`` through ctypes, or None where there is none."""
    try:
        import ctypes
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


_MADVISE = _libc_madvise()


def prefault(rows: torch.Tensor) -> bool:
    """Make the pages under ``rows`` (a contiguous tensor of fresh, zero rows about to
    be written) present and writable in one system call, ``MADV_POPULATE_WRITE``;
    the values are unchanged. False where the kernel or platform has no such advice
    (nothing done).

    A fresh row of a growing table is otherwise faulted in by the first loop that
    touches it, a page at a time, in the middle of its random accesses; and a loop
    that *reads* a row first (the optimizer steps read their state) maps the zero page
    and then faults again to write it. On the test VM (whose host takes back freed
    pages) 1,400 fresh state rows a step cost the Adagrad step 1.6 against 0.55 ms
    (``sparse_embedding.py``'s 10k-id case, in one process)."""
    n = rows.numel() * rows.element_size()
    if _MADVISE is None or n == 0:
        return False
    start = rows.data_ptr()
    first = start - start % mmap.PAGESIZE
    return _MADVISE(first, start + n - first, _MADV_POPULATE_WRITE) == 0


#: At most this many bytes of a growing array are faulted in ahead of its rows in use.
_AHEAD_BYTES = 32 << 20
#: ... in system calls of at most this many bytes.
_AHEAD_PIECE = 1 << 20
#: The thread ends after this long without work.
_AHEAD_LINGER_S = 2.0
#: The thread's nice value (the lowest priority; it runs on what cores leave idle).
_AHEAD_NICE = 19


class _FaultAhead:
    """A daemon thread that faults in, ahead of time, the pages a growing table will
    write next, so that the serve thread finds them present.

    A table that creates rows at every request (new ids keep arriving) pays for its
    fresh pages in the kernel: zeroing them, and on a VM whose host takes back freed
    memory, asking the host for them again. On the 2-core test VM that was a third of
    a server's time at 100k ids a batch (``sparse_embedding.py``: ``prefault`` 0.34 of
    1.03 s). ``MADV_POPULATE_WRITE`` releases the GIL (ctypes), so this thread's faults
    overlap the serve thread's work; the serve thread's own :func:`prefault` of the
    same range then finds the pages present. Values are not touched: the pages are
    zero either way. The memory held ahead is bounded (:data:`_AHEAD_BYTES` an array).

    The thread runs at the lowest priority (nice :data:`_AHEAD_NICE`, itself only): its
    work pays only where a core would otherwise idle. At normal priority, on a host
    whose cores are all busy (two servers and a worker on the 2-core test VM), it took
    the core from the other server's serve thread and slowed requests by 10-20%.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._work: dict[int, list] = {}   # id(area) -> [area, base address, from, to]
        self._marks: dict[int, tuple] = {}  # id(area) -> (weakref to area, faulted to)
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._pid = -1

    def request(self, t: torch.Tensor, used: int, rows: int) -> None:
        """Fault in the pages of rows ``used .. used + rows`` of ``t``'s reservation
        (those not already asked for), unless ``t`` has none."""
        area = getattr(t, "_tessera_area", None)
        if area is None or _MADVISE is None or rows <= 0:
            return
        row_bytes = math.prod(t.shape[1:]) * t.element_size()
        want = min((used + rows) * row_bytes, len(area), used * row_bytes + _AHEAD_BYTES)
        key = id(area)
        with self._cond:
            ref_mark = self._marks.get(key)
            mark = ref_mark[1] if ref_mark is not None and ref_mark[0]() is area else 0
            start = max(mark, used * row_bytes)
            if want - start < mmap.PAGESIZE:
                return
            if ref_mark is None:
                self._marks = {k: v for k, v in self._marks.items() if v[0]() is not None}
            self._marks[key] = (weakref.ref(area), want)
            queued = self._work.get(key)
            if queued is not None and queued[0] is area and queued[3] == start:
                queued[3] = want  # the range still queued grows
            else:
                self._work[key] = [area, t.data_ptr(), start, want]
            # Started on first use in this process (threads die in fork) and again after
            # it ended for want of work.
            if self._thread is None or self._pid != os.getpid():
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="tessera-fault-ahead",
                                                daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self, timeout: float = 5.0) -> None:
        """Drop the faults still queued and wait for the thread to end (a job run in
        this process ends its threads: :class:`tessera.cluster.inprocess.InProcessJob`).
        A later request starts it again."""
        with self._cond:
            thread = self._thread if self._pid == os.getpid() else None
            self._work.clear()
            self._marks.clear()  # what was dropped was not faulted in
            self._stopping = thread is not None
            self._cond.notify_all()
        if thread is not None:
            thread.join(timeout)

    def _run(self) -> None:
        _lower_priority(_AHEAD_NICE)
        while True:
            with self._cond:
                if not self._work and not self._stopping:
                    self._cond.wait(_AHEAD_LINGER_S)
                if not self._work:  # idle or stopped: end; the next request starts one
                    if self._thread is threading.current_thread():
                        self._thread, self._stopping = None, False
                    return
                area, base, start, end = self._work.pop(next(iter(self._work)))  # oldest
            # In pieces: a fault holds the process's mmap lock for reading, and the serve
            # thread's allocations (mmap, brk) wait for it to write.
            at = base + start - (base + start) % mmap.PAGESIZE
            while at < base + end:
                n = min(_AHEAD_PIECE, base + end - at)
                _MADVISE(at, n, _MADV_POPULATE_WRITE)
                at += n
            del area  # the mapping lives until its faults are done


def _lower_priority(nice: int) -> None:
    """Give the calling thread (Linux: a thread's own nice value) ``nice``; nothing where
    the platform has no per-thread priority or refuses."""
    if not sys.platform.startswith("linux"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


_FAULT_AHEAD = _FaultAhead()


def fault_ahead(t: torch.Tensor, used: int, rows: int) -> None:
    """Have the pages of rows ``used .. used + rows`` of the growable mapped tensor
    ``t`` faulted in by a background thread (:class:`_FaultAhead`); nothing for a
    tensor that is not one."""
    _FAULT_AHEAD.request(t, used, rows)


def stop_fault_ahead(timeout: float = 5.0) -> None:
    """End the fault-ahead thread of this process, if one runs (see :meth:`_FaultAhead.stop`)."""
    _FAULT_AHEAD.stop(timeout)


def grown(array, needed: int):
    """``array`` (numpy or torch, rows first) with at least ``needed`` rows, doubling;
    rows beyond those held are zero. A mapped tensor grows in place while its
    reservation lasts (the result shares the rows held: ``array`` must not be used
    after), else into a copy 8x larger."""
    have = array.shape[0]
    if have >= needed:
        return array
    if isinstance(array, torch.Tensor):
        tail, dtype = tuple(array.shape[1:]), array.dtype
        row_bytes = math.prod(tail) * dtype.itemsize
        area = getattr(array, "_tessera_area", None)
        if area is not None and needed * row_bytes <= len(area):
            return _view(area, min(max(needed, 2 * have), len(area) // row_bytes), tail, dtype)
        growth = _MAPPED_GROWTH if array.nbytes >= _MAPPED_BYTES else 2
        rows = max(needed, growth * have, _MIN_CAPACITY)
        out = zero_rows(rows, tail, dtype, growable=True)
    else:
        rows = max(needed, 2 * have, _MIN_CAPACITY)
        out = np.empty((rows, *array.shape[1:]), dtype=array.dtype)
    out[:have] = array
    return out


def rows_view(t: torch.Tensor) -> np.ndarray:
    """A 1-D numpy view of the contiguous 2-D tensor ``t`` with one opaque item per
    row: numpy moves a row as one ``memcpy`` of its bytes, which makes gathers and
    scatters of whole rows an order of magnitude faster than ``index_select`` and
    ``index_copy_`` (those step element by element); the bytes are the same."""
    return t.numpy().view(np.dtype((np.void, t.shape[1] * t.element_size()))).reshape(-1)


def gather_rows(src: torch.Tensor, slots: np.ndarray,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``src[slots]`` (rows, repeats allowed) as a new contiguous tensor, or written into
    ``out`` (contiguous, ``[len(slots), width]`` of ``src``'s dtype): the compiled loop
    that asks for rows ahead (:func:`tessera.ps.kernels.gather`; a table larger than the
    caches answers each row from memory), else numpy's ``take``."""
    rows = src.numpy()
    if kernels.ENABLED and rows.ndim == 2 and slots.dtype == np.int64:
        into = np.empty((len(slots), rows.shape[1]), dtype=rows.dtype) if out is None \
            else out.numpy()
        kernels.gather(rows, slots, into)
        return torch.from_numpy(into) if out is None else out
    got = np.take(rows_view(src), slots)
    got = torch.from_numpy(got.view(rows.dtype).reshape(len(slots), rows.shape[1]))
    return got if out is None else out.copy_(got)


def scatter_rows(dst: torch.Tensor, slots: np.ndarray, rows: torch.Tensor) -> None:
    """``dst[slots] = rows`` (``slots`` unique; ``rows`` of ``dst``'s dtype and width)."""
    rows_view(dst)[slots] = rows_view(rows.contiguous())


def fill_rows(dst: torch.Tensor, slots: np.ndarray, value: float) -> None:
    """``dst[slots] = value``."""
    rows_view(dst)[slots] = rows_view(torch.full((1, dst.shape[1]), value, dtype=dst.dtype))[0]


class Slots:
    """Slot numbers ``0 .. end - 1`` handed out and taken back; freed ones are reused."""

    def __init__(self) -> None:
        self.end = 0
        self._free = np.empty(0, dtype=np.int64)

    def take(self, n: int) -> np.ndarray:
        reused = self._free[len(self._free) - min(n, len(self._free)):]
        self._free = self._free[:len(self._free) - len(reused)]
        fresh = np.arange(self.end, self.end + n - len(reused), dtype=np.int64)
        self.end += len(fresh)
        return np.concatenate([reused, fresh])

    def give(self, slots: np.ndarray) -> None:
        self._free = np.concatenate([self._free, slots])


#: Multiplier of the index's Fibonacci hash (2^64 / golden ratio, odd): consecutive
#: ids land far apart.
_HASH_MUL = np.uint64(kernels.HASH_MUL)
#: Hash-table buckets at first; the table doubles while over half full.
_MIN_BUCKETS = 1 << 10
_EMPTY, _GONE = -1, -2  # bucket markers: never used, and a removed id (a tombstone)


class IdIndex:
    """A set of int64 ids (>= 0), each at a slot, with the clock each was last touched.

    Per slot: ``ids`` (the id stored there; -1: free) and ``last`` (clock of its
    last touch). Ids map to slots through an open-addressing hash table with linear
    probing, held in one numpy array (``_table``: per bucket the id, -1 empty, -2
    removed, and its slot) and worked on a whole batch at a time:

    * :meth:`find` gathers every query's home bucket in one fancy index, then probes
      on only the queries still unresolved (at most half the buckets are used, so
      almost every id is found at its first or second probe): O(k) for k ids,
      against O(k log n) random reads of a binary search over n ids;
    * :meth:`insert` writes the new ids into free buckets in rounds: every id still
      unplaced writes its key into its bucket, reads it back, and the ones whose key
      stayed there took it (two ids claiming one bucket: one wins, the other moves
      on); O(k), not the O(n) array merge a sorted index needs per batch;
    * :meth:`remove` marks buckets removed; when removed plus live buckets pass half
      the table, it is rebuilt (from ``ids``), doubled if the live ids need it.

    :meth:`live` sorts the live ids when asked (checkpoints and exports, not the
    request path).
    """

    def __init__(self, capacity: int = 0, buckets: int = 0) -> None:
        self.slots = Slots()
        #: > 0: a fixed index (a shard under a byte cap): at most ``capacity`` ids, in
        #: arrays allocated once, and ``buckets`` hash buckets (a power of two, at least
        #: 2.5x ``capacity``) that are cleaned in place, never grown.
        self.capacity = capacity
        self.ids = np.full(capacity, -1, dtype=np.int64)  # id at each slot; -1: free
        self.last = np.zeros(capacity, dtype=np.int64)    # clock of last touch
        self._count = 0
        self._used = 0  # live + removed buckets
        # The buckets' storage: a fixed index's, allocated once; a growing one's, a
        # reserved mapping that grows in place (:func:`grown`), so that a rebuild into
        # twice the buckets faults in only the new half, not a whole new table.
        self._store = zero_rows(buckets or _MIN_BUCKETS, (2,), torch.int64,
                                growable=not capacity)
        self._rebuild(buckets or _MIN_BUCKETS, np.empty(0, dtype=np.int64))

    @staticmethod
    def bytes_per_id() -> int:
        """Bytes a fixed index keeps per id of capacity (``ids``, ``last``, and the free
        list of :class:`Slots` at its longest); buckets cost 16 bytes each on top."""
        return 8 + 8 + 8

    def _crowded(self, extra: int = 0) -> bool:
        """Too many used (live or removed) buckets to probe quickly."""
        if self.capacity:
            return 10 * (self._used + extra) > 7 * len(self._table)
        return 2 * (self._used + extra) > len(self._table)

    def _clean_in_place(self) -> None:
        """A fixed index: drop the removed buckets, re-placing the live ids a chunk at a
        time (no second table, no temporaries the size of the index)."""
        self._table[:, 0] = _EMPTY
        self._used = 0
        chunk = 1 << 16
        for start in range(0, self.slots.end, chunk):
            part = self.ids[start:start + chunk]
            live = np.flatnonzero(part >= 0)
            if len(live):
                self._place(part[live], live + start)

    def __len__(self) -> int:
        return self._count

    def _home(self, ids: np.ndarray) -> np.ndarray:
        """Each id's home bucket: the top bits of a Fibonacci hash."""
        with np.errstate(over="ignore"):
            h = np.asarray(ids, dtype=np.int64).view(np.uint64) * _HASH_MUL
        h >>= np.uint64(64 - self._bits)
        return h.view(np.int64)

    def _rebuild(self, buckets: int, slots: np.ndarray) -> None:
        self._bits = buckets.bit_length() - 1
        self._mask = buckets - 1
        # Bucket b: (id, slot); one row, so one probe reads one cache line.
        held = self._store.shape[0]
        if held < buckets:
            self._store = grown(self._store, buckets)
            prefault(self._store[held:buckets])  # the pages this table adds, at once
        self._table = self._store[:buckets].numpy()
        self._table[:, 0] = _EMPTY
        self._used = 0
        if len(slots):
            self._place(self.ids[slots], slots)

    def _place(self, ids: np.ndarray, slots: np.ndarray) -> None:
        """Put absent, unique ``ids`` (at ``slots``) into free buckets."""
        if kernels.ENABLED:
            self._used += kernels.place_ids(self._table, np.ascontiguousarray(ids, np.int64),
                                            np.ascontiguousarray(slots, np.int64), self._bits)
            return
        flat, mask = self._table.reshape(-1), self._mask
        keys = flat[::2]
        pos = self._home(ids)
        while len(ids):
            free = np.flatnonzero(keys[pos] < 0)
            at, cand = pos[free], ids[free]
            fresh = keys[at] == _EMPTY
            keys[at] = cand  # two ids on one bucket: the last write stays, the other moves on
            won = keys[at] == cand
            flat[2 * at[won] + 1] = slots[free[won]]
            self._used += int(np.count_nonzero(fresh & won))
            left = np.ones(len(ids), dtype=bool)
            left[free[won]] = False
            ids, slots, pos = ids[left], slots[left], (pos[left] + 1) & mask

    def _lookup(self, ids: np.ndarray, buckets: bool = False):
        """Slot of each id (-1: absent); with ``buckets``, also its bucket (-1: absent)."""
        if kernels.ENABLED:
            ids = np.ascontiguousarray(ids, np.int64)
            found = np.empty(len(ids), dtype=np.int64)
            if not buckets:
                kernels.find_slots(self._table, ids, self._bits, found)
                return found, None
            kernels.find_buckets(self._table, ids, self._bits, found)
            return np.where(found >= 0, self._table[found, 1], -1), found
        table, mask = self._table, self._mask
        pos = self._home(ids)
        got = np.take(table, pos, axis=0)  # (k, 2): key and slot of each home bucket
        keys = got[:, 0]
        hit = keys == ids
        slot = np.where(hit, got[:, 1], -1)
        bucket = np.where(hit, pos, -1) if buckets else None
        hit |= keys == _EMPTY  # resolved: found, or absent
        if hit.all():
            return slot, bucket
        todo = np.flatnonzero(~hit)  # probe on
        pos = pos[todo]
        while len(todo):
            pos += 1
            pos &= mask
            got = np.take(table, pos, axis=0)
            hit = got[:, 0] == ids[todo]
            done = todo[hit]
            slot[done] = got[hit, 1]
            if buckets:
                bucket[done] = pos[hit]
            go_on = ~hit & (got[:, 0] != _EMPTY)
            todo, pos = todo[go_on], pos[go_on]
        return slot, bucket

    def find(self, ids: np.ndarray) -> np.ndarray:
        """Slot of each id (any order, repeats allowed); -1 where absent."""
        if self._count == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        if len(ids) and ids.min() < 0:  # never stored (and -1, -2 mark buckets)
            out = np.full(len(ids), -1, dtype=np.int64)
            ok = ids >= 0
            out[ok] = self._lookup(ids[ok])[0]
            return out
        return self._lookup(ids)[0]

    def insert(self, ids: np.ndarray, clock: int) -> np.ndarray:
        """Slots for ``ids`` (absent and unique); arrays grow to ``self.slots.end``."""
        slots = self.slots.take(len(ids))
        self.ids = grown(self.ids, self.slots.end)
        self.last = grown(self.last, self.slots.end)
        self.ids[slots] = ids
        self.last[slots] = clock
        self._count += len(ids)
        if self.capacity and self._count > self.capacity:
            raise AssertionError(f"fixed id index over its capacity {self.capacity}")
        if self._crowded(len(ids)):
            self._resize()
        else:
            self._place(ids, slots)
        return slots

    def insert_at(self, ids: np.ndarray, slots: np.ndarray, end: int, free: np.ndarray,
                  last: np.ndarray) -> None:
        """Into an empty index: ``ids`` at the given ``slots`` (a checkpoint's layout),
        with the slot allocator at ``end`` and free list ``free``."""
        self.slots.end = end
        self.slots._free = free.astype(np.int64)
        self.ids = grown(self.ids, end)
        self.last = grown(self.last, end)
        self.ids[slots] = ids
        self.last[slots] = last
        self._count = len(ids)
        if self._crowded():
            self._resize()
        else:
            self._place(ids, slots)

    def _resize(self) -> None:
        """Rebuild the table from the live slots, at most a quarter full afterwards (a
        fixed index: cleaned in place)."""
        if self.capacity:
            self._clean_in_place()
            return
        buckets = len(self._table)
        while 4 * self._count > buckets:
            buckets *= 2
        live = np.flatnonzero(self.ids[:self.slots.end] >= 0)
        self._rebuild(buckets, live)

    def touch(self, slots: np.ndarray, clock: int) -> None:
        # max: in async mode a late request may carry an older clock.
        self.last[slots] = np.maximum(self.last[slots], clock)

    def remove(self, slots: np.ndarray) -> None:
        if len(slots) == 0:
            return
        _, bucket = self._lookup(self.ids[slots], buckets=True)
        self._table.reshape(-1)[2 * bucket] = _GONE
        self._count -= len(slots)
        self.ids[slots] = -1
        self.slots.give(slots)
        if self._crowded():  # too many removed buckets: clean them up
            self._resize()

    def live(self) -> np.ndarray:
        """Occupied slots, in increasing id order."""
        slots = np.flatnonzero(self.ids[:self.slots.end] >= 0)
        return slots[np.argsort(self.ids[slots], kind="stable")]

    def expired(self, clock: int, evict_after: int, max_rows: int) -> np.ndarray:
        """Slots untouched for ``evict_after`` clocks, then the least recently
        touched beyond ``max_rows`` (ties: smaller id first, so it is deterministic)."""
        slots = np.flatnonzero(self.ids[:self.slots.end] >= 0)
        old = np.zeros(len(slots), dtype=bool)
        if evict_after > 0:
            old = clock - self.last[slots] >= evict_after
        if max_rows > 0 and len(slots) - old.sum() > max_rows:
            kept = slots[~old]
            order = np.lexsort((self.ids[kept], self.last[kept]))
            return np.concatenate([slots[old], kept[order[:len(kept) - max_rows]]])
        return slots[old]
