"""Collective rendezvous through the coordinator, Gloo pinned to the node's interface,
and the half-width all-reduce hook (tessera/parallel/rendezvous.py, tessera/cluster/store.py,
tessera/parallel/halfwidth.py).

The store tests talk to the real Coordinator's handler over its authenticated
socket; whole jobs that rendezvous this way are in test_allreduce.py (local,
listeners checked with ss) and test_multihost.py (across network namespaces).
"""

from __future__ import annotations

import datetime
import json
import os
import queue
import subprocess
import sys
import threading
import time

import pytest
import torch

from tessera.cluster.coordinator import Coordinator
from tessera.config.schema import JobConfig
from tessera.errors import UsageError
from tessera.parallel.rendezvous import CoordinatorStore, RendezvousError, interface_of
from tessera.transport.endpoint import AuthRefused
from tests.harness import ROOT

SECRET = "tessera-test-rendezvous-secret-0123456789"


@pytest.fixture
def coordinator(ctx, tmp_path):
    """The real Coordinator's message handling on its real socket, served by a thread
    (its own run() would also watch for registrations that never come); ``calls``
    runs a function on that thread (the socket's only user)."""
    coord = Coordinator(JobConfig(), tmp_path, SECRET, ctx=ctx)
    calls: queue.Queue = queue.Queue()
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            if coord.endpoint.poll(0.02):
                coord._handle(coord.endpoint.recv())
            coord._reply_all(coord.store.expire(time.monotonic()))
            while not calls.empty():
                calls.get()()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    coord.calls = calls
    yield coord
    stop.set()
    thread.join(5)
    coord.endpoint.close()


def store(ctx, coord, timeout_s=5.0, secret=SECRET):
    return CoordinatorStore(ctx, coord.address, secret, timeout_s=timeout_s)


def test_store_calls_follow_torch_semantics(ctx, coordinator):
    a, b = store(ctx, coordinator), store(ctx, coordinator)
    a.set("rank0", b"\x00addr\xff")
    assert b.get("rank0") == b"\x00addr\xff"
    assert a.add("count", 3) == 3 and b.add("count", 2) == 5 and a.get("count") == b"5"
    # compare_set: a missing key is set only when nothing is expected
    assert a.compare_set("cas", "x", "y") == b"x" and not a.check(["cas"])
    assert a.compare_set("cas", "", "first") == b"first"
    assert b.compare_set("cas", "other", "second") == b"first"
    assert b.compare_set("cas", "first", "second") == b"second"
    assert a.check(["rank0", "count"]) and not a.check(["rank0", "nope"])
    assert a.num_keys() == 3
    assert a.delete_key("cas") and not a.delete_key("cas") and a.num_keys() == 2
    a.close()
    b.close()


def test_get_is_held_until_another_rank_sets_the_key(ctx, coordinator):
    waiting, setter = store(ctx, coordinator), store(ctx, coordinator)
    timer = threading.Timer(0.5, lambda: setter.set("late", b"here"))
    t0 = time.monotonic()
    timer.start()
    try:
        assert waiting.get("late") == b"here"
        waiting.wait(["late"])
    finally:
        timer.join()
    assert 0.4 <= time.monotonic() - t0 < 4


def test_every_wait_ends_at_the_store_timeout(ctx, coordinator):
    s = store(ctx, coordinator, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RendezvousError, match="never-set not published within 0.5 s"):
        s.wait(["never-set"], datetime.timedelta(minutes=30))  # new_group's default: capped
    with pytest.raises(RendezvousError, match="not published"):
        s.get("never-set")
    assert time.monotonic() - t0 < 4


def test_job_failure_ends_held_waits_with_the_reason(ctx, coordinator):
    s = store(ctx, coordinator, timeout_s=30)
    threading.Timer(0.5, lambda: coordinator.calls.put(
        lambda: coordinator._fail("worker 1 died"))).start()
    t0 = time.monotonic()
    with pytest.raises(RendezvousError, match="job failed: worker 1 died"):
        s.get("never-set")
    assert time.monotonic() - t0 < 5


