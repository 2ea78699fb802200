"""Security: nothing is ever unpickled, CURVE when asked, and a live server that
survives hostile input.

1. A scan of every module under ``tessera/`` for deserialisers that can run code
   (pickle and kin, ``torch.load`` without ``weights_only=True``, ...).
2. CURVE endpoints (``"curve:"`` secrets) on real sockets: they talk, the
   traffic and the secret are not readable on the wire (a TCP relay records the
   bytes), and every other key or mechanism is refused fast.
3. A parameter server in a process of its own (``tests/scripts/lone_server.py``)
   takes 2,000 hypothesis-generated malformed or hostile messages (hypothesis
   shrinks a failure to its smallest case) through real, authenticated DEALER
   sockets, frames above its size limit, and dozens of connections with wrong
   secrets. Every malformed message is answered with a ``wire.Error``; afterwards
   the values are the initial ones, nothing was applied, and its memory did not grow.
4. The production configuration: the server of a whole ``tessera run --encrypt``
   job in sync mode with nine embedding tables, under the frame limits the job
   sets, takes 10,000 seeded hostile messages (dense and table requests) while its
   worker is stopped; each is refused with an ``Error``, a frame one byte over the
   256 MiB limit is never read, a message of one frame over ``MAX_FRAMES`` is
   refused; its dense values and every table row read back bit for bit the same,
   its memory stays within 100 MiB, and the job then finishes.
"""

from __future__ import annotations

import ast
import json
import math
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from zmq.utils.monitor import recv_monitor_message

from tessera.transport import wire
from tessera.transport.endpoint import (CLIENT_MAX_FRAME_BYTES, MAX_FRAMES, RCV_HWM, AuthRefused,
                                        ClientEndpoint, ServerEndpoint, TransportError, _keys,
                                        close_context)
from tests.scripts.lone_server import initial_values

ROOT = Path(__file__).resolve().parents[1]
PLAIN_SECRET = "9c" * 32
CURVE_SECRET = "curve:" + "5e" * 32
OTHER_CURVE_SECRET = "curve:" + "a1" * 32
#: Only failing tests wait this long; generous because the machine may be busy.
TIMEOUT_S = 10.0
#: A refusal must come well before any timeout a caller would set.
FAST_S = 3.0


# ------------------------------------------------------------------- 1. no pickle

#: Modules whose loading runs code chosen by whoever wrote the bytes.
BANNED_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "marshal", "shelve",
                  "joblib"}
BANNED_METHODS = {"recv_pyobj", "send_pyobj", "read_pickle", "to_pickle",
                  # torch.distributed's object collectives pickle and unpickle
                  "send_object_list", "recv_object_list", "broadcast_object_list",
                  "all_gather_object", "gather_object", "scatter_object_list"}
#: The run-time guard (tessera/config/nopickle.py) imports pickle to disable its loaders.
GUARD = "tessera/config/nopickle.py"
BANNED_CALLS = {"yaml.load": "use yaml.safe_load", "yaml.load_all": "use yaml.safe_load_all",
                "yaml.unsafe_load": "use yaml.safe_load", "yaml.full_load": "use yaml.safe_load"}


def pickle_findings(source: str, filename: str) -> list[str]:
    """``file:line: what`` for every use of a code-running deserialiser in ``source``."""
    tree = ast.parse(source, filename)
    aliases: dict[str, str] = {}  # local name -> dotted origin ("np" -> "numpy")
    found = []

    def report(node, what):
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] in BANNED_MODULES:
                    report(node, f"import {a.name}")
                top = a.name.split(".")[0]
                aliases[a.asname or top] = a.name if a.asname else top
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if mod.split(".")[0] in BANNED_MODULES:
                report(node, f"from {mod} import ...")
            for a in node.names:
                if a.name in BANNED_MODULES:
                    report(node, f"from {mod} import {a.name}")
                aliases[a.asname or a.name] = f"{mod}.{a.name}"

    def dotted(expr) -> str:
        parts = []
        while isinstance(expr, ast.Attribute):
            parts.append(expr.attr)
            expr = expr.value
        if not isinstance(expr, ast.Name):
            return ""
        parts.append(aliases.get(expr.id, expr.id))
        return ".".join(reversed(parts))

    def keyword(call, name):
        return next((k.value for k in call.keywords if k.arg == name), None)

    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        name = dotted(node.func)
        if isinstance(node.func, ast.Attribute) and node.func.attr in BANNED_METHODS:
            report(node, f"{node.func.attr}() unpickles")
        elif name in ("torch.load", "torch.serialization.load"):
            wo = keyword(node, "weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                report(node, "torch.load without weights_only=True unpickles")
        elif name in ("numpy.load", "numpy.lib.npyio.load"):
            ap = keyword(node, "allow_pickle")
            if ap is not None and not (isinstance(ap, ast.Constant) and ap.value is False):
                report(node, "numpy.load with allow_pickle unpickles")
        elif name in BANNED_CALLS:
            report(node, f"{name}: {BANNED_CALLS[name]}")
        elif name in ("__import__", "importlib.import_module") and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and str(arg.value).split(".")[0] in BANNED_MODULES:
                report(node, f"{name}({arg.value!r})")
    return found


def test_scanner_catches_each_banned_use():
    bad = "\n".join([
        "import pickle", "import cPickle as cp", "from dill import loads", "import marshal",
        "import shelve", "import torch as T", "import numpy as np", "import yaml",
        "from torch import load", "sock.recv_pyobj()", "sock.send_pyobj(x)", "T.load(f)",
        "load(f, weights_only=False)", "np.load(f, allow_pickle=True)", "yaml.load(s)",
        "__import__('pickle')", "dist.recv_object_list(objs, src=0)",
    ])
    found = pickle_findings(bad, "bad.py")
    lines = [int(f.split(":")[1]) for f in found]
    assert lines == [1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, 16, 17], found
    good = ("import torch\nimport numpy as np\nimport yaml\ntorch.load(f, weights_only=True)\n"
            "np.load(f)\nnp.load(f, allow_pickle=False)\nyaml.safe_load(s)\n"
            "'''pickle is never used'''  # import pickle\n")
    assert pickle_findings(good, "good.py") == []


def test_no_module_uses_pickle():
    files = sorted((ROOT / "tessera").rglob("*.py"))
    assert len(files) > 20
    found = []
    for path in files:
        name = str(path.relative_to(ROOT))
        found += [f for f in pickle_findings(path.read_text(), name)
                  if not (name == GUARD and f.endswith(": import pickle"))]
    for line in found:
        print(line)
    assert not found, "code-running deserialisers in tessera/:\n" + "\n".join(found)


# ------------------------------------------------------------------- 2. CURVE


class Relay:
    """A TCP relay on loopback that records every byte passing through it, both ways."""

    def __init__(self, target_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.target = target_port
        self.seen = bytearray()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pairs: dict[socket.socket, socket.socket] = {}
        while not self._stop:
            readable, _, _ = select.select([self.listener, *pairs], [], [], 0.05)
            for s in readable:
                if s is self.listener:
                    a, _ = s.accept()
                    b = socket.create_connection(("127.0.0.1", self.target))
                    pairs[a], pairs[b] = b, a
                    continue
                if s not in pairs:  # its other end closed earlier in this pass
                    continue
                try:
                    data = s.recv(1 << 16)
                except OSError:
                    data = b""
                if not data:
                    other = pairs.pop(s)
                    pairs.pop(other, None)
                    s.close()
                    other.close()
                    continue
                self.seen += data
                pairs[s].sendall(data)
        for s in pairs:
            s.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=5)
        self.listener.close()


def _exchange(ctx, secret: str) -> tuple[ServerEndpoint, ClientEndpoint, bytes]:
    """A request with a recognisable payload and the server's answer, through a Relay:
    the endpoints, and the bytes that crossed the wire."""
    server = ServerEndpoint(ctx, "127.0.0.1", secret)
    relay = Relay(server.port)
    client = ClientEndpoint(ctx, f"tcp://127.0.0.1:{relay.port}", secret, "server 0",
                            sndtimeo_s=TIMEOUT_S)
    try:
        client.wait_connected(TIMEOUT_S)
        marker = b"TESSERA-PLAINTEXT-MARKER-" * 8
        client.send(wire.InitParams(req=7, partitions=[3]), [marker])
        assert server.poll(TIMEOUT_S)
        got = server.recv()
        assert isinstance(got.msg, wire.InitParams) and got.msg.req == 7
        assert bytes(got.frames[0].buffer) == marker
        server.send(got.peer, wire.Error(req=7, message="MARKER-REPLY-" * 4))
        reply, _ = client.wait(7, TIMEOUT_S, "the marker request")
        assert isinstance(reply, wire.Error) and reply.message.startswith("MARKER-REPLY-")
        return server, client, bytes(relay.seen)
    finally:
        relay.close()


def test_curve_endpoints_talk_encrypted(ctx):
    server, client, seen = _exchange(ctx, CURVE_SECRET)
    assert server.sock.mechanism == zmq.CURVE
    assert client.sock.mechanism == zmq.CURVE
    assert b"CURVE" in seen[:64]  # the ZMTP greeting names the mechanism
    for plaintext in (b"TESSERA-PLAINTEXT-MARKER", b"MARKER-REPLY", b"InitParams",
                      CURVE_SECRET.encode(), CURVE_SECRET[6:].encode()):
        assert plaintext not in seen, f"{plaintext!r} crossed the wire in the clear"
    client.close()
    server.close()


def test_plain_endpoints_still_send_in_the_clear(ctx):
    """The control for the test above: the relay does see PLAIN traffic."""
    server, client, seen = _exchange(ctx, PLAIN_SECRET)
    assert server.sock.mechanism == zmq.PLAIN
    assert b"TESSERA-PLAINTEXT-MARKER" in seen and PLAIN_SECRET.encode() in seen
    client.close()
    server.close()


@pytest.mark.parametrize("secret, why", [
    (OTHER_CURVE_SECRET, "hung up during the CURVE handshake"),
    (CURVE_SECRET[6:], "another security mechanism"),  # the same hex, PLAIN
    (PLAIN_SECRET, "another security mechanism"),
], ids=["other-curve-secret", "same-hex-plain", "plain-secret"])
def test_curve_server_refuses_other_secrets_fast(ctx, secret, why):
    server = ServerEndpoint(ctx, "127.0.0.1", CURVE_SECRET)
    intruder = ClientEndpoint(ctx, server.address, secret, "server 3", sndtimeo_s=1)
    t0 = time.monotonic()
    with pytest.raises(AuthRefused, match=f"server 3 \\(tcp://127.0.0.1:{server.port}\\).*{why}"):
        intruder.wait_connected(TIMEOUT_S)
    assert time.monotonic() - t0 < FAST_S
    try:  # nothing it sends reaches the server
        intruder.sock.send(wire.encode(wire.Pull(req=1, worker=0, partitions=[0])), zmq.NOBLOCK)
    except zmq.Again:
        pass
    assert not server.poll(0.3)
    intruder.close()
    server.close()


def test_curve_client_refused_by_plain_server(ctx):
    server = ServerEndpoint(ctx, "127.0.0.1", PLAIN_SECRET)
    intruder = ClientEndpoint(ctx, server.address, "curve:" + PLAIN_SECRET, "server 0")
    with pytest.raises(AuthRefused, match="another security mechanism than our CURVE"):
        intruder.wait_connected(TIMEOUT_S)
    intruder.close()
    server.close()


def test_curve_zap_accepts_only_the_job_client_key(ctx):
    """A client that knows the server's public key (it is public) but has its own
    keypair is refused by the ZAP handler, not let in by CURVE alone."""
    server = ServerEndpoint(ctx, "127.0.0.1", CURVE_SECRET)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = _keys(CURVE_SECRET).server_public
    sock.curve_publickey, sock.curve_secretkey = public, secret
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_FAILED_AUTH
                                      | zmq.EVENT_HANDSHAKE_SUCCEEDED)
    sock.connect(server.address)
    assert monitor.poll(int(TIMEOUT_S * 1000))
    assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_FAILED_AUTH
    sock.disable_monitor()
    monitor.close(linger=0)
    sock.close(linger=0)
    assert not server.poll(0.1)
    server.close()


