"""Shared memory between a worker and a parameter server on one host
(:mod:`tessera.transport.shm`): payloads through a memfd segment, headers over
ZeroMQ, set up over the authenticated channel; nothing left behind by a crash;
servers on another host (a network namespace) stay on TCP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from tessera.transport import shm, wire
from tessera.transport.endpoint import ClientEndpoint, ServerEndpoint
from tessera.transport.frames import frame_to_tensor, tensor_to_frame
from tests import netns
from tests.harness import ROOT, Job, run_job, wait_for

SECRET = "tessera-test-shm-secret"
JOB = str(ROOT / "tests" / "jobs" / "shm.toml")


def segments(pid="self", name="tessera-shm") -> dict[str, tuple[int, int]]:
    """The tessera-shm segments ``pid`` maps (``name="tessera-"``: and the servers'
    arenas): inode -> (lowest, highest address)."""
    found: dict[str, tuple[int, int]] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            lines = f.readlines()
    except OSError:
        return found
    for line in lines:
        if f"memfd:{name}" not in line:
            continue
        span, _, _, _, inode = line.split()[:5]
        lo, hi = (int(x, 16) for x in span.split("-"))
        old = found.get(inode, (lo, hi))
        found[inode] = (min(lo, old[0]), max(hi, old[1]))
    return found


def dev_shm() -> set[str]:
    """Shared-memory files in /dev/shm (not POSIX semaphores, ``sem.*``, which other
    processes on a shared machine make and remove all the time). The tests check that none
    appeared, not that none went: another test's process (``make test`` runs two files at
    once) may remove its own."""
    return {name for name in os.listdir("/dev/shm") if not name.startswith("sem.")}


def holds_dev_shm(pid) -> bool:
    """Whether ``pid`` maps or holds open anything under /dev/shm."""
    try:
        with open(f"/proc/{pid}/maps") as f:
            if "/dev/shm/" in f.read():
                return True
        return any(os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/dev/shm/")
                   for fd in os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return False


class Echo:
    """A server endpoint in a thread that answers each push with its payloads times 2,
    and notes what each received frame was (a segment view, or a ZeroMQ frame)."""

    def __init__(self, ctx, shm_on: bool = True):
        self.ep = ServerEndpoint(ctx, "127.0.0.1", SECRET, shm=shm_on)
        self.seen: list[list] = []
        self.stop = False
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def serve(self) -> None:
        while not self.stop:
            try:
                if not self.ep.poll(0.05):
                    continue
            except zmq.ZMQError:  # the test failed and its context is gone
                return
            got = self.ep.recv()
            if got.msg is None:
                self.ep.send(got.peer, wire.Error(req=got.req, message=got.error))
                continue
            self.seen.append([(type(f).__name__,
                               f.ctypes.data if isinstance(f, np.ndarray) else 0)
                              for f in got.frames])
            out = [frame_to_tensor(f.buffer, "float32", len(f) // 4) * 2 for f in got.frames]
            self.ep.send(got.peer, wire.Params(req=got.msg.req, partitions=got.msg.partitions,
                                               clock=0), [tensor_to_frame(t) for t in out])
            del got, out  # no view of the segment outlives the request, as in a server

    def close(self) -> None:
        self.stop = True
        self.thread.join(timeout=5)
        self.ep.close()


def round_trip(client: ClientEndpoint, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    req = client.new_req()
    msg = wire.Push(req=req, worker=0, seq=req, clock=0, partitions=list(range(len(tensors))))
    reply, frames = client.request(msg, [tensor_to_frame(t) for t in tensors], timeout_s=20)
    assert isinstance(reply, wire.Params), reply
    return [frame_to_tensor(f.buffer, "float32", len(f) // 4).clone() for f in frames]


def test_payloads_travel_through_one_segment_exactly_and_it_goes_with_the_client(ctx):
    before = dev_shm()
    echo = Echo(ctx)
    client = ClientEndpoint(ctx, echo.ep.address, SECRET, "server 0")
    client.wait_connected(10)
    big = torch.randn(300_000, generator=torch.Generator().manual_seed(1))  # 1.2 MB
    small = torch.randn(100)  # under shm.MIN_BYTES: inline
    try:
        for _ in range(4):  # ask, prove, then through the segment
            got = round_trip(client, [big, small])
            assert torch.equal(got[0], big * 2) and torch.equal(got[1], small * 2)
        mapped = segments()
        assert len(mapped) == 1, mapped  # one segment (this process maps both of its ends)
        (kind, addr), (small_kind, _) = echo.seen[-1]
        assert kind == "ShmFrame" and small_kind == "Frame", echo.seen
        assert any(lo <= addr < hi for lo, hi in mapped.values()), (hex(addr), mapped)
        assert echo.seen[0][0][0] == "Frame"  # the first push went before any segment
        assert not dev_shm() - before
    finally:
        client.close()
    # The client is gone: the server sees its unix socket close and drops the segment.
    wait_for(lambda: not segments(), 5, "the server to drop the closed client's segment")
    echo.close()


def test_a_request_naming_a_segment_the_server_lost_is_sent_again_inline(ctx):
    """As after a replacement took the dead server's address, or a re-made connection
    (a new routing id): the server holds no segment for this connection. It answers
    Error (SHM_LOST); the client endpoint sends the request again inline and sets up
    a new segment, and the caller sees only the right answer."""
    echo = Echo(ctx)
    client = ClientEndpoint(ctx, echo.ep.address, SECRET, "server 0")
    client.wait_connected(10)
    x = torch.randn(300_000)
    try:
        for _ in range(3):
            assert torch.equal(round_trip(client, [x])[0], x * 2)
        first = client._shm.id
        echo.ep._shm.by_peer.clear()  # the server forgets the connection's segment
        reqs = []
        for k in range(3):  # three in flight through the lost segment
            req = client.new_req()
            client.send(wire.Push(req=req, worker=0, seq=req, clock=0, partitions=[0]),
                        [tensor_to_frame(x + k)])
            reqs.append(req)
        for k, req in enumerate(reqs):
            reply, frames = client.wait(req, 20, "a push")
            assert isinstance(reply, wire.Params), reply
            assert torch.equal(frame_to_tensor(frames[0].buffer, "float32", x.numel()),
                               (x + k) * 2)
        del frames
        for _ in range(4):
            assert torch.equal(round_trip(client, [x])[0], x * 2)
        assert client._shm.active and client._shm.id != first
        kinds = [s[0][0] for s in echo.seen]
        # shm; three refused, then inline; the set-up again; shm
        assert kinds[2] == "ShmFrame" and kinds[3:6] == ["Frame"] * 3, kinds
        assert kinds[-1] == "ShmFrame", kinds
    finally:
        client.close()
        echo.close()


def test_a_server_without_shm_and_a_squatted_socket_stay_on_tcp(ctx):
    plain = Echo(ctx, shm_on=False)
    client = ClientEndpoint(ctx, plain.ep.address, SECRET, "server 0")
    client.wait_connected(10)
    x = torch.randn(300_000)
    for _ in range(3):
        assert torch.equal(round_trip(client, [x])[0], x * 2)
    assert {k for s in plain.seen for k, _ in s} == {"Frame"} and not segments()
    client.close()
    plain.close()

    # A process squatting the server's socket name hands out a segment of its own: the
    # client proves it with that segment's nonce, which the server refuses.
    echo = Echo(ctx)
    echo.ep._shm = host = shm.Host()
    host._stop = True  # its fd thread ends, and its socket name is free for the squatter
    host.thread.join(timeout=5)
    host.listener.close()
    squat = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    squat.bind("\0" + host.name)
    squat.listen(1)

    def hand_out_own_segment() -> None:
        conn, _ = squat.accept()
        conn.recv(16)
        socket.send_fds(conn, [b"ok"], [shm.Segment.create().fd])
        time.sleep(2)
        conn.close()

    thief = threading.Thread(target=hand_out_own_segment, daemon=True)
    thief.start()
    client = ClientEndpoint(ctx, echo.ep.address, SECRET, "server 0")
    client.wait_connected(10)
    try:
        for _ in range(4):
            assert torch.equal(round_trip(client, [x])[0], x * 2)
        assert client._shm == "off"
        assert {k for s in echo.seen for k, _ in s} == {"Frame"}
    finally:
        client.close()
        echo.close()
        squat.close()


def test_a_proof_that_overtakes_the_handout_thread_is_accepted():
    """The client can read the nonce and prove it (over ZeroMQ, served by the endpoint's
    thread) before the fd thread that handed the fd out has recorded the connection: the
    proof must wait for it, not be refused (under load that left a worker on TCP)."""
    host = shm.Host()
    try:
        offer = host.open(b"peer")
        s = host.by_peer[b"peer"]
        handed = threading.Event()
        close_fd = s.seg.close_fd

        def slow_close_fd() -> None:  # the fd thread, descheduled right after the handout
            handed.set()
            time.sleep(0.5)
            close_fd()

        s.seg.close_fd = slow_close_fd
        attached: list = []
        client = threading.Thread(target=lambda: attached.append(shm.Attached(offer)))
        client.start()
        assert handed.wait(5)
        client.join(5)
        assert attached, "the client got no segment"
        sid, why = host.prove(b"peer", attached[0].seg.nonce.hex())
        assert (sid, why) == (offer.session, ""), why
        attached[0].close()
    finally:
        host.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to become another user")
def test_a_segment_is_handed_only_to_our_uid_with_a_live_offer():
    host = shm.Host()
    try:
        offer = host.open(b"peer")
        probe = ("import socket,sys,os\n"
                 "os.setuid(int(sys.argv[3]))\n"
                 "s=socket.socket(socket.AF_UNIX);s.settimeout(5);s.connect('\\0'+sys.argv[1])\n"
                 "try:\n"
                 "    s.sendall(bytes.fromhex(sys.argv[2]) + bytes(8))\n"  # no arena lent
                 "    m,fds,_,_=socket.recv_fds(s,16,1)\n"
                 "except OSError:\n"
                 "    fds=[]\n"
                 "print(len(fds))\n")

        def fetch(offer_hex: str, uid: int) -> str:
            proc = subprocess.run([sys.executable, "-c", probe, offer.socket, offer_hex,
                                   str(uid)], capture_output=True, text=True, timeout=20,
                                  cwd="/")
            assert proc.returncode == 0, proc.stderr
            return proc.stdout.strip()

        assert fetch(offer.offer, 65534) == "0"  # nobody: refused (SO_PEERCRED)
        assert fetch("00" * 16, 0) == "0"  # no such offer
        assert fetch(offer.offer, 0) == "1"  # our uid, the live offer: the fd
        assert fetch(offer.offer, 0) == "0"  # once only
    finally:
        host.close()


# ----------------------------------------------------------------- clusters


# ---------------------------------------------------------- the masters' arena


def _mapping(addr: int) -> tuple[str, str]:
    """(permissions, name) of this process's mapping that holds ``addr``."""
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo <= addr < hi:
                return fields[1], " ".join(fields[5:])
    return "", ""


