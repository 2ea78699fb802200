"""Tier 3: replication under faults with real processes (issue 14 items 6, 8, 9).

A server killed during the start-up pull, and two servers killed one after the
other (the second after re-replication), with ``--replication 2``: the job ends
and every acknowledged push was applied on a surviving copy, once.
"""

from __future__ import annotations

import contextlib

import json
import os
import signal
import time

import pytest

from tessera.ps.checkpoint import CheckpointStore
from tests.harness import ROOT, Job, wait_for
from tests.test_faults import DIGITS, finish, kill_after, metric_lines, pid_of


def test_server_killed_during_start_up_pull(tmp_path):
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--replication", "2", "--steps", "60"],
              timeout_s=150)
    # cluster.json is written as the coordinator answers the registrations: the workers
    # are about to send the initial values and pull them.
    wait_for(lambda: (out / "cluster.json").exists() or job.proc.poll() is not None, 90,
             "the cluster to come up")
    assert job.proc.poll() is None, "the job ended before the kill"
    os.kill(pid_of(out, "server", 1), signal.SIGKILL)
    output = finish(job)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dead_servers"] == [1] and summary["steps"] == 60, output
    expected = summary["steps"] * summary["workers"] * summary["partitions"]
    assert summary["pushes_applied"] == summary["pushes_acked"] == expected, summary


def test_slow_store_does_not_stall_the_coordinator(tmp_path, monkeypatch):
    """Each manifest takes 6 s to commit (longer than the 5 s heartbeat timeout): the
    coordinator writes it from its writer thread and keeps answering heartbeats."""
    store = tmp_path / "ckpt"
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests" / "slow_store"),
                                                      str(ROOT)]))
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--steps", "10", "--checkpoint-every",
               "10", "--checkpoint-dir", f"slowfile://{store}"], timeout_s=150)
    output = finish(job)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoints"] == [10], output
    latest = CheckpointStore(str(store)).latest()
    assert latest is not None and latest["clock"] == 10


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_two_servers_killed_one_after_the_other_with_re_replication(tmp_path, mode):
    """3 servers, --replication 2: server 1 dies; server 2 takes over its partitions and
    copies them to server 0, server 0 copies its own to server 2 (its backup was 1).
    Then server 2 dies too: server 0 holds everything, and nothing acknowledged is lost."""
    out = tmp_path / "run"
    job = Job(["run", DIGITS, "--out", out, "--quiet", "--mode", mode, "--servers", "3",
               "--replication", "2", "--epochs", "16"], timeout_s=240)
    kill_after(job, out, "server", 1, 3)
    logs = out / "logs"

    def copied(rank: int) -> bool:
        path = logs / f"server-{rank}.log"
        return path.exists() and "two copies again" in path.read_text()
    wait_for(lambda: (copied(0) and copied(2)) or job.proc.poll() is not None, 60,
             "re-replication onto servers 0 and 2")
    lines = metric_lines(out)
    kill_after(job, out, "server", 2, lines + 2)  # training goes on in between
    output = finish(job)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dead_servers"] == [1, 2], output
    expected = summary["steps"] * summary["workers"] * summary["partitions"]
    assert summary["pushes_applied"] == summary["pushes_acked"] == expected, summary
    assert summary["eval_accuracy"] >= 0.93, summary
    assert "promoted to primary" in (logs / "server-0.log").read_text()


def test_a_malformed_replication_reply_fails_at_once_naming_the_backup(ctx):
    """A backup that answers Replicate with bytes that are no message: the push's answer
    is an error naming that backup within a second, not a wait for the 10 s timeout."""
    import threading
    import time

    import torch

    from tessera.config.schema import OptimizerConfig
    from tessera.parallel.flat import param_layout
    from tessera.ps.client import PSClient, ServerError
    from tessera.ps.server import ParameterServer, Replicas, ServerHooks, ServerOptions
    from tessera.ps.sharding import plan_shards
    from tessera.transport import wire
    from tessera.transport.endpoint import ClientEndpoint, ServerEndpoint
    from tests.test_server_inproc import SECRET, TIMEOUT_S, flat_of, small_model

    model = small_model(0)
    shard_map = plan_shards(param_layout(model), 1, 10_000)
    primary_ep = ServerEndpoint(ctx, "127.0.0.1", SECRET)
    liar = ServerEndpoint(ctx, "127.0.0.1", SECRET)  # the "backup"
    peer = ClientEndpoint(ctx, liar.address, SECRET, "server 1 (backup)", sndtimeo_s=TIMEOUT_S)
    stop = threading.Event()
    server = ParameterServer(
        ServerOptions(rank=0, num_workers=1, num_servers=2, mode="sync", timeout_s=TIMEOUT_S),
        endpoint=primary_ep, partitions=list(shard_map.partitions),
        optimizer=OptimizerConfig(name="sgd", lr=0.1),
        hooks=ServerHooks(should_stop=stop.is_set), replicas=Replicas(peer=peer, primary=1))

    def lie() -> None:  # acks the initial values, then answers nonsense
        while not stop.is_set():
            if liar.poll(0.05):
                got = liar.recv()
                if isinstance(got.msg, wire.Replicate) and got.msg.kind == "init":
                    liar.send(got.peer, wire.Ack(req=got.msg.req))
                elif isinstance(got.msg, wire.Replicate):
                    liar.sock.send_multipart([got.peer, b"\xc1 not msgpack"])
    threads = [threading.Thread(target=server.serve, daemon=True),
               threading.Thread(target=lie, daemon=True)]
    for t in threads:
        t.start()
    client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=[primary_ep.address],
                      secret=SECRET, worker=0, timeout_s=TIMEOUT_S)
    try:
        client.connect()
        client.init_params(flat_of(model))
        started = time.monotonic()
        grad = torch.ones(shard_map.total_elems)
        with pytest.raises(ServerError, match=r"backup server 1 \(backup\).*malformed"):
            for p in shard_map.partitions:
                client.push(p.id, grad[p.start:p.stop], 0).wait()
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=5)
        client.close()
        for ep in (peer, liar, primary_ep):
            ep.close()


