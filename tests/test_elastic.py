"""Tier 3: elastic servers (issue 16 item 3): ``tessera scale`` and ``[ps] rebalance``.

Real jobs: dense partitions move live between the servers of a running job while the
workers train; a request that reaches the former owner is answered "moved" and re-sent.
Nothing acknowledged is lost and nothing is applied twice (the summary's counters); in
sync mode the result is bit for bit that of the same job never scaled, and the
checkpoints written after the moves restore.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from tessera.cluster.elastic import place, place_shards, scale_problem
from tessera.config.schema import JobConfig
from tessera.ps.checkpoint import CheckpointError, CheckpointStore, read_flat, table_shards
from tests.harness import ROOT, Job, run_cli, run_job, wait_for
from tests.test_faults import DIGITS, finish, metric_lines

#: 7 dense partitions for the digits MLP: 4 on server 0, 3 on server 1.
SMALL = ["--partition-mb", "0.01", "--quiet"]
PARTITIONS = 7


def _text(path: Path) -> str:
    return path.read_text() if path.exists() else ""


def _moves_done(out: Path) -> int:
    return _text(out / "logs" / "coordinator-0.log").count(" moved partitions ")


def _scale(out: Path, n) -> tuple[int, str]:
    return run_cli(["scale", out, "--servers", str(n)], timeout_s=60)


def _one_line(code: int, output: str, *words: str) -> None:
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in output, output
    for word in words:
        assert word in lines[0], output


def _raised(fn, *args):
    """What ``fn(*args)`` raised (None: nothing): a test thread's failure, for the test."""
    try:
        fn(*args)
    except BaseException as exc:  # noqa: BLE001 - handed to the test's assert
        return exc
    return None


def _saved_by(run: Path, rank: int) -> bool:
    """Whether a complete checkpoint of ``run`` holds a file of server ``rank``. The job
    runs on and prunes (checkpoint.keep): a manifest listed, then pruned before it is read,
    is passed over; one that is there and unreadable fails the test."""
    store = CheckpointStore(str(run / "checkpoints"))
    for clock in store.clocks()[0]:
        try:
            if str(rank) in store.manifest(clock)["files"]:
                return True
        except CheckpointError:
            if store.has_manifest(clock):
                raise
    return False


def _served_moved(log: str) -> int:
    served = [line for line in log.splitlines() if "requests for partitions moved here" in line]
    return int(served[-1].split("served ")[1].split()[0]) if served else 0