def _ps(ctx, mode: str, numel: int, **options):
    """A real ParameterServer (SGD, one worker) in a thread on a shared-memory
    endpoint, and a PSClient that has set the segment up; -> (client, stop)."""
    from tessera.config.schema import OptimizerConfig
    from tessera.ps.client import PSClient
    from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
    from tessera.ps.sharding import plan_shards

    shard_map = plan_shards([wire.ParamSpec(name="w", shape=[numel], numel=numel)], 1,
                            numel // 2)
    stop = threading.Event()
    endpoint = ServerEndpoint(ctx, "127.0.0.1", SECRET, shm=True)
    server = ParameterServer(ServerOptions(rank=0, num_workers=1, mode=mode, **options),
                             endpoint=endpoint,
                             partitions=list(shard_map.on_server(0)),
                             optimizer=OptimizerConfig(name="sgd", lr=0.5),
                             hooks=ServerHooks(should_stop=stop.is_set))
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=[endpoint.address],
                      secret=SECRET, worker=0, timeout_s=30.0)
    client.connect()

    def close():
        client.close()
        stop.set()
        thread.join(timeout=10)
        endpoint.close()
    close.server = server
    return client, shard_map, close


@pytest.mark.parametrize("mode", ["sync", "async", "sync-no-arena"])
def test_sync_replies_are_read_from_the_servers_master_and_async_ones_are_copies(
        ctx, mode, monkeypatch, capfd):
    """Sync: a push's reply is the master itself, read in the server's arena through a
    read-only mapping (``r--s``: no client can write the master; no copy into the
    segment); async, where the master moves on at
    any time, the reply is a copy in the segment, made there once (not in a reply buffer
    first). The values are exact either way."""
    numel = 400_000  # 2 partitions of 800 KB: through shared memory
    if mode == "sync-no-arena":  # an arena that cannot be made (as under ulimit -v)
        monkeypatch.setattr(shm, "ARENA_BYTES", 1 << 62)
    client, shard_map, close = _ps(ctx, mode.split("-")[0], numel)
    try:
        gen = torch.Generator().manual_seed(3)
        expected = torch.randn(numel, generator=gen)
        client.init_params(expected.clone())
        where = set()
        for clock in range(6):
            grad = torch.randn(numel, generator=gen)
            expected.add_(grad, alpha=-0.5)
            handles = [client.push(p.id, grad[p.start:p.stop], clock)
                       for p in shard_map.partitions]
            for p, h in zip(shard_map.partitions, handles):
                got = h.wait()[p.id]
                assert torch.equal(got, expected[p.start:p.stop]), (mode, clock, p.id)
                where.add(_mapping(got.data_ptr()))
                h.release()
        # (the first pushes went before the segment was set up: inline)
        if mode == "sync":
            assert ("r--s", "/memfd:tessera-arena (deleted)") in where, where
            assert not any("tessera-shm" in name for _, name in where), where
        else:  # copies in the segment; without an arena the masters stay where they were
            assert ("rw-s", "/memfd:tessera-shm (deleted)") in where, where
            assert not any("arena" in name for _, name in where), where
        if mode == "async":  # copied once, straight into the segment: no reply buffer
            for st in close.server.parts.values():  # holds the last values (Producer.reserve)
                assert all(e[2] != st.rule.steps for e in st.replies._all), st.info.id
    finally:
        close()
    said = capfd.readouterr().err
    assert ("the masters stay in ordinary memory" in said) == (mode == "sync-no-arena"), said


