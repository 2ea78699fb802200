"""Control-plane messages: between every process and the coordinator.

Rendezvous (:class:`Register` -> :class:`ClusterView`), liveness
(:class:`Heartbeat` -> :class:`HeartbeatAck`), the launcher's notices
(:class:`Departed`, :class:`CheckpointNow`), checkpoint reports, clock sync and
final reports. Headers only: no message here carries payload frames.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import msgspec

from tessera.config.schema import OptimizerConfig
from tessera.transport.header import MESSAGE


class ParamSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One model parameter (or float buffer): its name, shape and element count.

    Buffers (BatchNorm's running statistics) follow every parameter in the flat
    vector; the servers average them over the workers instead of stepping them."""

    name: str
    shape: list[int]
    numel: int
    buffer: bool = False


class TableSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One embedding table, as every server holding a shard of it sees it."""

    #: Names the table in errors, metrics and checkpoints.
    name: str
    #: Width of each row.
    dim: int
    #: ``None``: an unbounded hashed id space (any int64 >= 0). Otherwise ids must be
    #: in ``[0, num_embeddings)``; rows are still created lazily.
    num_embeddings: Optional[int] = None
    #: Rows start uniform in ``(-init_scale, init_scale)``.
    init_scale: float = 0.01
    #: Seeds the initial rows (with the id); same seed, same rows on every server.
    seed: int = 0
    #: A row is stored once it has been looked up this many times (1: at first touch).
    admit_after: int = 1
    #: > 0: rows not touched for this many clocks are dropped (0: never).
    evict_after: int = 0
    #: > 0: per-server row budget; the least recently touched rows beyond it are
    #: dropped after each apply (0: no budget).
    max_rows: int = 0
    #: > 0: hard cap, in bytes, on this table's shard on one server: rows, optimizer
    #: state, id index and admission filter, allocated once at this size (rows reused
    #: in place); new rows evict old ones (``eviction``) once it is full. 0: no cap.
    memory_bytes: int = 0
    #: Under ``memory_bytes``: which rows make room, ``lru`` (least recently touched)
    #: or ``lfu`` (fewest lookups, halved every ``lfu_half_life`` clocks).
    eviction: str = "lru"
    #: ``lfu``: lookup counts decay by half every this many clocks (0: no decay).
    lfu_half_life: int = 0
    #: Under ``memory_bytes`` with ``admit_after > 1``: bytes of the counting Bloom
    #: filter that counts lookups toward admission (part of ``memory_bytes``; 0: a
    #: sixteenth of it).
    filter_bytes: int = 0
    #: The sparse update rule the servers apply to the rows (sgd, adagrad, adam).
    optimizer: OptimizerConfig = msgspec.field(
        default_factory=lambda: OptimizerConfig(name="adagrad", lr=0.05))

    def __post_init__(self) -> None:
        where = f"table {self.name!r}"
        if not self.name:
            raise ValueError("TableSpec.name must be a non-empty string")
        if self.dim < 1:
            raise ValueError(f"{where}: dim must be >= 1 (the width of a row), got {self.dim}")
        if self.num_embeddings is not None and self.num_embeddings < 1:
            raise ValueError(f"{where}: num_embeddings must be >= 1, or None for an unbounded "
                             f"hashed id space, got {self.num_embeddings}")
        if not (math.isfinite(self.init_scale) and self.init_scale >= 0):
            raise ValueError(f"{where}: init_scale must be a finite number >= 0, "
                             f"got {self.init_scale}")
        if self.admit_after < 1:
            raise ValueError(f"{where}: admit_after must be >= 1 (1 stores a row at first "
                             f"touch), got {self.admit_after}")
        if self.evict_after < 0:
            raise ValueError(f"{where}: evict_after must be >= 0 (0 never evicts), "
                             f"got {self.evict_after}")
        if self.max_rows < 0:
            raise ValueError(f"{where}: max_rows must be >= 0 (0 means no budget), "
                             f"got {self.max_rows}")
        if self.memory_bytes < 0 or self.filter_bytes < 0 or self.lfu_half_life < 0:
            raise ValueError(f"{where}: memory_bytes, filter_bytes and lfu_half_life must be "
                             f">= 0 (0: none), got {self.memory_bytes}, {self.filter_bytes}, "
                             f"{self.lfu_half_life}")
        if self.eviction not in ("lru", "lfu"):
            raise ValueError(f"{where}: eviction must be 'lru' or 'lfu', got {self.eviction!r}")


#: A hyperparameter value as it travels: torch.optim groups hold numbers, booleans,
#: strings, None and tuples of numbers (sent as lists).
HParam = Union[None, bool, int, float, str, list[float]]


class OptimGroup(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One ``torch.optim`` param group: its hyperparameters and the ``[start, stop)``
    ranges of the flat parameter vector its parameters occupy."""

    hparams: dict[str, HParam]
    ranges: list[tuple[int, int]]
    #: Not an optimizer group: the model's buffers, averaged over the workers.
    average: bool = False


