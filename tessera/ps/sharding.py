"""Key-range sharding of a model's dense parameters over servers.

All dense parameters, in ``named_parameters()`` order, are laid end to end in one
flat fp32 vector. The vector is cut into contiguous *partitions* of at most
``partition_elems`` elements, so a tensor larger than a partition is split
across partitions (and so across servers), as MXNet's KVStore does for arrays
over 1M elements and BytePS does with its 4 MB partitions (neighbouring
partitions may land on the same server: the balance is by bytes, not by
tensor). Partitions are then placed on servers greedily, biggest first onto the server holding the fewest
bytes (LPT scheduling), which keeps every server within one partition of the
mean load.

The plan is pure arithmetic, so every process that knows the layout and the
partition size derives the same map; the coordinator computes it once and
sends it to all.
"""

from __future__ import annotations

from dataclasses import dataclass

from tessera.transport.wire import ParamSpec, PartitionInfo

MiB = 1 << 20


@dataclass(frozen=True)
class Segment:
    """Elements ``[param_start, param_start + length)`` of parameter ``param`` lie at
    ``[flat_start, flat_start + length)`` of the flat vector."""

    param: int
    param_start: int
    flat_start: int
    length: int


@dataclass(frozen=True)
class ShardMap:
    layout: tuple[ParamSpec, ...]
    partitions: tuple[PartitionInfo, ...]
    num_servers: int

    @property
    def total_elems(self) -> int:
        return sum(p.numel for p in self.layout)

    def on_server(self, server: int) -> list[PartitionInfo]:
        return [p for p in self.partitions if p.server == server]

    def server_bytes(self, itemsize: int = 4) -> list[int]:
        load = [0] * self.num_servers
        for p in self.partitions:
            load[p.server] += (p.stop - p.start) * itemsize
        return load

    def param_offsets(self) -> list[int]:
        offsets, acc = [], 0
        for spec in self.layout:
            offsets.append(acc)
            acc += spec.numel
        return offsets

    def partitions_of_param(self) -> list[list[int]]:
        """For each parameter, the ids of the partitions that hold part of it."""
        offsets = self.param_offsets()
        out: list[list[int]] = []
        for spec, off in zip(self.layout, offsets):
            end = off + spec.numel
            out.append([p.id for p in self.partitions if p.start < end and p.stop > off]
                       if spec.numel else [])
        return out


def partition_elems_for(partition_mb: float, itemsize: int = 4) -> int:
    return max(1, int(partition_mb * MiB) // itemsize)


def _cut(start: int, stop: int, num_servers: int, partition_elems: int) -> list[tuple[int, int]]:
    """``[start, stop)`` in near-equal partitions of at most ``partition_elems``: cutting
    into ceil(n / partition_elems) near-equal pieces balances better than fixed-size
    pieces plus a small remainder."""
    total = stop - start
    if total <= 0:
        return []
    num_parts = max(-(-total // partition_elems), min(num_servers, total))
    base, extra = divmod(total, num_parts)
    bounds = []
    for i in range(num_parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def plan_shards(layout: list[ParamSpec], num_servers: int, partition_elems: int,
                weights: list[float] | None = None) -> ShardMap:
    """Cut the flat vector into partitions and place them on ``num_servers`` servers.

    ``weights`` (one positive number per server) makes server s hold about
    ``weights[s] / sum(weights)`` of the bytes, for servers of unequal capacity.
    """
    if num_servers < 1:
        raise ValueError(f"num_servers must be >= 1, got {num_servers}")
    if partition_elems < 1:
        raise ValueError(f"partition_elems must be >= 1, got {partition_elems}")
    total = sum(p.numel for p in layout)
    if total == 0:
        raise ValueError("the model has no parameters to put on servers")
    # Parameters and buffers (which the servers average, not step) never share a
    # partition: each region is cut on its own.
    params = sum(p.numel for p in layout if not p.buffer)
    bounds = _cut(0, params, num_servers, partition_elems) + \
        _cut(params, total, num_servers, partition_elems)
    num_parts = len(bounds)
    w = weights or [1.0] * num_servers
    if len(w) != num_servers or any(x <= 0 for x in w):
        raise ValueError(f"weights must be {num_servers} positive numbers, got {weights}")
    load = [0] * num_servers
    owner = [0] * num_parts
    for i in sorted(range(num_parts), key=lambda i: (-(bounds[i][1] - bounds[i][0]), i)):
        size = bounds[i][1] - bounds[i][0]
        server = min(range(num_servers), key=lambda s: ((load[s] + size) / w[s], s))
        owner[i] = server
        load[server] += bounds[i][1] - bounds[i][0]
    parts = tuple(PartitionInfo(id=i, start=a, stop=b, server=owner[i])
                  for i, (a, b) in enumerate(bounds))
    return ShardMap(layout=tuple(layout), partitions=parts, num_servers=num_servers)