def test_a_replacement_answering_for_the_dead_backup_is_dropped_not_failed(ctx, capfd):
    """The backup dies and its replacement takes its address before the coordinator's word
    of the death reaches the primary: the primary's next forwarded update reaches the
    replacement, which holds nothing yet. It refuses, saying it is a replacement, and the
    primary drops that backup (one copy until it is sent a full one) instead of failing
    its workers' pushes, which are answered and applied once."""
    import threading

    import torch

    from tessera.config.schema import OptimizerConfig
    from tessera.parallel.flat import param_layout
    from tessera.ps.client import PSClient
    from tessera.ps.server import ParameterServer, Replicas, ServerHooks, ServerOptions
    from tessera.ps.sharding import plan_shards
    from tessera.transport.endpoint import ClientEndpoint, ServerEndpoint
    from tests.test_server_inproc import SECRET, TIMEOUT_S, flat_of, small_model

    model = small_model(0)
    shard_map = plan_shards(param_layout(model), 1, 10_000)
    eps = [ServerEndpoint(ctx, "127.0.0.1", SECRET) for _ in range(2)]
    peer = ClientEndpoint(ctx, eps[1].address, SECRET, "server 1 (backup)", sndtimeo_s=TIMEOUT_S)
    stops = [threading.Event(), threading.Event()]
    options = dict(num_workers=1, num_servers=2, mode="sync", timeout_s=TIMEOUT_S)
    primary = ParameterServer(
        ServerOptions(rank=0, **options), endpoint=eps[0], partitions=list(shard_map.partitions),
        optimizer=OptimizerConfig(name="sgd", lr=0.1),
        hooks=ServerHooks(should_stop=stops[0].is_set), replicas=Replicas(peer=peer, primary=1))
    # Server 1's replacement: it joined holding nothing (the coordinator counts it replaced).
    replacement = ParameterServer(
        ServerOptions(rank=1, **options), endpoint=eps[1], partitions=[],
        optimizer=OptimizerConfig(name="sgd", lr=0.1),
        hooks=ServerHooks(should_stop=stops[1].is_set), replicas=Replicas(lives=((1, 1),)))
    threads = [threading.Thread(target=s.serve, daemon=True) for s in (primary, replacement)]
    for t in threads:
        t.start()
    client = PSClient(ctx=ctx, shard_map=shard_map, server_addresses=[eps[0].address],
                      secret=SECRET, worker=0, timeout_s=TIMEOUT_S)
    try:
        client.connect()
        client.init_params(flat_of(model))  # its Replicate "init" is refused too
        grad = torch.ones(shard_map.total_elems)
        for step in range(3):
            for p in shard_map.partitions:
                client.push(p.id, grad[p.start:p.stop], step).wait()
        applied = {pid: st.applied_pushes for pid, st in primary.parts.items()}
        assert client.pushes_acked == 3 * len(shard_map.partitions)
        assert applied == {p.id: 3 for p in shard_map.partitions}, applied
        assert primary.replication.peer is None and not primary.replication.replicated
        assert primary.stats["errors"] == 0, primary.stats
    finally:
        for s in stops:
            s.set()
        for t in threads:
            t.join(timeout=5)
        client.close()
        for ep in (peer, *eps):
            ep.close()
    out = capfd.readouterr().out
    assert "a replacement took its address" in out and "refused" in out, out


