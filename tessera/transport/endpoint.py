"""Authenticated ZeroMQ endpoints: a ROUTER that serves, a DEALER that asks.

Authentication happens in ZeroMQ's own handshake (ZAP, RFC 27), so a peer
without the job's secret never gets a single message delivered, let alone
served. Two mechanisms, picked by the secret the launcher draws:

* **PLAIN** (a plain hex secret, the default): every server socket runs the
  PLAIN mechanism and a ZAP handler that accepts only the job's secret as the
  password. PLAIN sends the secret and all traffic in the clear: fine on
  loopback and private networks.
* **CURVE** (``tessera run --encrypt``: the secret is ``"curve:<64 hex>"``;
  CurveZMQ, RFC 26, ZeroMQ's CurveCP handshake over Curve25519): traffic is
  encrypted and authenticated per message and the secret itself never crosses
  the wire. Two long-term keypairs derive from the secret, so no key files are
  distributed: the *server* keypair (shared by every server socket of the job:
  coordinator and parameter servers) and the *client* keypair (shared by every
  client socket), each secret key being ``z85(sha256(tag + secret))``
  (tags ``tessera-server:`` and ``tessera-client:``), each public key
  ``zmq.curve_public`` of it. Clients know the server's public key; the ZAP
  handler accepts only the job's client public key. A client with another
  secret derives another server key, so the server cannot even open its first
  handshake message and hangs up.

Clients watch their socket's handshake events and fail at once, naming the
server, when it refuses them (:class:`AuthRefused`): a wrong PLAIN password, a
server that hangs up twice during a CURVE handshake, or a server that runs the
other mechanism (one side started with ``--encrypt``, the other not).

Size limits, against a peer that wants us to allocate without bound:

* ``max_frame_bytes`` sets ``ZMQ_MAXMSGSIZE`` on every socket (servers: the
  roles pass theirs; clients: :data:`CLIENT_MAX_FRAME_BYTES` unless told;
  -1: no limit). ZeroMQ checks every frame's length prefix *before* allocating
  it, so a peer that announces a larger frame is disconnected and the frame
  never reaches Python nor memory. The limit applies to each frame of a
  multipart message on the wire; under CURVE a frame on the wire carries 33
  bytes more than its payload (flags, nonce and MAC), so limits need a margin
  over the largest frame a job sends (the roles add 1 MiB).
* ``ZMQ_RCVHWM`` is :data:`RCV_HWM` on every socket: at most that many complete
  messages wait per connection; past it ZeroMQ stops reading that connection
  (TCP pushes back on the sender; nothing is dropped).
* A message may carry at most :data:`MAX_FRAMES` payload frames besides its
  header. Messages are taken frame by frame, so a longer one is refused (a
  server answers ``Error``; a client raises naming the server) without a
  Python object for each frame; the rest of it is read and dropped one frame
  at a time. Senders refuse to send one in one line.
* Headers are capped at :data:`tessera.transport.wire.MAX_HEADER_BYTES` when
  decoded, and receivers check every payload frame's length against their own
  shard map (:mod:`tessera.transport.frames`).

What these do not bound: ZeroMQ (libzmq 4.3) delivers a multipart message only
once its last frame has arrived, and has no limit on the number of frames in
one; until then the frames wait inside libzmq. A peer *that holds the job's
secret* can therefore make a process hold as many bytes as it sends in one
message it never finishes. Peers without the secret cannot: nothing they send
passes the handshake, and each handshake command is itself capped at the
socket's ``ZMQ_MAXMSGSIZE``.

Errors are never swallowed: a server that cannot encode or send a reply answers
``Error`` where it still can and logs one line on stderr where it cannot (the
peer is gone); a client raises :class:`TransportError` naming the server when
it cannot send, when a reply is malformed, when the server answers ``Error``
with ``req`` 0 (it could not read one of our messages), and when the server
dropped and re-took our connection while a request was unanswered (a frame over
its limit, or a restart), instead of waiting out its timeout.

Transports: the address a server binds to, ``tcp://`` between processes or
``inproc://`` between threads of one process, is chosen in one place,
:mod:`tessera.transport.address`, from the host the server is given; the code
here is the same for both. On inproc, ZeroMQ runs no handshake: no mechanism, no
ZAP, no frame limit; that module's docstring says why that is the right trust
boundary (the peers are this process).

Shared memory (:mod:`tessera.transport.shm`): a server endpoint made with ``shm=True``
offers each client a segment; a client on the same host maps it, and from then on
payload frames of at least :data:`tessera.transport.shm.MIN_BYTES` travel through it.
Such a message starts with a *prefix frame* (first byte 0xc1, which no msgpack header
starts with) naming the session and, per payload frame, its slot in the segment or
"inline"; the frames handed up are views over the segment (``.buffer``, ``len``, as a
``zmq.Frame``). Set-up rides in prefix frames of ordinary messages too, so the roles
above see nothing of it. A server asked about a segment it does not hold (it was
restarted) answers ``Error`` with :data:`tessera.transport.shm.SHM_LOST`, and the
client sends that request again inline, transparently.

Every wait takes a timeout; a :class:`PeerTimeout` names the peer and the request.
"""

from __future__ import annotations

import functools
import hashlib
import sys
import threading
import time
from typing import Callable, Optional, Sequence

import numpy as np
import zmq
import zmq.auth.thread
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from tessera.errors import TesseraError
from tessera.transport import address as addresses
from tessera.transport import shm
from tessera.transport.wire import MAX_HEADER_BYTES, Error, Message, WireError, decode, encode

_USER = "tessera"
#: A job secret with this prefix asks for CURVE encryption (set by the launcher).
CURVE_PREFIX = "curve:"
#: libzmq retries a refused connection every 100 ms; two CURVE hang-ups in a row
#: (not one, which a server restarting mid-handshake could also cause) mean the
#: server cannot open our handshake: it holds another secret.
_CURVE_HANGUPS = 2
#: Times a client asks a server again for shared memory after a set-up that failed
#: for a reason that may pass (pauses of 2, 4, 8 s); then it stays on TCP.
_SHM_TRIES = 3

