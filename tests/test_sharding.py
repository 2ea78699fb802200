"""Tier 1: key-range sharding arithmetic (tessera.ps.sharding).

The reference is plain per-element bookkeeping: which partition holds each
element of the flat vector, computed independently of the plan's own helpers.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.ps.sharding import MiB, partition_elems_for, plan_shards
from tessera.transport.wire import ParamSpec


def layout_of(numels: list[int]) -> list[ParamSpec]:
    return [ParamSpec(name=f"p{i}", shape=[n], numel=n) for i, n in enumerate(numels)]


def owner_of_each_element(shard_map) -> np.ndarray:
    """Partition id of every flat element; -1 where no partition covers it."""
    owner = np.full(shard_map.total_elems, -1, dtype=np.int64)
    for p in shard_map.partitions:
        assert (owner[p.start:p.stop] == -1).all(), f"partition {p.id} overlaps another"
        owner[p.start:p.stop] = p.id
    return owner


layouts = st.lists(st.integers(min_value=0, max_value=400), min_size=1, max_size=8).filter(
    lambda numels: sum(numels) > 0)


@settings(max_examples=300, deadline=None)
@given(numels=layouts, num_servers=st.integers(1, 7), partition_elems=st.integers(1, 300))
def test_plan_properties(numels, num_servers, partition_elems):
    layout = layout_of(numels)
    total = sum(numels)
    m = plan_shards(layout, num_servers, partition_elems)
    parts = m.partitions
    assert m.total_elems == total and m.num_servers == num_servers

    # Contiguous cover of [0, total), ids in order, no empty partition, no overlap.
    assert [p.id for p in parts] == list(range(len(parts)))
    assert parts[0].start == 0 and parts[-1].stop == total
    for a, b in zip(parts, parts[1:]):
        assert a.stop == b.start
    owner = owner_of_each_element(m)
    assert (owner >= 0).all()
    for p in parts:
        assert 0 < p.stop - p.start <= partition_elems
        assert 0 <= p.server < num_servers
    # No more partitions than needed, except to give every server one.
    needed = -(-total // partition_elems)
    assert len(parts) == max(needed, min(num_servers, total))

    # Balance: server loads within one (largest) partition of each other.
    loads = m.server_bytes()
    assert sum(loads) == 4 * total
    biggest = max(p.stop - p.start for p in parts) * 4
    assert max(loads) - min(loads) <= biggest
    assert m.server_bytes(itemsize=2) == [x // 2 for x in loads]
    if total >= num_servers:
        assert all(m.on_server(s) for s in range(num_servers)), "a server got no partition"
    assert sorted(p.id for s in range(num_servers) for p in m.on_server(s)) == [p.id for p in parts]

    # partitions_of_param agrees with the per-element owners.
    offsets = m.param_offsets()
    assert offsets == list(np.cumsum([0] + numels[:-1]))
    for spec, off, ids in zip(layout, offsets, m.partitions_of_param()):
        expected = sorted(set(owner[off:off + spec.numel].tolist()))
        assert ids == expected
        if spec.numel > partition_elems:
            assert len(ids) >= 2, "a tensor larger than a partition must be split"

    # Pure arithmetic: every process derives the same plan.
    assert plan_shards(layout_of(numels), num_servers, partition_elems) == m


def test_big_tensor_is_split_over_every_server():
    layout = layout_of([10, 1000, 3])
    m = plan_shards(layout, 3, 100)
    big = m.partitions_of_param()[1]
    assert len(big) >= 10
    assert {m.partitions[i].server for i in big} == {0, 1, 2}
    # The big tensor's pieces are contiguous slices that tile it exactly.
    pieces = sorted((max(m.partitions[i].start, 10), min(m.partitions[i].stop, 1010)) for i in big)
    assert pieces[0][0] == 10 and pieces[-1][1] == 1010
    assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))


def test_more_servers_than_needed_each_get_a_partition():
    m = plan_shards(layout_of([5, 7]), 4, 1000)  # one partition would hold it all
    assert len(m.partitions) == 4
    assert sorted(p.server for p in m.partitions) == [0, 1, 2, 3]
    # Fewer elements than servers: one element each, the rest get nothing.
    m = plan_shards(layout_of([2, 0, 1]), 5, 1000)
    assert [p.stop - p.start for p in m.partitions] == [1, 1, 1]
    assert sorted(p.server for p in m.partitions) == [0, 1, 2]
    assert m.partitions_of_param()[1] == []


def test_errors():
    with pytest.raises(ValueError, match="num_servers"):
        plan_shards(layout_of([4]), 0, 10)
    with pytest.raises(ValueError, match="partition_elems"):
        plan_shards(layout_of([4]), 1, 0)
    with pytest.raises(ValueError, match="no parameters"):
        plan_shards([], 2, 10)
    with pytest.raises(ValueError, match="no parameters"):
        plan_shards(layout_of([0, 0]), 2, 10)


def test_partition_elems_for():
    assert partition_elems_for(4.0) == MiB
    assert partition_elems_for(4.0, itemsize=2) == 2 * MiB
    assert partition_elems_for(1e-9) == 1
