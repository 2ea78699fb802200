"""Shared memory between a worker and a parameter server on one host.

When a client and a server share a host, the payload frames of their messages (the
gradients pushed, the values answered) travel through one shared-memory segment per
connection, and ZeroMQ carries only the headers and a small *prefix frame* that says
where in the segment each payload lies. The endpoints do it
(:mod:`tessera.transport.endpoint`); the server and client logic above them see the
same frames as before.

The segment: ``memfd_create`` (never a name in ``/dev/shm``), sealed against
shrinking and growing (a peer cannot make our mapping fault), laid out as::

    [header page: magic, nonce, sizes][status up][status down][data up][data down]

*Up* is what the client writes (requests), *down* what the server writes
(replies). Each direction has one producer and one consumer. The producer copies a
frame into its data region at the lowest gap that fits (so a job touches only the
pages its frames in flight need), marks the frame's status entry 1 and sends the
prefix. The consumer hands the frame up as a NumPy array over the segment
(:class:`ShmFrame`, no copy); when the last view of it is gone (every tensor made
from it was dropped), a finalizer writes the entry's status back to 0, and the
producer may reuse the bytes. A region that is full, or a frame under
:data:`MIN_BYTES`, goes inline as an ordinary ZeroMQ frame: nothing ever waits for
room.

Setting a segment up (all control rides in prefix frames of ordinary messages, so a
server needs no new request type):

1. The client's first message with a payload of at least :data:`MIN_BYTES` asks
   (``open``). A server endpoint that offers shared memory creates a segment,
   writes a random nonce into it, and answers (on its next message to that peer)
   with an ``offer``: the name of an abstract unix socket and a one-time offer id.
2. The client connects to that socket (abstract unix names are per network
   namespace: a client on another host, or another network namespace, gets
   ``ECONNREFUSED`` at once, says so with its next message (``refused``: the server
   drops the segment) and stays on TCP), presents the offer id, and gets
   the segment's fd (``SCM_RIGHTS``). The server hands it only to a process of its
   own uid (``SO_PEERCRED``) that presents a live offer id, once.
3. The client checks the seals and sizes, maps it, reads the nonce, and sends it
   back over the authenticated channel (``prove``). The server activates the
   segment for that connection only if the nonce matches (``accepted``): the
   client proved that it mapped *this* segment, and it learned where to fetch it
   only over the authenticated channel. A process squatting the socket name hands
   out another segment, whose nonce the server refuses: the client stays on TCP.

Replies that are a sync server's master itself (``Shared`` frames): a server endpoint
that offers shared memory also keeps an *arena*, one more memfd that holds its dense
partitions' fp32 masters (:meth:`Arena.empty`), handed to each client with its segment
and mapped there read-only (the arena is sealed against new writable mappings where
the kernel can, ``F_SEAL_FUTURE_WRITE``). A sync reply of fp32 values names the master's
place in the arena (entry :data:`ARENA`) instead of copying it into the segment: the
client copies the values out of the server's master, one pass over them in all where
there were two. That is safe only where the master cannot change until the client has
read it: in sync mode it changes once every live worker pushed the next clock, and a
worker pushes it only after it has read this reply (the condition that already lets
such a reply go over TCP without a copy; ``ParameterServer._frame``). Only the server
marks a frame ``Shared``, and only then; any other frame over the arena is copied.

Gradients *lent* to the server (``LENT`` slots): a client may keep its gradient buffer in
an arena of its own (:class:`Arena` again; ``PSClient.shared_zeros``), whose fd it hands
the server with its offer id in step 2 (the server maps it read-only, checking the same
seals). A pushed frame whose bytes lie in that arena is not copied into the segment: its
slot names an up-direction status entry, marked 1 as for a copied frame, and the frame's
place in the client's arena. The server reads the gradient in place and releases the
entry when the last view of it is gone, as for any frame; until then the client must
not write those bytes (:meth:`Producer.outstanding`; ``PSClient.wait_lent``, which
``PSDataParallel.step`` calls before it zeroes the gradients). The client already waits
for the push's reply before its next backward, and the server drops its views of a push
before or just after answering it (a replicated one once it was forwarded), so that wait
is normally over at once.

Crashes leak nothing: a memfd segment disappears with its last fd and mapping, so
``kill -9`` of either side frees it with that process. The unix connection of
step 2 stays open as a liveness line: when the client process ends, the server sees
EOF and drops the segment at once (a restarted worker gets a new one); when the
server ends, the client stops writing into the segment and sends inline.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import select
import socket
import struct
import threading
import time
import weakref
from typing import Optional

import msgspec
import numpy as np

from tessera.transport.frames import raw

#: First byte of a prefix frame. msgpack never uses 0xc1, so a Tessera header (a
#: msgpack map) never starts with it: a message with a prefix is told apart at once.
PREFIX = 0xC1
#: Frames smaller than this go inline: a copy into the segment saves nothing on them.
MIN_BYTES = 64 << 10
#: Status entries per direction: frames that may be in flight (and held) at once.
ENTRIES = 1 << 16
#: Data region per direction (virtual: pages are allocated only when written).
REGION_BYTES = 512 << 20
#: A server's arena of masters (virtual, as above); past it, masters are ordinary memory.
ARENA_BYTES = 16 << 30
#: A freed arena block is reused (and, where the write seal allows it, its pages given
#: back) only after this many seconds: a client may still be reading the last values it
#: was answered with.
ARENA_GRACE_S = 10.0
#: A slot's entry that names the server's arena (a ``Shared`` reply), not the segment.
ARENA = -2
#: A slot's entry at or below this names a frame *lent* from the client's arena: entry
#: ``LENT - e`` is up-direction status entry ``e``, released as for a copied frame.
LENT = -3
#: A pending offer not proved within this many seconds is dropped.
OFFER_TTL_S = 30.0
#: How long a client waits for the segment's fd on the unix socket.
ATTACH_TIMEOUT_S = 5.0
#: Marker in the ``Error`` a server answers to a message naming a segment it does
#: not hold for that connection (it restarted, or dropped it): the client endpoint
#: sends that request again inline.
SHM_LOST = "shared-memory segment unknown to this server"
#: A server's answer to a proof for an offer it no longer holds (it expired after
#: :data:`OFFER_TTL_S`, or a newer one replaced it): the client may ask again.
OFFER_GONE = "no segment is offered to this connection"

_MAGIC = b"TESSERA-SHM-v1\0\0"
_HEADER = 4096
_ALIGN = 64
_SEALS_NEEDED = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10)  # Linux 5.1; not in fcntl
_ARENA_ALIGN = 4096
#: What a client sends on the unix socket: its offer id and the size of the arena it
#: lends gradients from (0: none; the fd rides along otherwise).
_HELLO = 16 + 8
UP, DOWN = 0, 1


class ShmError(Exception):
    """A segment that cannot be set up or used as it says (the caller falls back to TCP).
    ``transient``: the reason may pass (a timeout under load, an offer that expired), so
    asking again later may succeed; not so when the server's socket cannot be reached
    at all (it is on another host, or in another network namespace)."""

    def __init__(self, message: str = "", transient: bool = False):
        super().__init__(message)
        self.transient = transient


# ------------------------------------------------------------------- prefix


class Offer(msgspec.Struct, forbid_unknown_fields=True):
    socket: str  # abstract unix socket name (without the leading NUL)
    offer: str  # one-time offer id, hex
    session: int
    size: int  # the segment's size in bytes
    arena: int = 0  # the arena's size in bytes, handed out with the segment (0: none)


class Prefix(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """What a prefix frame says. ``slots``: one ``(entry, offset, nbytes)`` per payload
    frame of the message, in order; entry -1: the next inline ZeroMQ frame; entry
    :data:`ARENA` (replies only): at ``offset`` in the server's arena; entry ``LENT - e``
    (requests only): at ``offset`` in the client's arena, status entry ``e``."""

    session: int = 0
    slots: list[tuple[int, int, int]] = []
    open: bool = False
    offer: Optional[Offer] = None
    prove: str = ""
    accepted: int = 0
    refused: str = ""


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Prefix)