@contextlib.contextmanager
def _async_pair(ctx, workers: int, intercept, mode: str = "async",
                partition_elems: int = 10_000, tables: tuple = ()):
    """Two in-process servers (async unless ``mode``), each the other's backup
    (``answer_early``), serving on threads, with a shard of each of ``tables`` each;
    ``intercept(on_replicate)`` wraps server 1's handler of forwarded updates. Yields
    (model, shard map, servers, stops, threads, membership, clients of ``workers``
    workers, connected, retaining their last answered push)."""
    import threading

    from tessera.cluster.role import ready_to_serve
    from tessera.config.schema import OptimizerConfig
    from tessera.parallel.flat import param_layout
    from tessera.ps.client import PSClient
    from tessera.ps.replication import WINDOW
    from tessera.ps.server import ParameterServer, Replicas, ServerHooks, ServerOptions
    from tessera.ps.sharding import plan_shards
    from tessera.transport.endpoint import ClientEndpoint, ServerEndpoint
    from tests.test_faults_inproc import Membership
    from tests.test_server_inproc import SECRET, TIMEOUT_S, small_model

    model = small_model(0)
    shard_map = plan_shards(param_layout(model), 2, partition_elems)
    eps = [ServerEndpoint(ctx, "127.0.0.1", SECRET) for _ in range(2)]
    peers = [ClientEndpoint(ctx, eps[1 - r].address, SECRET, f"server {1 - r} (backup)",
                            sndtimeo_s=TIMEOUT_S) for r in range(2)]
    membership, stops = Membership(), [threading.Event() for _ in range(2)]
    servers = [ParameterServer(
        ServerOptions(rank=r, num_workers=workers, num_servers=2, mode=mode, timeout_s=3.0),
        endpoint=eps[r], partitions=shard_map.on_server(r),
        optimizer=OptimizerConfig(name="sgd", lr=0.1), tables=list(tables) or None,
        hooks=ServerHooks(should_stop=stops[r].is_set, membership=membership),
        replicas=Replicas(backups=tuple(shard_map.on_server(1 - r)), peer=peers[r],
                          primary=1 - r, answer_early=True)) for r in range(2)]
    backup = servers[1].replication
    backup.on_replicate = intercept(backup.on_replicate)
    # What a server does before it serves: compile its tables' row kernels. Compiled at
    # the first row push instead (on a loaded 2-core CI machine, seconds), the backup's
    # Ack came later than the servers' 3 s replication timeout (CI, session 55).
    ready_to_serve(tables, own_process=False)
    threads = [threading.Thread(target=ps.serve, daemon=True) for ps in servers]
    for t in threads:
        t.start()
    clients = [PSClient(ctx=ctx, shard_map=shard_map, server_addresses=[e.address for e in eps],
                        secret=SECRET, worker=w, timeout_s=TIMEOUT_S,
                        retain=1 if mode == "sync" else WINDOW,
                        dead_servers=lambda: membership.dead) for w in range(workers)]
    try:
        for c in clients:
            c.connect()
        yield model, shard_map, servers, stops, threads, membership, clients
    finally:
        for s in stops:
            s.set()
        for t in threads:
            t.join(timeout=5)
        for c in clients:
            c.close()
        for ep in peers + eps:
            ep.close()


def _updates(msg) -> list:
    """A forwarded Replicate's updates (a ``batch`` holds several)."""
    from tessera.transport import wire
    if msg.kind == "batch":
        return list(msg.updates)
    return [wire.ReplicaUpdate(kind=msg.kind, partition=msg.partitions[0], clock=msg.clock,
                               pushes=msg.pushes, worker=msg.worker, seq=msg.seq,
                               hparams=msg.hparams)] if msg.partitions else []


def _without(msg, frames, pid: int, nbytes: dict):
    """``msg`` (a batch) and its frame without partition ``pid``'s update (``nbytes``: each
    partition's bytes); None when nothing is left."""
    import msgspec
    view, at, kept, parts = memoryview(frames[0].buffer).cast("B"), 0, [], []
    for u in msg.updates:
        if u.partition != pid:
            kept.append(u)
            parts.append(bytes(view[at:at + nbytes[u.partition]]))
        at += nbytes[u.partition]
    if not kept:
        return None
    return msgspec.structs.replace(msg, partitions=[u.partition for u in kept],
                                   updates=kept), [_Frame(b"".join(parts))]


class _Frame:
    """A received frame's face (``.buffer``, ``len``) over bytes."""

    def __init__(self, data: bytes):
        self.buffer = data

    def __len__(self) -> int:
        return len(self.buffer)


def _stall_from(first, stalled: list):
    """An interceptor of the backup's Replicate handler: from the first forwarded update
    ``first`` accepts on, every gradient update that reaches the backup is neither applied
    nor acked, only kept in ``stalled`` (a batch with one of them: stalled whole, since
    one Ack answers all of it)."""
    def intercept(on_replicate):
        def stall(peer, msg, frames):
            updates = [u for u in _updates(msg) if u.kind == "grad"]
            if updates and (stalled or any(first(u) for u in updates)):
                stalled.extend(updates)
                return
            on_replicate(peer, msg, frames)
        return stall
    return intercept


