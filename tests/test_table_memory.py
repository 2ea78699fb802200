"""Table memory that stays bounded (``[model] table_memory_mb``), with real processes:

* a real server process under a byte cap takes a stream of 200k distinct ids (Zipf
  hot ids and new ids, each seen twice); its resident memory, read from /proc, stops
  growing once the table is full (within 5% of the cap over the second half of the
  stream), while the same stream grows a server without a cap (exact admission
  counts) all along;
* the clicks job with a cap per server, LFU eviction and Bloom-filter admission
  reaches the AUC of an unbounded table (same seed, same data) within 0.005, the
  capped tables full and evicting; its checkpoint restores the same rows, optimizer
  state, lookup counts, admission filter and slot layout on ``--resume``;
* a capped shard restored from a checkpoint (safetensors) goes on bit-identically,
  evictions included; user mistakes are one-line errors.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import secrets
from pathlib import Path

import numpy as np
import pytest
import torch

from tessera.config.schema import OptimizerConfig
from tessera.ps.checkpoint import CheckpointStore
from tessera.ps.embedding import EmbeddingShard
from tessera.ps.embedding_ids import TableError
from tessera.transport.endpoint import close_context
from tessera.transport.wire import TableSpec
from tests.harness import ROOT, Job, run_cli

PAGE = os.sysconf("SC_PAGE_SIZE")
DIM = 16


def _rss(pid) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE


def _hwm(pid) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _serve(secret: str, conn, stop, spec_kw: dict) -> None:
    """A real ParameterServer with one table ``emb`` (a spawned process)."""
    import zmq

    from tessera.ps import kernels
    from tessera.ps.server import ParameterServer, ServerHooks, ServerOptions
    from tessera.transport.endpoint import ServerEndpoint

    torch.set_num_threads(1)
    kernels.warm()  # the process's code, loaded before its table, as a fork server does
    ctx = zmq.Context()
    spec = TableSpec(name="emb", dim=DIM, optimizer=OptimizerConfig(name="adagrad", lr=0.05),
                     **spec_kw)
    base = _rss("self")  # before the server and its table exist
    endpoint = ServerEndpoint(ctx, "127.0.0.1", secret)
    server = ParameterServer(ServerOptions(rank=0, num_workers=1, mode="async"),
                             endpoint=endpoint, partitions=[],
                             optimizer=OptimizerConfig(name="sgd", lr=0.05), tables=[spec],
                             hooks=ServerHooks(should_stop=stop.is_set))
    conn.send((endpoint.address, base))
    server.serve()
    shard = server.tables.tables["emb"].shard
    conn.send({"rows": shard.num_rows, "evictions": shard.evictions,
               "capacity": shard.capacity.rows if shard.capacity else None})
    endpoint.close()
    close_context(ctx)


def test_a_capped_server_stays_within_its_bytes_where_an_unbounded_one_grows(tmp_path):
    import zmq

    from tessera.ps.client import PSClient
    from tessera.ps.sharding import ShardMap

    cap = 16 << 20
    mpctx = mp.get_context("spawn")
    servers = {}
    for name, kw in (("capped", dict(memory_bytes=cap, admit_after=2, eviction="lfu",
                                     lfu_half_life=50, evict_after=400)),
                     ("unbounded", dict(admit_after=2))):
        secret, stop = secrets.token_hex(8), mpctx.Event()
        parent, child = mpctx.Pipe()
        proc = mpctx.Process(target=_serve, args=(secret, child, stop, kw), daemon=True)
        proc.start()
        assert parent.poll(120), f"{name} server did not start"
        address, base = parent.recv()
        ctx = zmq.Context()
        client = PSClient(ctx=ctx, shard_map=ShardMap(layout=(), partitions=(), num_servers=1),
                          server_addresses=[address], secret=secret, worker=0, timeout_s=60.0)
        client.connect()
        servers[name] = dict(proc=proc, conn=parent, stop=stop, base=base, ctx=ctx,
                             client=client)
    try:
        rng = np.random.default_rng(0)
        grads = torch.full((16384, DIM), 0.01)
        fresh, prev = 1 << 40, np.empty(0, dtype=np.int64)
        full = {}
        for clock in range(48):
            # 4,096 new ids, the previous batch's again (admitted at this second lookup),
            # and Zipf draws over 10^5 hot ids: 200k distinct ids; 67k rows fit the cap,
            # full after ~17 batches.
            hot = rng.zipf(1.1, 2048)
            new = np.arange(fresh, fresh + 4096, dtype=np.int64)
            fresh += 4096
            ids = np.unique(np.concatenate([hot[hot < 100_000], prev, new]).astype(np.int64))
            prev = new
            for s in servers.values():
                rows = s["client"].pull_rows("emb", 0, ids, clock).wait()
                assert rows.numel() == len(ids) * DIM
                s["client"].push_rows("emb", 0, ids, grads[:len(ids)], clock).wait()
            if clock == 23:  # the capped table is full: from here on it only evicts
                full = {n: _rss(s["proc"].pid) for n, s in servers.items()}
        end = {n: _rss(s["proc"].pid) for n, s in servers.items()}
        grown = {n: _hwm(s["proc"].pid) - s["base"] for n, s in servers.items()}
    finally:
        stats = {}
        for name, s in servers.items():
            s["client"].close()
            s["stop"].set()
            stats[name] = s["conn"].recv() if s["conn"].poll(60) else None
            s["proc"].join(30)
            close_context(s["ctx"])
    capped = stats["capped"]
    assert capped["rows"] == capped["capacity"] and capped["evictions"] > 0, stats
    # Bounded: 100k more distinct ids into the full table add nothing but noise (the
    # allocator's: up to 0.86 MiB seen, where the unbounded table grows ~20 MiB) ...
    later = {n: end[n] - full[n] for n in end}
    assert later["capped"] <= 0.05 * cap + (1 << 20), (later, stats)
    # ... and in all it took the cap (+5%) plus what a server process needs besides its
    # table (sockets, threads, lazy imports, allocator, one request's buffers: ~10-15 MiB,
    # whatever the cap, up to ~27 MiB at its peak on a loaded machine;
    # benchmarks/table_memory.py holds +2.6% at a 256 MiB cap).
    assert grown["capped"] <= 1.05 * cap + (32 << 20), (grown, stats)
    # The alternative, measured the same way, grows all along: the test can fail.
    assert later["unbounded"] > cap / 2 and grown["unbounded"] > 2 * cap, (later, grown)


CLICKS = (ROOT / "examples" / "clicks.toml").read_text()


def _clicks_job(tmp_path: Path, name: str, model: str) -> Path:
    text = (CLICKS.replace("max_rows_per_server = 600000", model)
            .replace("samples_per_epoch = 1000000", "samples_per_epoch = 200000")
            .replace("eval_samples = 20000", "eval_samples = 10000")
            .replace("servers = 4", "servers = 2"))
    job = tmp_path / f"{name}.toml"
    job.write_text(text)
    return job


def _tables(run: Path, clock: int) -> dict:
    store = CheckpointStore(str(run / "checkpoints"))
    out = {}
    for name in store.manifest(clock)["files"].values():
        f = store.open_shard(clock, name)
        for key in f.keys():
            if key.startswith("t/"):
                out[f"{f.meta['rank']}:{key}"] = f.get(key)
    return out


def test_clicks_auc_under_a_cap_and_its_checkpoint_resumes(tmp_path):
    capped = _clicks_job(tmp_path, "capped", 'table_memory_mb = 2\neviction = "lfu"\n'
                         'lfu_half_life = 20\nadmit_after = 2')
    unbounded = _clicks_job(tmp_path, "unbounded", "max_rows_per_server = 0")
    flags = ["--mode", "sync", "--steps", "40", "--quiet"]
    a, u, b = tmp_path / "a", tmp_path / "u", tmp_path / "b"
    jobs = [Job(["run", capped, "--out", a, "--checkpoint-every", "20", *flags], timeout_s=240),
            Job(["run", unbounded, "--out", u, *flags], timeout_s=240)]
    for job in jobs:
        code, output = job.wait()
        assert code == 0, output
    sa = json.loads((a / "summary.json").read_text())
    su = json.loads((u / "summary.json").read_text())
    gap = su["eval_auc"] - sa["eval_auc"]
    assert abs(gap) <= 0.005, (sa["eval_auc"], su["eval_auc"])
    rows, cap = sa["rows_per_server"]["weights"], sa["table_capacity_per_server"]["weights"]
    assert rows == cap and min(sa["table_evictions_per_server"]["weights"]) > 0, sa
    assert sum(su["rows_per_server"]["weights"]) > 4 * sum(rows), su  # the cap did bind
    assert max(sa["table_bytes_per_server"]["weights"]) <= 2 << 20

    # Resume from the capped run's clock 40, no further step: its own checkpoint holds
    # the same rows, state, counts, filter and layout.
    code, output = run_cli(["run", capped, "--out", b, "--resume", a, "--checkpoint-every",
                            "20", *flags], timeout_s=240)
    assert code == 0, output
    before, after = _tables(a, 40), _tables(b, 40)
    assert before.keys() == after.keys() and any(k.endswith("/bloom") for k in before)
    differ = [k for k in before if not torch.equal(before[k], after[k])]
    assert not differ, differ


def _stream(shard: EmbeddingShard, clocks: range, seed: int) -> list[torch.Tensor]:
    rng, out = np.random.default_rng(seed), []
    for clock in clocks:
        hot = rng.zipf(1.2, 2000) % 5000
        ids = np.unique(np.concatenate([hot, 10**9 + clock * 2000 + np.arange(2000)]))
        out.append(shard.lookup(ids, clock))
        shard.apply(ids, torch.full((len(ids), 4), 0.01), clock)
    return out


@pytest.mark.parametrize("eviction", ["lru", "lfu"])
def test_a_capped_shard_restored_from_safetensors_goes_on_bit_identically(tmp_path, eviction):
    from safetensors.torch import load_file, save_file
    spec = TableSpec(name="w", dim=4, memory_bytes=1 << 19, admit_after=2, evict_after=30,
                     eviction=eviction, lfu_half_life=10,
                     optimizer=OptimizerConfig(name="adagrad", lr=0.1))
    shard = EmbeddingShard(spec, spec.optimizer)
    _stream(shard, range(40), 0)
    assert shard.num_rows <= shard.capacity.rows and shard.evictions > 0, shard.evictions
    save_file(shard.export_state(), str(tmp_path / "s.safetensors"))
    restored = EmbeddingShard(spec, spec.optimizer)
    restored.import_state(load_file(str(tmp_path / "s.safetensors")))
    assert shard.evictions  # and from here both evict the same rows
    for x, y in zip(_stream(shard, range(40, 60), 1), _stream(restored, range(40, 60), 1)):
        assert torch.equal(x, y)
    a, b = shard.export_state(), restored.export_state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Onto two shards of half the bytes: each keeps its most recently touched rows.
    from tessera.ps.embedding_ids import owner_of
    half = TableSpec(**{**{f: getattr(spec, f) for f in spec.__struct_fields__},
                        "memory_bytes": 1 << 18})
    ids = a["ids"].numpy()
    for rank in range(2):
        part = EmbeddingShard(half, half.optimizer)
        part.import_state(a, owner_of(ids, 2) == rank)
        assert 0 < part.num_rows <= part.capacity.rows
        kept = part.export_state()
        mine = owner_of(ids, 2) == rank
        if mine.sum() > part.capacity.rows:
            cut = np.sort(a["last"].numpy()[mine])[-part.capacity.rows]
            assert kept["last"].min() >= cut


def test_memory_mistakes_are_one_line_errors(tmp_path):
    with pytest.raises(TableError, match="table_memory_mb"):
        EmbeddingShard(TableSpec(name="w", dim=64, memory_bytes=1000), OptimizerConfig())
    with pytest.raises(ValueError, match="eviction must be 'lru' or 'lfu'"):
        TableSpec(name="w", dim=4, eviction="fifo")
    job = _clicks_job(tmp_path, "bad", "table_memory_mb = 8\nadmission_filter_mb = 9")
    code, output = run_cli(["run", job, "--out", tmp_path / "r", "--quiet"], timeout_s=60)
    assert code != 0 and "admission_filter_mb" in output and "Traceback" not in output
    job = _clicks_job(tmp_path, "tiny", "table_memory_mb = 0.01")
    code, output = run_cli(["run", job, "--out", tmp_path / "r1", "--quiet"], timeout_s=60)
    assert code != 0 and "table_memory_mb" in output and "Traceback" not in output
    # A table too wide for its cap (one 200,000-wide row and its Adagrad state take 1.6 MB,
    # over the 1 MiB cap): refused by worker 0 in one line before it registers the table,
    # so no server is asked to build it.
    out = tmp_path / "wide"
    code, output = run_cli(["launch", "--workers", "1", "--servers", "1", "--quiet", "--out",
                            out, str(ROOT / "tests" / "scripts" / "table_job.py"), "--dim",
                            "200000", "--memory-mb", "1"], timeout_s=90)
    said = " ".join(output.split())  # (the launcher wraps its lines)
    assert code != 0 and "Traceback" not in output, output
    assert "worker 0 (pid" in said and "tessera: table 'users': memory_bytes = 1048576" in said
    assert "cannot hold one row" in said and "raise table_memory_mb" in said, output
    for log in (out / "logs").glob("server-*.log"):
        assert "cannot hold one row" not in log.read_text(), log.read_text()
    job = _clicks_job(tmp_path, "rep", "table_memory_mb = 8")
    code, output = run_cli(["run", job, "--out", tmp_path / "r2", "--replication", "2",
                            "--quiet"], timeout_s=60)
    assert code != 0 and "table_memory_mb" in output and "Traceback" not in output


def test_capacity_counts_every_byte_the_shard_allocates():
    spec = TableSpec(name="w", dim=8, memory_bytes=8 << 20, admit_after=3, eviction="lfu",
                     optimizer=OptimizerConfig(name="adam", lr=0.01))
    shard = EmbeddingShard(spec, spec.optimizer)
    arrays = [shard._values, *shard._state.values()]
    numpy_arrays = [shard._state_slot, shard._freq, shard._rows.ids, shard._rows.last,
                    shard._rows._table, shard._bloom.counters]
    allocated = sum(t.nbytes for t in arrays) + sum(a.nbytes for a in numpy_arrays)
    # The free lists (at most 8 bytes per row each) are the rest of the plan.
    free_lists = 8 * shard.capacity.rows * 2
    assert allocated + free_lists == shard.capacity.nbytes <= spec.memory_bytes
    assert shard.capacity.nbytes > 0.9 * spec.memory_bytes