@pytest.mark.parametrize("mode", ["sync", "async", "sync-costs"])
def test_lent_gradients_are_read_by_the_server_in_place_and_waited_for(ctx, mode,
                                                                        monkeypatch):
    """A client's gradients in ``shared_zeros`` memory are lent, not copied: the server
    reads each push through a read-only mapping of the client's arena (``r--s``), the
    values are exact every clock, and once ``wait_lent`` returned the server holds no
    view of them, so the buffer may be written again (``costs``: with the per-request
    CPU breakdown on, whose serve loop held the last request until the next came)."""
    seen = []
    receive_lent = shm.receive_lent

    def recording(seg, lent, slot):
        frame = receive_lent(seg, lent, slot)
        seen.append(_mapping(frame.ctypes.data))
        return frame
    monkeypatch.setattr(shm, "receive_lent", recording)
    numel = 400_000  # 2 partitions of 800 KB: through shared memory
    client, shard_map, close = _ps(ctx, mode.split("-")[0], numel,
                                   cost_breakdown=mode.endswith("costs"))
    client.timeout_s = 10.0  # (wait_lent's limit)
    try:
        grads = client.shared_zeros(numel)  # before the segment is set up: it lends
        assert grads is not None and not grads.any()
        assert _mapping(grads.data_ptr()) == ("rw-s", "/memfd:tessera-lend (deleted)")
        assert client.shared_zeros(10) is None  # one lending buffer per client
        gen = torch.Generator().manual_seed(5)
        expected = torch.randn(numel, generator=gen)
        client.init_params(expected.clone())
        for clock in range(6):
            grads.copy_(torch.randn(numel, generator=gen))
            expected.add_(grads, alpha=-0.5)
            handles = [client.push(p.id, grads[p.start:p.stop], clock)
                       for p in shard_map.partitions]
            for p, h in zip(shard_map.partitions, handles):
                assert torch.equal(h.wait()[p.id], expected[p.start:p.stop]), (clock, p.id)
                h.release()
            client.wait_lent()
            assert sum(ep.lent() for ep in client.servers) == 0
            grads.fill_(float("nan"))  # written right after: the next clock shows any misuse
        # (the first push set the segment up: inline; every later one was lent)
        assert len(seen) >= 2 * 5, seen
        assert set(seen) == {("r--s", "/memfd:tessera-lend (deleted)")}, set(seen)
    finally:
        close()