def _wait_backup_acked(servers, what: str) -> None:
    deadline = time.monotonic() + 20
    while servers[0].replication.pending() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not servers[0].replication.pending(), f"the backup never acked {what}"


def test_an_answered_push_the_backup_lacks_is_sent_again_after_failover(ctx):
    """answer_early: a push is answered before its own update is on the backup. Here the
    backup drops that update (as if the primary died with it unsent); after the primary
    is gone the worker sends its retained push to the backup, which applies it: every
    acknowledged push is applied once on the surviving copy."""
    import threading

    import torch

    from tests.test_server_inproc import flat_of

    dropping = threading.Event()

    def intercept(on_replicate):
        def drop_updates(peer, msg, frames):  # the lost update: never applied, never acked
            if not (dropping.is_set() and msg.kind in ("grad", "batch")):
                on_replicate(peer, msg, frames)
        return drop_updates

    with _async_pair(ctx, 1, intercept) as (model, shard_map, servers, stops, threads,
                                            membership, (client,)):
        client.init_params(flat_of(model))
        (part,) = shard_map.on_server(0)
        grad = torch.ones(part.stop - part.start)
        client.push(part.id, grad, 0).wait()
        # Push 0's update acked by the backup (answer_early answered push 0 before that):
        # push 1 is then answered at once, while the backup drops its update.
        _wait_backup_acked(servers, "push 0")
        dropping.set()
        client.push(part.id, grad, 1).wait()  # answered; the backup drops its update
        assert client.pushes_acked == 2
        stops[0].set()  # server 0 goes (its Ack never comes); the coordinator says so
        threads[0].join(timeout=5)
        membership.dead = [0]
        dropping.clear()
        for h in client.pull([part.id], clock=0):
            h.wait()
        survivor = servers[1].parts[part.id]
        assert survivor.applied_pushes == client.pushes_acked == 2
        torch.testing.assert_close(survivor.rule.master, servers[0].parts[part.id].rule.master,
                                   rtol=0, atol=0)


def test_an_async_answer_waits_only_for_its_own_workers_updates(ctx):
    """answer_early, async: worker 0's push is answered while worker 1's earlier update
    is not yet on the backup (waiting for it would put that round trip on worker 0's
    path). After the primary dies with both updates missing on the backup, each worker
    sends its own answered push again: every acknowledged push is applied once."""
    import threading

    import torch

    from tests.test_server_inproc import flat_of

    stalling, stalled = threading.Event(), []
    # from worker 1's update on, in order: neither applied nor acked
    intercept = _stall_from(lambda u: stalling.is_set() and u.worker == 1, stalled)

    with _async_pair(ctx, 2, intercept) as (model, shard_map, servers, stops, threads,
                                            membership, clients):
        clients[0].init_params(flat_of(model))
        (part,) = shard_map.on_server(0)
        grad = torch.ones(part.stop - part.start)
        for c in clients:
            c.push(part.id, grad, 0).wait()
        _wait_backup_acked(servers, "clock 0")
        stalling.set()
        clients[1].push(part.id, grad, 1).wait()  # its update stalls on the backup
        started = time.monotonic()
        clients[0].push(part.id, grad, 1).wait(timeout_s=2.0)  # not held for worker 1's
        assert time.monotonic() - started < 2.0
        # Its own update goes to the backup after its answer (it may still be on the way).
        wait_for(lambda: len(stalled) >= 2, 5, "worker 0's update reaching the backup")
        assert [m.worker for m in stalled] == [1, 0]
        stops[0].set()  # server 0 goes with both updates missing on the backup
        threads[0].join(timeout=5)
        membership.dead = [0]
        for c in clients:
            for h in c.pull([part.id], clock=0):
                h.wait()
        survivor = servers[1].parts[part.id]
        acked = sum(c.pushes_acked for c in clients)
        assert survivor.applied_pushes == acked == 4
        torch.testing.assert_close(survivor.rule.master, servers[0].parts[part.id].rule.master,
                                   rtol=0, atol=0)