def encode_prefix(prefix: Prefix) -> bytes:
    return bytes([PREFIX]) + _encoder.encode(prefix)


def is_prefix(frame) -> bool:
    buf = raw(frame)
    return len(buf) > 0 and buf[0] == PREFIX


def decode_prefix(frame, max_bytes: int) -> Prefix:
    buf = memoryview(raw(frame))
    if len(buf) > max_bytes:
        raise ShmError(f"prefix frame of {len(buf)} bytes exceeds the {max_bytes}-byte limit")
    try:
        return _decoder.decode(buf[1:])
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ShmError(f"malformed prefix frame: {exc}") from None


# ------------------------------------------------------------------ segment


def _layout(region: int) -> tuple[int, list[int], list[int]]:
    """(size, [status offset per direction], [data offset per direction])."""
    status = [_HEADER, _HEADER + ENTRIES]
    data0 = -(-(_HEADER + 2 * ENTRIES) // mmap.PAGESIZE) * mmap.PAGESIZE
    data = [data0, data0 + region]
    return data0 + 2 * region, status, data


class Segment:
    """One connection's segment, mapped in this process."""

    def __init__(self, fd: int, nonce: bytes, region: int):
        self.size, status_at, data_at = _layout(region)
        self.region = region
        self.nonce = nonce
        self.fd = fd  # kept until handed to the peer (server) or closed at once (client)
        self.mm = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.status = [np.frombuffer(self.mm, np.uint8, ENTRIES, at) for at in status_at]
        self.data_at = data_at

    @classmethod
    def create(cls, region: int = REGION_BYTES) -> "Segment":
        size = _layout(region)[0]
        fd = os.memfd_create("tessera-shm", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS_NEEDED)
            nonce = secrets.token_bytes(32)
            seg = cls(fd, nonce, region)
        except BaseException:
            os.close(fd)
            raise
        seg.mm[:_HEADER] = (_MAGIC + nonce + struct.pack("<QQ", region, ENTRIES)).ljust(
            _HEADER, b"\0")
        return seg

    @classmethod
    def attach(cls, fd: int, size: int) -> "Segment":
        """Map a segment received from a peer; the fd is closed (the mapping stays)."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & _SEALS_NEEDED != _SEALS_NEEDED:
                raise ShmError("the segment is not sealed against resizing")
            if os.fstat(fd).st_size != size:
                raise ShmError(f"the segment has {os.fstat(fd).st_size} bytes, "
                               f"the offer said {size}")
            with mmap.mmap(fd, _HEADER, mmap.MAP_SHARED, mmap.PROT_READ) as head:
                header = head[:len(_MAGIC) + 48]
            if header[:len(_MAGIC)] != _MAGIC:
                raise ShmError("not a Tessera segment")
            nonce = header[len(_MAGIC):len(_MAGIC) + 32]
            region, entries = struct.unpack("<QQ", header[len(_MAGIC) + 32:])
            if entries != ENTRIES or _layout(region)[0] != size:
                raise ShmError("the segment's layout does not match its size")
            seg = cls(fd, nonce, region)
            seg.fd = -1  # closed below: the mapping is what stays
            return seg
        except OSError as exc:
            raise ShmError(f"cannot map the segment: {exc}") from None
        finally:
            os.close(fd)

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Drop this process's hold (the mapping goes once no frame over it is alive)."""
        self.close_fd()
        self.status = []
        try:
            self.mm.close()
        except BufferError:  # frames over it still alive: unmapped when they are gone
            pass


class ShmFrame(np.ndarray):
    """A received payload in the segment: a uint8 NumPy array (buffer protocol,
    ``len``), with ``.buffer`` and ``.bytes`` as a ``zmq.Frame`` has."""

    @property
    def buffer(self) -> np.ndarray:
        return self.base if self.base is not None else self

    @property
    def bytes(self) -> bytes:
        return self.tobytes()


def _release(status: np.ndarray, entry: int) -> None:
    status[entry] = 0


def receive(seg: Segment, direction: int, slot: tuple[int, int, int]) -> ShmFrame:
    """The frame a peer wrote at ``slot`` of ``direction``, as a view (no copy).
    Its status entry is released when the last view over it is gone."""
    entry, off, n = slot
    if not (0 <= entry < ENTRIES and 0 <= off and 0 <= n and off + n <= seg.region):
        raise ShmError(f"slot {slot} lies outside the segment")
    return _held(seg.mm, seg.data_at[direction] + off, n, seg.status[direction], entry)


def _held(mapping, at: int, n: int, status: np.ndarray, entry: int) -> ShmFrame:
    """``n`` bytes at ``at`` of ``mapping`` as a view whose status ``entry`` is released
    when the last view over it is gone."""
    # Made straight from the mmap: its base is no ndarray, so every NumPy view of it
    # (and every tensor over it) keeps *this* array alive, and the finalizer waits.
    arr = np.frombuffer(mapping, np.uint8, n, at)
    weakref.finalize(arr, _release, status, entry)
    return arr.view(ShmFrame)


class Shared(np.ndarray):
    """A reply frame that is the server's master itself, marked by the server where the
    master cannot change before the client has read it (module docstring): through
    shared memory it goes as its place in the arena, over TCP as the bytes."""


class Arena:
    """A server's masters in one memfd that its same-host clients map read-only (or a
    client's gradients, ``name`` ``tessera-lend``, that its servers map read-only)."""

    def __init__(self, size: Optional[int] = None, name: str = "tessera-arena"):
        self.size = size = ARENA_BYTES if size is None else size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, size)
            self.mm = mmap.mmap(self.fd, size, mmap.MAP_SHARED,
                                mmap.PROT_READ | mmap.PROT_WRITE)
            try:  # no process may map it writable any more; ours stays so
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS_NEEDED | _SEAL_FUTURE_WRITE)
            except OSError:  # an older kernel: sealed against resizing only
                fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, _SEALS_NEEDED)
        except BaseException:
            os.close(self.fd)
            raise
        self.base = np.frombuffer(self.mm, np.uint8, 1).ctypes.data
        self._top = 0
        self._free: dict[int, list[int]] = {}  # size -> offsets past their grace
        #: (when, offset, size) in grace: appended by finalizers (any thread, maybe
        #: inside :meth:`empty`: no lock there), taken under the lock.
        self._freed: list[tuple[float, int, int]] = []
        self.lock = threading.Lock()

    def empty(self, count: int) -> Optional[np.ndarray]:
        """``count`` fp32 values in the arena (contents undefined), or None when it is
        full. The block returns to the arena when the array's last view is gone."""
        size = -(-count * 4 // _ARENA_ALIGN) * _ARENA_ALIGN
        with self.lock:
            self._reap_locked()
            reused = self._free.get(size)
            if reused:
                off = reused.pop()
            elif self._top + size <= self.size:
                off, self._top = self._top, self._top + size
            else:
                return None
        arr = np.frombuffer(self.mm, np.float32, count, off)
        weakref.finalize(arr, self._release, off, size)
        return arr

    def _release(self, off: int, size: int) -> None:
        self._freed.append((time.monotonic(), off, size))

    def reap(self) -> None:
        """Make the blocks freed more than :data:`ARENA_GRACE_S` ago reusable (and give
        their pages back where the kernel allows it: not under ``F_SEAL_FUTURE_WRITE``,
        where a block of the same size takes them over)."""
        if self._freed:
            with self.lock:
                self._reap_locked()

    def _reap_locked(self) -> None:
        now = time.monotonic()
        while self._freed and now - self._freed[0][0] > ARENA_GRACE_S:
            _, off, size = self._freed.pop(0)
            try:
                self.mm.madvise(mmap.MADV_REMOVE, off, size)
            except (OSError, ValueError):
                pass
            self._free.setdefault(size, []).append(off)

    def offset_of(self, arr: np.ndarray) -> int:
        """Where ``arr``'s bytes lie in the arena, or -1 when they do not."""
        off = arr.ctypes.data - self.base
        return off if 0 <= off and off + arr.nbytes <= self.size else -1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        try:
            self.mm.close()
        except BufferError:  # masters over it still alive: unmapped when they are gone
            pass


def attach_arena(fd: int, size: int) -> mmap.mmap:
    """Map a peer's arena read-only (the fd is closed; the mapping stays): sealed against
    resizing, so reading it can never fault."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
        if seals & _SEALS_NEEDED != _SEALS_NEEDED:
            raise ShmError("the arena is not sealed against resizing")
        if os.fstat(fd).st_size != size:
            raise ShmError(f"the arena has {os.fstat(fd).st_size} bytes, the offer said {size}")
        return mmap.mmap(fd, size, access=mmap.ACCESS_READ)  # read-only buffers, too
    except OSError as exc:
        raise ShmError(f"cannot map the arena: {exc}") from None
    finally:
        os.close(fd)


def receive_lent(seg: Segment, lent: Optional[mmap.mmap], slot: tuple[int, int, int]
                 ) -> ShmFrame:
    """A frame lent from the client's arena (``lent``, mapped read-only), as a view: its
    up-direction status entry is released when the last view over it is gone."""
    entry, off, n = LENT - slot[0], slot[1], slot[2]
    if lent is None or not (0 <= entry < ENTRIES and 0 <= off and 0 <= n
                            and off + n <= len(lent)):
        raise ShmError(f"slot {slot} lies outside the client's arena")
    return _held(lent, off, n, seg.status[UP], entry)


def receive_arena(arena: Optional[mmap.mmap], slot: tuple[int, int, int]) -> ShmFrame:
    """A ``Shared`` reply's bytes in the server's arena, as a view (nothing to release)."""
    _, off, n = slot
    if arena is None or not (0 <= off and 0 <= n and off + n <= len(arena)):
        raise ShmError(f"slot {slot} lies outside the server's arena")
    return np.frombuffer(arena, np.uint8, n, off).view(ShmFrame)


class Producer:
    """This side's writer into one direction of a segment: first-fit allocation of
    frames, reclaimed once the consumer released them. ``arena``: the server's, whose
    ``Shared`` frames go as their place there; ``lend``: the client's, whose frames go as
    their place there, lent until the server releases them."""

    def __init__(self, seg: Segment, direction: int, arena: Optional[Arena] = None,
                 lend: Optional[Arena] = None):
        self.seg, self.direction, self.arena, self.lend = seg, direction, arena, lend
        self.status = seg.status[direction]
        self.data = np.frombuffer(seg.mm, np.uint8, seg.region, seg.data_at[direction])
        self.live: list[tuple[int, int, int]] = []  # (offset, size, entry), by offset
        self.lent: list[int] = []  # entries of lent frames (no bytes in the segment)
        self.free = list(range(ENTRIES - 1, -1, -1))
        #: Places handed out by :meth:`reserve` and not sent yet: offset -> (bytes, entry).
        self.reserved: dict[int, tuple[int, int]] = {}
        self._base = self.data.ctypes.data

    def _reclaim(self) -> None:
        # Each entry's status is read once: the consumer releases entries concurrently
        # (another process), and an entry read as live, then as released, used to land
        # both in ``live`` and in ``free``; freed twice later, two frames then shared an
        # entry, and the release of one handed the other's bytes to the next frame while
        # the consumer still read them (a push applied with another partition's
        # gradient, under load: shm_roundtrip's "same values: no").
        status = self.status
        kept, freed = [], []
        for x in self.live:
            (kept if status[x[2]] else freed).append(x)
        if freed:
            self.free.extend(x[2] for x in freed)
            self.live = kept
        if self.lent:
            lent, free = [], self.free
            for e in self.lent:
                (lent if status[e] else free).append(e)
            self.lent = lent

    def outstanding(self) -> int:
        """Frames lent from the client's arena that the consumer has not released yet."""
        self._reclaim()
        return len(self.lent)

    def reserve(self, n: int) -> Optional[np.ndarray]:
        """``n`` writable bytes (uint8) in this direction's data region, for a frame to be
        written in place and then sent (:meth:`put` sends it as its place there, without
        a copy); None where ``n`` is under :data:`MIN_BYTES` or there is no room (the
        caller allocates as usual). Dropped unsent, the place is freed again."""
        if n < MIN_BYTES:
            return None
        self._reclaim()  # (as put does: entries the consumer released are free again)
        at = self._place(n) if self.free else -1
        if at < 0:
            return None
        entry = self.free.pop()
        self.status[entry] = 1  # held from now on: no other frame is placed here
        self._insert((at, -(-n // _ALIGN) * _ALIGN, entry))
        self.reserved[at] = (n, entry)
        view = self.data[at:at + n]
        # (every array or tensor made from ``view`` keeps it alive: the place is freed
        # when the last of them is gone, unless it was sent)
        weakref.finalize(view, self._unsent, self.reserved, self.status, at, entry)
        return view

    @staticmethod
    def _unsent(reserved: dict, status: np.ndarray, at: int, entry: int) -> None:
        if reserved.get(at, (0, -1))[1] == entry:
            del reserved[at]
            status[entry] = 0  # reclaimed at the next put, as a released frame

    def _reserved_slot(self, src: np.ndarray) -> Optional[tuple[int, int, int]]:
        """The slot of ``src`` when it is a place :meth:`reserve` handed out (all of
        it or its first bytes), taken off the reserved places; else None."""
        at = src.ctypes.data - self._base
        got = self.reserved.get(at)
        if got is None or src.nbytes > got[0] or not src.flags.c_contiguous:
            return None
        del self.reserved[at]
        return got[1], at, src.nbytes

    def put(self, frames) -> tuple[list, list]:
        """(slots, inline frames): each frame of at least :data:`MIN_BYTES` copied into
        the segment if there is room, the rest left to go inline. A ``Shared`` frame in
        the arena goes as its place there, and a frame written where :meth:`reserve`
        said as that place, both without a copy."""
        self._reclaim()
        slots, inline = [], []
        for frame in frames:
            try:
                src = frame if isinstance(frame, np.ndarray) else np.frombuffer(frame, np.uint8)
            except (TypeError, ValueError):  # not a buffer: inline, where ZeroMQ refuses it
                src = np.empty(0, np.uint8)
            n = src.nbytes
            if self.reserved and n >= MIN_BYTES:
                slot = self._reserved_slot(src)
                if slot is not None:
                    slots.append(slot)
                    continue
            if self.lend is not None and n >= MIN_BYTES and self.free:
                off = self.lend.offset_of(src)
                if off >= 0:  # the client's own buffer: lent, not copied
                    entry = self.free.pop()
                    self.status[entry] = 1
                    self.lent.append(entry)
                    slots.append((LENT - entry, off, n))
                    continue
            if type(src) is Shared and self.arena is not None and n >= MIN_BYTES:
                off = self.arena.offset_of(src)
                if off >= 0:
                    slots.append((ARENA, off, n))
                    continue
            at = self._place(n) if n >= MIN_BYTES and self.free else -1
            if at < 0:
                slots.append((-1, 0, 0))
                inline.append(frame)
                continue
            self.data[at:at + n] = src.reshape(-1).view(np.uint8)
            entry = self.free.pop()
            self.status[entry] = 1
            self._insert((at, -(-n // _ALIGN) * _ALIGN, entry))
            slots.append((entry, at, n))
        return slots, inline

    def _place(self, n: int) -> int:
        size = -(-n // _ALIGN) * _ALIGN
        end = 0
        for off, used, _ in self.live:
            if off - end >= size:
                return end
            end = off + used
        return end if self.seg.region - end >= size else -1

    def _insert(self, item: tuple[int, int, int]) -> None:
        live = self.live
        i = len(live)
        while i and live[i - 1][0] > item[0]:
            i -= 1
        live.insert(i, item)


# ------------------------------------------------------------- server side


class _Session:
    __slots__ = ("id", "peer", "seg", "offer", "conn", "created", "producer", "active",
                 "lent")

    def __init__(self, sid: int, peer: bytes, seg: Segment):
        self.id, self.peer, self.seg = sid, peer, seg
        #: The client's arena, mapped read-only, when it lends its gradients.
        self.lent: Optional[mmap.mmap] = None
        self.offer = secrets.token_bytes(16)
        self.conn: Optional[socket.socket] = None
        self.created = time.monotonic()
        self.producer: Optional[Producer] = None
        self.active = False


class Host:
    """A server endpoint's segments, one per connection that proved it shares this
    host, and the thread that hands out their fds and watches their clients live."""

    def __init__(self, region: int = REGION_BYTES, arena: Optional[Arena] = None):
        self.region = region
        self.arena = arena  # handed out with every segment, when there is one
        self.name = f"tessera-shm-{os.getpid()}-{secrets.token_hex(16)}"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self.listener.bind("\0" + self.name)
        self.listener.listen(64)
        self.lock = threading.Lock()
        self.by_offer: dict[bytes, _Session] = {}
        self.by_peer: dict[bytes, _Session] = {}  # the peer's newest session
        self.dead: list[_Session] = []  # clients gone (EOF): dropped by the serve thread
        self._next = 1
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="tessera-shm", daemon=True)
        self.thread.start()

    # serve thread ---------------------------------------------------------

    def open(self, peer: bytes) -> Offer:
        """A new segment for ``peer`` (replacing its earlier one) and its offer."""
        seg = Segment.create(self.region)
        with self.lock:
            sid, self._next = self._next, self._next + 1
            s = _Session(sid, peer, seg)
            old = self.by_peer.get(peer)
            self.by_peer[peer] = s
            self.by_offer[s.offer] = s
        if old is not None:
            self._drop(old)
        return Offer(socket=self.name, offer=s.offer.hex(), session=sid, size=seg.size,
                     arena=self.arena.size if self.arena is not None else 0)

    def prove(self, peer: bytes, nonce_hex: str) -> tuple[int, str]:
        """(session id, "") when ``peer`` read its segment's nonce, else (0, why)."""
        try:
            nonce = bytes.fromhex(nonce_hex)
        except ValueError:
            nonce = b""
        # Under the lock: the fd thread hands the fd out and records the connection in
        # one locked step, so a proof that follows the handout always sees it.
        with self.lock:
            s = self.by_peer.get(peer)
            if s is None or s.active:
                return 0, OFFER_GONE
            proved = s.conn is not None and secrets.compare_digest(nonce, s.seg.nonce)
            if proved:
                s.active = True
                s.producer = Producer(s.seg, DOWN, self.arena)
        if not proved:
            self._drop(s)
            return 0, "the nonce does not match the offered segment"
        return s.id, ""

    def decline(self, peer: bytes) -> None:
        """``peer`` could not map the segment offered (another host): drop it now."""
        s = self.by_peer.get(peer)
        if s is not None and not s.active:
            self._drop(s)

    def active(self, peer: bytes) -> Optional[_Session]:
        s = self.by_peer.get(peer)
        return s if s is not None and s.active else None

    def reap(self) -> None:
        """Drop the segments of clients that are gone, and offers never proved."""
        if self.dead:
            with self.lock:
                dead, self.dead = self.dead, []
            for s in dead:
                self._drop(s)
        if len(self.by_offer) > 0:
            now = time.monotonic()
            for s in [s for s in self.by_peer.values()
                      if not s.active and now - s.created > OFFER_TTL_S]:
                self._drop(s)

    def _drop(self, s: _Session) -> None:
        with self.lock:
            self.by_offer.pop(s.offer, None)
            if self.by_peer.get(s.peer) is s:
                del self.by_peer[s.peer]
            conn, s.conn = s.conn, None
        s.active = False
        s.producer = None
        if conn is not None:
            conn.close()
        s.seg.close()
        if s.lent is not None:
            try:
                s.lent.close()
            except BufferError:  # lent frames still read: unmapped when they are gone
                pass

    def close(self) -> None:
        self._stop = True
        self.thread.join(timeout=2.0)
        with self.lock:
            sessions = list(self.by_peer.values())
        for s in sessions:
            self._drop(s)
        self.listener.close()

    # fd thread ------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            with self.lock:
                watched = {s.conn: s for s in self.by_peer.values() if s.conn is not None}
            try:
                ready, _, _ = select.select([self.listener, *watched], [], [], 0.2)
            except (OSError, ValueError):  # a socket closed meanwhile: look again
                continue
            for sock in ready:
                if sock is self.listener:
                    self._hand_out()
                    continue
                try:  # EOF: the client is gone; any byte: it broke the protocol
                    sock.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK)
                    gone = True
                except BlockingIOError:
                    gone = False
                except OSError:
                    gone = True
                if gone:
                    with self.lock:
                        s = watched[sock]
                        if s.conn is sock and s not in self.dead:
                            self.dead.append(s)

    def _hand_out(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except OSError:
            return
        lent_fd = -1
        try:
            conn.settimeout(ATTACH_TIMEOUT_S)
            pid, uid, gid = struct.unpack("3i", conn.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            if uid != os.getuid():
                raise ShmError("another user")
            # The offer id, the size of the arena the client lends its gradients from
            # (0: none) and, with a size, that arena's fd.
            got, fds, _, _ = socket.recv_fds(conn, _HELLO, 1)
            lent_fd = fds[0] if fds else -1
            hello = got
            while got and len(hello) < _HELLO:
                got = conn.recv(_HELLO - len(hello))
                hello += got
            if len(hello) != _HELLO:
                raise ShmError("hung up")
            offer, (lent_size,) = hello[:16], struct.unpack("<Q", hello[16:])
            if bool(lent_size) != (lent_fd >= 0):
                raise ShmError("an arena's size without its fd, or an fd without a size")
            if lent_fd >= 0:
                lent_fd, fd = -1, lent_fd
                lent = attach_arena(fd, lent_size)  # (closes fd)
            else:
                lent = None
            with self.lock:
                s = self.by_offer.pop(offer, None)
                if s is None or s.conn is not None or s.seg.fd < 0:
                    raise ShmError("no such offer")
                fds = [s.seg.fd] + ([self.arena.fd] if self.arena is not None else [])
                socket.send_fds(conn, [b"ok"], fds)
                s.seg.close_fd()  # handed out once; the mapping stays
                conn.setblocking(False)
                s.conn, s.lent = conn, lent
        except (OSError, ShmError):
            conn.close()
            if lent_fd >= 0:
                os.close(lent_fd)


# ------------------------------------------------------------- client side


class Attached:
    """The client's side of a proved (or about to be proved) segment."""

    def __init__(self, offer: Offer, lend: Optional[Arena] = None):
        self.id = offer.session
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            self.conn.settimeout(ATTACH_TIMEOUT_S)
            self.conn.connect("\0" + offer.socket)
            hello = bytes.fromhex(offer.offer) + struct.pack("<Q", lend.size if lend else 0)
            if len(hello) != _HELLO:
                raise ShmError("a malformed offer id")
            if lend is not None:  # the server maps it read-only: lent frames are read there
                socket.send_fds(self.conn, [hello], [lend.fd])
            else:
                self.conn.sendall(hello)
            msg, fds, _, _ = socket.recv_fds(self.conn, 16, 2)
            if msg != b"ok" or len(fds) != 1 + bool(offer.arena):
                for fd in fds:
                    os.close(fd)
                raise ShmError("the server handed out no segment", transient=True)
            try:
                #: The server's arena, read-only: ``Shared`` replies are read from it.
                self.arena = attach_arena(fds[1], offer.arena) if offer.arena else None
            except ShmError:
                os.close(fds[0])
                raise
            self.seg = Segment.attach(fds[0], offer.size)
            self.conn.setblocking(False)
        except (OSError, ValueError) as exc:
            self.conn.close()
            unreachable = isinstance(exc, (ConnectionRefusedError, FileNotFoundError))
            raise ShmError(f"cannot fetch the segment: {exc}",
                           transient=not unreachable) from None
        except ShmError:
            self.conn.close()
            raise
        self.producer = Producer(self.seg, UP, lend=lend)
        self.active = False

    def server_alive(self) -> bool:
        """False once the server process is gone (its end of the unix socket closed)."""
        try:
            return self.conn.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) != b""
        except BlockingIOError:
            return True
        except OSError:
            return False

    def close(self) -> None:
        self.active = False
        self.producer = None
        self.conn.close()
        self.seg.close()
        if self.arena is not None:
            try:
                self.arena.close()
            except BufferError:  # replies over it still alive: unmapped when they are gone
                pass