def test_one_context_serves_secrets_apart(ctx):
    """The ZAP handler is per context, its configuration per secret: endpoints of
    different secrets in one context each admit only their own clients."""
    servers = {s: ServerEndpoint(ctx, "127.0.0.1", s)
               for s in (PLAIN_SECRET, "0f" * 32, CURVE_SECRET, OTHER_CURVE_SECRET)}
    for s, server in servers.items():
        for other in servers:
            client = ClientEndpoint(ctx, server.address, other, "server 0")
            if other == s:
                client.wait_connected(TIMEOUT_S)
            else:
                with pytest.raises(AuthRefused):
                    client.wait_connected(TIMEOUT_S)
            client.close()
    for server in servers.values():
        server.close()


def test_closing_a_context_ends_its_zap_handler():
    """Whoever owns a context that served (a job's session, the coordinator, an
    in-process cluster) closes it with close_context: the ZAP handler thread ends
    first. Destroying the context under it closed the sockets it polls: the thread
    stayed alive, one per context, and now and then died with a ZMQError."""
    from zmq.auth.thread import AuthenticationThread

    def handlers() -> set:
        return {t for t in threading.enumerate() if isinstance(t, AuthenticationThread)}
    died, hook = [], threading.excepthook
    threading.excepthook = died.append
    try:
        for secret in (PLAIN_SECRET, CURVE_SECRET) * 4:
            before = handlers()
            ctx = zmq.Context()
            server = ServerEndpoint(ctx, "127.0.0.1", secret)
            client = ClientEndpoint(ctx, server.address, secret, "server 0",
                                    sndtimeo_s=TIMEOUT_S)
            client.wait_connected(TIMEOUT_S)  # the handler answered for this peer
            assert handlers() - before, "no ZAP handler ran"
            client.close()
            server.close()
            t0 = time.monotonic()
            close_context(ctx)
            assert time.monotonic() - t0 < FAST_S
            assert not handlers() - before, "the ZAP handler outlived its context"
    finally:
        threading.excepthook = hook
    assert not died, [f"{d.thread.name}: {d.exc_value!r}" for d in died]


@pytest.mark.parametrize("secret", ["", "curve:"])
def test_empty_secret_is_named(ctx, secret):
    with pytest.raises(TransportError, match="secret is empty"):
        ServerEndpoint(ctx, "127.0.0.1", secret)
    with pytest.raises(TransportError, match="secret is empty"):
        ClientEndpoint(ctx, "tcp://127.0.0.1:9", secret, "server 0")


def test_client_max_frame_bytes_drops_oversize_replies(ctx):
    server = ServerEndpoint(ctx, "127.0.0.1", CURVE_SECRET)
    client = ClientEndpoint(ctx, server.address, CURVE_SECRET, "server 0", max_frame_bytes=1000)
    assert client.sock.getsockopt(zmq.MAXMSGSIZE) == 1000
    client.wait_connected(TIMEOUT_S)
    for req, size in ((1, 900), (2, 5000)):
        client.send(wire.Pull(req=req, worker=0, partitions=[0]))
        assert server.poll(TIMEOUT_S)
        got = server.recv()
        server.send(got.peer, wire.Params(req=req, partitions=[0], clock=0), [bytes(size)])
    _, frames = client.wait(1, TIMEOUT_S, "the small reply")
    assert len(frames[0]) == 900
    t0 = time.monotonic()
    # The 5000-byte frame was refused, never delivered; ZeroMQ never re-makes a
    # connection it broke off on a protocol error, so the wait fails at once, and so
    # does the next send, naming the server and the limit.
    with pytest.raises(TransportError, match=r"server 0 .* closed for good .* limit of 1000 bytes"):
        client.wait(2, TIMEOUT_S, "the oversize reply")
    assert time.monotonic() - t0 < FAST_S
    with pytest.raises(TransportError, match="closed for good while sending Pull"):
        client.send(wire.Pull(req=3, worker=0, partitions=[0]))
    client.close()
    server.close()


