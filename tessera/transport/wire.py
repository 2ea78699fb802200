"""The wire schema: every message Tessera processes exchange, typed.

A message on the wire is a ZeroMQ multipart message: frame 0 is a msgpack header
decoded by msgspec into exactly one of the structs below (the ``op`` tag picks
which), and frames 1..n are raw tensor payloads (see :mod:`tessera.transport.frames`).
Nothing is ever unpickled: a header that does not decode into a known struct with
the right field types is refused with an :class:`Error` reply.

Every request carries ``req``, an id chosen by the sender, echoed by the reply,
so that one socket can have many requests in flight (ps-lite's timestamps).
Pushes also carry ``(worker, seq)``: a sequence number per worker that later
lets servers apply a retried push exactly once and forward updates to replicas
in order.
"""

from __future__ import annotations

import math
from typing import Optional, Union

import msgspec

from tessera.config.schema import OptimizerConfig

#: Largest header we accept. Headers hold ids and, once per job, the model's
#: parameter names and shapes (~50 bytes a tensor); a bigger one is hostile or broken.
MAX_HEADER_BYTES = 1 << 20

#: Dtypes that may appear on the wire, by their wire name.
WIRE_DTYPES = ("float32", "bfloat16", "float16")

_MSG = dict(tag_field="op", tag=True, kw_only=True, forbid_unknown_fields=True)


# ---------------------------------------------------------------- coordinator


class ParamSpec(msgspec.Struct, forbid_unknown_fields=True):
    """One model parameter: its name, shape and element count."""

    name: str
    shape: list[int]
    numel: int


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


class Register(msgspec.Struct, **_MSG):
    req: int
    role: str
    rank: int
    host: str
    pid: int
    address: str = ""
    #: Worker 0 describes the model so the coordinator can cut the shard map,
    #: and names the optimizer the servers are to apply.
    layout: Optional[list[ParamSpec]] = None
    optimizer: Optional[OptimizerConfig] = None
    tables: list[TableSpec] = []
    #: Worker 0: samples in its training set (0: unknown or a stream), so that the
    #: coordinator can record each worker's data position in checkpoints.
    samples: int = 0


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


class ClusterView(msgspec.Struct, **_MSG):
    req: int
    processes: list[ProcessInfo]
    partitions: list[PartitionInfo]
    layout: list[ParamSpec]
    optimizer: OptimizerConfig
    tables: list[TableSpec] = []
    #: Set when the job resumes from a checkpoint.
    restore: Optional[Restore] = None
    #: The clock this process starts at (a resumed job's checkpoint clock, or for a
    #: restarted worker the last clock it reported).
    clock: int = 0
    #: How many times this rank has (re)joined: 0 for the first start. Push sequence
    #: numbers of incarnation i start above those of every earlier one.
    incarnation: int = 0


class Heartbeat(msgspec.Struct, **_MSG):
    req: int
    role: str
    rank: int
    #: Workers: the last clock they completed (-1: none yet); servers: their lowest
    #: partition clock.
    clock: int = -1


class HeartbeatAck(msgspec.Struct, **_MSG):
    req: int
    #: ``running``; ``shutdown`` (work is done, exit cleanly); ``failed`` (see reason).
    state: str
    reason: str = ""
    #: To worker 0: write a checkpoint at your next step (the launcher was interrupted).
    checkpoint: bool = False
    #: Workers that died (worker -> the incarnation that died): servers stop waiting for them.
    departed: dict[int, int] = {}
    #: Servers that died; with replication their backups now own their partitions.
    dead_servers: list[int] = []


class Departed(msgspec.Struct, **_MSG):
    """From the launcher: a process of the job exited (faster than a heartbeat timeout)."""

    req: int
    role: str
    rank: int
    reason: str


class CheckpointNow(msgspec.Struct, **_MSG):
    """From the launcher: write a checkpoint; answered with Ack once it is complete."""

    req: int


class CheckpointSaved(msgspec.Struct, **_MSG):
    """From a server: its file of the checkpoint at ``clock`` is written."""

    req: int
    rank: int
    clock: int
    file: str
    nbytes: int


class TimeSync(msgspec.Struct, **_MSG):
    """NTP-style clock probe: the reply carries the coordinator's clock at receipt."""

    req: int
    t0_ns: int


class TimeSyncAck(msgspec.Struct, **_MSG):
    req: int
    t1_ns: int


class Finished(msgspec.Struct, **_MSG):
    """A process's final report: its counters for summary.json."""

    req: int
    role: str
    rank: int
    stats: dict[str, Union[int, float, str, None]]


class Ack(msgspec.Struct, **_MSG):
    req: int


class Error(msgspec.Struct, **_MSG):
    req: int
    message: str


# ---------------------------------------------------------- parameter server


class InitParams(msgspec.Struct, **_MSG):
    """Initial values of partitions (from worker 0), one payload frame each."""

    req: int
    partitions: list[int]
    dtype: str = "float32"


