"""Training from a stream of shards (``[data] follow = true``), delta checkpoints and export,
on real clusters: shards appended while the job trains are each trained exactly once
(from what the workers record having read), across an interrupt and a resume from a
delta checkpoint; a delta checkpoint plus its base holds (and a resume from it restores)
bit for bit what a full checkpoint of the same clock holds; the export of a delta chain
loads into a plain PyTorch model that predicts what the job evaluated."""

from __future__ import annotations

import json
import signal
import threading
import time

import numpy as np
import pytest
import torch

from tessera.data.clicks import ClickLog
from tessera.data.stream import END_MARKER, EVAL_FILE, end_stream, read_ledgers, write_shard
from tessera.ps.embedding_ids import initial_rows
from tessera.ps.checkpoint import CheckpointStore, apply_delta, read_flat, table_shards
from tessera.ps.embedding import EmbeddingShard
from tests.harness import Job, run_cli, wait_for
from tests.test_embedding_checkpoint import (CASE_IDS, CASES, CONFIGS, assert_same_state,
                                             id_pool, play, spec)

FIELDS, ID_SPACE, SHARD = 8, 50_000, 256


def _job(tmp_path, data, *, workers: int, name: str, delta_every: int, every: int = 4,
         servers: int = 2) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(f"""
name = "{name}"
[model]
embedding_optimizer = "adagrad"
embedding_lr = 0.05
[data]
dataset = "clicks"
path = "{data}"
follow = true
follow_poll_s = 0.05
batch_size = {128 // workers}
id_space = {ID_SPACE}
num_fields = {FIELDS}
[train]
eval_every = 100000
log_every = 10
[ps]
mode = "sync"
[cluster]
workers = {workers}
servers = {servers}
[checkpoint]
every = {every}
delta_every = {delta_every}
keep = 20
""")
    return str(path)


def _shard(data, i: int, log: ClickLog) -> None:
    ids, y = log.batch(i, SHARD)
    write_shard(str(data), f"shard-{i:06d}.npz", ids=ids.numpy(), y=y.numpy())


def _eval_file(data, log: ClickLog) -> None:
    ids, y = log.batch(10**6, 1000)
    write_shard(str(data), EVAL_FILE, ids=ids.numpy(), y=y.numpy())


def _covered_once(lines, sizes: dict) -> None:
    """Every shard's rows read exactly once, over every worker's ledger lines."""
    got: dict = {}
    for line in lines:
        got.setdefault(line["shard"], []).append((line["lo"], line["hi"]))
    assert sorted(got) == sorted(sizes), (sorted(got), sorted(sizes))
    for shard, parts in got.items():
        at = 0
        for lo, hi in sorted(parts):
            assert lo == at, f"{shard}: rows {at}..{lo} skipped or read twice ({sorted(parts)})"
            at = hi
        assert at == sizes[shard], f"{shard}: read {at} of {sizes[shard]} rows"