class OptimSpec(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """The optimizer the servers run: a ``torch.optim`` class by name, and its groups."""

    name: str
    groups: list[OptimGroup]


class ProcessInfo(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    role: str
    rank: int
    host: str
    pid: int
    address: str = ""


class PartitionInfo(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """Partition ``id`` is elements ``[start, stop)`` of the flat parameter vector."""

    id: int
    start: int
    stop: int
    server: int


class Register(msgspec.Struct, **MESSAGE):
    req: int
    role: str
    rank: int
    host: str
    pid: int
    address: str = ""
    #: Worker 0 describes the model so the coordinator can cut the shard map,
    #: and names the optimizer the servers are to apply.
    layout: Optional[list[ParamSpec]] = None
    optimizer: Optional[OptimSpec] = None
    tables: list[TableSpec] = []
    #: Worker 0: samples in its training set (0: unknown or a stream), so that the
    #: coordinator can record each worker's data position in checkpoints.
    samples: int = 0
    #: Every worker in the parameter-server modes: a digest of each frozen parameter
    #: (requires_grad=False) by name, which must be the same on every worker.
    frozen: dict[str, str] = {}


class Restore(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Where servers load their state from when a job resumes from a checkpoint."""

    #: The checkpoint location (local path or fsspec URL) whose ``clock-<clock>/``
    #: directory holds the files below.
    path: str
    clock: int
    #: The saved run's partitions (the new map may cut the vector differently).
    partitions: list[PartitionInfo]
    #: File of each saved server, by saved rank.
    files: list[str]
    #: Data position at ``clock``: epoch, and offset into that epoch's permutation.
    epoch: int = 0
    offset: int = 0
    #: The dataset size the position was counted over (0: not known when the checkpoint
    #: was written, e.g. a script that called ``tessera.shard`` after ``distribute``; the
    #: offset is then a count of samples from the start of ``epoch``), and the saved
    #: run's samples per step.
    samples: int = 0
    global_batch: int = 0


class ClusterView(msgspec.Struct, **MESSAGE):
    req: int
    processes: list[ProcessInfo]
    partitions: list[PartitionInfo]
    layout: list[ParamSpec]
    optimizer: OptimSpec
    tables: list[TableSpec] = []
    #: Set when the job resumes from a checkpoint.
    restore: Optional[Restore] = None
    #: The clock this process starts at (a resumed job's checkpoint clock, or for a
    #: restarted worker the last clock it reported).
    clock: int = 0
    #: How many times this rank has (re)joined: 0 for the first start. Push sequence
    #: numbers of incarnation i start above those of every earlier one.
    incarnation: int = 0
    #: A replacement server: the servers dead now, and the replaced ones (as HeartbeatAck).
    dead_servers: list[int] = []
    server_lives: dict[int, int] = {}
    #: A server started mid-job by ``tessera scale``: it holds nothing until partitions
    #: move to it.
    scaled_in: bool = False


class Heartbeat(msgspec.Struct, **MESSAGE):
    req: int
    role: str
    rank: int
    #: Workers: the last clock they completed (-1: none yet); servers: their lowest
    #: partition clock.
    clock: int = -1
    #: Servers: seconds spent serving requests so far (elastic rebalancing's load) ...
    busy_s: float = 0.0
    #: ... of which serving table rows (a hot table shard may move).
    table_busy_s: float = 0.0


class HeartbeatAck(msgspec.Struct, **MESSAGE):
    req: int
    #: ``running``; ``shutdown`` (work is done, exit cleanly); ``failed`` (see reason);
    #: ``regroup`` (to node launchers only: the others hear ``failed``).
    state: str
    reason: str = ""
    #: To worker 0: write a checkpoint at your next step (the launcher was interrupted).
    checkpoint: bool = False
    #: Workers that died (worker -> the incarnation that died): servers stop waiting for them.
    departed: dict[int, int] = {}
    #: Servers that died; with replication their backups now own their partitions.
    dead_servers: list[int] = []
    #: Workers that sent their final report (async/ssp: worker 0 evaluates after them).
    finished: list[int] = []
    #: allreduce/hybrid: the group's generation (re-formings so far). To a node launcher
    #: (role ``launcher``) the state ``regroup`` says: stop your processes and start them
    #: again once a coordinator of a higher generation answers.
    generation: int = 0
    #: Servers replaced by the launcher (rank -> how many times): a rank whose count went
    #: up died and has a new process, which joined as a backup (``--max-restarts``).
    server_lives: dict[int, int] = {}
    #: Once a server died: where every partition is now (partition -> owner), and every
    #: table shard (the rows hashed to server s, keyed ``-(s + 1)``) -> the server serving it.
    owners: dict[int, int] = {}
    #: Elastic servers (tessera scale, [ps] rebalance): partitions to move now (partition
    #: -> the server to move it to; table shard s keyed ``-(s + 1)``), to their owners.
    moves: dict[int, int] = {}
    #: Elastic servers: every server's address once ``tessera scale`` started one mid-job
    #: (rank -> address; clients connect to a new rank before partitions move to it) ...
    addresses: dict[int, str] = {}
    #: ... and the servers scaled away that hold nothing: they exit (0), clients route
    #: their former partitions by ``owners``.
    retired: list[int] = []


class Departed(msgspec.Struct, **MESSAGE):
    """From the launcher: a process of the job exited (faster than a heartbeat timeout)."""

    req: int
    role: str
    rank: int
    reason: str
    #: The launcher will not start it again: where it never registered (it ended before
    #: joining), the job cannot come up without it, and fails now.
    final: bool = False


class CheckpointNow(msgspec.Struct, **MESSAGE):
    """From the launcher: write a checkpoint; answered with Ack once it is complete."""

    req: int


class CheckpointSaved(msgspec.Struct, **MESSAGE):
    """From a server (or, in allreduce/hybrid mode, worker 0 with the dense replica):
    its file of the checkpoint at ``clock`` is written."""

    req: int
    rank: int
    clock: int
    file: str
    nbytes: int
    role: str = "server"
    #: A server's file: the dense partitions in it (elastic servers: the manifest names
    #: the file that holds each partition, which after a move may not be its owner's).
    partitions: list[int] = []


class Replicated(msgspec.Struct, **MESSAGE):
    """From a server (re-replication): a full copy of ``partitions``, which it is the
    primary of, is on server ``backup`` and kept there from now on."""

    req: int
    rank: int
    backup: int
    partitions: list[int]


class Scale(msgspec.Struct, **MESSAGE):
    """From ``tessera scale``: serve the job's partitions from ``servers`` servers
    (answered with an Error naming what is wrong, or an Ack once the moves are ordered)."""

    req: int
    servers: int


class Moved(msgspec.Struct, **MESSAGE):
    """From a server (elastic): ``partitions`` (table shard s as ``-(s + 1)``), which it
    owned, are on server ``target`` now (copied whole and acknowledged there); it
    answers requests for them with "moved"."""

    req: int
    rank: int
    target: int
    partitions: list[int]


class TimeSync(msgspec.Struct, **MESSAGE):
    """NTP-style clock probe: the reply carries the coordinator's clock at receipt."""

    req: int
    t0_ns: int


class TimeSyncAck(msgspec.Struct, **MESSAGE):
    req: int
    t1_ns: int


class Finished(msgspec.Struct, **MESSAGE):
    """A process's final report: its counters for summary.json."""

    req: int
    role: str
    rank: int
    stats: dict[str, Union[int, float, str, None]]


class StoreOp(msgspec.Struct, **MESSAGE):
    """One call on the job's collective rendezvous store, which the coordinator keeps
    (:mod:`tessera.cluster.store`): ``torch.distributed`` rendezvous (Gloo's and NCCL's
    addresses) travels over this authenticated connection, never an open TCPStore."""

    req: int
    #: Which ``torch.distributed.Store`` method.
    call: Literal["set", "get", "add", "compare_set", "wait", "check", "delete_key",
                  "num_keys", "exchange"]
    keys: list[str] = []
    #: set: the value; compare_set: the desired value; exchange: the value of ``publish``.
    value: bytes = b""
    #: exchange (one collective of the server modes' torch.distributed group, in one round
    #: trip): set this key to ``value`` (none when empty), then answer with the values of
    #: ``keys`` once all are set; a key published with ``amount`` readers is deleted after
    #: that many exchanges have read it.
    publish: str = ""
    #: compare_set: the value expected now (empty: the key must not exist).
    expected: bytes = b""
    #: add: the increment; exchange: how many exchanges will read ``publish``.
    amount: int = 0
    #: get, wait and exchange: how long the coordinator may hold the request for missing keys.
    wait_s: float = 0.0


class StoreReply(msgspec.Struct, **MESSAGE):
    req: int
    #: get: the value; compare_set: the value stored after the call.
    value: bytes = b""
    #: exchange: the values of the keys asked for, in their order.
    values: list[bytes] = []
    #: add: the new count; num_keys: the number of keys; check, delete_key: 1 or 0.
    number: int = 0
    #: get, wait and exchange: False when keys were still missing after ``wait_s``.
    found: bool = True