def test_an_exchange_is_one_collective_in_one_round_trip_and_leaves_nothing(ctx, coordinator):
    """The server modes' collectives (tessera.parallel.collectives): three ranks each
    publish their part for the two others and get the others' parts, held until all are
    there; each part is deleted once both of its readers have read it. A gather: only
    rank 0 reads, so the others' parts go with its read, and rank 0 publishes nothing."""
    ranks = [store(ctx, coordinator) for _ in range(3)]
    got = {}

    def one(r, delay):
        time.sleep(delay)
        got[r] = ranks[r].exchange([f"pg/0/{o}" for o in range(3) if o != r],
                                   publish=f"pg/0/{r}", value=bytes([r]) * 3, readers=2)
    threads = [threading.Thread(target=one, args=(r, 0.3 * r)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == {0: [b"\x01" * 3, b"\x02" * 3], 1: [b"\x00" * 3, b"\x02" * 3],
                   2: [b"\x00" * 3, b"\x01" * 3]}
    assert ranks[0].num_keys() == 0 and coordinator.store.nbytes == 0
    for r in (1, 2):
        assert ranks[r].exchange([], publish=f"pg/1/{r}", value=b"g", readers=1) == []
    assert ranks[0].exchange(["pg/1/1", "pg/1/2"]) == [b"g", b"g"]
    assert ranks[0].num_keys() == 0 and not coordinator.store.readers
    # A part nobody would read is refused (it would stay for ever); a missing one times out.
    with pytest.raises(RendezvousError, match="publishes a key for at least one reader"):
        ranks[1].exchange([], publish="pg/2/1", value=b"x", readers=0)
    assert ranks[1].exchange(["pg/2/0"], wait_s=0.3) is None
    for r in ranks:
        r.close()


def test_a_process_without_the_secret_cannot_reach_the_store(ctx, coordinator):
    with pytest.raises(AuthRefused):
        store(ctx, coordinator, secret="not-the-job-secret-0000")


def test_interface_of_the_node_address():
    assert interface_of("127.0.0.1") == interface_of("localhost") == interface_of("127.0.0.2")
    for host in ("198.51.100.77", "no-such-host.invalid"):  # TEST-NET-2: on no interface here
        with pytest.raises(UsageError, match="cluster.host"):
            interface_of(host)


def test_pin_collectives_replaces_a_stray_setting(monkeypatch):
    from tessera.config import env as envvars
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "eth9")
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert envvars.pin_collectives("lo") == {"GLOO_SOCKET_IFNAME": "eth9"}
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo"
    assert os.environ["NCCL_SOCKET_IFNAME"] == "=lo"


def test_half_width_hook_all_reduces_in_half_width_on_gloo(tmp_path):
    """DDP refuses torch's bf16 hook without CUDA+NCCL; ours runs on Gloo, and the
    averaged gradient is a sum of half-width values (so it really crossed in half width)."""
    script = str(ROOT / "tests" / "scripts" / "halfwidth_grads.py")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    procs = [subprocess.Popen([sys.executable, script, str(r), str(tmp_path / "store")],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=env, cwd=ROOT) for r in range(2)]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        assert p.returncode == 0, outs[-1]
    found = json.loads(outs[0].strip().splitlines()[-1])
    for wire, dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        grad, mean = torch.tensor(found[wire]["grad"]), torch.tensor(found[wire]["mean"])
        assert torch.equal(grad, grad.to(dtype).float()), wire  # each a half-width value
        assert not torch.equal(mean, mean.to(dtype).float()), wire  # fp32 would not give that
        # Three roundings of values below 4 in size (each half, then their sum).
        assert (grad - mean).abs().max() <= 4 * torch.finfo(dtype).eps, wire


def test_cuda_workers_agree_on_a_backend_every_rank_can_use():
    """NCCL refuses two ranks on one GPU; the choice is made from every rank's GPU."""
    from tessera.parallel.rendezvous import choose_backend
    assert choose_backend(["GPU-a", "GPU-b", "GPU-c"], p2p=True) == ("cpu:gloo,cuda:nccl", None)
    assert choose_backend(["GPU-a", "GPU-b", "GPU-a"], p2p=False) == ("gloo", (0, 2))
    assert choose_backend(["cpu", "cpu"], p2p=True) == ("gloo", None)
    with pytest.raises(UsageError, match=r"workers 1 and 2 run on the same GPU \(GPU-b\)"):
        choose_backend(["GPU-a", "GPU-b", "GPU-b"], p2p=True)
    with pytest.raises(UsageError, match=r"worker 1 trains on a GPU \(GPU-b\) but worker 0 on "
                                         r"the CPU"):
        choose_backend(["cpu", "GPU-b"], p2p=False)


def test_the_gpus_are_exchanged_through_the_coordinator_store(ctx, coordinator):
    """Each rank publishes its GPU through its own authenticated store connection and
    reads the others': all ranks come out with the same backend, and rank 0 says why."""
    from tessera.parallel.rendezvous import agree_backend
    said: list[str] = []
    got: dict[int, str] = {}

    def rank(r, gpu, p2p=False):
        got[r] = agree_backend(store(ctx, coordinator), r, 3, gpu, p2p=p2p, generation=0,
                               log=said.append)

    threads = [threading.Thread(target=rank, args=(r, g))
               for r, g in enumerate(["GPU-x", "GPU-y", "GPU-x"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got == {0: "gloo", 1: "gloo", 2: "gloo"}
    assert len(said) == 1 and "workers 0 and 2 share GPU GPU-x" in said[0]
    # The next generation of the group publishes afresh; each has its own GPU now.
    threads = [threading.Thread(target=lambda r=r: got.__setitem__(
        r, agree_backend(store(ctx, coordinator), r, 2, f"GPU-{r}", p2p=True, generation=1)))
        for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert got[0] == got[1] == "cpu:gloo,cuda:nccl"
