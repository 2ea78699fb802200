"""--resume of a script that calls ``tessera.shard`` after ``tessera.distribute``: the
worker registered before it knew its dataset's size, so the checkpoint counted the data
position as an endless stream. The resumed samplers must still continue at the same
samples as an uninterrupted run, past the first epoch."""

from __future__ import annotations

import json

from tessera.data.sampler import ShardSampler
from tests.harness import ROOT, run_cli

SCRIPT = ROOT / "tests" / "scripts" / "late_shard.py"


def test_resume_past_the_first_epoch_when_shard_comes_after_distribute(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    flags = ["launch", "--workers", 2, "--servers", 1, "--quiet"]
    code, output = run_cli([*flags, "--checkpoint-every", 10, "--out", a, SCRIPT, 60],
                           timeout_s=180)
    assert code == 0, output
    # 60 steps of 2 x 32 samples: past the first epoch of digits' training split.
    samples = json.loads((a / "first-0.json").read_text())["samples"]
    assert 60 * 64 > samples, samples
    code, output = run_cli([*flags, "--resume", a, "--out", b, SCRIPT, 70], timeout_s=180)
    assert code == 0, output
    for rank in (0, 1):
        first = json.loads((b / f"first-{rank}.json").read_text())
        assert first["step"] == 60, first
        fresh = ShardSampler(samples, batch_size=32, num_workers=2, rank=rank, seed=0)
        assert first["ids"] == fresh.indices(60).tolist(), rank