def test_a_batch_whose_partitions_reached_the_backup_at_two_clocks_is_resent_per_partition(ctx):
    """Sync, answer_early, two small partitions pushed as one batch (``batch_bytes``): the
    backup gets the clock's update of one partition and not of the other (as if the
    primary died between the two). Re-sent whole, the batch was refused on the first
    partition's clock ("push for clock 1 but partition 0 is at clock 2"); re-sent one
    push per partition, the backup answers the applied one as a duplicate and applies
    the other: both copies end equal, each push applied once."""
    import threading

    import torch

    from tests.test_server_inproc import flat_of

    lagging, dropped = threading.Event(), []

    def intercept(on_replicate):
        def drop_second(peer, msg, frames):  # the update of the batch's second partition
            updates = _updates(msg)
            if lagging.is_set() and any(u.kind == "grad" and u.partition == second
                                        for u in updates):
                dropped.extend(u.clock for u in updates if u.partition == second)
                rest = _without(msg, frames, second, nbytes) if msg.kind == "batch" else None
                if rest is not None:  # the rest of a batch applied (and acked: the primary dies)
                    on_replicate(peer, *rest)
                return
            on_replicate(peer, msg, frames)
        return drop_second

    # torch.optim's first optimizer imports torch._dynamo (seconds on a loaded machine):
    # here, not inside a server's first init, which the client waits for.
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    with _async_pair(ctx, 1, intercept, mode="sync", partition_elems=26) as (
            model, shard_map, servers, stops, threads, membership, (client,)):
        client.batch_bytes = 1 << 20  # small partitions to a server go as one message
        client.init_params(flat_of(model))
        parts = shard_map.on_server(0)
        assert len(parts) >= 2, shard_map
        second = parts[1].id
        nbytes = {p.id: 4 * (p.stop - p.start) for p in parts}

        def step(clock: int) -> None:
            handles = [client.push(p.id, torch.full((p.stop - p.start,), 0.5), clock)
                       for p in parts]
            for h in handles:
                h.wait()
        step(0)
        _wait_backup_acked(servers, "clock 0")
        lagging.set()
        step(1)  # answered (the updates before it are on the backup); one lags there
        first = servers[1].backups[parts[0].id]
        deadline = time.monotonic() + 20
        while first.clock < 2 and time.monotonic() < deadline:  # the other one's, applied
            time.sleep(0.01)
        assert first.clock == 2 and dropped == [1], (first.clock, dropped)
        stops[0].set()  # server 0 goes with the second partition's update of clock 1 unsent
        threads[0].join(timeout=5)
        membership.dead = [0]
        lagging.clear()
        for h in client.pull([p.id for p in parts], clock=0):
            h.wait()
        for p in parts:  # the survivor holds what the dead primary held, bit for bit
            survivor, primary = servers[1].parts[p.id], servers[0].parts[p.id]
            assert survivor.clock == primary.clock == 2, (p.id, survivor.clock)
            torch.testing.assert_close(survivor.rule.master, primary.rule.master, rtol=0,
                                       atol=0)
        step(2)  # training goes on, on the survivor
        assert client.pushes_acked == 3 * len(parts)
        assert [servers[1].parts[p.id].applied_pushes for p in parts] == [3] * len(parts)


def test_a_batch_still_waiting_when_its_server_dies_goes_to_the_backup(ctx):
    """A batch of small partitions opened before its server died and sent after the
    client followed the failover (the death heard of at a later push of the same step):
    it goes to the partitions' owners now, not to the dead server, where nothing would
    send it again (the wait timed out: faults.py's server-tables case, 2026-12-07)."""
    import torch

    from tests.test_server_inproc import flat_of

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # (see above)
    with _async_pair(ctx, 1, lambda on_replicate: on_replicate, mode="sync",
                     partition_elems=26) as (
            model, shard_map, servers, stops, threads, membership, (client,)):
        client.batch_bytes = 1 << 20  # small partitions to a server go as one message
        client.init_params(flat_of(model))
        parts = shard_map.on_server(0)
        assert len(parts) >= 2, shard_map
        grads = {p.id: torch.full((p.stop - p.start,), 0.5) for p in parts}
        for h in [client.push(p.id, grads[p.id], 0) for p in parts]:
            h.wait()
        _wait_backup_acked(servers, "clock 0")
        first = client.push(parts[0].id, grads[parts[0].id], 1)  # waits in server 0's batch
        stops[0].set()
        threads[0].join(timeout=5)
        membership.dead = [0]
        rest = [client.push(p.id, grads[p.id], 1) for p in parts[1:]]  # hears of the death
        got = {}
        for h in [first, *rest]:
            got.update(h.wait())
        initial = flat_of(model)
        for p in parts:  # two steps of plain SGD (lr 0.1) with a gradient of 0.5
            expected = initial[p.start:p.stop] - 2 * 0.1 * 0.5
            torch.testing.assert_close(got[p.id], expected)
            assert servers[1].parts[p.id].applied_pushes == 2
        assert client.pushes_acked == 2 * len(parts)


def _worker_1_restarted(ctx, shard_map, servers, membership):
    """Worker 1 died (departed at clock 0): its restart, incarnation 1, as a client of
    ``_async_pair``'s servers (not connected yet), keeping its last answered push."""
    from tessera.ps.client import PSClient
    from tests.test_server_inproc import SECRET, TIMEOUT_S

    membership.departed = {1: 0}
    return PSClient(ctx=ctx, shard_map=shard_map,
                    server_addresses=[s.endpoint.address for s in servers], secret=SECRET,
                    worker=1, incarnation=1, timeout_s=TIMEOUT_S, retain=1,
                    dead_servers=lambda: membership.dead)


