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


class ClusterView(msgspec.Struct, **_MSG):
    req: int
    processes: list[ProcessInfo]
    partitions: list[PartitionInfo]
    layout: list[ParamSpec]
    optimizer: OptimizerConfig


class Heartbeat(msgspec.Struct, **_MSG):
    req: int
    role: str
    rank: int


class HeartbeatAck(msgspec.Struct, **_MSG):
    req: int
    #: ``running``; ``shutdown`` (work is done, exit cleanly); ``failed`` (see reason).
    state: str
    reason: str = ""


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


Message = Union[Register, ClusterView, Heartbeat, HeartbeatAck, Finished, Ack, Error,
                InitParams, Pull, Push, Params, Verdict, TimeSync, TimeSyncAck]

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
