"""Where a server endpoint binds, and whether a client can reach it: the transport seam.

The endpoints (:mod:`tessera.transport.endpoint`) are the same code for every
transport; only the address differs, and this module is the one place that
chooses it, from the *host* a server is told to bind to (``cluster.host``):

* any network host (the default ``127.0.0.1``): ``tcp://host:port``, between
  processes (port 0: one the OS picks);
* :data:`INPROC` (``"inproc"``): ZeroMQ's in-process transport,
  ``inproc://tessera-<n>``, between threads of one process that share one
  ``zmq.Context`` (:mod:`tessera.cluster.inprocess` runs a whole job that way).

Trust boundary of ``inproc``. Checked on libzmq 4.3.5 / pyzmq 27: an inproc
connection has no ZMTP handshake, so neither PLAIN nor CURVE runs and the ZAP
handler is never asked (a client with a wrong password is served), no handshake
event reaches a socket monitor, ``ZMQ_MAXMSGSIZE`` is not enforced, and a frame
sent without a copy arrives as the *same memory* (writable) in the receiver.
None of that weakens the job: an inproc endpoint is reachable only from sockets
of the same ``zmq.Context``, that is from code already running inside this
process, which holds the secret and the whole address space anyway; no port is
opened. The endpoints set the same socket options either way (a peer in the
process needs no less), headers are still capped when decoded
(:data:`tessera.transport.wire.MAX_HEADER_BYTES`) and receivers still check every
payload's length against their own shard map. The shared memory asks what
zero-copy over TCP already asks, for longer: a sender leaves a sent buffer alone
until the reply to it arrives, and a receiver does not write into a received
frame (the server copies or casts what it keeps; the worker copies replies out).
"""

from __future__ import annotations

import secrets

import zmq

#: The host that asks for the in-process transport (see the module docstring).
INPROC = "inproc"


def _bound(ctx: zmq.Context) -> set:
    """The inproc addresses bound in ``ctx`` (kept on the context itself: an inproc
    address exists only within one context)."""
    return ctx.__dict__.setdefault("_tessera_inproc_bound", set())  # atomic under the GIL


def is_inproc(address: str) -> bool:
    return address.startswith("inproc://")


def port_of(address: str) -> int:
    """The TCP port of ``address`` (0 for inproc)."""
    return 0 if is_inproc(address) else int(address.rsplit(":", 1)[1])


def bind(sock: zmq.Socket, ctx: zmq.Context, host: str, port: int = 0) -> str:
    """Bind ``sock`` where ``host`` says; returns the address peers connect to."""
    if host == INPROC:
        address = f"inproc://tessera-{secrets.token_hex(8)}"
        sock.bind(address)
        _bound(ctx).add(address)
        return address
    if port:
        sock.bind(f"tcp://{host}:{port}")
    else:
        port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"


def unbind(ctx: zmq.Context, address: str) -> None:
    """Forget an inproc address whose socket is closed (tcp: nothing to do)."""
    _bound(ctx).discard(address)


def unreachable(ctx: zmq.Context, address: str) -> str:
    """Why no socket of ``ctx`` can be reached at inproc ``address`` ("" if one can).

    ZeroMQ would accept the connect and wait for a bind that never comes, so a job
    that put ``cluster.host = "inproc"`` on separate processes would only fail at a
    timeout. (tcp addresses are left to the handshake.)
    """
    if not is_inproc(address):
        return ""
    if address not in _bound(ctx):
        return (
            f"{address} is not bound in this process's ZeroMQ context: an inproc address reaches only threads of the "
            f"one process (and ZeroMQ context) that runs the whole job (tessera run "
            f"--in-process, or python script.py without a launcher); a launched job needs a "
            f"network host (cluster.host, --host 127.0.0.1)")
    return ""