def test_a_rejoined_workers_push_waits_for_a_promoted_copy_a_clock_behind(ctx):
    """Sync, answer_early: worker 1 rejoins at clock 2, which the primary answers once it
    reached clock 2 while the backup still lacks clock 1's update. The primary dies.
    Worker 1's first push (clock 2) reaches the promoted copy before worker 0's re-sent
    push of clock 1: it was refused ("push for clock 2 but partition 0 is at clock 1"),
    the worker exited, and the job waited for it (seen once in a whole clean-clone
    run). Now it is sent again until the copy completed clock 1 with worker 0's re-sent
    push: every clock is applied once, as torch.optim steps the same mean gradients."""
    import threading

    import torch

    from tessera.config.schema import OptimizerConfig
    from tests.test_faults_inproc import values_of
    from tests.test_server_inproc import Reference, flat_of

    lagging = threading.Event()

    def intercept(on_replicate):
        def drop_updates(peer, msg, frames):  # the primary's last clock: never on the backup
            if not (lagging.is_set() and msg.kind in ("grad", "batch")):
                on_replicate(peer, msg, frames)
        return drop_updates

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports, not in a server
    with _async_pair(ctx, 2, intercept, mode="sync") as (
            model, shard_map, servers, stops, threads, membership, (w0, w1)):
        ref = Reference(model, OptimizerConfig(name="sgd", lr=0.1))
        w0.init_params(flat_of(model))
        n = shard_map.total_elems
        g0, g1 = torch.linspace(-1, 1, n), torch.linspace(2, 0, n)

        def push(client, grad, clock):
            return [client.push(p.id, grad[p.start:p.stop], clock) for p in shard_map.partitions]

        h0, h1 = push(w0, g0, 0), push(w1, g1, 0)
        values_of(h0), values_of(h1)
        ref.step((g0 + g1) / 2)
        _wait_backup_acked(servers, "clock 0")
        rejoined = _worker_1_restarted(ctx, shard_map, servers, membership)
        try:
            rejoined.connect()
            joins = rejoined.join(2, incarnation=1)
            lagging.set()  # clock 1's update of server 0's partitions never reaches server 1
            values_of(push(w0, g0, 1))  # clock 1: worker 0 alone (worker 1 counts from 2)
            ref.step(g0)
            values_of(joins)  # answered at clock 2 by the primary
            (part,) = shard_map.on_server(0)
            assert servers[0].parts[part.id].clock == 2
            assert servers[1].backups[part.id].clock == 1
            stops[0].set()  # server 0 dies with clock 1's update unsent
            threads[0].join(timeout=5)
            membership.dead = [0]
            lagging.clear()
            first = push(rejoined, g1, 2)  # reaches the promoted copy, at clock 1
            deadline = time.monotonic() + 20
            while servers[1].stats["errors"] == 0 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert servers[1].stats["errors"] >= 1, "the early push was not refused"
            assert servers[1].parts[part.id].clock == 1
            h0 = push(w0, g0, 2)  # re-sends worker 0's clock-1 push first
            got1, got0 = values_of(first), values_of(h0)
            ref.step((g0 + g1) / 2)
            for p in shard_map.partitions:
                want = ref.flat()[p.start:p.stop]
                torch.testing.assert_close(got0[p.id], want)
                torch.testing.assert_close(got1[p.id], want)
                assert servers[1].parts[p.id].clock == 3
        finally:
            rejoined.close()