#: Payload frames one message may carry besides its header. An honest message
#: carries one frame per partition it names (a pull's reply: every partition one
#: server holds), so this admits 64 Ki partitions on one server: a 256 GiB share
#: of a model at the default 4 MiB partitions.
MAX_FRAMES = 1 << 16
#: ``ZMQ_RCVHWM`` of every socket: complete messages queued per connection before
#: ZeroMQ stops reading from it (the sender is pushed back by TCP; nothing is lost).
RCV_HWM = 256
#: ``ZMQ_MAXMSGSIZE`` of client sockets unless told otherwise: the servers' own limit
#: (a partition, at most 256 MiB by ``ps.partition_mb``, plus 1 MiB) plus room for
#: CURVE's 33 bytes a frame. Row replies share it: a reply with a larger frame (a
#: table export of a shard over 257 MiB) ends that connection, and the client says so
#: in one line naming the server.
CLIENT_MAX_FRAME_BYTES = (257 << 20) + 4096
#: After our connection was dropped and re-made while a request was unanswered,
#: how long its reply may still come (it may have waited in our queue) before the
#: request counts as lost.
_LOST_GRACE_S = 2.0
#: A server logs at most one line per this many seconds about replies it could
#: not deliver (a peer that hangs up on purpose must not flood its log).
_LOG_EVERY_S = 5.0
#: ``ZMQ_EVENTS`` and its bits as plain ints: ``sock.get(_EVENTS) & _POLLIN`` costs about a
#: microsecond, where ``getsockopt`` (an enum), ``get(zmq.EVENTS)`` (the option an enum:
#: 0.6 µs more), ``& zmq.POLLIN`` (Flag arithmetic) or ``sock.poll(0)`` (a new Poller) cost
#: more, on every request sent and reply taken.
_POLLIN, _POLLOUT = int(zmq.POLLIN), int(zmq.POLLOUT)
_EVENTS = int(zmq.EVENTS)
_SNDMORE = int(zmq.SNDMORE)
#: The C-level ``send`` under pyzmq's Python ``Socket``: :func:`send_parts` calls it once a
#: frame, where ``Socket.send_multipart`` adds a Python call, a type check and an enum
#: ``|`` per frame (~6 µs a small reply; benchmarks/HISTORY.md, "Server under load").
_SEND = zmq.backend.Socket.send
#: Below this many bytes pyzmq copies a frame anyway (``copy=False`` or not).
_COPY_BELOW = zmq.COPY_THRESHOLD


def send_parts(sock: zmq.Socket, head: Sequence[bytes], frames: Sequence = ()) -> None:
    """``sock.send_multipart([*head, *frames], copy=False)``, at less Python cost per
    frame. ``head``: the leading parts this module builds itself (a routing id, a shm
    prefix, a header), small ``bytes``, copied into ZeroMQ's messages without a look.
    ``frames``: the payload, whatever the caller gave; frames under
    ``zmq.COPY_THRESHOLD`` bytes are copied as they are sent (as pyzmq does), larger ones
    and ``zmq.Frame`` objects go without a copy. Every frame is checked to be a buffer
    before any part is sent (a TypeError then leaves nothing half sent, as
    ``send_multipart`` does)."""
    for part in frames:
        if not isinstance(part, (bytes, memoryview, zmq.Frame)):
            memoryview(part)  # raises TypeError: not a buffer
    if not frames:
        last = len(head) - 1
        for i, part in enumerate(head):
            _SEND(sock, part, 0 if i == last else _SNDMORE, copy=True)
        return
    for part in head:
        _SEND(sock, part, _SNDMORE, copy=True)
    last = len(frames) - 1
    for i, part in enumerate(frames):
        if isinstance(part, zmq.Frame):
            _SEND(sock, part, 0 if i == last else _SNDMORE, copy=False)
        else:
            small = _nbytes(part) < _COPY_BELOW
            _SEND(sock, part, 0 if i == last else _SNDMORE, copy=small)


class TransportError(TesseraError):
    """A peer failed us: it timed out, refused us, or answered nonsense."""


class PeerTimeout(TransportError):
    pass


class AuthRefused(TransportError):
    pass


class _Keys:
    """What a job secret means to ZeroMQ: the mechanism and, for CURVE, the keys."""

    __slots__ = ("curve", "domain", "server_public", "server_secret", "client_public",
                 "client_secret")

    def __init__(self, secret: str):
        self.curve = secret.startswith(CURVE_PREFIX)
        if not secret[len(CURVE_PREFIX) if self.curve else 0:]:
            # ZeroMQ refuses an empty PLAIN password with a bare EINVAL; say what it is.
            raise TransportError(f"the job secret is empty ({secret!r}): every process needs "
                                 f"the secret the launcher drew (TESSERA_SECRET)")
        # One ZAP domain per secret: one handler per context can then serve
        # endpoints of different secrets (tests do) without mixing them up.
        digest = hashlib.sha256(b"tessera-zap:" + secret.encode()).hexdigest()
        self.domain = "tessera-" + digest[:16]
        if self.curve:
            self.server_public, self.server_secret = _curve_keypair(b"tessera-server:", secret)
            self.client_public, self.client_secret = _curve_keypair(b"tessera-client:", secret)

    @property
    def mechanism(self) -> str:
        return "CURVE" if self.curve else "PLAIN"


@functools.lru_cache(maxsize=8)
def _keys(secret: str) -> _Keys:
    return _Keys(secret)


def _curve_keypair(tag: bytes, secret: str) -> tuple[bytes, bytes]:
    """(public, secret) Z85 keys derived from ``secret``: any 32 bytes make a Curve25519
    secret key (it is clamped when used), and the public key follows from it."""
    secret_key = z85.encode(hashlib.sha256(tag + secret.encode()).digest())
    return zmq.curve_public(secret_key), secret_key


class _OnlyKey:
    """ZAP credentials provider that accepts exactly one CURVE client key."""

    def __init__(self, public_key: bytes):
        self.public_key = public_key

    def callback(self, domain: str, key: bytes) -> bool:
        return key == self.public_key