def _pair(ctx, secret: str = CURVE_SECRET, **client):
    server = ServerEndpoint(ctx, "127.0.0.1", secret, max_frame_bytes=1 << 20)
    client = ClientEndpoint(ctx, server.address, secret, "server 0", sndtimeo_s=TIMEOUT_S,
                            **client)
    client.wait_connected(TIMEOUT_S)
    return server, client


def _take(server: ServerEndpoint):
    assert server.poll(TIMEOUT_S)
    return server.recv()


def test_every_socket_is_bounded(ctx):
    server, client = _pair(ctx)
    for sock in (server.sock, client.sock):
        assert sock.getsockopt(zmq.RCVHWM) == RCV_HWM
    assert server.sock.getsockopt(zmq.MAXMSGSIZE) == 1 << 20
    assert client.sock.getsockopt(zmq.MAXMSGSIZE) == CLIENT_MAX_FRAME_BYTES
    client.close()
    server.close()


def test_too_many_frames_refused_both_ways(ctx):
    server, client = _pair(ctx)
    # A server takes the message frame by frame and refuses it, echoing its req.
    client.sock.send_multipart([wire.encode(wire.Pull(req=9, worker=0, partitions=[0])),
                                *[b"x"] * (MAX_FRAMES + 3)])
    got = _take(server)
    assert got.msg is None and got.req == 9 and got.frames == []
    assert f"{MAX_FRAMES + 3} payload frames exceeds the limit of {MAX_FRAMES}" in got.error
    # A client refuses to send one, in one line naming the server and what to do.
    with pytest.raises(TransportError, match=r"cannot send Push to server 0 .*--partition-mb"):
        client.send(wire.Push(req=1, worker=0, seq=1, clock=0, partitions=[0]),
                    [b""] * (MAX_FRAMES + 1))
    # A client receiving one raises naming the server.
    client.send(wire.Pull(req=2, worker=0, partitions=[0]))
    got = _take(server)
    server.sock.send_multipart([got.peer, wire.encode(wire.Ack(req=2)), *[b""] * (MAX_FRAMES + 1)])
    with pytest.raises(TransportError, match=r"server 0 .* malformed reply: .*limit of 65536"):
        client.wait(2, TIMEOUT_S, "the pull")
    client.close()
    server.close()


def test_server_send_errors_reach_the_peer_at_once(ctx, capfd):
    server, client = _pair(ctx)
    # A reply that cannot go out as it is goes out as an Error with its req.
    bad_replies = [
        (wire.Params(req=1, partitions=[0], clock=0), [object()]),       # not a buffer
        (wire.Params(req=2, partitions=[0], clock=2 ** 70), []),          # does not encode
        (wire.Params(req=3, partitions=[0], clock=0), [b""] * (MAX_FRAMES + 1)),
    ]
    for reply, frames in bad_replies:
        client.send(wire.Pull(req=reply.req, worker=0, partitions=[0]))
        got = _take(server)
        t0 = time.monotonic()
        assert server.send(got.peer, reply, frames)
        msg, frames_back = client.wait(reply.req, TIMEOUT_S, "the pull")
        assert time.monotonic() - t0 < FAST_S
        assert isinstance(msg, wire.Error) and frames_back == [], msg
        assert "Params reply could not be" in msg.message or "frames" in msg.message, msg
    # A peer that is gone: no reply possible; send says so and the log has one line.
    client.send(wire.Pull(req=4, worker=0, partitions=[0]))
    got = _take(server)
    client.close()
    time.sleep(0.3)
    assert server.send(got.peer, wire.Ack(req=4)) is False
    assert server.undelivered == 1
    err = capfd.readouterr().err
    assert "could not deliver a Ack reply (req 4)" in err and "it disconnected" in err, err
    server.close()


def test_client_send_errors_name_the_server(ctx):
    server, client = _pair(ctx)
    with pytest.raises(TransportError, match=r"cannot send Ack to server 0 \(tcp://.*encode"):
        client.send(wire.Ack(req=2 ** 70))
    with pytest.raises(TransportError, match=r"cannot send Pull to server 0 "):
        client.send(wire.Pull(req=1, worker=0, partitions=[0]), [object()])
    client.close()
    server.close()


def test_client_fails_fast_when_the_server_drops_its_request(ctx):
    """A request with a frame over the server's limit: the server breaks the connection
    off (never reading the frame) and ZeroMQ re-makes it; the request is lost, and the
    client says so in seconds, not at its timeout."""
    server, client = _pair(ctx)
    client.send(wire.Push(req=1, worker=0, seq=1, clock=0, partitions=[0]), [bytes(2 << 20)])
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"server 0 .* dropped our connection while the "
                                             r"push was unanswered .* request was lost"):
        client.wait(1, 30, "the push")
    assert time.monotonic() - t0 < FAST_S + 2
    # The connection was re-made: the next request is answered.
    client.send(wire.Pull(req=2, worker=0, partitions=[0]))
    got = _take(server)
    server.send(got.peer, wire.Ack(req=2))
    assert isinstance(client.wait(2, TIMEOUT_S, "the pull")[0], wire.Ack)
    client.close()
    server.close()


def test_error_without_req_fails_the_waiting_client(ctx):
    """A server that could not read a message answers Error with req 0: the client
    raises at once instead of waiting for a reply that will never come."""
    server, client = _pair(ctx, secret=PLAIN_SECRET)
    client.sock.send_multipart([b"\xc1 not msgpack"])
    got = _take(server)
    assert got.msg is None and got.req == 0
    server.send(got.peer, wire.Error(req=0, message=f"server 0: {got.error}"))
    t0 = time.monotonic()
    with pytest.raises(TransportError, match=r"server 0 .* could not read a message of ours: "
                                             r"server 0: malformed header"):
        client.wait(5, TIMEOUT_S, "the pull")
    assert time.monotonic() - t0 < FAST_S
    client.close()
    server.close()


# ------------------------------------------------- 3. a live server under attack

PARTITIONS, ELEMS, SEED = 2, 1000, 1234
#: The lone server's ZMQ_MAXMSGSIZE: above a partition (4000 bytes) and any honest header.
MAX_FRAME = 64 << 10
BATCH = 50
MIN_MESSAGES = 2_000  # the whole-job fuzz below sends 10,000
#: A partition id no server holds.
FOREIGN = 1_000_003
#: Every op the wire knows, and every field name any message has (kept in step with wire.py).
MESSAGE_TYPES = typing.get_args(wire.Message)
OPS = [t.__struct_config__.tag for t in MESSAGE_TYPES]
FIELDS = sorted({f for t in MESSAGE_TYPES for f in t.__struct_fields__})
#: Int-typed fields (the rest get arbitrary msgpack values).
INT_FIELDS = {"req", "worker", "seq", "clock", "rank", "pid", "incarnation", "pushes", "nbytes",
              "t0_ns", "sent_ns", "checkpoint", "samples"}


