"""The wire schema: every message Tessera processes exchange, typed.

A message on the wire is a ZeroMQ multipart message: frame 0 is a msgpack header
decoded by msgspec into exactly one of the structs of :data:`Message` (the ``op`` tag picks
which), and frames 1..n are raw tensor payloads (see :mod:`tessera.transport.frames`).
Nothing is ever unpickled: a header that does not decode into a known struct with
the right field types is refused with an :class:`Error` reply.

Every request carries ``req``, an id chosen by the sender, echoed by the reply,
so that one socket can have many requests in flight (ps-lite's timestamps).
Pushes also carry ``(worker, seq)``: a sequence number per worker that later
lets servers apply a retried push exactly once and forward updates to replicas
in order.

The structs live by concern: :mod:`tessera.transport.control_plane` (to and from
the coordinator), :mod:`tessera.transport.data_plane` (workers and parameter
servers) and :mod:`tessera.transport.header` (what both share). This module
assembles them into the one tagged union that is decoded, and re-exports every
struct, so the rest of Tessera writes ``wire.Push`` whichever plane it is on.
"""

from __future__ import annotations

from typing import Union

import msgspec

from tessera.transport.control_plane import (HParam, OptimGroup, OptimSpec, ParamSpec, TableSpec, ProcessInfo, PartitionInfo,
    Register, Restore, ClusterView, Heartbeat, HeartbeatAck, Departed, CheckpointNow,
    CheckpointSaved, Replicated, Scale, Moved, TimeSync, TimeSyncAck, Finished, StoreOp, StoreReply)
from tessera.transport.data_plane import (InitParams, Pull, Push, Join, Replicate, ReplicaUpdate, Overflow,
    Verdict, Judged, Word, Params, OptimState, PullRows, Rows, PushRows, DumpRows, SnapshotTables)
from tessera.transport.header import MAX_HEADER_BYTES, WIRE_DTYPES, Ack, Error

__all__ = ["MAX_HEADER_BYTES", "WIRE_DTYPES", "Ack", "Error", "HParam", "OptimGroup",
           "OptimSpec", "ParamSpec", "TableSpec",
           "ProcessInfo", "PartitionInfo", "Register", "Restore", "ClusterView", "Heartbeat",
           "HeartbeatAck", "Departed", "CheckpointNow", "CheckpointSaved", "Replicated", "Scale", "Moved", "TimeSync",
           "TimeSyncAck", "Finished", "StoreOp", "StoreReply", "InitParams", "Pull", "Push", "Join", "Replicate", "ReplicaUpdate",
           "Overflow", "Verdict", "Judged", "Word", "Params", "OptimState", "PullRows", "Rows", "PushRows", "DumpRows", "SnapshotTables", "Message",
           "WireError", "encode", "decode"]

Message = Union[Register, ClusterView, Heartbeat, HeartbeatAck, Finished, Ack, Error,
                InitParams, Pull, Push, Params, Verdict, TimeSync, TimeSyncAck,
                PullRows, Rows, PushRows, Departed, CheckpointNow, CheckpointSaved, Join,
                Replicate, DumpRows, StoreOp, StoreReply, SnapshotTables, Replicated, Scale,
                Moved, Judged, Word, OptimState]

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