class _Auth:
    """One ZAP handler thread per context (ZeroMQ asks it about every connection),
    configured once per secret served from that context (a ZAP domain each).

    Its state lives on the context it serves (``ctx.__dict__``), not in this module:
    two contexts, two handlers, and nothing left over once a context is gone."""

    def __init__(self, ctx: zmq.Context):
        self.lock = threading.Lock()
        self.thread: Optional[zmq.auth.thread.ThreadAuthenticator] = None
        self.domains: set[str] = set()

    @staticmethod
    def of(ctx: zmq.Context) -> "_Auth":
        return ctx.__dict__.setdefault("_tessera_zap", _Auth(ctx))  # atomic under the GIL

    @classmethod
    def ensure(cls, ctx: zmq.Context, keys: _Keys, secret: str) -> None:
        auth = cls.of(ctx)
        with auth.lock:
            if auth.thread is None:
                auth.thread = zmq.auth.thread.ThreadAuthenticator(ctx, log=_quiet_logger())
                auth.thread.start()
            if keys.domain in auth.domains:
                return
            if keys.curve:
                auth.thread.configure_curve_callback(
                    domain=keys.domain, credentials_provider=_OnlyKey(keys.client_public))
            else:
                auth.thread.configure_plain(domain=keys.domain, passwords={_USER: secret})
            auth.domains.add(keys.domain)

    @classmethod
    def stop(cls, ctx: zmq.Context, timeout_s: float = 5.0) -> None:
        """End the handler thread, waiting at most ``timeout_s`` (pyzmq's own ``stop()``
        waits forever). A thread still running then keeps its sockets: they are left to
        the context's ``destroy``, as they were before there was a stop."""
        auth = cls.of(ctx)
        with auth.lock:
            handler, auth.thread = auth.thread, None
            auth.domains.clear()
        if handler is None:
            return
        pipe, worker = handler.pipe, handler.thread
        if pipe is not None:
            try:
                pipe.send(b"TERMINATE", zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
            if worker is not None:
                worker.join(timeout_s)
                if worker.is_alive():
                    # Nothing more to close from here: closing its sockets under a running
                    # thread is what this stop exists to avoid. pyzmq's __del__ would join
                    # it without a limit, so it is told there is nothing left to stop.
                    handler.pipe = handler.thread = handler.zap_socket = None
                    return
            handler.thread = None
            pipe.close()
            handler.pipe = None
        zmq.auth.Authenticator.stop(handler)  # the ZAP socket, now that nobody polls it


def close_context(ctx: zmq.Context, linger_ms: int = 0) -> None:
    """Destroy ``ctx`` after ending its ZAP handler thread (bounded). Destroying the
    context under that thread closes the sockets it is polling: the thread then stays
    alive, one per context, and may die with a ZMQError. Every owner of a context
    that bound a server closes it here."""
    _Auth.stop(ctx)
    ctx.destroy(linger=linger_ms)


def _quiet_logger():
    import logging
    log = logging.getLogger("tessera.zap")
    log.setLevel(logging.WARNING)
    return log


class Received:
    """One message taken off a server socket. ``msg`` is None when it was refused
    (``error`` says why); ``req`` is then the request id its header named, if it
    could be read (0 otherwise), for the ``Error`` reply to echo."""

    __slots__ = ("peer", "msg", "frames", "error", "req")

    def __init__(self, peer: bytes, msg: Optional[Message], frames: list, error: str = "",
                 req: int = 0):
        self.peer, self.msg, self.frames, self.error, self.req = peer, msg, frames, error, req


def _recv_bounded(sock: zmq.Socket, max_parts: int, flags: int = 0) -> tuple[list, int]:
    """One whole message, frame by frame: (its first ``max_parts`` frames, how many it
    had). Frames past ``max_parts`` are read and dropped one at a time, so a hostile
    message costs no Python object per frame. ``flags`` of the first frame's recv
    (``zmq.NOBLOCK``: ``zmq.Again`` when none is queued; ZeroMQ delivers a message's
    frames together, so the others are there)."""
    parts = [sock.recv(flags, copy=False)]
    while parts[-1].more:
        if len(parts) == max_parts:
            count = len(parts)
            while sock.getsockopt(zmq.RCVMORE):
                sock.recv(copy=False)
                count += 1
            return parts, count
        parts.append(sock.recv(copy=False))
    return parts, len(parts)


def _nbytes(frame) -> int:
    if isinstance(frame, (bytes, zmq.Frame)):  # (a zmq.Frame has no nbytes, and asking
        return len(frame)                      # hasattr costs ~2 µs a frame)
    try:
        return frame.nbytes if hasattr(frame, "nbytes") else len(frame)
    except TypeError:  # not a buffer: ZeroMQ refuses it when sent, naming the peer
        return 0


def _slotted(seg: "shm.Segment", direction: int, slots: list, inline: list,
             arena=None, lent=None) -> tuple[list, str]:
    """The payload frames a prefix describes: views over ``seg`` (or, in a reply, the
    server's ``arena``; in a request, the client's ``lent`` arena) for its slots, the
    inline ZeroMQ frames in their places; ("", why) when it does not add up."""
    if len(slots) > MAX_FRAMES:
        return [], _too_many(len(slots))
    frames, k = [], 0
    try:
        for slot in slots:
            if slot[0] == shm.ARENA:
                frames.append(shm.receive_arena(arena, slot))
            elif slot[0] <= shm.LENT:
                frames.append(shm.receive_lent(seg, lent, slot))
            elif slot[0] < 0:
                if k == len(inline):
                    return [], "a prefix names more inline frames than the message has"
                frames.append(inline[k])
                k += 1
            else:
                frames.append(shm.receive(seg, direction, slot))
    except shm.ShmError as exc:
        return [], str(exc)
    if k != len(inline):
        return [], "a message has inline frames its prefix does not name"
    return frames, ""


def _too_many(count: int) -> str:
    return (f"a message of {count} payload frames exceeds the limit of {MAX_FRAMES} "
            f"frames a message")


def _req_of(header) -> int:
    try:
        return decode(header.buffer).req
    except (WireError, AttributeError):
        return 0


def _encode_or_error(msg: Message, frames: Sequence) -> tuple[bytes, Sequence, str]:
    """(header, frames, "") or, when ``msg`` cannot go out as it is, an ``Error``
    reply with its req and the reason ("" -> what went wrong)."""
    why = ""
    if len(frames) > MAX_FRAMES:
        why = _too_many(len(frames))
    else:
        try:
            return encode(msg), frames, ""
        except Exception as exc:  # msgspec.EncodeError, OverflowError, TypeError, ...
            why = f"{type(msg).__name__} reply could not be encoded: {exc}"
    req = getattr(msg, "req", 0)
    req = req if isinstance(req, int) and -2 ** 63 <= req < 2 ** 64 else 0
    return encode(Error(req=req, message=why)), (), why


def small_frames(frames: Sequence) -> bool:
    """Whether every frame is under ZeroMQ's copy size (one that is no buffer counts as
    small here: sending it fails, or holding it, as it would unheld)."""
    for part in frames:
        if _nbytes(part) >= _COPY_BELOW:
            return False
    return True


def _copied(frames: Sequence) -> Optional[list]:
    """Small ``frames`` as ``zmq.Frame`` copies (pyzmq copies a buffer under its copy
    size when it makes a frame of it), or None when one is no buffer."""
    kept = []
    for part in frames:
        if not isinstance(part, zmq.Frame):
            try:
                part = zmq.Frame(part)
            except (TypeError, ValueError):
                return None
        kept.append(part)
    return kept


class ServerEndpoint:
    """A bound ROUTER socket that only authenticated peers can reach.

    ``max_frame_bytes``: ``ZMQ_MAXMSGSIZE``, the largest frame a peer may send
    (-1: no limit); a peer announcing a larger one is disconnected (module docstring).
    """

    def __init__(self, ctx: zmq.Context, host: str, secret: str, *, max_frame_bytes: int = -1,
                 port: int = 0, shm: bool = False):
        keys = _keys(secret)
        if host != addresses.INPROC:  # ZeroMQ asks no ZAP handler about inproc peers
            _Auth.ensure(ctx, keys, secret)
        self.ctx = ctx
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.zap_domain = keys.domain.encode()
        if keys.curve:
            self.sock.curve_secretkey = keys.server_secret
            self.sock.curve_publickey = keys.server_public
            self.sock.curve_server = True
        else:
            self.sock.plain_server = True
        self.sock.linger = 0
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # replies to requests we took: never dropped
        self.sock.setsockopt(zmq.RCVHWM, RCV_HWM)
        self.address = addresses.bind(self.sock, ctx, host, port)
        self.port = addresses.port_of(self.address)  # 0 on inproc
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        #: Replies that could not be delivered (the peer was gone), and when we last said so.
        self.undelivered = 0
        self._logged: dict[str, tuple[float, int]] = {}  # kind -> (last logged, since then)
        #: Shared memory: offered to clients that ask (same host only, and never inproc);
        #: the segments, made at the first request for one; set-up replies per peer.
        self._shm_offered = shm and host != addresses.INPROC
        self._shm: Optional[shm.Host] = None
        self._shm_ctl: dict[bytes, shm.Prefix] = {}
        self._shm_reaped = 0.0
        #: Small replies held while the server drains its queue (:meth:`hold`), as
        #: (head, frames copied, message, why replaced); None: every reply goes at once.
        self._held: Optional[list] = None
        #: The masters' arena (:class:`tessera.transport.shm.Arena`), made with the first
        #: segment or master, whichever comes first; False where it cannot be made.
        self._arena = None
        #: Payload bytes that went through shared memory, each way.
        self.shm_bytes_in = self.shm_bytes_out = 0
        #: Messages taken off the socket (:meth:`recv`), whatever they carried.
        self.messages_in = 0

    def poll(self, timeout_s: float) -> bool:
        if self._shm is not None:  # segments of clients that are gone: dropped here too
            self._shm_reap()
        return bool(self._poller.poll(int(timeout_s * 1000)))

    def recv(self, wait: bool = True) -> Optional[Received]:
        """Take one message (call after :meth:`poll` said there is one). ``wait=False``:
        None at once when none is queued, which costs less than asking :meth:`poll`
        first (a server draining its queue asks after every message)."""
        # [routing id, (shm prefix,) header, payload frames...]
        if not wait and not self.sock.get(_EVENTS) & _POLLIN:
            return None  # (asking costs ~1 µs; a recv raising zmq.Again, several)
        try:
            parts, count = _recv_bounded(self.sock, MAX_FRAMES + 3, 0 if wait else zmq.NOBLOCK)
        except zmq.Again:
            if wait:
                raise
            return None
        self.messages_in += 1
        peer = parts[0].bytes
        if self._shm is not None:
            self._shm_reap()
        if count < 2:
            return Received(peer, None, [], "empty message: expected a header frame")
        # (the header's buffer asked once: each ask makes a memoryview)
        head = parts[1].buffer
        if count >= 3 and shm.is_prefix(head):  # a prefix is followed by a header
            return self._recv_prefixed(peer, parts, count)
        if count > MAX_FRAMES + 2:
            return Received(peer, None, [], _too_many(count - 2), req=_req_of(parts[1]))
        try:
            msg = decode(head)
        except WireError as exc:
            return Received(peer, None, [], str(exc))
        return Received(peer, msg, parts[2:])

    # ------------------------------------------------------------ shared memory

    def _recv_prefixed(self, peer: bytes, parts: list, count: int) -> Received:
        """A message with a prefix frame: its set-up requests, and its payload slots."""
        if count > MAX_FRAMES + 3:
            return Received(peer, None, [], _too_many(count - 3), req=_req_of(parts[2]))
        try:
            prefix = shm.decode_prefix(parts[1], MAX_HEADER_BYTES)
            msg = decode(parts[2].buffer)
        except (shm.ShmError, WireError) as exc:
            return Received(peer, None, [], str(exc), req=_req_of(parts[2]))
        self._shm_control(peer, prefix)
        frames = parts[3:]
        if prefix.slots:
            req = getattr(msg, "req", 0)
            s = self._shm.active(peer) if self._shm is not None else None
            if s is None or s.id != prefix.session:
                return Received(peer, None, [], shm.SHM_LOST, req=req)
            frames, why = _slotted(s.seg, shm.UP, prefix.slots, frames, lent=s.lent)
            if why:
                return Received(peer, None, [], why, req=req)
            self.shm_bytes_in += sum(len(f) for f in frames if isinstance(f, shm.ShmFrame))
        return Received(peer, msg, frames)

    def _shm_control(self, peer: bytes, prefix: "shm.Prefix") -> None:
        """A client asks for a segment, or proves it mapped the one offered."""
        if prefix.open and self._shm_offered:
            try:
                if self._shm is None:
                    self._shm = shm.Host(arena=self._ensure_arena())
                offer = self._shm.open(peer)
            except OSError as exc:  # no memfd or unix sockets here: TCP it is
                self._shm_offered = False
                self._log("shm", f"shared memory is unavailable, staying on TCP: {exc}")
            else:
                self._shm_ctl[peer] = shm.Prefix(offer=offer)
        if prefix.refused and self._shm is not None:  # the client cannot map it
            self._shm.decline(peer)
            self._log("shm-declined", f"a client declined the shared-memory offer "
                                      f"({prefix.refused}): its payloads stay on TCP")
        if prefix.prove:
            sid, why = self._shm.prove(peer, prefix.prove) if self._shm is not None else \
                (0, "this server offers no shared memory")
            ctl = self._shm_ctl.setdefault(peer, shm.Prefix())
            ctl.accepted, ctl.refused = sid, why
            print(f"tessera endpoint {self.address}: " + (
                f"a client on this host moves payloads through shared memory (segment {sid})"
                if sid else f"refused a client's shared-memory proof: {why}"),
                file=sys.stderr, flush=True)

    def _ensure_arena(self):
        if self._arena is None:
            try:
                self._arena = shm.Arena()
            except (OSError, ValueError, AttributeError) as exc:
                # no memfd on this OS, or no address space to map it (ulimit -v): the
                # masters stay in ordinary memory and every reply is copied, as before
                self._arena = False
                self._log("arena", f"the masters stay in ordinary memory: {exc}")
        return self._arena or None

    def shared_empty(self, count: int):
        """``count`` fp32 values (a NumPy array, contents undefined) in memory that this
        endpoint's same-host clients can read replies from without a copy, or None where
        it offers no shared memory (the caller allocates as usual)."""
        if not self._shm_offered:
            return None
        arena = self._ensure_arena()
        return arena.empty(count) if arena is not None else None

    def reply_buffer(self, peer: bytes, nbytes: int) -> Optional[np.ndarray]:
        """``nbytes`` writable bytes (uint8) in the shared-memory segment of ``peer``, for
        a reply frame written in place: :meth:`send` then sends it as its place in the
        segment, with no copy (:meth:`tessera.transport.shm.Producer.reserve`). None for
        a peer over TCP, a frame too small to go through the segment, or no room: the
        caller allocates as usual."""
        s = self._shm.active(peer) if self._shm is not None else None
        return s.producer.reserve(nbytes) if s is not None else None

    def _shm_reap(self) -> None:
        now = time.monotonic()
        if self._shm.dead or now - self._shm_reaped > 1.0:
            self._shm_reaped = now
            self._shm.reap()
            if self._arena:
                self._arena.reap()

    def shares_memory_with(self, peer: bytes) -> bool:
        """Whether ``peer`` (a client on this host) takes its payloads through a
        shared-memory segment it mapped; False for a peer over TCP."""
        return self._shm is not None and self._shm.active(peer) is not None

    def _shm_prefix(self, peer: bytes, frames: Sequence) -> tuple[Optional[bytes], Sequence]:
        """(prefix frame or None, the frames to send inline) for a message to ``peer``."""
        ctl = self._shm_ctl.pop(peer, None) if self._shm_ctl else None
        s = self._shm.active(peer)
        if s is not None and frames and any(_nbytes(f) >= shm.MIN_BYTES for f in frames):
            slots, inline = s.producer.put(frames)
            if len(inline) < len(frames):
                self.shm_bytes_out += sum(n for e, _, n in slots if e != -1)
                ctl = ctl or shm.Prefix()
                ctl.session, ctl.slots = s.id, slots
                frames = inline
        return (shm.encode_prefix(ctl) if ctl is not None else None), frames

    def send(self, peer: bytes, msg: Message, frames: Sequence = ()) -> bool:
        """Send a reply; False when it could not be delivered. A reply that cannot
        go out as it is (not encodable, too many frames, a frame that is no buffer)
        goes out as an ``Error`` with its req, so the peer fails now rather than at
        its timeout; a peer that is gone (ROUTER_MANDATORY) is logged on stderr.
        While replies are held (:meth:`hold`), a small one is kept, its payload copied
        as ZeroMQ would copy it now, and True returned."""
        header, frames, why = _encode_or_error(msg, frames)
        if self._held is not None and not small_frames(frames):
            # A large reply goes now, through shared memory or not (its peer can start
            # on it while the server goes on), after what is held, in order.
            self.release()
        prefix = None
        if self._shm is not None:
            prefix, frames = self._shm_prefix(peer, frames)
        head = (peer, header) if prefix is None else (peer, prefix, header)
        if self._held is not None:
            kept = _copied(frames)
            if kept is not None:
                self._held.append((head, kept, msg, why))
                return True
            self.release()  # (a frame that is no buffer: what is held goes first)
        return self._send_now(head, frames, msg, why)

    def hold(self) -> None:
        """Keep small replies until :meth:`release`, to send them together. A send to a
        ROUTER wakes ZeroMQ's I/O thread through a kernel call unless it is awake
        already; a server that answers each of many queued requests as it takes them
        pays that wake-up per reply (~7 µs of its ~60 here: benchmarks/HISTORY.md,
        "Session 56"), one that answers a drained batch together pays it about once.
        Only replies whose payload frames are all under ZeroMQ's copy size are held,
        copied as they are held (as ZeroMQ would copy them when sent): what a caller
        changes afterwards is not what the peer reads, and nothing large waits."""
        if self._held is None:
            self._held = []

    def release(self) -> None:
        """Send the held replies, in the order they were given, and stop holding."""
        held, self._held = self._held, None
        if held:
            for head, frames, msg, why in held:
                self._send_now(head, frames, msg, why)

    def _send_now(self, head: tuple, frames: Sequence, msg: Message, why: str) -> bool:
        try:
            try:
                send_parts(self.sock, head, frames)
            except (TypeError, ValueError) as exc:  # a frame pyzmq cannot send: nothing went
                why = f"{type(msg).__name__} reply could not be sent: {exc}"
                self.sock.send_multipart(
                    [head[0], encode(Error(req=getattr(msg, "req", 0), message=why))])
        except zmq.ZMQError as exc:
            self.undelivered += 1
            gone = " (it disconnected)" if exc.errno == zmq.EHOSTUNREACH else ""
            self._log("undelivered", f"could not deliver a {type(msg).__name__} reply "
                      f"(req {getattr(msg, 'req', '?')}) to peer {head[0].hex()}: "
                      f"{exc.strerror}{gone}")
            return False
        if why:
            self._log("replaced", f"answered Error instead of {type(msg).__name__}: {why}")
        return True

    def _log(self, kind: str, line: str) -> None:
        """One line on stderr, at most one per :data:`_LOG_EVERY_S` of each kind."""
        now = time.monotonic()
        last, unlogged = self._logged.get(kind, (-_LOG_EVERY_S, 0))
        if now - last < _LOG_EVERY_S:
            self._logged[kind] = (last, unlogged + 1)
            return
        more = f" ({unlogged} more since the last such line)" if unlogged else ""
        self._logged[kind] = (now, 0)
        print(f"tessera endpoint {self.address}: {line}{more}", file=sys.stderr, flush=True)

    def close(self) -> None:
        addresses.unbind(self.ctx, self.address)
        self.sock.close(linger=0)
        if self._shm is not None:
            self._shm.close()
            self._shm = None
        if self._arena:
            self._arena.close()
        self._arena = None


class ClientEndpoint:
    """A DEALER connected to one server; many requests may be in flight.

    Replies are matched to requests by ``req``; replies that arrive while waiting
    for another request are kept until asked for. ``max_frame_bytes``: the largest
    frame the server may send us (``ZMQ_MAXMSGSIZE``; -1: no limit).

    Every failure raises :class:`TransportError` naming the server (module docstring).
    """

    def __init__(self, ctx: zmq.Context, address: str, secret: str, peer_name: str,
                 *, sndtimeo_s: float = 30.0, max_frame_bytes: int = CLIENT_MAX_FRAME_BYTES):
        self.address = address
        self.peer_name = f"{peer_name} ({address})"
        self._keys = keys = _keys(secret)
        self._inproc = addresses.is_inproc(address)
        why = addresses.unreachable(ctx, address)
        if why:
            raise TransportError(f"cannot connect to {peer_name}: {why}")
        self.sock = ctx.socket(zmq.DEALER)
        if keys.curve:
            self.sock.curve_serverkey = keys.server_public
            self.sock.curve_publickey = keys.client_public
            self.sock.curve_secretkey = keys.client_secret
        else:
            self.sock.plain_username = _USER.encode()
            self.sock.plain_password = secret.encode()
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, RCV_HWM)
        self.sock.setsockopt(zmq.SNDTIMEO, int(sndtimeo_s * 1000))
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
            | zmq.EVENT_DISCONNECTED)
        self.sock.connect(address)
        self._pending: dict[int, tuple[Message, list]] = {}
        self._next_req = 1
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)
        #: Handshakes completed, and the count when each unanswered request was sent:
        #: a request sent on an earlier connection than the current one was dropped
        #: with that connection (see :meth:`wait`).
        self._connections = 0
        self._dropped = False
        self._sent_on: dict[int, int] = {}
        #: Shared memory with this server: None (not asked yet), "asked", "off" (it
        #: offers none, or is on another host), or the attached segment.
        self._shm: object = "off" if self._inproc else None
        self._shm_prove = ""  # the nonce to send back, with the next message
        self._shm_decline = ""  # why we could not map the segment offered
        self._shm_transient = False  # whether that reason may pass (then: ask again later)
        self._shm_tries = 0
        self._shm_retry_at = 0.0
        #: Requests sent through the segment: (header, frames, segment) to send again inline if
        #: the server no longer holds the segment (shm.SHM_LOST).
        self._shm_sent: dict[int, tuple[bytes, Sequence, int]] = {}
        #: Payload bytes that went through shared memory, each way.
        self.shm_bytes_in = self.shm_bytes_out = 0
        #: The arena our pushes' gradients may be lent from (``PSClient.shared_zeros``),
        #: handed to the server with the next segment set up.
        self.lend: Optional[shm.Arena] = None

    @property
    def shares_memory(self) -> bool:
        """Whether large payloads to this server go through shared memory now (it runs
        on this host, and the segment is set up: :mod:`tessera.transport.shm`)."""
        state = self._shm
        return isinstance(state, shm.Attached) and state.active

    def wait_connected(self, timeout_s: float, check: Callable[[], None] = lambda: None) -> None:
        """Block until the handshake (authentication included) has succeeded.

        An inproc peer is connected once ``connect`` returns (it is bound: see
        :func:`tessera.transport.address.unreachable`); there is no handshake to await.
        """
        if self._inproc:
            check()
            return
        deadline = time.monotonic() + timeout_s
        hangups = 0
        while time.monotonic() < deadline:
            check()
            if self._monitor.poll(100):
                got = recv_monitor_message(self._monitor)
                event, value = got["event"], got["value"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    self._connections += 1
                    return
                if event == zmq.EVENT_DISCONNECTED:
                    continue  # ZeroMQ reconnects; a refusal comes as its own event
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise AuthRefused(f"{self.peer_name} refused our credentials: this process "
                                      f"does not hold the job's secret")
                if event == zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL:
                    # The server closed the connection mid-handshake. Under PLAIN that
                    # is not a verdict (ZeroMQ reconnects); under CURVE it is how a
                    # server that cannot open our HELLO (other secret) answers.
                    hangups += 1
                    if self._keys.curve and hangups >= _CURVE_HANGUPS:
                        raise AuthRefused(
                            f"{self.peer_name} hung up during the CURVE handshake {hangups} times: "
                            f"it holds another server key, so this process does not hold the "
                            f"job's secret (or the server is not a Tessera process)")
                    continue
                if value == zmq.PROTOCOL_ERROR_ZMTP_MECHANISM_MISMATCH:
                    raise AuthRefused(
                        f"{self.peer_name} runs another security mechanism than our "
                        f"{self._keys.mechanism}: one side was started with --encrypt "
                        f"(CURVE) and the other without, so this process does not hold "
                        f"the job's secret")
                raise TransportError(f"{self.peer_name} failed the ZeroMQ handshake "
                                     f"(event {event}, value {value:#x}): is it a Tessera "
                                     f"process?")
        raise PeerTimeout(f"could not connect to {self.peer_name} within {timeout_s:g} s")

    def new_req(self) -> int:
        req = self._next_req
        self._next_req += 1
        return req

    def send(self, msg: Message, frames: Sequence = ()) -> None:
        what = type(msg).__name__
        if len(frames) > MAX_FRAMES:
            raise TransportError(f"cannot send {what} to {self.peer_name}: "
                                 f"{_too_many(len(frames))} (use larger partitions: "
                                 f"--partition-mb)")
        try:
            header = encode(msg)
        except Exception as exc:  # msgspec.EncodeError, OverflowError, TypeError, ...
            raise TransportError(f"cannot send {what} to {self.peer_name}: it does not "
                                 f"encode: {exc}") from None
        self._follow_connection()
        if self._dropped:
            self._check_closed(f"sending {what}")
        prefix, sent = None, frames
        if self._shm != "off":
            prefix, sent = self._shm_prefix(frames)
            if prefix is not None and len(sent) < len(frames):
                if len(self._shm_sent) >= MAX_FRAMES:  # requests nobody waits for
                    self._shm_sent.clear()
                self._shm_sent[getattr(msg, "req", 0)] = (header, frames, self._shm.id)
        try:
            if prefix is not None:
                send_parts(self.sock, (prefix, header), sent)
            else:
                send_parts(self.sock, (header,), frames)
        except zmq.Again:
            raise PeerTimeout(f"{self.peer_name} did not take our {what} "
                              f"request (send timed out)") from None
        except zmq.ZMQError as exc:
            raise TransportError(f"cannot send {what} to {self.peer_name}: "
                                 f"{exc.strerror}") from None
        except (TypeError, ValueError) as exc:  # a frame that is not a buffer
            raise TransportError(f"cannot send {what} to {self.peer_name}: {exc}") from None
        req = getattr(msg, "req", None)
        if isinstance(req, int):
            if len(self._sent_on) >= MAX_FRAMES:  # requests nobody waits for: forget them
                self._sent_on.clear()
            self._sent_on[req] = self._connections

    def _shm_prefix(self, frames: Sequence) -> tuple[Optional[bytes], Sequence]:
        """(prefix frame or None, frames to send inline): ask for a segment with the
        first large payload, prove the one offered, then put large payloads in it."""
        state = self._shm
        if state is None:
            if not any(_nbytes(f) >= shm.MIN_BYTES for f in frames):
                return None, frames
            self._shm = "asked"
            return shm.encode_prefix(shm.Prefix(open=True)), frames
        if state == "declined":  # tell the server, which then drops the segment at once
            self._shm = self._shm_after_failure()
            return shm.encode_prefix(shm.Prefix(refused=self._shm_decline)), frames
        if state == "later":  # a set-up that failed for a passing reason: ask again
            if time.monotonic() < self._shm_retry_at:
                return None, frames
            self._shm = None
            return self._shm_prefix(frames)
        if not isinstance(state, shm.Attached):
            return None, frames
        if not state.active:
            if self._shm_prove:
                prove, self._shm_prove = self._shm_prove, ""
                return shm.encode_prefix(shm.Prefix(prove=prove)), frames
            return None, frames
        if not frames or not any(_nbytes(f) >= shm.MIN_BYTES for f in frames):
            return None, frames
        if not state.server_alive():  # the server process ended: ask its successor
            self._shm_drop(None)
            self._shm_sent.clear()  # (their buffers: a server gone answers none of them)
            return self._shm_prefix(frames)
        slots, inline = state.producer.put(frames)
        if len(inline) == len(frames):
            return None, frames
        self.shm_bytes_out += sum(n for e, _, n in slots if e != -1)  # copied or lent
        return shm.encode_prefix(shm.Prefix(session=state.id, slots=slots)), inline

    def lent(self) -> int:
        """Frames lent to the server from :attr:`lend` that it still reads (0 once it is
        gone: nothing reads them then)."""
        state = self._shm
        if not isinstance(state, shm.Attached) or state.producer is None:
            return 0
        n = state.producer.outstanding()
        return n if n == 0 or state.server_alive() else 0

    def _shm_after_failure(self) -> str:
        """"later" after a set-up failed for a reason that may pass (a timeout under
        load, an offer that expired), at most :data:`_SHM_TRIES` times with a growing
        pause; "off" for good otherwise (the server is on another host)."""
        if not self._shm_transient or self._shm_tries >= _SHM_TRIES:
            return "off"
        self._shm_tries += 1
        self._shm_retry_at = time.monotonic() + 2.0 ** self._shm_tries
        return "later"

    def _shm_drop(self, then) -> None:
        if isinstance(self._shm, shm.Attached):
            self._shm.close()
        self._shm, self._shm_prove = then, ""

    def _shm_control(self, prefix: "shm.Prefix") -> None:
        """The server's side of the set-up: an offer, or its verdict on our proof."""
        if prefix.offer is not None and self._shm == "asked":
            try:
                self._shm = shm.Attached(prefix.offer, self.lend)
                self._shm_prove = self._shm.seg.nonce.hex()
            except shm.ShmError as exc:  # another host (or namespace): TCP it is
                self._shm, self._shm_decline = "declined", str(exc) or "cannot map it"
                self._shm_transient = exc.transient
        state = self._shm
        if not isinstance(state, shm.Attached):
            return
        if prefix.accepted and prefix.accepted == state.id:
            state.active = True
        elif prefix.refused:  # our proof came too late (the offer expired), or was wrong
            self._shm_transient = prefix.refused == shm.OFFER_GONE
            self._shm_drop(None)
            self._shm = self._shm_after_failure()

    def _follow_connection(self) -> None:
        """Take the monitor's news: count handshakes, note drops (never blocks)."""
        if self._inproc:
            return
        while self._monitor.get(_EVENTS) & _POLLIN:
            event = recv_monitor_message(self._monitor)["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._connections += 1
            elif event == zmq.EVENT_DISCONNECTED:
                self._dropped = True

    def _check_closed(self, what: str) -> None:
        """After a drop: a DEALER without a connection that ZeroMQ will re-make has no
        pipe and cannot send. That happens when *we* broke the connection off, on a
        protocol error (a reply frame over our ``ZMQ_MAXMSGSIZE``): ZeroMQ never
        reconnects then, so no reply can come and nothing more can be sent."""
        if not self.sock.get(_EVENTS) & _POLLOUT:
            limit = self.sock.getsockopt(zmq.MAXMSGSIZE)
            raise TransportError(
                f"our connection to {self.peer_name} closed for good while {what}: its "
                f"reply broke the protocol or had a frame over our limit of {limit} bytes "
                f"(ZMQ_MAXMSGSIZE); a Tessera server sends none, so it is not one")

    def _take_one(self) -> None:
        parts, count = _recv_bounded(self.sock, MAX_FRAMES + 2)
        prefix = None
        try:
            if count >= 2 and shm.is_prefix(parts[0]):  # a prefix is followed by a header
                prefix = shm.decode_prefix(parts[0], MAX_HEADER_BYTES)
                parts, count = parts[1:], count - 1
            if count > MAX_FRAMES + 1:
                raise WireError(_too_many(count - 1))
            msg = decode(parts[0].buffer)
        except (WireError, shm.ShmError) as exc:
            raise TransportError(f"{self.peer_name} sent a malformed reply: {exc}") from None
        frames = parts[1:]
        if prefix is not None:
            self._shm_control(prefix)
            if prefix.slots:
                state = self._shm
                if not isinstance(state, shm.Attached) or state.id != prefix.session:
                    raise TransportError(f"{self.peer_name} sent a reply through a "
                                         f"shared-memory segment we do not hold")
                frames, why = _slotted(state.seg, shm.DOWN, prefix.slots, frames, state.arena)
                if why:
                    raise TransportError(f"{self.peer_name} sent a malformed reply: {why}")
                self.shm_bytes_in += sum(len(f) for f in frames if isinstance(f, shm.ShmFrame))
        if isinstance(msg, Error) and msg.req == 0 and 0 not in self._sent_on:
            # Not an answer to a request of ours: the server could not read one of them.
            raise TransportError(f"{self.peer_name} could not read a message of ours: "
                                 f"{msg.message}")
        again = self._shm_sent.pop(msg.req, None) if self._shm_sent else None
        if again is not None and isinstance(msg, Error) and shm.SHM_LOST in msg.message:
            # The server no longer holds our segment (a replacement at its address):
            # that request was not served; it goes again inline, and we ask anew.
            header, frames, sid = again
            if isinstance(self._shm, shm.Attached) and self._shm.id == sid:
                self._shm_drop(None)  # (not a newer segment set up since)
            self._shm_sent[msg.req] = again  # popped by the answer to the inline copy
            self.sock.send_multipart([header, *frames], copy=False)
            return
        self._pending[msg.req] = (msg, frames)

    def wait(self, req: int, timeout_s: float, what: str,
             check: Callable[[], None] = lambda: None) -> tuple[Message, list]:
        """The reply to request ``req``; ``check`` runs every 100 ms (it may raise).

        When the server dropped our connection and took us back while ``req`` was
        unanswered (it refused a frame over its limit, or it restarted), the reply
        is lost: after :data:`_LOST_GRACE_S` (it may still come if the request had
        waited in our queue) this raises naming the server, not at ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        lost_at = None
        while req not in self._pending:
            check()
            now = time.monotonic()
            left = deadline - now
            if left <= 0:
                self._sent_on.pop(req, None)
                self._shm_sent.pop(req, None)
                raise PeerTimeout(f"{self.peer_name} did not answer {what} within {timeout_s:g} s")
            if lost_at is None and self._dropped:
                self._follow_connection()
                # A request sent before the first handshake went out on connection 1.
                if self._connections > max(self._sent_on.get(req, self._connections), 1):
                    lost_at = now
            if self._dropped:
                self._check_closed(f"waiting for {what}")
            if lost_at is not None and now - lost_at > _LOST_GRACE_S:
                self._sent_on.pop(req, None)
                raise TransportError(
                    f"{self.peer_name} dropped our connection while {what} was unanswered "
                    f"and took us back: the request was lost (a frame over its size limit, "
                    f"or it restarted)")
            if self._poller.poll(int(min(left, 0.1) * 1000)):
                while self.sock.get(_EVENTS) & _POLLIN:
                    self._take_one()
            elif not self._dropped:
                self._follow_connection()
        self._sent_on.pop(req, None)
        return self._pending.pop(req)

    def take(self, req: int) -> Optional[tuple[Message, list]]:
        """The reply to request ``req`` if it has arrived, else None, without waiting
        (the caller polls :attr:`sock`; :meth:`wait` with a short timeout spins until it
        runs out). A malformed reply raises :class:`TransportError`, as in :meth:`wait`."""
        if req not in self._pending:
            while self.sock.get(_EVENTS) & _POLLIN:
                self._take_one()
            if req not in self._pending:
                return None
        self._sent_on.pop(req, None)
        return self._pending.pop(req)

    def request(self, msg: Message, frames: Sequence = (), *, timeout_s: float, what: str = "",
                check: Callable[[], None] = lambda: None) -> tuple[Message, list]:
        self.send(msg, frames)
        return self.wait(msg.req, timeout_s, what or type(msg).__name__, check)

    def close(self) -> None:
        self._shm_drop("off")
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
