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

Size limits: ``max_frame_bytes`` sets ``ZMQ_MAXMSGSIZE`` on a socket (servers
and, optionally, clients; -1: no limit). ZeroMQ checks every frame's length
prefix *before* allocating it, so a peer that announces a larger frame is
disconnected and the frame never reaches Python nor memory. The limit applies
to each frame of a multipart message on the wire; under CURVE a frame on the
wire carries 33 bytes more than its payload (flags, nonce and MAC), so limits
need a margin over the largest frame a job sends (the roles add 1 MiB). Headers
are further capped at :data:`tessera.transport.wire.MAX_HEADER_BYTES` when
decoded, and receivers check every payload frame's length against their own
shard map (:mod:`tessera.transport.frames`).

Transports: the address a server binds to, ``tcp://`` between processes or
``inproc://`` between threads of one process, is chosen in one place,
:mod:`tessera.transport.address`, from the host the server is given; the code
here is the same for both. On inproc, ZeroMQ runs no handshake: no mechanism, no
ZAP, no frame limit; that module's docstring says why that is the right trust
boundary (the peers are this process).

Every wait takes a timeout; a :class:`PeerTimeout` names the peer and the request.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import time
from typing import Callable, Optional, Sequence

import zmq
import zmq.auth.thread
from zmq.utils import z85

from tessera.errors import TesseraError
from tessera.transport import address as addresses
from tessera.transport.wire import Message, WireError, decode, encode

_USER = "tessera"
#: A job secret with this prefix asks for CURVE encryption (set by the launcher).
CURVE_PREFIX = "curve:"
#: libzmq retries a refused connection every 100 ms; two CURVE hang-ups in a row
#: (not one, which a server restarting mid-handshake could also cause) mean the
#: server cannot open our handshake: it holds another secret.
_CURVE_HANGUPS = 2


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
    def stop(cls, ctx: zmq.Context) -> None:
        auth = cls.of(ctx)
        with auth.lock:
            thread, auth.thread = auth.thread, None
            auth.domains.clear()
        if thread is not None:
            thread.stop()


def _quiet_logger():
    import logging
    log = logging.getLogger("tessera.zap")
    log.setLevel(logging.WARNING)
    return log


class Received:
    """One message taken off a server socket."""

    __slots__ = ("peer", "msg", "frames", "error")

    def __init__(self, peer: bytes, msg: Optional[Message], frames: list, error: str = ""):
        self.peer, self.msg, self.frames, self.error = peer, msg, frames, error


class ServerEndpoint:
    """A bound ROUTER socket that only authenticated peers can reach.

    ``max_frame_bytes``: ``ZMQ_MAXMSGSIZE``, the largest frame a peer may send
    (-1: no limit); a peer announcing a larger one is disconnected (module docstring).
    """

    def __init__(self, ctx: zmq.Context, host: str, secret: str, *, max_frame_bytes: int = -1,
                 port: int = 0):
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
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.address = addresses.bind(self.sock, ctx, host, port)
        self.port = addresses.port_of(self.address)  # 0 on inproc
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)

    def poll(self, timeout_s: float) -> bool:
        return bool(self._poller.poll(int(timeout_s * 1000)))

    def recv(self) -> Received:
        """Take one message (call after :meth:`poll` said there is one)."""
        parts = self.sock.recv_multipart(copy=False)
        peer = parts[0].bytes
        if len(parts) < 2:
            return Received(peer, None, [], "empty message: expected a header frame")
        try:
            msg = decode(parts[1].buffer)
        except WireError as exc:
            return Received(peer, None, [], str(exc))
        return Received(peer, msg, parts[2:])

    def send(self, peer: bytes, msg: Message, frames: Sequence = ()) -> None:
        try:
            self.sock.send_multipart([peer, encode(msg), *frames], copy=False)
        except zmq.ZMQError:
            # The peer is gone (ROUTER_MANDATORY): nothing to answer; its own
            # side reports the failure.
            pass

    def close(self) -> None:
        addresses.unbind(self.ctx, self.address)
        self.sock.close(linger=0)


class ClientEndpoint:
    """A DEALER connected to one server; many requests may be in flight.

    Replies are matched to requests by ``req``; replies that arrive while waiting
    for another request are kept until asked for. ``max_frame_bytes``: the largest
    frame the server may send us (``ZMQ_MAXMSGSIZE``; -1: no limit).
    """

    def __init__(self, ctx: zmq.Context, address: str, secret: str, peer_name: str,
                 *, sndtimeo_s: float = 30.0, max_frame_bytes: int = -1):
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
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(sndtimeo_s * 1000))
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock.connect(address)
        self._pending: dict[int, tuple[Message, list]] = {}
        self._next_req = 1
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)

    def wait_connected(self, timeout_s: float, check: Callable[[], None] = lambda: None) -> None:
        """Block until the handshake (authentication included) has succeeded.

        An inproc peer is connected once ``connect`` returns (it is bound: see
        :func:`tessera.transport.address.unreachable`); there is no handshake to await.
        """
        from zmq.utils.monitor import recv_monitor_message
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
                    return
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
        try:
            self.sock.send_multipart([encode(msg), *frames], copy=False)
        except zmq.Again:
            raise PeerTimeout(f"{self.peer_name} did not take our {type(msg).__name__} "
                              f"request (send timed out)") from None

    def _take_one(self) -> None:
        parts = self.sock.recv_multipart(copy=False)
        try:
            msg = decode(parts[0].buffer)
        except WireError as exc:
            raise TransportError(f"{self.peer_name} sent a malformed reply: {exc}") from None
        self._pending[msg.req] = (msg, parts[1:])

    def wait(self, req: int, timeout_s: float, what: str,
             check: Callable[[], None] = lambda: None) -> tuple[Message, list]:
        """The reply to request ``req``; ``check`` runs every 100 ms (it may raise)."""
        deadline = time.monotonic() + timeout_s
        while req not in self._pending:
            check()
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerTimeout(f"{self.peer_name} did not answer {what} within {timeout_s:g} s")
            if self._poller.poll(int(min(left, 0.1) * 1000)):
                while self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    self._take_one()
        return self._pending.pop(req)

    def request(self, msg: Message, frames: Sequence = (), *, timeout_s: float, what: str = "",
                check: Callable[[], None] = lambda: None) -> tuple[Message, list]:
        self.send(msg, frames)
        return self.wait(msg.req, timeout_s, what or type(msg).__name__, check)

    def close(self) -> None:
        self.sock.disable_monitor()
        self._monitor.close(linger=0)
        self.sock.close(linger=0)