def test_scale_starts_and_stops_servers_in_sync_mode_is_exact_and_resumes(tmp_path, monkeypatch):
    """Launched with one server: scale 1 -> 2 starts server 1 (a new process, which
    serves), 2 -> 1 stops it (exit 0, never counted dead), 1 -> 2 starts it again."""
    a, ref, again = tmp_path / "a", tmp_path / "ref", tmp_path / "again"
    steps = 200
    # Server 0 takes 5 ms per partition it serves: a job long enough to start servers twice
    # on a busy machine, without more CPU (the delay changes no result).
    monkeypatch.setenv("TESSERA_SLOW_SERVER", "0:5")
    flags = [*SMALL, "--servers", "1", "--steps", str(steps), "--checkpoint-every", "25"]
    digits = tmp_path / "digits.toml"  # every checkpoint kept: those about the moves too
    digits.write_text(Path(DIGITS).read_text() + "\n[checkpoint]\nkeep = 100\n")
    job = Job(["run", digits, "--out", a, *flags], timeout_s=240)
    reference = Job(["run", digits, "--out", ref, *flags], timeout_s=240)  # never scaled
    wait_for(lambda: metric_lines(a) >= 2 or job.proc.poll() is not None, 120, "training")
    code, output = _scale(a, 2)
    assert code == 0 and "moving partitions onto 2 servers (started server 1)" in output, output
    wait_for(lambda: _moves_done(a) >= 1 or job.proc.poll() is not None, 60, "the move to 2")
    _one_line(*_scale(a, 2), "already served by 2 servers")
    # Bad input while it runs: one line each, naming what to do.
    _one_line(*_scale(a, 0), "--servers must be at least 1")
    _one_line(*_scale(a, 8), "7 dense partitions", "--servers 8")
    _one_line(*_scale(tmp_path / "nothing", 1), "not a run directory")
    code, output = _scale(a, 1)
    assert code == 0, output
    log1 = a / "logs" / "server-1.log"
    wait_for(lambda: "scaled away" in _text(log1) or job.proc.poll() is not None, 60,
             "server 1 to stop")
    assert "joined the running job" in _text(log1) and _served_moved(_text(log1)) > 0, \
        _text(log1)
    # Rank 1 again: a new process. (The job may end while it starts: it ends cleanly.)
    code, output = _scale(a, 2)
    assert code == 0 and "(started server 1)" in output, output
    wait_for(lambda: _moves_done(a) >= 3 or job.proc.poll() is not None, 60, "the move to 2")
    output = finish(job)
    finish(reference)
    assert "died" not in output and "restarting" not in output, output
    summary = json.loads((a / "summary.json").read_text())
    expected = steps * 2 * PARTITIONS
    assert summary["pushes_applied"] == summary["pushes_acked"] == expected, summary
    whys = [m["why"] for m in summary["elastic"]["moves"]]
    assert whys[:2] == ["scale to 2 servers", "scale to 1 servers"], summary["elastic"]
    coordinator = _text(a / "logs" / "coordinator-0.log")
    assert "server 1 stopped (scaled away)" in coordinator, coordinator
    assert "died" not in coordinator and "no heartbeat" not in coordinator, coordinator
    # Server 1's first life exited 0 and said so; its second served moved partitions.
    first, _, second = _text(log1).partition("restarted by the launcher")
    assert "scaled away: it holds no partitions and exits" in first, first
    if len(whys) == 3:  # it joined before the job ended: it served what moved there
        assert "joined the running job" in second and _served_moved(second) > 0, second
        assert set(summary["owners"].values()) == {0, 1}, summary["owners"]
    else:
        assert set(summary["owners"].values()) == {0}, summary["owners"]
    assert _served_moved(_text(a / "logs" / "server-0.log")) > 0
    # Sync: bit for bit the job that never scaled (values and optimizer state).
    mine, theirs = load_file(str(a / "final.safetensors")), load_file(str(ref / "final.safetensors"))
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    # Every checkpoint, before, between and after the moves: the same state, read from
    # the files the manifests name (a moved partition's may not be its owner's).
    clocks = CheckpointStore(str(a / "checkpoints")).clocks()[0]
    assert clocks == list(range(25, steps + 1, 25)), clocks
    for clock in clocks:
        _, v_a, s_a = read_flat(str(a / "checkpoints"), clock)
        _, v_r, s_r = read_flat(str(ref / "checkpoints"), clock)
        assert torch.equal(v_a, v_r) and set(s_a) == set(s_r), clock
        for key in s_a:
            assert torch.equal(s_a[key], s_r[key]), (clock, key)
    # The newest checkpoint (the new layout) resumes: no further step, the same state.
    run_job(str(digits), again, "--resume", str(a), "--steps", str(steps), *flags)
    _, v_b, _ = read_flat(str(again / "checkpoints"), steps)
    _, v_end, _ = read_flat(str(ref / "checkpoints"), steps)
    assert torch.equal(v_b, v_end)
    _one_line(*_scale(a, 1), "not running", "finished")