def test_follow_trains_every_shard_once_across_interrupt_and_delta_resume(tmp_path):
    data, log = tmp_path / "data", ClickLog(num_fields=FIELDS, id_space=ID_SPACE, seed=3)
    data.mkdir()
    for i in range(3):
        _shard(data, i, log)
    _eval_file(data, log)
    job_file = _job(tmp_path, data, workers=2, name="follow", delta_every=100)
    run1, run2 = tmp_path / "run1", tmp_path / "run2"
    job = Job(["run", job_file, "--out", run1, "--quiet"], timeout_s=120)
    written = [3]
    stop = threading.Event()

    def reading(shard: int) -> bool:
        want = f'"shard-{shard:06d}.npz"'
        return any(want in p.read_text() for p in (run1 / "stream").glob("worker-*.jsonl"))

    def produce():  # shards keep arriving while the job trains: one ahead of its reading
        while not stop.is_set() and written[0] < 12:
            if reading(written[0] - 2):
                _shard(data, written[0], log)
                written[0] += 1
            time.sleep(0.05)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        # Interrupt while shards arrive and steps run: after some delta checkpoints.
        wait_for(lambda: (run1 / "checkpoints" / "clock-00000012" / "manifest.json").exists(),
                 60, "three checkpoints of the followed stream")
        stop.set()
        producer.join(timeout=10)
        assert written[0] < 12, "the producer finished before the interrupt"
        job.proc.send_signal(signal.SIGINT)
        code, out1 = job.wait()
    finally:
        stop.set()
        producer.join(timeout=10)
        if job.proc.poll() is None:
            job.kill()
    assert code == 130, out1
    assert "checkpoint at clock" in out1, out1
    store = CheckpointStore(str(run1 / "checkpoints"))
    complete, _ = store.clocks()
    last = store.manifest(complete[-1])
    clock = last["clock"]
    # Full at clock 4, then deltas: the run resumes from a delta checkpoint whose chain
    # starts at a full one. (A snapshot is full, too, where the newest before it still
    # waits for its manifest: on a busy machine, clock 8's.)
    chain = last.get("delta", {}).get("chain", [])
    assert chain and "delta" not in store.manifest(chain[0]), (complete, last.get("delta"))
    # The rest of the stream arrives; the resumed run trains it to the end marker.
    while written[0] < 12:
        _shard(data, written[0], log)
        written[0] += 1
    end_stream(str(data))
    code, out2 = run_cli(["run", job_file, "--out", run2, "--quiet", "--resume", run1],
                         timeout_s=120)
    assert code == 0, out2
    summary = json.loads((run2 / "summary.json").read_text())
    total = 12 * SHARD
    assert summary["steps"] == total // 128, summary
    assert summary["worker_loop_steps"] == [total // 128 - clock] * 2, (clock, summary)
    # What the workers read: run 1 up to the checkpoint's clock (later steps were not
    # committed and are trained again), then run 2.
    lines = [x for x in read_ledgers(run1) if x["step"] < clock] + read_ledgers(run2)
    assert all(x["step"] >= clock for x in read_ledgers(run2))
    _covered_once(lines, {f"shard-{i:06d}.npz": SHARD for i in range(12)})
    assert sum(x["hi"] - x["lo"] for x in lines) == total
    assert {x["worker"] for x in lines} == {0, 1}

    # Export (a delta chain when the last checkpoint is one) into a plain PyTorch model.
    final = CheckpointStore(str(run2 / "checkpoints"))
    assert final.manifest(final.clocks()[0][-1])["clock"] == total // 128
    out = tmp_path / "model.safetensors"
    code, text = run_cli(["export", run2, "--out", out])
    assert code == 0, text
    from safetensors.torch import load_file
    state = load_file(str(out))
    with np.load(data / EVAL_FILE) as z:
        x, y = torch.from_numpy(z["ids"]), torch.from_numpy(z["y"]).float()
    # Rows the servers never stored answer their initial value (a pure function of the
    # table's seed and the id): the plain model's table gets those too.
    spec = final.manifest(final.clocks()[0][-1])["tables"][0]
    unseen = np.setdiff1d(x.numpy().ravel(), state["tables.weights.ids"].numpy())
    ids = torch.cat([state["tables.weights.ids"], torch.from_numpy(unseen)])
    rows = torch.cat([state["tables.weights.rows"],
                      initial_rows(unseen, 1, spec["seed"], spec["init_scale"])])
    ids, order = torch.sort(ids)
    rows = rows[order]

    class Plain(torch.nn.Module):  # logistic regression over a plain nn.Embedding
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Embedding(len(ids), 1)
            self.bias = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return self.table(torch.searchsorted(ids, x)).squeeze(-1).sum(1) + self.bias

    model = Plain()
    model.load_state_dict({"table.weight": rows, "bias": state["bias"]})
    with torch.no_grad():
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).item()
    assert abs(loss - summary["eval_loss"]) < 1e-5, (loss, summary["eval_loss"])