class LoneServer:
    """tests/scripts/lone_server.py as a child process: address, pid, memory, stop."""

    def __init__(self, tmp: Path):
        addr_file = tmp / "address"
        # stderr to a file: a pipe nobody reads while the test runs could fill and block it.
        self.err_path = tmp / "lone_server.err"
        self._err = self.err_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "scripts" / "lone_server.py"), str(addr_file),
             "--partitions", str(PARTITIONS), "--elems", str(ELEMS), "--seed", str(SEED),
             "--workers", "2", "--mode", "async", "--max-frame-bytes", str(MAX_FRAME)],
            cwd=ROOT, env=dict(os.environ, TESSERA_SECRET=PLAIN_SECRET), stdout=subprocess.PIPE,
            stderr=self._err, text=True, start_new_session=True)
        deadline = time.monotonic() + 60
        while not addr_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"lone server did not start:\n{self.stderr()}")
            time.sleep(0.05)
        self.address = addr_file.read_text()

    def memory_kb(self) -> dict[str, int]:
        with open(f"/proc/{self.proc.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}

    def alive_or_fail(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"lone server died (exit {self.proc.returncode}):\n"
                                 f"{self.stderr()}")

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, (f"lone server exited {self.proc.returncode}:\n"
                                           f"{self.stderr()}")
        return json.loads(out.strip().splitlines()[-1])

    def stderr(self) -> str:
        return self.err_path.read_text()[-4000:]

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        if self.proc.stdout:
            self.proc.stdout.close()
        self._err.close()


@pytest.fixture
def lone_server(tmp_path):
    server = LoneServer(tmp_path)
    try:
        yield server
    finally:
        server.kill()


@dataclass
class Case:
    """One hostile message and the ``req`` its Error reply must echo."""

    kind: str
    header: bytes
    frames: list
    req: int

    def __repr__(self) -> str:
        return (f"Case({self.kind}, header={self.header[:120]!r}, "
                f"frames={[len(f) for f in self.frames][:8]}, req={self.req})")


def _expected_req(header: bytes) -> int:
    """The req an Error reply echoes: the message's own, or 0 if it does not decode."""
    try:
        return wire.decode(header).req
    except wire.WireError:
        return 0


def _payload(n: int) -> bytes:
    return bytes(n)


ints = st.one_of(st.integers(-3, 5), st.integers(-2 ** 63, 2 ** 64 - 1))
reqs = st.integers(-2 ** 63, 2 ** 64 - 1)
msgpack_values = st.recursive(
    st.none() | st.booleans() | ints | st.floats() | st.text(max_size=8) | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                 max_size=3),
    max_leaves=4)
small_frames = st.lists(st.binary(max_size=12), max_size=3)
good_parts = st.sampled_from([[0], [1], [0, 1], [1, 0]])
bad_dtypes = st.sampled_from(["float64", "int8", "int64", "uint8", "bool", "", "Float32",
                              "float32\x00", "<f4", "object"]) | st.text(max_size=6).filter(
    lambda s: s not in wire.WIRE_DTYPES)
valid_dtype = st.sampled_from(wire.WIRE_DTYPES)
request_kinds = st.sampled_from(("Push", "Pull", "InitParams"))
push_defects = st.sampled_from(("worker", "seq", "clock", "scale"))


def _frames_for(parts: list[int], dtype: str) -> list[bytes]:
    return [_payload(ELEMS * (2 if dtype != "float32" else 4)) for _ in parts]


@st.composite
def junk(draw):
    header = draw(st.binary(max_size=80))
    return Case("junk", header, draw(small_frames), _expected_req(header))


any_op = st.sampled_from(OPS) | st.text(max_size=10)
field_names = st.lists(st.sampled_from(FIELDS), max_size=6, unique=True)
made_up_op = st.text(max_size=12).filter(lambda s: s not in OPS)


@st.composite
def wrong_shape(draw):
    """msgpack that is not a Tessera message: random values, or dicts with real or
    made-up ops and random fields. A dict that happens to decode into a request
    names a partition nobody holds, so the server refuses it whatever else it says."""
    if draw(st.booleans()):
        value = draw(msgpack_values)
    else:
        value = {"op": draw(any_op)}
        for name in draw(field_names):
            value[name] = draw(ints if name in INT_FIELDS else msgpack_values)
        if isinstance(value.get("partitions"), list):
            value["partitions"].append(FOREIGN)
    header = msgspec.msgpack.encode(value)
    return Case("wrong-shape", header, draw(small_frames), _expected_req(header))


@st.composite
def unknown_op(draw):
    op = draw(made_up_op)
    header = msgspec.msgpack.encode({"op": op, "req": draw(reqs), "partitions": [0]})
    return Case("unknown-op", header, [], 0)


@st.composite
def wrong_dtype(draw):
    parts, dtype = draw(good_parts), draw(bad_dtypes)
    req = draw(reqs)
    kind = draw(request_kinds)
    fields = {"op": kind, "req": req, "partitions": parts, "dtype": dtype}
    if kind == "Push":
        fields.update(worker=0, seq=draw(st.integers(0, 10)), clock=0)
    if kind == "Pull":
        fields.update(worker=0)
    frames = [] if kind == "Pull" else [_payload(ELEMS * 4) for _ in parts]
    return Case("wrong-dtype", msgspec.msgpack.encode(fields), frames, 0)