class Pull(msgspec.Struct, **_MSG):
    """Ask for partitions' current values, once the server has reached ``clock``."""

    req: int
    worker: int
    partitions: list[int]
    clock: int = 0
    dtype: str = "float32"
    #: With loss scaling in sync mode: apply (True) or skip (False) the update of
    #: clock ``clock - 1`` that the partitions hold pending a verdict.
    commit: Optional[bool] = None


class Push(msgspec.Struct, **_MSG):
    """Gradients of partitions for ``clock``; one payload frame per partition.

    The reply is a :class:`Params` with the partitions' values after the update
    this push took part in (one round trip for push and pull, DESIGN.md), or,
    when the job scales its loss (fp16) in sync mode, a :class:`Verdict`.
    """

    req: int
    worker: int
    seq: int
    clock: int
    partitions: list[int]
    dtype: str = "float32"
    #: The loss scale the gradients carry; the server divides by it in fp32.
    scale: float = 1.0
    #: Name of the first parameter (in backward order) whose gradient in this push
    #: is not finite on the sending worker; "" when all are finite.
    nonfinite: str = ""
    #: Sender's clock (aligned to the coordinator's) when sent; 0 when not profiling.
    sent_ns: int = 0
    #: > 0 (worker 0 only): servers write a checkpoint when they reach this clock.
    checkpoint: int = 0


class Join(msgspec.Struct, **_MSG):
    """A restarted worker joins sync training at ``clock``: servers count its pushes
    from that clock on. Answered with the partitions' values at ``clock`` (a Params),
    or an Error when a partition is already past it (ask again later)."""

    req: int
    worker: int
    incarnation: int
    clock: int
    partitions: list[int]
    dtype: str = "float32"


class Replicate(msgspec.Struct, **_MSG):
    """Primary -> backup: apply this update (or initial values) to your copy.

    ``kind`` ``init``: frames are initial values; ``grad``: frames are the fp32
    gradient the primary applied, which the backup applies with the same optimizer
    (so both copies stay bit-identical). ``pushes`` worker pushes went into it;
    ``worker``/``seq`` name the push for async dedupe (-1 for a sync sum).
    """

    req: int
    kind: str
    partitions: list[int]
    clock: int
    pushes: int = 0
    worker: int = -1
    seq: int = -1


class Overflow(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    worker: int
    param: str


class Verdict(msgspec.Struct, **_MSG):
    """Whether the sum of every worker's gradients for a partition and clock is finite.

    Every worker gets the same verdicts, takes the same decision (apply only if all
    partitions are finite) and sends it with its next :class:`Pull` as ``commit``.
    """

    req: int
    partitions: list[int]
    clock: int
    finite: bool
    overflows: list[Overflow] = []


class Params(msgspec.Struct, **_MSG):
    """Values of partitions (one payload frame each) as of server clock ``clock``."""

    req: int
    partitions: list[int]
    clock: int
    dtype: str = "float32"
    #: Async mode: the push was not applied because its gradient was not finite.
    skipped: bool = False
    #: Server's aligned clock when it sent this reply (for the profiler's overlap figure).
    sent_ns: int = 0


class PullRows(msgspec.Struct, **_MSG):
    """Rows of ``table`` for the ids in payload frame 0 (int64, unique), at ``clock``."""

    req: int
    worker: int
    table: str
    clock: int = 0
    dtype: str = "float32"


class Rows(msgspec.Struct, **_MSG):
    """Reply to :class:`PullRows`: payload frame 0 holds the rows, [n, dim] in ``dtype``."""

    req: int
    table: str
    clock: int
    dtype: str = "float32"


class PushRows(msgspec.Struct, **_MSG):
    """Row-sparse gradient of ``table`` for ``clock``: frame 0 ids (int64, unique),
    frame 1 gradients [n, dim] in ``dtype``. Every worker pushes every table to every
    server once per clock, with no rows if it touched none there. Answered with
    :class:`Ack` once the worker may go on (sync: at once; ssp: within the bound)."""

    req: int
    worker: int
    seq: int
    clock: int
    table: str
    dtype: str = "float32"
    scale: float = 1.0


Message = Union[Register, ClusterView, Heartbeat, HeartbeatAck, Finished, Ack, Error,
                InitParams, Pull, Push, Params, Verdict, TimeSync, TimeSyncAck,
                PullRows, Rows, PushRows, Departed, CheckpointNow, CheckpointSaved, Join,
                Replicate]

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class WireError(ValueError):
    """A frame that is not a valid Tessera message."""


def encode(msg: Message) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes | memoryview) -> Message:
    """Decode a header frame; raises :class:`WireError` on anything malformed."""
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frame)} bytes exceeds the {MAX_HEADER_BYTES}-byte limit")
    try:
        msg = _decoder.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise WireError(f"malformed header: {exc}") from None
    dtype = getattr(msg, "dtype", None)
    if dtype is not None and dtype not in WIRE_DTYPES:
        raise WireError(f"dtype {dtype!r} is not a wire dtype; allowed: {', '.join(WIRE_DTYPES)}")
    return msg