def test_a_rejoined_workers_row_push_waits_for_a_promoted_table_copy_a_clock_behind(ctx):
    """The test above for a table shard. Row updates are never answered early: worker 0's
    clock-1 row push waits for the backup's Ack, which never comes (the backup drops
    it), while the primary has applied clock 1 and answered worker 1's Join at clock 2.
    The primary dies. Worker 1's clock-2 row push reaches the promoted copy, still at
    clock 1, first: it is refused ("has yet to complete that clock"), nothing applied,
    and sent again until worker 0's unanswered clock-1 push, sent again to the copy,
    completed clock 1 there. The rows equal SGD stepping each clock's mean gradient."""
    import threading

    import numpy as np
    import torch

    from tessera.config.schema import OptimizerConfig
    from tessera.ps.embedding_ids import initial_rows, owner_of
    from tessera.transport import wire
    from tests.test_faults_inproc import values_of
    from tests.test_server_inproc import flat_of

    lagging = threading.Event()

    def intercept(on_replicate):  # server 1's table service takes row updates
        def drop_rows(peer, msg, frames):  # server 0's row updates: never on the backup
            if not (lagging.is_set() and msg.kind == "rows"):
                on_replicate(peer, msg, frames)
        return drop_rows

    dim, lr = 4, 0.1
    spec = wire.TableSpec(name="items", dim=dim, init_scale=0.1, seed=3,
                          optimizer=OptimizerConfig(name="sgd", lr=lr))
    candidates = np.arange(64, dtype=np.int64)
    ids = [candidates[owner_of(candidates, 2) == s][:5] for s in (0, 1)]  # per shard
    gen = torch.Generator().manual_seed(0)
    grads = [[torch.randn(5, dim, generator=gen) for _ in (0, 1)] for _ in (0, 1)]  # [w][s]
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # imports, not in a server
    with _async_pair(ctx, 2, lambda on_replicate: on_replicate, mode="sync",
                     tables=(spec,)) as (
            model, shard_map, servers, stops, threads, membership, (w0, w1)):
        servers[1].tables.on_replicate = intercept(servers[1].tables.on_replicate)
        w0.init_params(flat_of(model))
        n = shard_map.total_elems
        dense = [torch.linspace(-1, 1, n), torch.linspace(2, 0, n)]

        def push(client, w, clock, shards=(0, 1), rows=True, params=True):
            handles = [client.push(p.id, dense[w][p.start:p.stop], clock)
                       for p in shard_map.partitions] if params else []
            return handles + ([client.push_tables(s, [("items", ids[s], grads[w][s])], clock)
                               for s in shards] if rows else [])

        for h in push(w0, 0, 0) + push(w1, 1, 0):
            h.wait()
        _wait_backup_acked(servers, "clock 0")
        rejoined = _worker_1_restarted(ctx, shard_map, servers, membership)
        try:
            rejoined.connect()
            joins = rejoined.join(2, incarnation=1)
            values_of(push(w0, 0, 1, rows=False))  # clock 1: worker 0 alone
            values_of(joins)  # answered at clock 2 by the primary
            lagging.set()  # clock 1's row update of shard 0 never reaches server 1
            unanswered, other = push(w0, 0, 1, params=False)
            other.wait()  # shard 1 (server 1's own): applied, acked by server 0, answered
            shard0 = servers[0].tables.tables["items"]
            deadline = time.monotonic() + 10
            while shard0.clock < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            assert shard0.clock == 2 and servers[1].tables.backups["items"].clock == 1
            # Server 0 dies with clock 1's row update unacked, its answer held. (A killed
            # server says nothing more; this thread would refuse the held answer when the
            # backup's Ack is 3 s late, while it stops.)
            servers[0].replication.timeout_s = 600.0
            stops[0].set()
            threads[0].join(timeout=5)
            membership.dead = [0]
            lagging.clear()
            errors = servers[1].stats["errors"]
            first = push(rejoined, 1, 2, params=False)  # shard 0 reaches the copy at clock 1
            deadline = time.monotonic() + 20
            while servers[1].stats["errors"] == errors and time.monotonic() < deadline:
                time.sleep(0.01)
            assert servers[1].stats["errors"] > errors, "the early row push was not refused"
            assert servers[1].tables.promoted[(0, "items")].clock == 1
            later = push(w0, 0, 2, params=False)  # worker 0's clock-1 push goes again first
            for h in [unanswered, *first, *later]:
                h.wait()
            assert servers[1].tables.promoted[(0, "items")].clock == 3
            mean = (grads[0][0] + grads[1][0]) / 2
            want = initial_rows(ids[0], dim, 3, 0.1) - lr * (mean + grads[0][0] + mean)
            got = w0.pull_rows("items", 0, ids[0], clock=3, dim=dim).wait().reshape(5, dim)
            torch.testing.assert_close(got, want)
        finally:
            rejoined.close()