def _lying_lengths(expected: int):
    """Frame lengths of which at least one, or the count, does not match."""
    return st.lists(st.integers(0, 3 * expected) | st.sampled_from(
        [expected - 1, expected + 1, expected // 2, 2 * expected]), max_size=4)


#: Built once: hypothesis validates a strategy the first time it draws from it.
lying_lengths = {4000: _lying_lengths(ELEMS * 4), 2000: _lying_lengths(ELEMS * 2)}
bad_ids = st.one_of(
    st.just([]),
    st.lists(st.integers(-2 ** 63, -1) | st.integers(2, 2 ** 64 - 1), min_size=1, max_size=3),
    st.sampled_from([[0, 0], [1, 1], [0, 1, 0]]),
    st.tuples(st.lists(st.integers(0, 1), max_size=2, unique=True),
              st.integers(2, 2 ** 64 - 1)).map(lambda t: t[0] + [t[1]]),
)
bad_workers = st.integers(-2 ** 63, -1) | st.integers(2, 2 ** 64 - 1)
bad_scales = st.floats(max_value=0.0) | st.just(math.nan)
negative = st.integers(-2 ** 63, -1)


@st.composite
def lying_sizes(draw):
    """Payload frames whose lengths do not match the partitions, or whose count does not."""
    parts, dtype = draw(good_parts), draw(valid_dtype)
    expected = ELEMS * (4 if dtype == "float32" else 2)
    lengths = draw(lying_lengths[expected])
    if len(lengths) == len(parts) and all(n == expected for n in lengths):
        lengths.append(expected)  # one frame too many
    req = draw(reqs)
    if draw(st.booleans()):
        msg = wire.Push(req=req, worker=draw(st.integers(0, 1)), seq=draw(st.integers(0, 99)),
                        clock=draw(st.integers(0, 5)), partitions=parts, dtype=dtype)
    else:
        msg = wire.InitParams(req=req, partitions=parts, dtype=dtype)
    return Case("lying-sizes", wire.encode(msg), [_payload(n) for n in lengths], req)


@st.composite
def bad_partitions(draw):
    ids = draw(bad_ids)
    req, dtype = draw(reqs), draw(valid_dtype)
    kind = draw(request_kinds)
    if kind == "Pull":
        msg, frames = wire.Pull(req=req, worker=0, partitions=ids, dtype=dtype), []
    elif kind == "Push":
        msg = wire.Push(req=req, worker=0, seq=draw(st.integers(0, 99)), clock=0, partitions=ids,
                        dtype=dtype)
        frames = _frames_for(ids, dtype)
    else:
        msg, frames = wire.InitParams(req=req, partitions=ids, dtype=dtype), _frames_for(ids, dtype)
    return Case("bad-partitions", wire.encode(msg), frames, req)


@st.composite
def too_many_frames(draw):
    req, parts = draw(reqs), draw(good_parts)
    count = draw(st.integers(len(parts) + 1, 2000))
    if draw(st.booleans()):
        msg = wire.Pull(req=req, worker=1, partitions=parts)
        frames = [_payload(draw(st.integers(0, 8)))] * min(count, 2000)
    else:
        msg = wire.Push(req=req, worker=1, seq=3, clock=0, partitions=parts)
        frames = [_payload(ELEMS * 4)] * min(count, 50)
    return Case("too-many-frames", wire.encode(msg), frames, req)


@st.composite
def bad_push_fields(draw):
    """A push with the right partitions and frames but one field out of bounds."""
    parts, dtype, req = draw(good_parts), draw(valid_dtype), draw(reqs)
    worker, seq, scale = draw(st.integers(0, 1)), draw(st.integers(0, 99)), 1.0
    clock = draw(st.integers(0, 9))
    which = draw(push_defects)
    if which == "worker":
        worker = draw(bad_workers)
    elif which == "seq":
        seq = draw(negative)
    elif which == "clock":
        clock = draw(negative)
    else:
        scale = draw(bad_scales)
    msg = wire.Push(req=req, worker=worker, seq=seq, clock=clock, partitions=parts, dtype=dtype,
                    scale=scale)
    return Case(f"bad-push-{which}", wire.encode(msg), _frames_for(parts, dtype), req)


@st.composite
def bad_join(draw):
    """A restarted worker's Join naming partitions it cannot have, or a worker not in the job."""
    req, dtype = draw(reqs), draw(valid_dtype)
    if draw(st.booleans()):
        ids, worker = draw(bad_ids), draw(st.integers(0, 1))
    else:
        ids, worker = draw(good_parts), draw(bad_workers)
    msg = wire.Join(req=req, worker=worker, incarnation=draw(ints), clock=draw(ints),
                    partitions=ids, dtype=dtype)
    return Case("bad-join", wire.encode(msg), [], req)


replicate_kinds = st.sampled_from(("init", "grad", "batch")) | st.text(max_size=6)


@st.composite
def stray_replicate(draw):
    """Replication from a peer that is not our primary: this server backs nobody up."""
    req = draw(reqs)
    ids = draw(good_parts | bad_ids)
    kind = draw(replicate_kinds)
    updates = [wire.ReplicaUpdate(kind=draw(st.sampled_from(("init", "grad", "sum", "x"))),
                                  partition=p, clock=draw(ints), pushes=draw(ints),
                                  worker=draw(ints), seq=draw(ints))
               for p in ids] if kind == "batch" else []
    msg = wire.Replicate(req=req, kind=kind, partitions=ids, clock=draw(ints),
                         pushes=draw(ints), worker=draw(ints), seq=draw(ints), updates=updates)
    frames = [_payload(n) for n in draw(lying_lengths[ELEMS * 4])] or [_payload(ELEMS * 4)]
    return Case("stray-replicate", wire.encode(msg), frames, req)


#: Well-formed messages that a parameter server does not serve, by req.
NOT_SERVED = (
    lambda req: wire.Heartbeat(req=req, role="worker", rank=0),
    lambda req: wire.Ack(req=req),
    lambda req: wire.Error(req=req, message="x"),
    lambda req: wire.TimeSync(req=req, t0_ns=1),
    lambda req: wire.Finished(req=req, role="worker", rank=0, stats={}),
    lambda req: wire.Register(req=req, role="server", rank=0, host="h", pid=1),
    lambda req: wire.HeartbeatAck(req=req, state="running"),
    lambda req: wire.Params(req=req, partitions=[0], clock=0),
    lambda req: wire.PullRows(req=req, worker=0, table="t"),
    lambda req: wire.PushRows(req=req, worker=0, seq=0, clock=0, table="t"),
    lambda req: wire.Departed(req=req, role="worker", rank=0, reason="x"),
    lambda req: wire.CheckpointNow(req=req),
    lambda req: wire.CheckpointSaved(req=req, rank=0, clock=0, file="/etc/passwd", nbytes=1),
)
not_served_makers = st.sampled_from(NOT_SERVED)


@st.composite
def not_served(draw):
    req = draw(reqs)
    msg = draw(not_served_makers)(req)
    return Case("not-served", wire.encode(msg), draw(small_frames), req)


hostile = st.one_of(junk(), wrong_shape(), unknown_op(), wrong_dtype(), lying_sizes(),
                    bad_partitions(), too_many_frames(), bad_push_fields(), bad_join(),
                    stray_replicate(), not_served())


def _connect(ctx, address: str, secret: str = PLAIN_SECRET) -> ClientEndpoint:
    ep = ClientEndpoint(ctx, address, secret, "lone server", sndtimeo_s=TIMEOUT_S)
    ep.wait_connected(TIMEOUT_S)
    return ep


def _send_batch(ctx, server: LoneServer, cases: list[Case]) -> None:
    """Send the batch over one fresh socket; every message must be answered, in order,
    with an Error echoing its req."""
    ep = _connect(ctx, server.address)
    try:
        for case in cases:
            ep.sock.send_multipart([case.header, *case.frames])
        for i, case in enumerate(cases):
            if not ep.sock.poll(int(TIMEOUT_S * 1000)):
                server.alive_or_fail()
                raise AssertionError(f"no reply to message {i} of the batch: {case!r}")
            parts = ep.sock.recv_multipart()
            reply = wire.decode(parts[0])
            assert isinstance(reply, wire.Error), f"{case!r} was answered with {reply!r}"
            assert reply.req == case.req, f"{case!r}: reply {reply!r}"
            assert reply.message.startswith("server 0: ") and len(parts) == 1
    finally:
        ep.close()


def _oversize_disconnects(ctx, server: LoneServer, frames: list[bytes]) -> None:
    """A message with a frame above the server's ZMQ_MAXMSGSIZE: the server drops the
    connection (it never allocates the frame) and answers nothing."""
    sock = ctx.socket(zmq.DEALER)  # by hand: its monitor must also watch disconnects
    sock.linger = 0
    sock.plain_username, sock.plain_password = b"tessera", PLAIN_SECRET.encode()
    assert_oversize_sender_cut(sock, server.address, frames, TIMEOUT_S, "the lone server")


def _pull_all(ctx, server: LoneServer) -> np.ndarray:
    ep = _connect(ctx, server.address)
    try:
        msg, frames = ep.request(wire.Pull(req=ep.new_req(), worker=0, partitions=[0, 1]),
                                 timeout_s=TIMEOUT_S)
        assert isinstance(msg, wire.Params) and msg.partitions == [0, 1], msg
        return np.concatenate([np.frombuffer(f.buffer, dtype=np.float32) for f in frames])
    finally:
        ep.close()


def test_live_server_survives_hostile_messages(lone_server):
    server = lone_server
    ctx = zmq.Context()
    before = server.memory_kb()
    t0 = time.monotonic()
    counts: dict[str, int] = {}

    @settings(max_examples=MIN_MESSAGES // BATCH + 10, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(hostile, min_size=BATCH, max_size=BATCH))
    def answered_with_errors(cases):
        _send_batch(ctx, server, cases)
        for case in cases:
            counts[case.kind] = counts.get(case.kind, 0) + 1

    @settings(max_examples=6, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(size=st.integers(MAX_FRAME + 1, 16 * MAX_FRAME), position=st.integers(0, 2))
    def oversize_dropped(size, position):
        header = wire.encode(wire.Push(req=1, worker=0, seq=1, clock=0, partitions=[0]))
        frames = [header, _payload(ELEMS * 4), _payload(8)]
        frames[position] = _payload(size)
        _oversize_disconnects(ctx, server, frames)
        counts["oversize"] = counts.get("oversize", 0) + 1

    try:
        answered_with_errors()
        fuzz_s = time.monotonic() - t0
        oversize_dropped()
        _oversize_disconnects(ctx, server, [_payload(256 << 20)])  # 256 MiB: never allocated
        counts["oversize"] += 1
        refused = 0
        for i in range(36):  # wrong secrets: PLAIN near-misses, and CURVE
            secret = [PLAIN_SECRET[:-1], PLAIN_SECRET + "0", PLAIN_SECRET.upper(), "0",
                      "curve:" + PLAIN_SECRET, f"guess-{i}"][i % 6]
            intruder = ClientEndpoint(ctx, server.address, secret, "lone server", sndtimeo_s=1)
            with pytest.raises(AuthRefused):
                intruder.wait_connected(TIMEOUT_S)
            try:
                intruder.sock.send(wire.encode(wire.Ack(req=i)), zmq.NOBLOCK)
            except zmq.Again:
                pass
            intruder.close()
            refused += 1
        server.alive_or_fail()
        values = _pull_all(ctx, server)
        after = server.memory_kb()
    finally:
        close_context(ctx)
    stats = server.stop()
    answered = sum(n for kind, n in counts.items() if kind != "oversize")
    print(f"\n{answered} hostile messages answered with errors in {fuzz_s:.1f} s; "
          f"{counts.get('oversize')} oversize dropped; {refused} wrong-secret connections refused; "
          f"by kind: {counts}; memory before {before}, after {after}, stats {stats}")
    assert answered >= MIN_MESSAGES
    assert len([k for k in counts if k != "oversize"]) >= 14  # every kind was exercised
    np.testing.assert_array_equal(values, initial_values(SEED, PARTITIONS * ELEMS))
    # Every answered message, and nothing else (not the intruders', not the oversize
    # ones), reached the server as a refusal; nothing was applied.
    assert stats["errors"] == answered
    assert (stats["pushes"], stats["updates"], stats["skipped"], stats["pulls"]) == (0, 0, 0, 1)
    assert after["VmRSS"] - before["VmRSS"] < 100 * 1024
    assert stats["vm_hwm_kb"] - before["VmHWM"] < 100 * 1024


# ------------------------------- 4. a whole job under attack (production configuration)

#: The job: MovieLens's DLRM (dense MLP on the servers, nine embedding tables) in sync
#: mode with --encrypt, one worker and one server. Long waits only: the worker is
#: stopped (SIGSTOP) while the server is attacked, and must not be declared dead.
JOB_STEPS = 16
JOB_MESSAGES = 10_000
JOB_BATCH = 100
FUZZ_SEED = 20261130
#: Every wait on the job's server: generous, as three processes share a busy machine.
JOB_WAIT_S = 60.0
#: Made-up names: no table and no op has them.
NOT_A_TABLE = ("", "users", "ITEM", "item\x00", "../item", "t" * 300)


def _job_file(tmp: Path) -> Path:
    text = (ROOT / "examples" / "movielens.toml").read_text()
    text = text.replace("[cluster]\n", "[cluster]\ntimeout_s = 120.0\nheartbeat_timeout_s = 120.0\n")
    path = tmp / "movielens_secure.toml"
    path.write_text(text)
    return path


def _proc_memory_kb(pid: int) -> dict[str, int]:
    with open(f"/proc/{pid}/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("VmRSS", "VmHWM")}


def _secret_of(pid: int) -> str:
    """The job's secret, from the environment the launcher gave its server (a test
    that plays a hostile job member needs what a member holds)."""
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return next(e.split(b"=", 1)[1].decode() for e in env if e.startswith(b"TESSERA_SECRET="))


class Hostile:
    """A seeded generator of messages a parameter server with tables must refuse, each
    with at least one defect that the server checks before it changes anything."""

    def __init__(self, seed: int, parts: dict[int, int], tables: dict[str, int],
                 workers: int):
        import random
        self.rng = random.Random(seed)
        self.parts = parts          # partition id -> elements
        self.tables = tables        # table name -> dim
        self.workers = workers
        self.kinds = [getattr(self, name) for name in sorted(vars(Hostile)) if
                      name.startswith("k_")]

    # ---------------------------------------------------------------- helpers
    def req(self) -> int:
        r = self.rng
        return r.choice([r.randint(1, 1000), r.randint(-2 ** 63, 2 ** 64 - 1)])

    def big(self) -> int:
        return self.rng.choice([self.rng.randint(-2 ** 63, -1), self.rng.randint(2, 2 ** 64 - 1)])

    def good_parts(self) -> list[int]:
        ids = list(self.parts)
        self.rng.shuffle(ids)
        return ids[:self.rng.randint(1, len(ids))]

    def bad_parts(self) -> list[int]:
        r = self.rng
        good = list(self.parts)
        return r.choice([[], [FOREIGN], [good[0], good[0]], good + [r.randint(len(good), 2 ** 40)],
                         [r.randint(-2 ** 63, -1)], [2 ** 64 - 1]])

    def frames_for(self, parts: list[int], dtype: str = "float32") -> list[bytes]:
        return [bytes(self.parts[p] * (4 if dtype == "float32" else 2)) for p in parts]

    def dtype(self) -> str:
        return self.rng.choice(wire.WIRE_DTYPES)

    def bad_dtype(self) -> str:
        return self.rng.choice(["float64", "int8", "", "Float32", "float32\x00", "<f4", "bf16"])

    def table(self) -> tuple[str, int]:
        name = self.rng.choice(sorted(self.tables))
        return name, self.tables[name]

    def ids(self, n: int) -> np.ndarray:
        return np.array(self.rng.sample(range(0, 900), n), dtype=np.int64)

    def case(self, kind: str, msg_or_header, frames=(), req=None) -> Case:
        header = msg_or_header if isinstance(msg_or_header, bytes) else wire.encode(msg_or_header)
        return Case(kind, header, list(frames), _expected_req(header) if req is None else req)

    # ---------------------------------------------------------- dense kinds
    def k_junk(self):
        r = self.rng
        return self.case("junk", r.randbytes(r.randint(0, 80)),
                         [r.randbytes(r.randint(0, 12)) for _ in range(r.randint(0, 3))])

    def k_wrong_shape(self):
        r = self.rng
        if r.random() < 0.3:
            value = r.choice([None, True, 3, -1.5, "Push", b"\x00", [1, 2], {"op": 1}])
        else:
            value = {"op": r.choice(OPS), "req": self.req()}
            for name in r.sample(FIELDS, r.randint(0, 5)):
                value[name] = r.choice([0, -1, 2 ** 64 - 1, "x", [0], None, 1.5, {"a": 1}])
            value["zz_" + r.choice(FIELDS)] = 1  # an unknown field: never a valid message
        return self.case("wrong-shape", msgspec.msgpack.encode(value))

    def k_unknown_op(self):
        op = self.rng.choice(["Pushh", "pull", "Shutdown", "Exec", "", "Rows2", "__class__"])
        return self.case("unknown-op", msgspec.msgpack.encode(
            {"op": op, "req": self.req(), "partitions": [0]}), req=0)

    def k_wrong_dtype(self):
        r, req = self.rng, self.req()
        kind = r.choice(["Push", "Pull", "InitParams", "Join", "PullRows", "PushRows"])
        fields = {"op": kind, "req": req, "dtype": self.bad_dtype()}
        if kind in ("Push", "Pull", "InitParams", "Join"):
            fields["partitions"] = self.good_parts()
        if kind in ("Push", "Pull", "Join", "PullRows", "PushRows"):
            fields["worker"] = 0
        if kind in ("Push", "PushRows"):
            fields.update(seq=r.randint(0, 9), clock=0)
        if kind == "Join":
            fields.update(incarnation=1, clock=0)
        if kind in ("PullRows", "PushRows"):
            fields["table"] = self.table()[0]
        return self.case("wrong-dtype", msgspec.msgpack.encode(fields), req=0)

    def k_lying_sizes(self):
        r, req, parts, dtype = self.rng, self.req(), self.good_parts(), self.dtype()
        frames = self.frames_for(parts, dtype)
        if r.random() < 0.5 and frames:
            i = r.randrange(len(frames))
            frames[i] = bytes(max(0, len(frames[i]) + r.choice([-1, 1, -2, 7, 4096])))
        else:
            frames = frames + [bytes(r.randint(0, 16))] if r.random() < 0.5 else frames[:-1]
        if r.random() < 0.5:
            msg = wire.Push(req=req, worker=0, seq=r.randint(0, 99), clock=r.randint(0, 5),
                            partitions=parts, dtype=dtype)
        else:
            msg = wire.InitParams(req=req, partitions=parts, dtype=dtype)
        return self.case("lying-sizes", msg, frames)

    def k_bad_partitions(self):
        r, req, ids, dtype = self.rng, self.req(), self.bad_parts(), self.dtype()
        kind = r.choice(["Pull", "Push", "InitParams"])
        frames = [bytes(self.parts.get(p, 3) * 2) for p in ids] if kind != "Pull" else []
        if kind == "Pull":
            msg = wire.Pull(req=req, worker=0, partitions=ids, dtype=dtype,
                            commit=r.choice([None, True, False]))
        elif kind == "Push":
            msg = wire.Push(req=req, worker=0, seq=r.randint(0, 99), clock=0, partitions=ids,
                            dtype=dtype)
        else:
            msg = wire.InitParams(req=req, partitions=ids, dtype=dtype)
        return self.case("bad-partitions", msg, frames)

    def k_too_many_frames(self):
        r, req, parts = self.rng, self.req(), self.good_parts()
        if r.random() < 0.5:
            msg = wire.Pull(req=req, worker=0, partitions=parts, commit=r.choice([None, True]))
            frames = [bytes(r.randint(0, 8))] * r.randint(1, 300)
        else:
            msg = wire.Push(req=req, worker=0, seq=3, clock=0, partitions=parts)
            frames = self.frames_for(parts) + [bytes(4)] * r.randint(1, 20)
        return self.case("too-many-frames", msg, frames)

    def k_bad_push_fields(self):
        r, req, parts, dtype = self.rng, self.req(), self.good_parts(), self.dtype()
        worker, seq, clock, scale = 0, r.randint(0, 99), r.randint(0, 9), 1.0
        which = r.choice(["worker", "seq", "clock", "scale"])
        if which == "worker":
            worker = r.choice([self.workers, -1, self.big()])
        elif which == "seq":
            seq = r.randint(-2 ** 63, -1)
        elif which == "clock":
            clock = r.randint(-2 ** 63, -1)
        else:
            scale = r.choice([0.0, -1.0, -math.inf, math.nan])
        msg = wire.Push(req=req, worker=worker, seq=seq, clock=clock, partitions=parts,
                        dtype=dtype, scale=scale)
        return self.case(f"bad-push-{which}", msg, self.frames_for(parts, dtype))

    def k_bad_join(self):
        r, req = self.rng, self.req()
        if r.random() < 0.5:
            ids, worker = self.bad_parts(), 0
        else:
            ids, worker = self.good_parts(), r.choice([self.workers, -1, self.big()])
        return self.case("bad-join", wire.Join(req=req, worker=worker, incarnation=r.randint(0, 9),
                                               clock=r.randint(0, 9), partitions=ids))

    def k_stray_replicate(self):
        r, req = self.rng, self.req()
        parts = self.good_parts()
        kind = r.choice(["init", "grad", "batch", "x"])
        updates = [wire.ReplicaUpdate(kind=r.choice(["init", "grad"]), partition=p,
                                      clock=r.randint(0, 9), pushes=1, worker=0,
                                      seq=r.randint(0, 9)) for p in parts] \
            if kind == "batch" else []
        msg = wire.Replicate(req=req, kind=kind, partitions=parts, clock=r.randint(0, 9),
                             pushes=1, worker=0, seq=r.randint(0, 9), updates=updates)
        return self.case("stray-replicate", msg, self.frames_for(parts))

    def k_not_served(self):
        r, req = self.rng, self.req()
        msg = r.choice(NOT_SERVED[:8] + NOT_SERVED[10:])(req)  # not the table ops: served here
        return self.case("not-served", msg)

    # ---------------------------------------------------------- table kinds
    def k_table_unknown(self):
        r, req, name = self.rng, self.req(), self.rng.choice(NOT_A_TABLE)
        ids = self.ids(r.randint(0, 4))
        kind = r.choice(["PullRows", "PushRows", "DumpRows"])
        if kind == "PullRows":
            return self.case("table-unknown", wire.PullRows(req=req, worker=0, table=name),
                             [ids.tobytes()])
        if kind == "PushRows":
            return self.case("table-unknown", wire.PushRows(
                req=req, worker=0, seq=r.randint(0, 9), clock=0, table=name),
                [ids.tobytes(), bytes(len(ids) * 4)])
        return self.case("table-unknown", wire.DumpRows(req=req, table=name))

    def k_table_bad_frames(self):
        r, req, (name, dim) = self.rng, self.req(), self.table()
        ids = self.ids(r.randint(1, 4)).tobytes()
        if r.random() < 0.5:
            frames = r.choice([[], [ids, ids], [ids[:-r.randint(1, 7)]], [ids + b"\x01"]])
            return self.case("table-bad-frames", wire.PullRows(req=req, worker=0, table=name),
                             frames)
        grads = bytes(len(ids) // 8 * dim * 4)
        frames = r.choice([[], [ids], [ids, grads, grads], [ids[:-1], grads]])
        return self.case("table-bad-frames", wire.PushRows(
            req=req, worker=0, seq=r.randint(0, 9), clock=0, table=name), frames)

    def k_table_bad_ids(self):
        r, req, (name, dim) = self.rng, self.req(), self.table()
        ids = self.ids(r.randint(0, 4))
        ids = np.append(ids, r.randint(-2 ** 63, -1)).astype(np.int64)
        r.shuffle(ids)
        if r.random() < 0.5:
            return self.case("table-bad-ids", wire.PullRows(req=req, worker=0, table=name),
                             [ids.tobytes()])
        return self.case("table-bad-ids", wire.PushRows(
            req=req, worker=0, seq=r.randint(0, 9), clock=0, table=name),
            [ids.tobytes(), bytes(len(ids) * dim * 4)])

    def k_table_bad_push(self):
        r, req, (name, dim) = self.rng, self.req(), self.table()
        n = r.randint(1, 4)
        ids, dtype = self.ids(n), self.dtype()
        grads = bytes(n * dim * (4 if dtype == "float32" else 2))
        worker, scale = 0, 1.0
        which = r.choice(["worker", "scale", "size", "duplicate", "nonfinite"])
        if which == "worker":
            worker = r.choice([self.workers, -1, self.big()])
        elif which == "scale":
            scale = r.choice([0.0, -1.0, math.nan])
        elif which == "size":
            grads = grads + bytes(r.choice([1, 2, 4, dim * 4])) if r.random() < 0.5 else grads[:-2]
        elif which == "duplicate":
            ids = np.append(ids, ids[0]).astype(np.int64)
            grads = bytes((n + 1) * dim * (4 if dtype == "float32" else 2))
        else:
            dtype = "float32"
            grads = np.full(n * dim, r.choice([math.nan, math.inf]), np.float32).tobytes()
        msg = wire.PushRows(req=req, worker=worker, seq=r.randint(0, 2 ** 40), clock=0,
                            table=name, dtype=dtype, scale=scale)
        return self.case(f"table-bad-push-{which}", msg, [ids.tobytes(), grads])

    def cases(self, n: int) -> list[Case]:
        return [self.rng.choice(self.kinds)() for _ in range(n)]


def _state(ep: ClientEndpoint, parts: list[int], tables: list[str]) -> dict:
    """Everything server 0 holds, read through the wire: dense values (a Pull at clock 0
    is answered at once) and every table's rows and ids (DumpRows)."""
    msg, frames = ep.request(wire.Pull(req=ep.new_req(), worker=0, partitions=parts),
                             timeout_s=JOB_WAIT_S)
    assert isinstance(msg, wire.Params), msg
    state = {"dense": b"".join(f.bytes for f in frames)}
    for name in tables:
        msg, frames = ep.request(wire.DumpRows(req=ep.new_req(), table=name), timeout_s=JOB_WAIT_S)
        assert isinstance(msg, wire.Rows), msg
        state[name] = (frames[0].bytes, frames[1].bytes)
    return state


def _settled_state(ep: ClientEndpoint, parts: list[int], tables: list[str]) -> dict:
    state, deadline = _state(ep, parts, tables), time.monotonic() + JOB_WAIT_S
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = _state(ep, parts, tables)
        if again == state:
            return state
        state = again
    raise AssertionError(f"server 0's state still changed {JOB_WAIT_S} s after the worker stopped")


def _what_changed(key: str, before: dict, after: dict, parts: dict) -> str:
    """Which dense partitions (by id) or how many table rows and ids differ."""
    if key != "dense":
        (rows_b, ids_b), (rows_a, ids_a) = before[key], after[key]
        return f"rows {len(rows_b)} -> {len(rows_a)} bytes, ids {len(ids_b)} -> {len(ids_a)} bytes"
    changed, offset = [], 0
    for pid in sorted(parts):
        size = parts[pid] * 4
        if before[key][offset:offset + size] != after[key][offset:offset + size]:
            changed.append(pid)
        offset += size
    return f"partitions {changed} of {sorted(parts)}"


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else "(no log)"


def _send_and_check(ep: ClientEndpoint, cases: list[Case], counts: dict) -> None:
    for case in cases:
        ep.sock.send_multipart([case.header, *case.frames])
    for i, case in enumerate(cases):
        assert ep.sock.poll(int(JOB_WAIT_S * 1000)), f"no reply to message {i}: {case!r}"
        parts = ep.sock.recv_multipart()
        reply = wire.decode(parts[0])
        assert isinstance(reply, wire.Error), f"{case!r} was answered with {reply!r}"
        assert reply.req == case.req and len(parts) == 1, f"{case!r}: reply {reply!r}"
        assert reply.message.startswith("server 0: "), reply
        counts[case.kind] = counts.get(case.kind, 0) + 1


def _curve_oversize_disconnects(ctx, address: str, secret: str, frames: list) -> None:
    """Like :func:`_oversize_disconnects`, over CURVE with the job's client keys."""
    keys = _keys(secret)
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.curve_serverkey, sock.curve_publickey = keys.server_public, keys.client_public
    sock.curve_secretkey = keys.client_secret
    assert_oversize_sender_cut(sock, address, frames, JOB_WAIT_S, "the job's server")


def test_whole_encrypted_sync_job_with_tables_survives_hostile_messages(tmp_path):
    """10,000 hostile messages at a running job's server: --encrypt, sync, embedding
    tables, the frame limits `tessera run` sets. The worker is stopped meanwhile, so
    the server's state must read back bit for bit the same; then the job finishes."""
    from tessera.ps.sharding import partition_elems_for
    from tests.harness import Job, wait_for

    out = tmp_path / "run"
    # The launcher's own fork server: _secret_of reads /proc/PID/environ, which for a
    # fork of the warm pool holds the pool's environment, not the job's.
    job = Job(["run", _job_file(tmp_path), "--mode", "sync", "--encrypt", "--workers", 1,
               "--servers", 1, "--steps", JOB_STEPS, "--out", out, "--quiet"], timeout_s=240,
              env={"TESSERA_WARM_POOL": ""})
    ctx = zmq.Context()
    worker_pid = None
    marks = [("start", time.monotonic())]
    try:
        def cluster():
            try:
                return json.loads((out / "cluster.json").read_text())
            except (OSError, ValueError):
                return None
        view = wait_for(cluster, 120, "cluster.json")
        procs = {(p["role"], p["rank"]): p for p in view["processes"]}
        server, worker_pid = procs[("server", 0)], procs[("worker", 0)]["pid"]
        wait_for(lambda: (out / "metrics.jsonl").exists()
                 and (out / "metrics.jsonl").read_text().strip(), 120, "the first steps")
        os.kill(worker_pid, signal.SIGSTOP)  # training stands still from here
        marks.append(("training", time.monotonic()))
        secret = _secret_of(server["pid"])
        assert secret.startswith("curve:")
        parts = {p["id"]: p["stop"] - p["start"] for p in view["partitions"] if p["server"] == 0}
        ep = ClientEndpoint(ctx, server["address"], secret, "server 0", sndtimeo_s=JOB_WAIT_S)
        ep.wait_connected(JOB_WAIT_S)
        # The server's tables, as it names them when asked for one it lacks.
        msg, _ = ep.request(wire.DumpRows(req=ep.new_req(), table="?"), timeout_s=JOB_WAIT_S)
        assert isinstance(msg, wire.Error) and "tables: [" in msg.message, msg
        names = ast.literal_eval(msg.message[msg.message.index("tables: [") + 8:-1])
        # A push the worker sent just before it stopped may still be on its way in:
        # "before" is the state once two reads 0.3 s apart agree.
        before = _settled_state(ep, sorted(parts), names)
        dims = {n: len(before[n][0]) // 4 // max(1, len(before[n][1]) // 8) for n in names}
        assert len(names) >= 2 and all(len(before[n][1]) for n in names), names
        memory_before = _proc_memory_kb(server["pid"])

        t0 = time.monotonic()
        gen, counts = Hostile(FUZZ_SEED, parts, dims, workers=1), {}
        for _ in range(JOB_MESSAGES // JOB_BATCH):
            batch_ep = ClientEndpoint(ctx, server["address"], secret, "server 0",
                                      sndtimeo_s=JOB_WAIT_S)
            batch_ep.wait_connected(JOB_WAIT_S)
            try:
                _send_and_check(batch_ep, gen.cases(JOB_BATCH), counts)
            finally:
                batch_ep.close()
        fuzz_s = time.monotonic() - t0
        marks.append(("fuzz", time.monotonic()))

        # Past the limits the job really runs with: a frame one byte over the server's
        # ZMQ_MAXMSGSIZE (256 MiB here) is never read; one frame more than MAX_FRAMES
        # is refused with an Error that names the limit.
        cap = max(partition_elems_for(4.0) * 4 + (1 << 20), 256 << 20)
        header = wire.encode(wire.Push(req=5, worker=0, seq=1, clock=0, partitions=[0]))
        _curve_oversize_disconnects(ctx, server["address"], secret, [header, bytes(cap + 1)])
        ep.sock.send_multipart([wire.encode(wire.Pull(req=77, worker=0, partitions=[0])),
                                *[b""] * (MAX_FRAMES + 1)])
        msg, _ = ep.wait(77, JOB_WAIT_S, "the pull of too many frames")
        assert isinstance(msg, wire.Error) and f"limit of {MAX_FRAMES} frames" in msg.message, msg
        ep.close()
        marks.append(("limits", time.monotonic()))
        near_miss = secret[:-1] + ("1" if secret.endswith("0") else "0")
        # (A PLAIN client against this CURVE server is refused too, but at times only
        # after seconds on a busy machine: test_curve_client_refused_by_plain_server.)
        for wrong in (OTHER_CURVE_SECRET, near_miss):
            intruder = ClientEndpoint(ctx, server["address"], wrong, "server 0", sndtimeo_s=5)
            with pytest.raises(AuthRefused):  # fast: see test_curve_server_refuses_other_secrets_fast
                intruder.wait_connected(JOB_WAIT_S)
            intruder.close()

        ep = ClientEndpoint(ctx, server["address"], secret, "server 0", sndtimeo_s=JOB_WAIT_S)
        ep.wait_connected(JOB_WAIT_S)
        after = _state(ep, sorted(parts), names)
        ep.close()
        memory_after = _proc_memory_kb(server["pid"])
        os.kill(worker_pid, signal.SIGCONT)
        marks.append(("checks", time.monotonic()))
        worker_pid = None
        code, output = job.wait()
        marks.append(("finish", time.monotonic()))
    finally:
        if worker_pid is not None:
            os.kill(worker_pid, signal.SIGCONT)
        job.kill()
        close_context(ctx)
    answered = sum(counts.values())
    print(f"\n{answered} hostile messages refused by a live --encrypt sync server with "
          f"{len(names)} tables in {fuzz_s:.1f} s ({answered / fuzz_s:.0f}/s); by kind: {counts}; "
          f"server memory before {memory_before}, after {memory_after}; seconds to "
          + ", ".join(f"{b[0]} {b[1] - a[1]:.1f}" for a, b in zip(marks, marks[1:])))
    assert answered == JOB_MESSAGES and len(counts) >= 20, counts
    for key in before:  # nothing was applied: every value and row is as it was
        assert after[key] == before[key], (
            f"{key} changed under attack: {_what_changed(key, before, after, parts)}; "
            f"server log:\n{_tail(out / 'logs' / 'server-0.log')}")
    assert memory_after["VmRSS"] - memory_before["VmRSS"] < 100 * 1024
    assert memory_after["VmHWM"] - memory_before["VmHWM"] < 100 * 1024  # 256 MiB never read
    assert code == 0, output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == JOB_STEPS
    # Every step pushes each dense partition and each table's rows (one server: one shard).
    assert summary["pushes_acked"] == summary["pushes_applied"] \
        == JOB_STEPS * (len(parts) + len(names)), summary
    assert summary["eval_rmse"] < 1.1, summary


def assert_oversize_sender_cut(sock, address: str, frames: list, wait_s: float,
                               who: str) -> None:
    """Connect ``sock`` (authenticated), send ``frames`` (over the server's frame limit),
    and assert the server drops the connection without answering; closes ``sock``."""
    monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(address)
        assert monitor.poll(int(wait_s * 1000)), f"no handshake with {who}"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        sock.send_multipart(frames, copy=False)
        assert monitor.poll(int(wait_s * 1000)), "the server kept an oversize sender"
        assert recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
        assert not sock.poll(0)
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
        sock.close(linger=0)
