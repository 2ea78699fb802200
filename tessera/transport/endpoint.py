"""Authenticated ZeroMQ endpoints: a ROUTER that serves, a DEALER that asks.

Authentication happens in ZeroMQ's own handshake (ZAP, RFC 27): every server
socket runs the PLAIN mechanism and a ZAP handler that accepts only the job's
secret, so a peer without it never gets a single message delivered, let alone
served. Clients watch their socket's handshake events and fail at once, naming
the server, when it refuses them. (PLAIN sends the secret in the clear; fine on
loopback and private networks; CURVE encryption is the upgrade path.)

Every wait takes a timeout; a :class:`PeerTimeout` names the peer and the request.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Optional, Sequence

import zmq
import zmq.auth.thread

from tessera.errors import TesseraError
from tessera.transport.wire import Message, WireError, decode, encode

_ZAP_DOMAIN = "tessera"
_USER = "tessera"


class TransportError(TesseraError):
    """A peer failed us: it timed out, refused us, or answered nonsense."""


class PeerTimeout(TransportError):
    pass


class AuthRefused(TransportError):
    pass


class _Auth:
    """One ZAP handler thread per (context, secret): ZeroMQ asks it about every connection."""

    _lock = threading.Lock()
    _running: dict[int, zmq.auth.thread.ThreadAuthenticator] = {}

    @classmethod
    def ensure(cls, ctx: zmq.Context, secret: str) -> None:
        with cls._lock:
            if id(ctx) in cls._running:
                return
            auth = zmq.auth.thread.ThreadAuthenticator(ctx, log=_quiet_logger())
            auth.start()
            auth.configure_plain(domain=_ZAP_DOMAIN, passwords={_USER: secret})
            cls._running[id(ctx)] = auth

    @classmethod
    def stop(cls, ctx: zmq.Context) -> None:
        with cls._lock:
            auth = cls._running.pop(id(ctx), None)
        if auth is not None:
            auth.stop()


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
    """A bound ROUTER socket that only authenticated peers can reach."""

    def __init__(self, ctx: zmq.Context, host: str, secret: str, *, max_frame_bytes: int = -1,
                 port: int = 0):
        _Auth.ensure(ctx, secret)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.zap_domain = _ZAP_DOMAIN.encode()
        self.sock.plain_server = True
        self.sock.linger = 0
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, max_frame_bytes)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        if port:
            self.sock.bind(f"tcp://{host}:{port}")
            self.port = port
        else:
            self.port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.address = f"tcp://{host}:{self.port}"
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
        self.sock.close(linger=0)


class ClientEndpoint:
    """A DEALER connected to one server; many requests may be in flight.

    Replies are matched to requests by ``req``; replies that arrive while waiting
    for another request are kept until asked for.
    """

    def __init__(self, ctx: zmq.Context, address: str, secret: str, peer_name: str,
                 *, sndtimeo_s: float = 30.0):
        self.address = address
        self.peer_name = f"{peer_name} ({address})"
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.plain_username = _USER.encode()
        self.sock.plain_password = secret.encode()
        self.sock.linger = 0
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SNDTIMEO, int(sndtimeo_s * 1000))
        self._monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_HANDSHAKE_FAILED_AUTH
            | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
        self.sock.connect(address)
        self._pending: dict[int, tuple[Message, list]] = {}
        self._next_req = 1
        self._poller = zmq.Poller()
        self._poller.register(self.sock, zmq.POLLIN)

    def wait_connected(self, timeout_s: float, check: Callable[[], None] = lambda: None) -> None:
        """Block until the handshake (authentication included) has succeeded."""
        from zmq.utils.monitor import recv_monitor_message
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            check()
            if self._monitor.poll(100):
                event = recv_monitor_message(self._monitor)["event"]
                if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                    return
                if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                    raise AuthRefused(f"{self.peer_name} refused our credentials: this process "
                                      f"does not hold the job's secret")
                raise TransportError(f"{self.peer_name} failed the ZeroMQ handshake "
                                     f"(event {event}): is it a Tessera process?")
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
