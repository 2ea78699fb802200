"""Data and checkpoints on any fsspec location give the same results as a local path.

``memory://`` lives inside one process, so the memory tests read and write in this
process (the same functions the workers and servers call); the job test runs real
processes against ``file://`` URLs, which go through the same fsspec code path as
``s3://`` or ``gs://`` would.
"""

from __future__ import annotations

import json
import uuid

import fsspec
import numpy as np
import torch

from tessera.config.schema import DataConfig, OptimizerConfig
from tessera.data.datasets import load_dataset
from tessera.data.sampler import ShardSampler
from tessera.ps.checkpoint import CheckpointStore, read_flat, read_partition, restore_info
from tessera.ps.optim import make_rule, spec_from_config
from tests.harness import ROOT, run_job


def write_npy(url: str, x: np.ndarray, y: np.ndarray) -> None:
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    for name, arr in (("x.npy", x), ("y.npy", y)):
        with fs.open(f"{root}/{name}", "wb") as f:
            np.save(f, arr)


def digits_arrays():
    from sklearn.datasets import load_digits
    d = load_digits()
    return (d.data / 16.0).astype(np.float32), d.target.astype(np.int64)


def test_npy_data_from_memory_equals_local(tmp_path):
    x, y = digits_arrays()
    mem = f"memory://tessera-{uuid.uuid4().hex}/digits"
    write_npy(mem, x, y)
    write_npy(str(tmp_path / "digits"), x, y)
    a = load_dataset(DataConfig(dataset="npy", path=mem))
    b = load_dataset(DataConfig(dataset="npy", path=str(tmp_path / "digits")))
    from tests.test_datasets import inputs
    for split in ("train", "test"):
        sa, sb = getattr(a, split), getattr(b, split)
        torch.testing.assert_close(inputs(sa), inputs(sb), rtol=0, atol=0)
        assert torch.equal(sa.y, sb.y)
    # Each worker's shard is the same batches either way.
    sa = ShardSampler(len(a.train), batch_size=16, num_workers=2, rank=1, seed=3)
    sb = ShardSampler(len(b.train), batch_size=16, num_workers=2, rank=1, seed=3)
    assert all(np.array_equal(sa.indices(t), sb.indices(t)) for t in range(200))


def test_workers_stream_only_their_rows_from_a_remote_location():
    """A worker reading a few batches of a 20,000-sample x.npy on memory:// reads those
    rows, not the file; the rows are the ones the local file holds."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((20_000, 64)).astype(np.float32)
    y = (np.arange(20_000) % 10).astype(np.int64)
    mem = f"memory://tessera-{uuid.uuid4().hex}/big"
    write_npy(mem, x, y)
    ds = load_dataset(DataConfig(dataset="npy", path=mem, test_fraction=0.01))
    reader = ds.train.x.rows
    start = reader.bytes_read  # the test split (1%) is read whole
    sampler = ShardSampler(len(ds.train), batch_size=32, num_workers=4, rank=2, seed=0)
    for step in range(5):
        idx = sampler.indices(step)
        got = ds.train.x[idx]
        np.testing.assert_array_equal(got.numpy(), x[ds.train.x.index[idx]])
    assert reader.bytes_read - start == 5 * 32 * 64 * 4  # 5 batches of 32 rows, nothing else
    assert reader.bytes_read < x.nbytes / 20


def _write_checkpoint(url: str) -> dict:
    """Two 'servers' with SGD-momentum partitions, stepped, saved as a checkpoint."""
    store = CheckpointStore(url)
    gen = torch.Generator().manual_seed(0)
    cfg = OptimizerConfig(name="sgd", lr=0.1, momentum=0.9)
    parts = [(0, 0, 40, 0), (1, 40, 70, 1), (2, 70, 100, 0)]
    tensors: dict = {0: {}, 1: {}}
    for pid, start, stop, server in parts:
        rule = make_rule(torch.randn(stop - start, generator=gen), spec_from_config(cfg), start,
                         stop)
        for _ in range(3):
            rule.apply(torch.randn(stop - start, generator=gen))
        tensors[server][f"p{pid}/values"] = rule.master.clone()
        for k, v in rule.state_tensors().items():
            tensors[server][f"p{pid}/state/{k}"] = v.clone()
    files = {}
    for server, ts in tensors.items():
        files[str(server)], _ = store.write_shard(30, server, ts, {"rank": server, "clock": 30})
    manifest = {"clock": 30, "servers": 2, "files": files,
                "partitions": [{"id": i, "start": a, "stop": b, "server": s}
                               for i, a, b, s in parts],
                "data": {"epoch": 1, "offset": 64}}
    store.write_manifest(30, manifest)
    return manifest


def test_checkpoints_on_memory_equal_local(tmp_path):
    mem = f"memory://tessera-{uuid.uuid4().hex}/ck"
    local = str(tmp_path / "ck")
    for url in (mem, local):
        _write_checkpoint(url)
    m1, v1, s1 = read_flat(mem)
    m2, v2, s2 = read_flat(local)
    assert m1 == m2
    torch.testing.assert_close(v1, v2, rtol=0, atol=0)
    torch.testing.assert_close(s1["momentum_buffer"], s2["momentum_buffer"], rtol=0, atol=0)
    # Re-cut on load (3 servers instead of 2): the same slices from either location.
    for start, stop in ((0, 33), (33, 66), (66, 100)):
        got = []
        for url in (mem, local):
            store = CheckpointStore(url)
            got.append(read_partition(store, restore_info(store, store.latest()), {}, start, stop))
        torch.testing.assert_close(got[0][0], got[1][0], rtol=0, atol=0)
        torch.testing.assert_close(got[0][0], v2[start:stop], rtol=0, atol=0)
    # The manifest is written last: without it, a checkpoint is not complete.
    store = CheckpointStore(mem)
    store.write_shard(40, 0, {"p0/values": torch.zeros(40)}, {})
    assert store.clocks() == ([30], [40]) and store.latest()["clock"] == 30


def test_job_on_file_urls_equals_local_paths(tmp_path):
    x, y = digits_arrays()
    write_npy(str(tmp_path / "data"), x, y)
    common = ["--steps", "40", "--checkpoint-every", "20"]
    local = tmp_path / "local"
    url = tmp_path / "url"
    cfg_local = tmp_path / "local.toml"
    cfg_url = tmp_path / "url.toml"
    base = (ROOT / "examples" / "digits.toml").read_text().replace(
        'dataset = "digits"', 'dataset = "npy"\npath = "PATH"')
    cfg_local.write_text(base.replace("PATH", str(tmp_path / "data")))
    cfg_url.write_text(base.replace("PATH", f"file://{tmp_path / 'data'}"))
    a = run_job(str(cfg_local), local, *common, "--checkpoint-dir", str(tmp_path / "ck-local"))
    b = run_job(str(cfg_url), url, *common, "--checkpoint-dir", f"file://{tmp_path / 'ck-url'}")
    assert a["eval_loss"] == b["eval_loss"] and a["eval_accuracy"] == b["eval_accuracy"]
    _, va, sa = read_flat(str(tmp_path / "ck-local"), 40)
    _, vb, sb = read_flat(f"file://{tmp_path / 'ck-url'}", 40)
    torch.testing.assert_close(va, vb, rtol=0, atol=0)
    torch.testing.assert_close(sa["momentum_buffer"], sb["momentum_buffer"], rtol=0, atol=0)
    assert json.loads((url / "summary.json").read_text())["checkpoints"] == [20, 40]