def test_a_lent_frame_is_outstanding_until_the_servers_last_view_is_gone():
    import gc

    seg = shm.Segment.create(region=1 << 22)
    lend = shm.Arena(1 << 20, name="tessera-lend")
    try:
        producer = shm.Producer(seg, shm.UP, lend=lend)
        grads = lend.empty(100_000)
        grads[:] = 3.0
        copied = np.full(shm.MIN_BYTES, 1, np.uint8)
        slots, inline = producer.put([grads, copied])
        assert not inline and slots[0][0] <= shm.LENT and slots[1][0] >= 0, slots
        assert slots[0][1:] == (lend.offset_of(grads), grads.nbytes)
        assert producer.outstanding() == 1
        server_view = shm.attach_arena(os.dup(lend.fd), lend.size)
        frame = shm.receive_lent(seg, server_view, slots[0])
        values = frame_to_tensor(frame.buffer, "float32", 100_000)[:10]
        assert values.eq(3.0).all()
        del frame
        gc.collect()
        assert producer.outstanding() == 1  # a tensor over it is still alive
        del values
        gc.collect()
        assert producer.outstanding() == 0
        with pytest.raises(shm.ShmError):  # a slot past the client's arena
            shm.receive_lent(seg, server_view, (shm.LENT, lend.size - 8, 64))
        del server_view
    finally:
        seg.close()
        lend.close()