def test_the_updates_of_one_turn_reach_the_backup_as_one_batch(ctx):
    """Sync, two small partitions pushed as one message: their clock completes in one
    turn of the primary's loop, and both updates travel to the backup as one ``batch``
    Replicate (one frame, one Ack). A batch whose frame does not match its updates is
    refused whole, and the copies stay bit-identical to the primary's."""
    import torch

    from tessera.transport import wire
    from tests.test_server_inproc import flat_of

    seen = []

    def intercept(on_replicate):
        def record(peer, msg, frames):
            seen.append((msg.kind, len(msg.updates)))
            on_replicate(peer, msg, frames)
        return record

    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # torch._dynamo, here
    with _async_pair(ctx, 1, intercept, mode="sync", partition_elems=26) as (
            model, shard_map, servers, stops, threads, membership, (client,)):
        client.batch_bytes = 1 << 20
        client.init_params(flat_of(model))
        parts = shard_map.on_server(0)
        assert len(parts) >= 2, shard_map
        for clock in range(3):
            handles = [client.push(p.id, torch.full((p.stop - p.start,), 0.25 * (clock + 1)),
                                   clock) for p in parts]
            for h in handles:
                h.wait()
        _wait_backup_acked(servers, "clock 2")
        assert ("batch", len(parts)) in seen, seen
        for p in parts:
            copy, primary = servers[1].backups[p.id], servers[0].parts[p.id]
            assert copy.clock == primary.clock == 3
            torch.testing.assert_close(copy.rule.master, primary.rule.master, rtol=0, atol=0)
        before = [servers[1].backups[p.id].rule.master.clone() for p in parts]
        # A batch of two updates carrying the values of one: refused before anything is
        # applied (the first update's bytes are there), and one with two frames too.
        backup = servers[1].replication
        lying = wire.Replicate(req=1, kind="batch", partitions=[p.id for p in parts[:2]],
                               clock=3, updates=[wire.ReplicaUpdate(kind="grad", partition=p.id,
                                                                    clock=3) for p in parts[:2]])
        one = _Frame(bytes(4 * (parts[0].stop - parts[0].start)))
        from tessera.ps.consistency import RequestError
        with pytest.raises(RequestError, match="replica payload of partitions"):
            backup.on_replicate(b"x", lying, [one])
        with pytest.raises(RequestError, match="their values in one frame"):
            backup.on_replicate(b"x", lying, [one, one])
        for p, old in zip(parts, before):
            assert torch.equal(servers[1].backups[p.id].rule.master, old)


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_backup_leaves_alone_what_its_primary_left_alone(ctx, mode):
    """``find_unused_parameters``: pushes naming element ranges unused (``Push.unused``),
    two workers in sync (a range left alone only where both named it) or one in async.
    The backup is sent the ranges with each update and stays bit-identical to its
    primary, the ranges no worker used unchanged on both."""
    import torch

    from tests.test_server_inproc import flat_of

    workers = 2 if mode == "sync" else 1
    with _async_pair(ctx, workers, lambda on_replicate: on_replicate, mode=mode) as (
            model, shard_map, servers, stops, threads, membership, clients):
        clients[0].init_params(flat_of(model))
        part = shard_map.on_server(0)[0]
        n = part.stop - part.start
        start = servers[0].parts[part.id].rule.master.clone()
        for clock in range(3):
            handles = [c.push(part.id, torch.full((n,), 0.5 + w), clock,
                              unused=[0, 4, 8, 12] if w == 0 else [2, 10])
                       for w, c in enumerate(clients)]
            for h in handles:
                h.wait()
        _wait_backup_acked(servers, "clock 2")
        copy, primary = servers[1].backups[part.id], servers[0].parts[part.id]
        torch.testing.assert_close(copy.rule.master, primary.rule.master, rtol=0, atol=0)
        kept = [(2, 4), (8, 10)] if mode == "sync" else [(0, 4), (8, 12)]
        moved = torch.ones(n, dtype=torch.bool)
        for lo, hi in kept:
            moved[lo:hi] = False
        assert torch.equal(primary.rule.master[~moved], start[~moved])
        assert not torch.isclose(primary.rule.master[moved], start[moved]).any()


def test_async_answers_wait_for_the_update_a_window_back_and_failover_resends_the_window(ctx):
    """Async, answer_early, a 40 KB partition (window of 8 pushes): with the backup
    taking none of the updates from push 1 on, pushes 1-8 are still answered (each waits
    only for its worker's update 8 pushes back: push 0's, on the backup), push 9's answer
    is held (push 1's update is not acked). The primary dies: the worker sends its 8
    kept pushes again, oldest first, and push 9 goes to the survivor, which applies
    each once: the survivor's copy is the dead primary's, bit for bit."""
    import threading

    import torch

    from tessera.ps.replication import WINDOW, window
    from tests.test_server_inproc import flat_of

    stalling, stalled = threading.Event(), []
    intercept = _stall_from(lambda u: stalling.is_set(), stalled)  # from push 1 on

    with _async_pair(ctx, 1, intercept) as (model, shard_map, servers, stops, threads,
                                            membership, (client,)):
        client.init_params(flat_of(model))
        (part,) = shard_map.on_server(0)
        assert window(part.stop - part.start) == WINDOW == 8
        grad = torch.linspace(-1, 1, part.stop - part.start)
        client.push(part.id, grad, 0).wait()
        _wait_backup_acked(servers, "push 0")
        stalling.set()
        for seq in range(1, WINDOW + 1):  # answered: push seq - 8 is on the backup (or none)
            client.push(part.id, grad * seq, seq).wait(timeout_s=5.0)
        assert client.pushes_acked == WINDOW + 1
        late = client.push(part.id, grad * 9, WINDOW + 1)
        wait_for(lambda: len(servers[0].replication._held) == 1, 5,
                 "push 9's answer held for push 1's update")
        wait_for(lambda: len(stalled) == WINDOW + 1, 5, "updates 1-9 reaching the backup")
        stops[0].set()  # server 0 goes with updates 1-9 missing on the backup
        threads[0].join(timeout=5)
        membership.dead = [0]
        late.wait(timeout_s=20.0)  # failover: kept pushes 1-8 first, then push 9
        survivor, primary = servers[1].parts[part.id], servers[0].parts[part.id]
        assert survivor.applied_pushes == client.pushes_acked == WINDOW + 2
        torch.testing.assert_close(survivor.rule.master, primary.rule.master, rtol=0, atol=0)
