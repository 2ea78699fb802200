"""The job's collective rendezvous store, kept by the coordinator.

``torch.distributed`` needs a key-value store to rendezvous: each rank of a
Gloo (or NCCL) group publishes its own address under a key, then waits for the
others' keys. torch's stock answer is a ``TCPStore`` that one worker hosts,
listening on all interfaces and serving anyone who connects. Tessera keeps the
store here instead: workers reach it as :class:`~tessera.transport.wire.StoreOp`
requests over their authenticated connection to the coordinator (PLAIN or CURVE,
:mod:`tessera.transport.endpoint`), through the ``torch.distributed.Store``
subclass in :mod:`tessera.parallel.rendezvous`. So only processes that hold the
job's secret can publish or read a rank's address, and no worker listens for it.

Semantics follow torch's ``HashStore``: ``add`` keeps a decimal count as the
value, ``compare_set`` with an empty expected value sets a missing key.
``get`` and ``wait`` on missing keys are *held* (like registrations) and answered
as soon as the keys are set, or with ``found=False`` after ``wait_s`` (capped at
:data:`MAX_WAIT_S`): every wait has an end on both sides.

Bounded: at most :data:`MAX_KEYS` keys, :data:`MAX_BYTES` of keys and values and
:data:`MAX_HELD` held requests; past that a request is refused with an
:class:`~tessera.transport.wire.Error` (a rendezvous of W ranks uses a few keys
of ~200 bytes per rank and group).

It imports no torch (the coordinator starts in a fraction of a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union

from tessera.transport import wire

MAX_KEYS = 1 << 16
MAX_BYTES = 16 << 20
MAX_HELD = 4096
MAX_WAIT_S = 3600.0

Reply = Union[wire.StoreReply, wire.Error]


@dataclass
class _Held:
    peer: bytes
    msg: wire.StoreOp
    deadline: float


class RendezvousStore:
    """Keys and values, and the get/wait requests held for keys not yet set."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.nbytes = 0
        self.held: list[_Held] = []
        #: Keys an exchange published: how many exchanges are still to read each.
        self.readers: dict[str, int] = {}

    def handle(self, peer: bytes, msg: wire.StoreOp, now: float) -> list[tuple[bytes, Reply]]:
        """Serve ``msg``; returns the replies to send now (none when it is held, and
        possibly replies to held requests that a set has made answerable)."""
        op, keys, req = msg.call, msg.keys, msg.req
        if op == "exchange":
            return self._exchange(peer, msg, now)
        takes = "no keys" if op == "num_keys" else "one or more keys" if op in (
            "wait", "check") else "one key"
        if len(keys) != {"no keys": 0, "one key": 1}.get(takes, max(len(keys), 1)):
            return [(peer, wire.Error(req=req, message=(
                f"coordinator: store {op} takes {takes}, got {len(keys)}")))]
        key = keys[0] if keys else ""
        if op in ("get", "wait"):
            if all(k in self.data for k in keys):
                return [(peer, self._answer(msg))]
            if len(self.held) >= MAX_HELD:
                return [(peer, wire.Error(req=req, message=(
                    f"coordinator: the rendezvous store holds {MAX_HELD} waiting requests "
                    f"already")))]
            self.held.append(_Held(peer, msg, now + min(max(msg.wait_s, 0.0), MAX_WAIT_S)))
            return []
        if op == "check":
            return [(peer, wire.StoreReply(req=req, number=int(all(k in self.data for k in keys))))]
        if op == "num_keys":
            return [(peer, wire.StoreReply(req=req, number=len(self.data)))]
        if op == "delete_key":
            self.readers.pop(key, None)
            old = self.data.pop(key, None)
            if old is not None:
                self.nbytes -= len(key) + len(old)
            return [(peer, wire.StoreReply(req=req, number=int(old is not None)))]
        if op == "add":
            try:
                count = int(self.data.get(key, b"0")) + msg.amount
            except ValueError:
                return [(peer, wire.Error(req=req, message=(
                    f"coordinator: store add on key {key!r}, whose value is not a number")))]
            refused = self._put(req, key, str(count).encode())
            return [(peer, refused or wire.StoreReply(req=req, number=count)), *self._release()]
        if op == "compare_set":
            current = self.data.get(key)
            if (current is None and not msg.expected) or (current is not None
                                                          and current == msg.expected):
                refused = self._put(req, key, msg.value)
                return [(peer, refused or wire.StoreReply(req=req, value=msg.value)),
                        *self._release()]
            return [(peer, wire.StoreReply(req=req, value=msg.expected if current is None
                                           else current))]
        # set
        refused = self._put(req, key, msg.value)
        return [(peer, refused or wire.StoreReply(req=req)), *self._release()]

    def expire(self, now: float) -> list[tuple[bytes, Reply]]:
        """Answer held requests whose wait is over: ``found=False``."""
        late = [h for h in self.held if h.deadline <= now]
        if not late:
            return []
        self.held = [h for h in self.held if h.deadline > now]
        return [(h.peer, wire.StoreReply(req=h.msg.req, found=False)) for h in late]

    def fail(self, reason: str) -> list[tuple[bytes, Reply]]:
        """The job failed: every held request gets the reason, at once."""
        held, self.held = self.held, []
        return [(h.peer, wire.Error(req=h.msg.req, message=f"coordinator: job failed: {reason}"))
                for h in held]

    # ---------------------------------------------------------------- helpers

    def _put(self, req: int, key: str, value: bytes) -> Union[wire.Error, None]:
        old = self.data.get(key)
        grow = len(value) - (len(old) if old is not None else -len(key))
        if old is None and len(self.data) >= MAX_KEYS or self.nbytes + grow > MAX_BYTES:
            return wire.Error(req=req, message=(
                f"coordinator: the rendezvous store is full ({len(self.data)} keys, "
                f"{self.nbytes} bytes; limits {MAX_KEYS} keys, {MAX_BYTES} bytes)"))
        self.data[key] = value
        self.nbytes += grow
        return None

    def _exchange(self, peer: bytes, msg: wire.StoreOp, now: float) -> list[tuple[bytes, Reply]]:
        """Publish ``msg.publish`` (read by ``msg.amount`` exchanges, then deleted), then
        answer with the values of ``msg.keys`` once all are set: one collective of the
        server modes' group in one round trip (tessera.parallel.collectives)."""
        req = msg.req
        if msg.publish:
            if msg.amount < 1:
                return [(peer, wire.Error(req=req, message=(
                    "coordinator: store exchange publishes a key for at least one reader")))]
            refused = self._put(req, msg.publish, msg.value)
            if refused is not None:
                return [(peer, refused)]
            self.readers[msg.publish] = msg.amount
        replies: list[tuple[bytes, Reply]] = []
        if all(k in self.data for k in msg.keys):
            replies.append((peer, self._answer(msg)))
        elif len(self.held) >= MAX_HELD:
            replies.append((peer, wire.Error(req=req, message=(
                f"coordinator: the rendezvous store holds {MAX_HELD} waiting requests already"))))
        else:
            self.held.append(_Held(peer, msg, now + min(max(msg.wait_s, 0.0), MAX_WAIT_S)))
        return replies + (self._release() if msg.publish else [])

    def _answer(self, msg: wire.StoreOp) -> wire.StoreReply:
        if msg.call == "get":
            return wire.StoreReply(req=msg.req, value=self.data[msg.keys[0]])
        if msg.call == "exchange":
            values = [self.data[k] for k in msg.keys]
            for k in msg.keys:  # read once more: the last reader deletes it
                left = self.readers.get(k)
                if left is not None:
                    if left > 1:
                        self.readers[k] = left - 1
                    else:
                        del self.readers[k]
                        self.nbytes -= len(k) + len(self.data.pop(k))
            return wire.StoreReply(req=msg.req, values=values)
        return wire.StoreReply(req=msg.req)

    def _release(self) -> list[tuple[bytes, Reply]]:
        """Answer the held requests whose keys are all set now, in arrival order (an
        exchange answered may delete keys a later one waits for: that one stays held)."""
        replies, waiting = [], []
        for h in self.held:
            if all(k in self.data for k in h.msg.keys):
                replies.append((h.peer, self._answer(h.msg)))
            else:
                waiting.append(h)
        self.held = waiting
        return replies