def test_the_server_maps_only_a_sealed_arena_a_client_lends():
    """A client's arena without seals could shrink under the server's mapping (a fault
    that kills it): the server hands no segment to such a client, which stays on TCP."""
    import fcntl

    class Unsealed:
        size = 1 << 20

        def __init__(self):
            self.fd = os.memfd_create("tessera-lend", os.MFD_CLOEXEC)
            os.ftruncate(self.fd, self.size)

    host = shm.Host()
    bad = Unsealed()
    try:
        with pytest.raises(shm.ShmError):
            shm.Attached(host.open(b"peer-a"), bad)
        good = shm.Arena(1 << 20, name="tessera-lend")
        attached = shm.Attached(host.open(b"peer-b"), good)
        assert fcntl.fcntl(good.fd, fcntl.F_GET_SEALS) & fcntl.F_SEAL_SHRINK
        attached.close()
        good.close()
    finally:
        os.close(bad.fd)
        host.close()


def test_the_arena_is_sealed_and_reuses_freed_blocks_after_their_grace(monkeypatch):
    import gc
    import mmap

    arena = shm.Arena(size=1 << 24)
    try:
        if arena.fd >= 0 and fcntl_future_write(arena.fd):
            with pytest.raises(PermissionError):  # no process maps it writable any more
                mmap.mmap(arena.fd, arena.size, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE)
        a = arena.empty(100_000)
        a[:] = 7.0
        first = arena.offset_of(a)
        b = arena.empty(100_000)
        assert arena.offset_of(b) > first
        del a
        gc.collect()
        c = arena.empty(100_000)  # a is in its grace: not reused yet
        assert arena.offset_of(c) not in (first, arena.offset_of(b))
        monkeypatch.setattr(shm, "ARENA_GRACE_S", 0.0)
        arena.reap()
        d = arena.empty(100_000)
        assert arena.offset_of(d) == first  # reused once its grace is over
        assert arena.empty(1 << 24) is None  # full: the caller allocates as usual
        del b, c, d
    finally:
        arena.close()


class _ReleasedWhileRead:
    """A status table whose entry ``entry`` the consumer releases right after the
    producer first reads it (another process does that at any moment)."""

    def __init__(self, status, entry: int):
        self.status, self.entry, self.reads = status, entry, 0

    def __getitem__(self, i):
        value = self.status[i]
        if i == self.entry:
            self.reads += 1
            if self.reads == 1:
                self.status[i] = 0  # released just after this read
        return value

    def __setitem__(self, i, value):
        self.status[i] = value


def test_an_entry_released_while_the_producer_reclaims_is_freed_once():
    """The consumer may release an entry between two reads of the producer's; the entry
    must then be either live or free, once, never both (else two frames share it, and
    releasing one hands the other's bytes to the next frame while they are read)."""
    seg = shm.Segment.create(region=1 << 22)
    try:
        producer = shm.Producer(seg, shm.UP)
        frames = [np.full(shm.MIN_BYTES, i, np.uint8) for i in range(3)]
        slots, _ = producer.put(frames)
        seg.status[shm.UP][slots[0][0]] = 0  # the consumer is done with frame 0
        producer.status = _ReleasedWhileRead(seg.status[shm.UP], slots[1][0])
        producer.put([np.full(shm.MIN_BYTES, 9, np.uint8)])
        live = [e for _, _, e in producer.live]
        assert len(live) == len(set(live)), ("two live frames share an entry", producer.live)
        assert len(producer.free) == len(set(producer.free)), "an entry freed twice"
        assert not set(live) & set(producer.free), (live, "both live and free")
        # and no two live frames overlap in the region
        spans = sorted((off, off + size) for off, size, _ in producer.live)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    finally:
        seg.close()