def test_a_stream_that_goes_idle_ends_by_itself_after_follow_idle_s(tmp_path):
    """[data] follow_idle_s: no _END is ever written, yet the job ends once no shard has
    arrived for that long. Worker 0 writes the marker naming the last shard there; every
    worker ends at it; each shard, those written while the job ran too, is trained once."""
    data, log = tmp_path / "data", ClickLog(num_fields=FIELDS, id_space=ID_SPACE, seed=5)
    data.mkdir()
    for i in range(2):
        _shard(data, i, log)
    job_file = _job(tmp_path, data, workers=2, name="idle", delta_every=0, every=1000)
    text = open(job_file).read().replace("follow_poll_s = 0.05",
                                         "follow_poll_s = 0.05\nfollow_idle_s = 1.5")
    open(job_file, "w").write(text)
    run = tmp_path / "run"
    job = Job(["run", job_file, "--out", run, "--quiet"], timeout_s=90)
    try:
        # Two more shards while the job trains (well inside the idle time of each other).
        wait_for(lambda: any((run / "stream").glob("worker-*.jsonl")), 60, "the first step")
        for i in (2, 3):
            _shard(data, i, log)
            time.sleep(0.3)
        code, out = job.wait()
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert code == 0, out
    assert (data / END_MARKER).read_text() == "shard-000003.npz"
    said = (run / "logs" / "worker-0.log").read_text()
    assert "no new shard in 1.5 s ([data] follow_idle_s): the stream ends with " \
           "shard-000003.npz" in said, said[-2000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 * SHARD // 128, summary
    _covered_once(read_ledgers(run), {f"shard-{i:06d}.npz": SHARD for i in range(4)})


def test_interrupt_while_waiting_for_shards_at_a_checkpointed_clock(tmp_path):
    """SIGINT while every worker waits for the next shard, at a clock whose checkpoint is
    complete already: the workers end there, the servers have nothing newer to write, and
    the launcher still gets its answer and names that checkpoint (the coordinator once
    ended without answering: "the coordinator exited before answering the checkpoint")."""
    data, log = tmp_path / "data", ClickLog(num_fields=FIELDS, id_space=ID_SPACE, seed=7)
    data.mkdir()
    for i in range(4):  # 2 steps a shard: the stream runs dry at clock 8, checkpointed
        _shard(data, i, log)
    job_file = _job(tmp_path, data, workers=1, name="dry", delta_every=0, servers=1)
    run = tmp_path / "run"
    job = Job(["run", job_file, "--out", run, "--quiet"], timeout_s=90)
    try:
        wait_for(lambda: (run / "checkpoints" / "clock-00000008" / "manifest.json").exists(),
                 60, "the checkpoint at clock 8")
        time.sleep(0.5)  # the worker is waiting for step 9's shard
        job.proc.send_signal(signal.SIGINT)
        code, out = job.wait()
    finally:
        if job.proc.poll() is None:
            job.kill()
    assert code == 130, out
    assert "checkpoint at clock 8 in" in " ".join(out.split()), out
    assert CheckpointStore(str(run / "checkpoints")).latest()["clock"] == 8


def test_delta_checkpoint_restores_what_a_full_one_holds(tmp_path):
    data, log = tmp_path / "data", ClickLog(num_fields=FIELDS, id_space=ID_SPACE, seed=5)
    data.mkdir()
    for i in range(2):  # clocks 1-4: the first checkpoint (3), full
        _shard(data, i, log)
    # The same job twice on one worker (bit-for-bit deterministic): deltas, and full. The
    # delta run follows the stream: the rest of it arrives once the first checkpoint's
    # manifest is written, so the later checkpoints have a complete one to be deltas of
    # (with every shard there at the start, a loaded machine could run all 12 clocks
    # before the first manifest was written, and every checkpoint was full).
    runs = {}
    for name, delta_every in (("delta", 4), ("full", 0)):
        runs[name] = tmp_path / name
        job = Job(["run", _job(tmp_path, data, workers=1, name=name, delta_every=delta_every,
                               every=3, servers=1), "--out", runs[name], "--quiet"],
                  timeout_s=120)
        try:
            if name == "delta":
                wait_for(lambda: (runs["delta"] / "checkpoints" / "clock-00000003" /
                                  "manifest.json").exists() or job.proc.poll() is not None,
                         90, "the first checkpoint's manifest")
                for i in range(2, 6):
                    _shard(data, i, log)
                (data / END_MARKER).write_text("")
            code, out = job.wait()
        finally:
            if job.proc.poll() is None:
                job.kill()
        assert code == 0, out
    delta = CheckpointStore(str(runs["delta"] / "checkpoints"))
    full = CheckpointStore(str(runs["full"] / "checkpoints"))
    clocks = delta.clocks()[0]
    assert clocks == full.clocks()[0] == [3, 6, 9, 12], clocks
    kinds = [bool(delta.manifest(c).get("delta")) for c in clocks]
    # The first is full; the later ones are deltas against the newest earlier checkpoint
    # whose manifest was written when they were taken (under load, not always the one
    # just before), so the chains vary but every chain starts at the full one.
    assert kinds[0] is False and any(kinds), kinds
    for c in [c for c, k in zip(clocks, kinds) if k]:
        chain = delta.manifest(c)["delta"]["chain"]
        assert not kinds[clocks.index(chain[0])] and max(chain) < c, (c, chain)
    for c in clocks:
        a = table_shards(delta, c, "weights")
        b = table_shards(full, c, "weights")
        a = sorted(a, key=lambda s: int(s["ids"][0]))
        b = sorted(b, key=lambda s: int(s["ids"][0]))
        assert len(a) == len(b) == 1
        for sa, sb in zip(a, b):
            assert sorted(sa) == sorted(sb)
            for key in sa:
                assert torch.equal(sa[key], sb[key]), (c, key)
        _, va, sta = read_flat(str(runs["delta"] / "checkpoints"), c)
        _, vb, stb = read_flat(str(runs["full"] / "checkpoints"), c)
        assert torch.equal(va, vb) and sorted(sta) == sorted(stb)
        assert all(torch.equal(sta[k], stb[k]) for k in sta)
        if kinds[clocks.index(c)]:  # a delta holds only the rows touched since
            rows_delta = sum(len(delta.open_shard(c, f"server-{r}.safetensors")
                                 .get("t/weights/ids")) for r in range(1))
            rows_full = sum(len(s["ids"]) for s in b)
            assert rows_delta < rows_full, (c, rows_delta, rows_full)

    # Resuming from the newest delta checkpoint (its chain copied alone: --resume takes
    # the newest) restores the state the full one holds: the resumed run's first
    # checkpoint (at that clock, written whole in its own run directory).
    import shutil
    d = max(c for c, k in zip(clocks, kinds) if k)
    chain = tmp_path / "chain" / "checkpoints"
    for c in [*delta.chain(d), d]:
        shutil.copytree(runs["delta"] / "checkpoints" / f"clock-{c:08d}", chain / f"clock-{c:08d}")
    resumed = tmp_path / "resumed"
    code, out = run_cli(["run", _job(tmp_path, data, workers=1, name="delta", delta_every=4,
                                     every=3, servers=1),
                         "--out", resumed, "--quiet", "--steps", d, "--resume", chain.parent],
                        timeout_s=120)
    assert code == 0, out
    again = CheckpointStore(str(resumed / "checkpoints"))
    assert again.clocks()[0] == [d] and not again.manifest(d).get("delta")
    a = sorted(table_shards(again, d, "weights"), key=lambda s: int(s["ids"][0]))
    b = sorted(table_shards(full, d, "weights"), key=lambda s: int(s["ids"][0]))
    for sa, sb in zip(a, b):
        assert sorted(sa) == sorted(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    _, va, sta = read_flat(str(resumed / "checkpoints"), d)
    _, vb, stb = read_flat(str(runs["full"] / "checkpoints"), d)
    assert torch.equal(va, vb) and all(torch.equal(sta[k], stb[k]) for k in sta)


@pytest.mark.parametrize("name,admit_after", CASES, ids=CASE_IDS)
def test_delta_export_applied_to_its_base_is_the_full_export(name, admit_after):
    """Tier 1, every optimizer and admission setting, with eviction: base + deltas (two
    in a row) give the shard's full export bit for bit."""
    shard = EmbeddingShard(spec(CONFIGS[name], admit_after), CONFIGS[name])
    play([shard], range(0, 10), seed=1)
    base = shard.export_state()
    play([shard], range(10, 20), seed=2)
    first = shard.export_touched(10)
    middle = apply_delta(base, first, "first")
    assert_same_state(middle, shard.export_state())
    play([shard], range(20, 30), seed=3)
    second = shard.export_touched(20)
    assert_same_state(apply_delta(middle, second, "second"), shard.export_state())
    # Rows evicted since (untouched for evict_after clocks) are dropped from the result.
    later = apply_delta(middle, second, "second")
    shard.lookup(np.sort(id_pool()[:20]), 37)
    shard.evict(40)
    third = shard.export_touched(30)
    gone = np.setdiff1d(later["ids"].numpy(), third["all_ids"].numpy())
    assert len(gone) > 0 and len(third["all_ids"]) > 0
    result = apply_delta(later, third, "third")
    assert_same_state(result, shard.export_state())
    assert not np.isin(gone, result["ids"].numpy()).any()


@pytest.mark.parametrize("admit_after", [1, 2])
def test_delta_of_a_table_that_never_evicts_carries_no_id_list(admit_after):
    cfg = CONFIGS["adagrad"]
    shard = EmbeddingShard(spec(cfg, admit_after, evict_after=0), cfg)
    play([shard], range(0, 10), seed=4)
    base = shard.export_state()
    play([shard], range(10, 20), seed=5)
    delta = shard.export_touched(10)
    assert "all_ids" not in delta and int(delta["stored"]) == len(shard.export_state()["ids"])
    assert_same_state(apply_delta(base, delta, "delta"), shard.export_state())


def test_shard_stream_spans_shards_skips_temporary_names_and_refuses_a_late_name(tmp_path):
    from tessera.data.location import DataError
    from tessera.data.stream import ShardStream
    data = tmp_path / "data"
    sizes = {"a-000.npz": 5, "a-001.npz": 3, "a-002.npz": 9}
    for n, (name, size) in enumerate(sizes.items()):
        write_shard(str(data), name, ids=np.full((size, 2), n, dtype=np.int64),
                    y=np.arange(size, dtype=np.float32))
    (data / ".a-003.npz.tmp123").write_bytes(b"half a shard")  # a writer's temporary name
    (data / "_notes.txt").write_text("not a shard")
    stream = ShardStream(str(data), poll_s=0.01)
    assert stream.wait_for(17) and stream.total == 17 and not stream.ended
    arrays, parts = stream.take(4, 14)  # the end of a-000, all of a-001, most of a-002
    assert parts == [("a-000.npz", 4, 5), ("a-001.npz", 0, 3), ("a-002.npz", 0, 6)]
    assert arrays["ids"][:, 0].tolist() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert arrays["y"].tolist() == [4, 0, 1, 2, 0, 1, 2, 3, 4, 5]
    end_stream(str(data))
    assert not stream.wait_for(18) and stream.ended  # past the end: the stream is over
    write_shard(str(data), "a-0005.npz", ids=np.zeros((1, 2), dtype=np.int64),
                y=np.zeros(1, dtype=np.float32))  # sorts before a-001.npz, which was read
    with pytest.raises(DataError, match="must sort after every shard"):
        stream.refresh()


def test_stop_ends_a_followed_stream_at_the_last_shard_there(tmp_path):
    from tessera.data.stream import ShardStream
    data = tmp_path / "data"
    for i in range(2):
        write_shard(str(data), f"s-{i}.npz", ids=np.zeros((4, 1), dtype=np.int64),
                    y=np.zeros(4, dtype=np.float32))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"follow": True, "path": str(data)}}))
    code, out = run_cli(["stop", run], timeout_s=60)
    assert code == 0 and "ends with s-1.npz" in out, out
    write_shard(str(data), "s-2.npz", ids=np.zeros((4, 1), dtype=np.int64),
                y=np.zeros(4, dtype=np.float32))  # after the stop: not part of the stream
    stream = ShardStream(str(data), poll_s=0.01)
    assert stream.wait_for(8) and not stream.wait_for(9) and stream.names == ["s-0.npz", "s-1.npz"]
    (run / "config.json").write_text(json.dumps({"data": {"follow": False, "path": str(data)}}))
    code, out = run_cli(["stop", run], timeout_s=60)
    assert code == 2 and "does not follow a stream" in out and "Traceback" not in out, out