def test_rebalance_moves_off_a_hot_server_then_scale_down_in_async_mode(tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setenv("TESSERA_SLOW_SERVER", "0:5")  # server 0: 5 ms per partition served
    steps = 250
    job = Job(["run", DIGITS, "--out", out, *SMALL, "--mode", "async", "--rebalance",
               "--steps", str(steps)], timeout_s=240)
    wait_for(lambda: _moves_done(out) >= 1 or job.proc.poll() is not None, 120,
             "the coordinator's move off the hot server")
    coordinator = _text(out / "logs" / "coordinator-0.log")
    assert "server 0 is hot" in coordinator, coordinator
    code, output = _scale(out, 1)
    # (A very slow machine may have finished already, or be shutting down after the
    # last step: the job is then no longer running, and there is nothing to scale. A
    # coordinator that closed its socket meanwhile does not answer: the job then ends
    # at once, where a hung one would not.)
    if "the coordinator did not answer" in output:
        wait_for(lambda: job.proc.poll() is not None, 30, "the job to end after its last step")
    if job.proc.poll() is None and "not running (it is shutdown)" not in output:
        assert code == 0 or "still moving" in output, output
    finish(job)
    summary = json.loads((out / "summary.json").read_text())
    expected = steps * 2 * PARTITIONS
    assert summary["pushes_applied"] == summary["pushes_acked"] == expected, summary
    moves = summary["elastic"]["moves"]
    assert moves[0]["why"].startswith("server 0 is hot") and \
        set(moves[0]["partitions"].values()) == {1}, moves
    assert "requests for partitions moved here" in _text(out / "logs" / "server-1.log")


def test_rebalance_moves_a_hot_table_shard_off_its_server_while_training(tmp_path, monkeypatch):
    """A server slow only at its table rows (``TESSERA_SLOW_SERVER=RANK:MS:rows``): the
    coordinator sees that its load is in its table shard and moves the shard, live, onto
    the other server; the workers follow, and every acknowledged push is applied once."""
    out = tmp_path / "run"
    monkeypatch.setenv("TESSERA_SLOW_SERVER", "0:6:rows")
    steps = 300
    job = Job(["launch", "--workers", "2", "--servers", "2", "--quiet", "--mode", "async",
               "--rebalance", "--out", out, TABLE_JOB, "--steps", str(steps)], timeout_s=240)
    wait_for(lambda: " moved table shards " in _text(out / "logs" / "coordinator-0.log")
             or job.proc.poll() is not None, 120, "the move of the hot table shard")
    finish(job)
    coordinator = _text(out / "logs" / "coordinator-0.log")
    assert "server 0 is hot" in coordinator, coordinator
    assert "server 0 moved table shards of servers [0] to server 1" in coordinator, coordinator
    summary = json.loads((out / "summary.json").read_text())
    # Per step, each worker pushes 2 dense partitions and the table to 2 shards.
    assert summary["pushes_applied"] == summary["pushes_acked"] == steps * 2 * 4, summary
    moves = summary["elastic"]["moves"]
    assert moves[0]["why"].startswith("server 0 is hot"), moves
    assert "serves the table rows of server 0 (moved here from server 0)" in \
        _text(out / "logs" / "server-1.log")


def test_what_cannot_scale_is_named():
    cfg = JobConfig()
    assert scale_problem(cfg, []) == ""
    assert scale_problem(cfg, [object()]) == ""  # table rows move too
    cfg.ps.replication = 2
    assert "--replication 2" in scale_problem(cfg, [])
    # Placement: the servers left get everything, balanced by bytes.
    owner = {0: 0, 1: 1, 2: 0, 3: 1, 4: 2}
    sizes = {0: 10, 1: 10, 2: 10, 3: 10, 4: 10}
    plan = place(owner, sizes, {0, 1})
    assert set(plan) == {4} and plan[4] in (0, 1)
    plan = place({0: 0, 1: 0, 2: 0, 3: 0}, {p: 10 for p in range(4)}, {0, 1})
    assert sorted(plan.values()) == [1, 1]
    # Table shards (keyed -(k + 1)): off the servers left, spread; back home on scale up.
    assert place_shards({0: 0, 1: 1, 2: 2}, {0}) == {-2: 0, -3: 0}
    assert place_shards({0: 0, 1: 0, 2: 0}, {0, 1, 2}) == {-2: 1, -3: 2}
    assert place_shards({0: 0, 1: 0, 2: 1}, {0, 1}) == {-2: 1}



def test_scale_up_waits_for_new_servers_and_scale_down_retires_them(monkeypatch):
    import tessera.cluster.elastic as elastic
    cfg = JobConfig()
    cfg.cluster.servers = 1
    e = elastic.Elastic(cfg)
    owner = {0: 0, 1: 0, 2: 0, 3: 0}
    sizes = {p: 10 for p in owner}
    assert "at most 4 servers" in e.scale(5, owner, sizes, "running", "")
    assert e.scale(2, owner, sizes, "running", "") == "" and e.joining == {1}
    assert not e.orders  # nothing moves before server 1 has joined
    assert "still starting" in e.scale(1, owner, sizes, "running", "")
    e.joined(1, owner)
    assert sorted(e.orders.values()) == [1, 1] and not e.joining
    for pid, target in list(e.orders.items()):
        e.done(0, target, [pid], owner)
    assert e.scale(1, owner, sizes, "running", "") == ""
    monkeypatch.setattr(elastic, "RETIRE_AFTER_S", 0.0)
    assert e.retire(owner) == []  # it still holds partitions
    for pid, target in list(e.orders.items()):
        e.done(1, target, [pid], owner)
    assert e.retire(owner) == [1]
    assert "still stopping" in e.scale(2, owner, sizes, "running", "")
    e.exited(1)
    assert e.scale(2, owner, sizes, "running", "") == "" and e.joining == {1}


# ------------------------------------------------------------------ table rows move

TABLE_JOB = str(ROOT / "tests" / "scripts" / "table_job.py")


def _table_rows(run: Path, clock: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every saved shard of the table 'users' at ``clock``, as (ids, rows) sorted by id."""
    shards = table_shards(CheckpointStore(str(run / "checkpoints")), clock, "users")
    ids = torch.cat([s["ids"] for s in shards])
    order = torch.argsort(ids)
    assert len(set(ids.tolist())) == len(ids), f"a row saved twice at clock {clock}"
    return ids[order], torch.cat([s["values"] for s in shards])[order]


def test_scale_moves_table_rows_live_in_sync_and_async_jobs_exactly(tmp_path):
    """Launched with 2 servers: the sync job scales 2 -> 3 -> 2 (server 2, started mid-job,
    takes server 0's table rows and gives them back, then exits), the async one 2 -> 1 ->
    2 (server 1 hands its rows over, exits, and is started again)."""
    a, ref, asy = tmp_path / "a", tmp_path / "ref", tmp_path / "async"
    steps = 200
    keep = tmp_path / "keep.toml"  # every checkpoint kept: those while scaled up too
    keep.write_text("[checkpoint]\nkeep = 100\n")
    flags = ["--workers", "2", "--servers", "2", "--quiet", "--checkpoint-every", "20",
             "--job", str(keep)]
    # Steps slowed (sleeping: no more CPU) so that the job trains through a server's start
    # and the moves, until the test has seen the job's last move (``fast``): then the rest
    # go at full speed. With a fixed slow pace, the async job's scale-down and scale-up
    # (two moves of a partition and a table shard each) outlasted 200, 300 and 400 steps
    # on busy or slow machines (the job ended after the partition's move, before the
    # shard's); now the moves happen while it trains however long they take, and the
    # job's last step waits for ``fast`` (tests/scripts/table_job.py), so that it cannot
    # end before its moves on a machine busy with other tests (it did once after 32 s).
    fast = {a: tmp_path / "a.fast", asy: tmp_path / "async.fast"}
    script = [TABLE_JOB, "--steps", str(steps), "--sleep", "0.05"]
    job = Job(["launch", *flags, "--mode", "sync", "--out", a, *script,
               "--sleep-until", fast[a]], timeout_s=240)
    reference = Job(["launch", *flags, "--mode", "sync", "--out", ref, TABLE_JOB, "--steps",
                     str(steps)], timeout_s=240)  # never scaled
    async_steps = 800  # slowed until the moves are done, then fast
    job_async = Job(["launch", *flags, "--mode", "async", "--out", asy, TABLE_JOB, "--steps",
                     str(async_steps), "--sleep", "0.04", "--sleep-until", fast[asy]],
                    timeout_s=240)

    def shard_moves(run: Path) -> int:
        return _text(run / "logs" / "coordinator-0.log").count(" moved table shards ")

    def scales(run: Path, proc, sizes: tuple[int, int]) -> None:
        wait_for(lambda: metric_lines(run) >= 2 or proc.poll() is not None, 120, "training")
        for moves, n in enumerate(sizes, 1):
            for _ in range(40):  # (a server scaled away may still be stopping)
                code, output = _scale(run, n)
                if code == 0 or "still stopping" not in output or proc.poll() is not None:
                    break
                time.sleep(0.5)
            assert code == 0 or proc.poll() is not None, output
            wait_for(lambda: shard_moves(run) >= moves or proc.poll() is not None, 90,
                     f"the move to {n} in {run.name}")
            if n == 3:  # a checkpoint written while server 2 holds server 0's rows: one
                # completed after the move's log line may be of a clock saved before it
                wait_for(lambda: _saved_by(run, 2) or proc.poll() is not None, 60,
                         "a checkpoint with server 2's file")
        # The server scaled away has stopped too (its line in the coordinator's log)
        wait_for(lambda: "stopped (scaled away)" in _text(run / "logs" / "coordinator-0.log")
                 or proc.poll() is not None, 60, f"the scaled-away server of {run.name} to stop")
        fast[run].touch()  # all of it happened while the job trained: the rest may go fast

    # Both jobs scaled at once (one after the other, the async job could finish first).
    failed = []
    threads = [threading.Thread(target=lambda *args: failed.append(_raised(scales, *args)),
                                args=args)
               for args in ((a, job.proc, (3, 2)), (asy, job_async.proc, (1, 2)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for marker in fast.values():  # (where a wait above failed: the jobs end now, not later)
        marker.touch()
    assert failed == [None, None], failed
    finish(job)
    finish(reference)
    finish(job_async)
    # Async: every acknowledged push applied once (nothing lost, nothing twice).
    summary = json.loads((asy / "summary.json").read_text())
    assert summary["pushes_applied"] == summary["pushes_acked"] == async_steps * 2 * 4, summary
    coordinator = _text(asy / "logs" / "coordinator-0.log")
    assert "server 1 moved table shards of servers [1] to server 0" in coordinator, coordinator
    assert "server 1 stopped (scaled away)" in coordinator, coordinator
    # Server 1 exited holding nothing, was started again and took its rows back.
    assert "server 0 moved table shards of servers [1] to server 1" in coordinator, coordinator
    first, _, second = _text(asy / "logs" / "server-1.log").partition("restarted by the launcher")
    assert "scaled away: it holds no partitions and exits" in first, first
    assert "serves the table rows of server 1 (moved here from server 0)" in second, second
    summary = json.loads((a / "summary.json").read_text())
    # Per step, each worker pushes 2 dense partitions and the table to 2 shards.
    assert summary["pushes_applied"] == summary["pushes_acked"] == steps * 2 * 4, summary
    coordinator = _text(a / "logs" / "coordinator-0.log")
    assert "server 0 moved table shards of servers [0] to server 2" in coordinator, coordinator
    assert "server 2 moved table shards of servers [0] to server 0" in coordinator, coordinator
    assert "server 2 stopped (scaled away)" in coordinator, coordinator
    assert "died" not in coordinator and "no heartbeat" not in coordinator, coordinator
    # Server 2, started mid-job, served server 0's rows (row requests counted in its log),
    # then exited holding nothing.
    log = _text(a / "logs" / "server-2.log")
    assert "joined the running job" in log and \
        "serves the table rows of server 0 (moved here from server 0)" in log, log
    served = [line for line in log.splitlines() if "of them table row requests" in line]
    assert served and int(served[0].split("; ")[1].split()[0]) > 0, log
    assert "scaled away: it holds no partitions and exits" in log, log
    # Sync: bit for bit the job that never scaled: the table, the dense values.
    mine, theirs = load_file(str(a / "final.safetensors")), load_file(str(ref / "final.safetensors"))
    assert mine.keys() == theirs.keys()
    for key in mine:
        assert torch.equal(mine[key], theirs[key]), key
    # Every checkpoint holds each row once, as the reference's (a moved shard's file is
    # the server's that held it at that clock).
    clocks = CheckpointStore(str(a / "checkpoints")).clocks()[0]
    assert clocks and clocks[-1] == steps, clocks
    for clock in clocks:
        ids_a, rows_a = _table_rows(a, clock)
        ids_r, rows_r = _table_rows(ref, clock)
        assert torch.equal(ids_a, ids_r) and torch.equal(rows_a, rows_r), clock
        assert torch.equal(read_flat(str(a / "checkpoints"), clock)[1],
                           read_flat(str(ref / "checkpoints"), clock)[1]), clock
    # One written while scaled up (server 2's file holds server 0's rows) resumes onto 2
    # servers: each takes its rows back, as the reference holds them.
    store = CheckpointStore(str(a / "checkpoints"))
    up = [c for c in clocks if "2" in store.manifest(c)["files"]]
    assert up, [store.manifest(c)["files"] for c in clocks]
    copy = tmp_path / "copy"
    shutil.copytree(a, copy, ignore=lambda d, names: [
        n for n in names if n.startswith("clock-") and int(n.split("-")[1]) > up[0]])
    again = tmp_path / "again"
    code, output = Job(["launch", *flags, "--mode", "sync", "--out", again, "--resume", copy,
                        TABLE_JOB, "--steps", str(up[0])], timeout_s=120).wait()
    assert code == 0, output
    ids_b, rows_b = _table_rows(again, up[0])
    ids_r, rows_r = _table_rows(ref, up[0])
    assert torch.equal(ids_b, ids_r) and torch.equal(rows_b, rows_r)
    for rank in (0, 1):  # each server saved only its own shard again
        assert "@s" not in " ".join(load_file(str(again / "checkpoints" / f"clock-{up[0]:08d}"
                                                  / f"server-{rank}.safetensors")).keys())


def test_a_job_with_tables_scales_past_its_launched_servers_and_moves_hot_shards(monkeypatch):
    import tessera.cluster.elastic as elastic
    cfg = JobConfig()
    cfg.cluster.servers = 2
    e = elastic.Elastic(cfg)
    e.shard_elems = 8
    # 6 dense partitions of 10 elements, 3 per server; table shards of 8 elements.
    owner, shards = {p: p % 2 for p in range(6)}, {0: 0, 1: 1}
    sizes = {p: 10 for p in owner}
    assert "6 dense partitions and 2 table shards" in e.scale(9, owner, sizes, "running", "",
                                                               shards)
    assert e.scale(3, owner, sizes, "running", "", shards) == "" and e.joining == {2}
    e.joined(2, owner, shards)
    # Server 2 (no rows hash to it) takes one shard, and partitions even out around it.
    assert e.orders[-1] == 2 and -2 not in e.orders, e.orders
    assert e.orders == {-1: 2, 0: 2, 1: 2}, e.orders  # the shard, a partition of each
    for key, target in list(e.orders.items()):
        e.done(owner[key] if key >= 0 else shards[-key - 1], target, [key], owner, shards)
    assert shards == {0: 2, 1: 1}
    assert e.scale(2, owner, sizes, "running", "", shards) == ""
    assert e.orders[-1] == 0  # back home; server 2's partitions onto 0 and 1
    for key, target in list(e.orders.items()):
        e.done(2, target, [key], owner, shards)
    assert shards == {0: 0, 1: 1} and set(owner.values()) == {0, 1}
    monkeypatch.setattr(elastic, "RETIRE_AFTER_S", 0.0)
    held = {**owner, **{-k - 1: s for k, s in shards.items()}}
    assert e.retire(held) == [2]  # it holds nothing: it stops (a table job's too)
    assert e.scale(1, owner, sizes, "running", "", shards) == ""
    assert e.orders[-2] == 0  # server 1's rows go to server 0
    for key, target in list(e.orders.items()):
        e.done(1, target, [key], owner, shards)
    assert e.retire({**owner, **{-k - 1: s for k, s in shards.items()}}) == [1, 2]


def test_rebalance_moves_a_hot_table_shard_only_when_it_lowers_the_maximum():
    from tessera.cluster.elastic import hot_moves
    owner, shards = {0: 0, 1: 0, 2: 1, 3: 1}, {0: 0, 1: 1}
    # Server 0's load is in its table shard: the shard moves, not partitions.
    assert hot_moves(0, 1, {0: 0.9, 1: 0.1}, {0: 0.6}, owner, shards) == {-1: 1}
    # A shard worth more than the gap stays (0.2 + 0.7 is not below 0.8): partitions move.
    plan = hot_moves(0, 1, {0: 0.8, 1: 0.2}, {0: 0.7}, owner, shards)
    assert plan and all(k >= 0 for k in plan), plan
    # Load in the dense partitions: they move (as in a job without tables).
    assert hot_moves(0, 1, {0: 0.9, 1: 0.2}, {0: 0.05}, owner, shards) == \
        hot_moves(0, 1, {0: 0.9, 1: 0.2}, {}, owner, {}) == {1: 1}
    # A slow server (its shard costs it 0.9, the same shard costs server 1 0.05): the shard
    # moves, although its cost where it is would overload server 1.
    assert hot_moves(0, 1, {0: 0.95, 1: 0.08}, {0: 0.9, 1: 0.05}, {0: 0, 1: 1}, shards) == \
        {-1: 1}
    # Back the other way, server 0 now serving no shard: not onto a server a shard was
    # measured to cost 0.9 (it would be hotter than server 1 is now); partitions move.
    plan = hot_moves(1, 0, {0: 0.05, 1: 0.6}, {1: 0.5}, {0: 1, 1: 1, 2: 0, 3: 1},
                     {0: 1, 1: 1}, {0: 0.9, 1: 0.25})
    assert plan and all(k >= 0 for k in plan), plan
    assert hot_moves(1, 0, {0: 0.05, 1: 0.6}, {1: 0.5}, {0: 1, 1: 1, 2: 0, 3: 1},
                     {0: 1, 1: 1}) == {-1: 0}  # (without that memory, it would go back)
    # Of two shards on the hot server, one that moved there goes first.
    assert hot_moves(0, 1, {0: 0.9, 1: 0.1}, {0: 0.8}, owner, {0: 0, 1: 0}) == {-2: 1}