def test_a_reply_written_where_the_producer_reserved_goes_without_a_copy():
    """Producer.reserve: a frame written in place goes as that place (the bytes are not
    copied anywhere else in the region); dropped unsent, the place is freed; sent twice,
    the second time it is copied like any frame."""
    import gc
    seg = shm.Segment.create(region=1 << 22)
    try:
        producer = shm.Producer(seg, shm.DOWN)
        assert producer.reserve(shm.MIN_BYTES - 1) is None  # too small for the segment
        buf = producer.reserve(3 * shm.MIN_BYTES)
        at = buf.ctypes.data - producer.data.ctypes.data
        rows = torch.from_numpy(buf.view(np.float32))
        rows.copy_(torch.arange(len(rows), dtype=torch.float32))
        # another frame meanwhile is placed elsewhere, not over the reserved bytes
        other, _ = producer.put([np.full(shm.MIN_BYTES, 7, np.uint8)])
        assert not at <= other[0][1] < at + 3 * shm.MIN_BYTES, (at, other)
        slots, inline = producer.put([tensor_to_frame(rows)])
        assert inline == [] and slots[0][1:] == (at, 3 * shm.MIN_BYTES), (slots, at)
        got = shm.receive(seg, shm.DOWN, slots[0])  # what the consumer reads there
        assert torch.equal(torch.from_numpy(got.view(np.float32)), rows)
        assert len(producer.live) == 2 and not producer.reserved
        again, _ = producer.put([tensor_to_frame(rows)])  # no longer reserved: a copy
        assert again[0][1] != at and again[0][0] != slots[0][0], (again, slots)
        # A reservation dropped unsent frees its place for the next frame.
        unsent = producer.reserve(shm.MIN_BYTES)
        assert unsent is not None and len(producer.live) == 4
        del unsent
        gc.collect()
        assert not producer.reserved
        for entry in (slots[0][0], other[0][0], again[0][0]):
            seg.status[shm.DOWN][entry] = 0  # the consumer let go of the frames sent
        del got
        nxt, _ = producer.put([np.full(shm.MIN_BYTES, 1, np.uint8)])
        assert nxt[0][1] == 0 and len(producer.live) == 1, (nxt, producer.live)
        assert len(producer.free) + len(producer.live) == shm.ENTRIES  # no entry leaked
    finally:
        seg.close()


def fcntl_future_write(fd: int) -> bool:
    import fcntl
    return bool(fcntl.fcntl(fd, fcntl.F_GET_SEALS) & 0x10)


def _segments_of(pids) -> set[str]:
    return set().union(*(segments(pid) for pid in pids))


@pytest.mark.parametrize("flags", [["--precision", "bf16", "--replication", "2"],
                                   ["--precision", "fp16"], []],
                         ids=["bf16-replicated", "fp16", "fp32"])
def test_sync_results_are_the_same_through_shared_memory(tmp_path, flags):
    flags = [*flags, "--steps", 20]
    on = run_job(JOB, tmp_path / "on", *flags)
    off = run_job(JOB, tmp_path / "off", "--shm", "off", *flags)
    assert on["eval_loss"] == off["eval_loss"], (on["eval_loss"], off["eval_loss"])
    assert on["pushes_acked"] == off["pushes_acked"]
    said = {run: sum(log.read_text().count("through shared memory")
                     for log in (tmp_path / run / "logs").glob("server-*"))
            for run in ("on", "off")}
    # Each server: both workers (and, replicated, its primary) proved a segment.
    assert said == {"on": 2 * (2 + ("2" in flags)), "off": 0}, said


