"""Short scheduler slices (tessera.cluster.latency, ``[cluster] slice_us``) for a
worker's ZeroMQ threads, which carry its pushes and replies, read back from the kernel
(``/proc/<pid>/task/<tid>/sched``) in a running job; servers and the coordinator keep
the kernel's. Linux 6.12+ only: elsewhere the setting changes nothing and these tests
are skipped."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

from tests.harness import ROOT, Job, wait_for


def _kernel_takes_slices() -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/sched") as f:
            has_field = "se.slice" in f.read()
    except OSError:
        return False
    version = re.match(r"(\d+)\.(\d+)", os.uname().release)  # e.g. 6.18.44-fc, 6.12-rc1
    return has_field and version is not None and \
        (int(version[1]), int(version[2])) >= (6, 12)


pytestmark = pytest.mark.skipif(not _kernel_takes_slices(),
                                reason="scheduler slices need Linux 6.12+")


def slices(pid: int) -> dict[int, tuple[str, int]]:
    """``{tid: (thread name, slice in ns)}`` of process ``pid``."""
    out = {}
    for name in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{name}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{name}/sched") as f:
                ns = next(int(line.split(":")[1]) for line in f if line.startswith("se.slice"))
        except (OSError, StopIteration):
            continue  # (a thread that ended meanwhile)
        out[int(name)] = (comm, ns)
    return out


def test_the_slices_of_a_process_of_its_own_threads():
    """In a process of its own: a worker's choice (ZeroMQ's threads only), a server's
    (none), every thread (each keeping its nice value), and 0 (nothing)."""
    code = textwrap.dedent("""
        import json, os, threading, time
        import zmq
        from tessera.cluster.latency import apply_for_role, short_slices
        from tests.test_scheduler_slices import slices
        ctx = zmq.Context()
        sock = ctx.socket(zmq.DEALER)  # (libzmq starts its I/O thread with a socket)
        ready, done = threading.Event(), threading.Event()
        def niced():
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 7)
            ready.set()
            done.wait(30)
        t = threading.Thread(target=niced)
        t.start()
        ready.wait(30)
        report = {"off": apply_for_role("worker", 0), "server": apply_for_role("server", 100),
                  "worker": apply_for_role("worker", 100), "after_worker": slices(os.getpid())}
        report["all"] = short_slices(250)
        report["after_server"] = slices(os.getpid())
        report["nice"] = os.getpriority(os.PRIO_PROCESS, t.native_id)
        report["main"], report["niced"] = os.getpid(), t.native_id
        done.set()
        t.join()
        sock.close(0)
        ctx.term()
        print(json.dumps(report))
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert r["off"] == 0 and r["server"] == 0
    zmq_threads = {tid for tid, (comm, _) in r["after_worker"].items() if comm.startswith("ZMQbg")}
    assert len(zmq_threads) >= 2 and r["worker"] == len(zmq_threads)  # I/O and reaper
    for tid, (comm, ns) in r["after_worker"].items():
        assert (ns == 100_000) == (tid in zmq_threads), (comm, ns)  # the others unchanged
    assert r["all"] == len(r["after_server"])
    assert {ns for _, ns in r["after_server"].values()} == {250_000}
    assert r["nice"] == 7  # the thread's own nice value kept


def test_a_launched_jobs_workers_zeromq_threads_take_short_slices(tmp_path):
    """``tessera run``'s default (slice_us = 100): while the job trains, each worker's
    session's ZeroMQ threads have a 100 µs slice, the worker's own (compute) thread keeps
    the kernel's, and so does every thread of the servers and the coordinator."""
    out = tmp_path / "run"
    job = Job(["run", ROOT / "examples" / "digits.toml", "--steps", 100000, "--quiet",
               "--out", out], timeout_s=120)
    try:
        wait_for(lambda: (out / "metrics.jsonl").exists() or job.proc.poll() is not None,
                 90, "the job's first steps")
        assert job.proc.poll() is None, job.wait()[1]
        procs = json.loads((out / "cluster.json").read_text())["processes"]
        assert sorted(p["role"] for p in procs) == ["coordinator", "server", "server",
                                                     "worker", "worker"]
        for p in procs:
            threads = slices(p["pid"])
            where = f"{p['role']} {p['rank']}: {threads}"
            if p["role"] == "worker":
                assert threads[p["pid"]][1] != 100_000, where  # its compute thread
                assert sum(comm.startswith("ZMQbg") and ns == 100_000
                           for comm, ns in threads.values()) >= 2, where
            else:
                assert threads and all(ns != 100_000 for _, ns in threads.values()), where
    finally:
        job.kill()
