"""Tier 1: ShardSampler against the one-process sampler with the global batch."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tessera.data.sampler import ShardSampler
from tessera.errors import UsageError


def samplers(n, batch, workers, seed):
    return [ShardSampler(n, batch_size=batch, num_workers=workers, rank=r, seed=seed)
            for r in range(workers)]


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 300), batch=st.integers(1, 16), workers=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1))
def test_workers_together_equal_one_process_with_global_batch(n, batch, workers, seed):
    if batch * workers > n:
        with pytest.raises(ValueError, match="batch_size"):
            ShardSampler(n, batch_size=batch, num_workers=workers, rank=0, seed=seed)
        return
    ranks = samplers(n, batch, workers, seed)
    single = ShardSampler(n, batch_size=batch * workers, num_workers=1, rank=0, seed=seed)
    steps_per_epoch = n // (batch * workers)
    assert all(s.steps_per_epoch == steps_per_epoch for s in ranks)
    assert single.steps_per_epoch == steps_per_epoch
    seen = []
    for step in range(min(2 * steps_per_epoch + 1, 40)):
        parts = [s.indices(step) for s in ranks]
        assert all(len(p) == batch for p in parts)
        together = np.concatenate(parts)
        np.testing.assert_array_equal(together, single.indices(step))
        assert len(set(together.tolist())) == batch * workers, "workers overlap"
        assert ((together >= 0) & (together < n)).all()
        if step < steps_per_epoch:
            seen.extend(together.tolist())
    # Within one epoch no sample is seen twice.
    assert len(seen) == len(set(seen))


def test_epoch_covers_all_but_the_dropped_tail():
    n, batch, workers = 103, 5, 4
    ranks = samplers(n, batch, workers, seed=7)
    steps = ranks[0].steps_per_epoch
    assert steps == 5
    seen = np.concatenate([s.indices(t) for t in range(steps) for s in ranks])
    assert len(seen) == 100 and len(np.unique(seen)) == 100
    # The dropped 3 are the tail of the epoch's permutation.
    dropped = set(range(n)) - set(seen.tolist())
    assert dropped == set(ranks[0].permutation(0)[100:].tolist())


def test_deterministic_per_seed_and_epoch():
    a = ShardSampler(500, batch_size=8, num_workers=2, rank=1, seed=3)
    b = ShardSampler(500, batch_size=8, num_workers=2, rank=1, seed=3)
    steps = a.steps_per_epoch
    # Visit b in a different order: the permutation depends only on (seed, epoch).
    order = [steps + 2, 0, 3 * steps, 1, steps]
    got_b = {t: b.indices(t) for t in order}
    for t in sorted(order):
        np.testing.assert_array_equal(a.indices(t), got_b[t])
    # Different epochs differ, and different seeds differ.
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    np.testing.assert_array_equal(np.sort(a.permutation(1)), np.arange(500))
    c = ShardSampler(500, batch_size=8, num_workers=2, rank=1, seed=4)
    assert not np.array_equal(a.permutation(0), c.permutation(0))
    # Step `steps` is the first batch of epoch 1.
    np.testing.assert_array_equal(a.indices(steps), a.permutation(1)[8:16])


def test_global_batch_larger_than_dataset():
    with pytest.raises(ValueError, match="batch_size") as info:
        ShardSampler(10, batch_size=4, num_workers=3, rank=0, seed=0)
    assert "12" in str(info.value) and "10" in str(info.value)
    ShardSampler(12, batch_size=4, num_workers=3, rank=2, seed=0)  # exactly one step is fine


@pytest.mark.parametrize("batch", [0, -3, 2.5, "8", True])
def test_a_batch_size_that_is_no_count_of_samples_is_a_usage_error(batch):
    # (before: 0 divided by zero in the constructor, a traceback in the worker's log)
    with pytest.raises(UsageError, match=r"batch_size must be a whole number"):
        ShardSampler(100, batch_size=batch, num_workers=2, rank=0, seed=0)
    with pytest.raises(UsageError, match=r"larger than the 10 training samples"):
        ShardSampler(10, batch_size=np.int64(6), num_workers=2, rank=0, seed=0)
    assert ShardSampler(10, batch_size=np.int64(5), num_workers=2, rank=1, seed=0).batch_size == 5


def test_rank_out_of_range():
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(100, batch_size=4, num_workers=2, rank=2, seed=0)
    with pytest.raises(ValueError, match="rank"):
        ShardSampler(100, batch_size=4, num_workers=2, rank=-1, seed=0)


@given(n=st.integers(50, 400), b=st.integers(1, 8), w_old=st.integers(1, 4),
       w_new=st.integers(1, 4), stop=st.integers(0, 30), seed=st.integers(0, 5))
@settings(max_examples=80, deadline=None)
def test_resume_with_another_worker_count_sees_each_sample_of_the_epoch_once(
        n, b, w_old, w_new, stop, seed):
    """Run `stop` steps with w_old workers, checkpoint the cursor, resume with w_new:
    over the epoch being read at the checkpoint, no sample is taken twice, and what is
    left out is less than one new global batch (the dropped remainder)."""
    from tessera.data.sampler import advance_cursor
    assume(n // (b * w_old) >= 1 and n // (b * w_new) >= 1)
    old = [ShardSampler(n, batch_size=b, num_workers=w_old, rank=r, seed=seed)
           for r in range(w_old)]
    epoch, offset = advance_cursor(0, 0, stop, b * w_old, n)
    new = [ShardSampler(n, batch_size=b, num_workers=w_new, rank=r, seed=seed)
           for r in range(w_new)]
    for s in new:
        s.seek(stop, epoch, offset)
    seen = [i for step in range(stop) for s in old
            if s._locate(step)[0] == epoch for i in s.indices(step)]
    end = new[0].steps_until_epoch(epoch + 1)
    seen += [i for step in range(stop, end) for s in new for i in s.indices(step)]
    assert len(seen) == len(set(seen))
    assert n - len(seen) < max(b * w_new, b * w_old)
    # The resumed sampler's cursor arithmetic agrees with advance_cursor.
    assert new[0]._locate(end) == (epoch + 1, 0)