def test_kill_9_of_a_worker_then_a_server_leaves_no_segment(tmp_path):
    before = dev_shm()
    out = tmp_path / "run"
    job = Job(["run", JOB, "--out", out, "--quiet", "--steps", 100000, "--replication", 2,
               "--max-restarts", 1], timeout_s=150)
    try:
        cluster = wait_for(lambda: (out / "cluster.json").exists() and
                           json.loads((out / "cluster.json").read_text()), 90, "cluster.json")
        pid = {(p["role"], p["rank"]): p["pid"] for p in cluster["processes"]}
        servers = [pid["server", 0], pid["server", 1]]
        metrics = out / "metrics.jsonl"

        def steps_logged() -> int:
            return len(metrics.read_text().splitlines()) if metrics.exists() else 0

        wait_for(steps_logged, 60, "training to start")
        # One segment per server: both are on this host.
        try:
            worker1 = wait_for(lambda: len(segments(pid["worker", 1])) == 2 and
                               segments(pid["worker", 1]), 60, "worker 1 to map 2 segments")
        except AssertionError:  # what the servers said about worker 1's segments
            logs = {log.name: log.read_text()[-2000:] for log in (out / "logs").glob("server-*")}
            raise AssertionError(f"worker 1 maps {len(segments(pid['worker', 1]))} "
                                 f"segments; the servers said: {logs}") from None
        # Its gradients lie in memory it lends both servers (read-only there).
        lent1 = set(segments(pid["worker", 1], "tessera-lend"))
        assert len(lent1) == 1, lent1
        wait_for(lambda: all(lent1 <= set(segments(s, "tessera-lend")) for s in servers), 30,
                 "both servers to map worker 1's gradients")
        os.kill(pid["worker", 1], signal.SIGKILL)
        # The servers see its unix sockets close and drop its segments (and its lent
        # gradients) at once.
        wait_for(lambda: not set(worker1) & _segments_of(servers), 10,
                 "the servers to drop the killed worker's segments")
        wait_for(lambda: not any(lent1 & set(segments(s, "tessera-lend")) for s in servers),
                 10, "the servers to unmap the killed worker's gradients")
        coordinator_log = out / "logs" / "coordinator-0.log"
        wait_for(lambda: "worker 1 rejoined" in coordinator_log.read_text(), 60,
                 "worker 1 to be restarted and rejoin")
        logged = steps_logged()
        os.kill(pid["server", 1], signal.SIGKILL)
        # Training goes on (server 1's backup serves its partitions), over the segments
        # the workers hold with server 0, and nothing appeared in /dev/shm.
        wait_for(lambda: steps_logged() > logged + 2, 90,
                 "training to go on after the server's death")
        assert not dev_shm() - before
        assert not any(holds_dev_shm(p) for p in [*pid.values(), job.proc.pid])
        assert job.proc.poll() is None
    finally:
        job.kill()
    assert not dev_shm() - before
    for p in cluster["processes"]:  # no segment, and no server's arena of masters
        wait_for(lambda p=p: not segments(p["pid"], "tessera-"), 15,
                 f"{p['role']} {p['rank']} to exit")


@pytest.fixture
def two_hosts():
    """Two network namespaces on a bridge (as tests/test_multihost.py's ``hosts``)."""
    netns.require()
    h = netns.Hosts(2).up()
    yield h
    h.down()


def test_two_hosts_one_local_server_each_the_other_over_tcp(two_hosts, tmp_path):
    """Two network-namespace hosts (tests/netns.py), each a node with one server and
    one worker: each worker shares memory with its own host's server and reaches the
    other host's over TCP (the abstract unix socket of a segment offer exists only in
    its server's network namespace, so that worker declines the offer)."""
    from tests.test_multihost import finish, start_node

    h = two_hosts
    flags = ["--workers", 2, "--servers", 2, "--steps", 40]
    n1 = start_node(h, 2, JOB, 1, 2, tmp_path / "node1", *flags)
    n0 = start_node(h, 1, JOB, 0, 2, tmp_path / "node0", *flags)
    code0, out0 = finish(n0, 150)
    code1, out1 = finish(n1, 60)
    assert code0 == 0, out0
    assert code1 == 0, out1
    summary = json.loads((tmp_path / "node0" / "summary.json").read_text())
    assert summary["steps"] == 40 and summary["eval_loss"] < 1.0, summary
    for node, server in ((0, 0), (1, 1)):
        log = (tmp_path / f"node{node}" / "logs" / f"server-{server}.log").read_text()
        # Exactly one client proved a segment: the worker on its own host.
        assert log.count("through shared memory") == 1, log
        assert "refused a client" not in log, log
        # The other host's worker could not reach the offer's socket, said so, and
        # stayed on TCP for good (it did not ask again).
        assert log.count("declined the shared-memory offer") == 1, log
        assert "Connection refused" in log, log
