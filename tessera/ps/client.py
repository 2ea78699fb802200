"""The worker's side of the parameter servers: push, pull, and their handles.

Phases of one client step (the calls :class:`tessera.parallel.ps.PSDataParallel` makes):

1. ``push(partition, grad, clock)`` as soon as backward has produced a
   partition's gradient. The send is queued and returns a :class:`Handle` at
   once; ZeroMQ's I/O thread moves the bytes while backward continues.
2. The server answers a push with the partition's values after the update the
   push took part in: push and pull in one round trip.
3. ``handle.wait()`` before the next forward returns those values.

``pull(partitions, clock)`` fetches values without pushing (start-up, and a
worker that rejoins). All sockets are used from the calling thread only;
``wait`` polls in 100 ms slices and runs ``check`` between them, so a cluster
failure seen by the heartbeat thread surfaces here instead of a hang.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import torch
import zmq

from tessera.errors import TesseraError
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps.sharding import ShardMap
from tessera.transport import wire
from tessera.transport.endpoint import ClientEndpoint, TransportError
from tessera.transport.frames import frame_to_tensor, itemsize, tensor_to_frame, torch_dtype


class ServerError(TesseraError):
    """A server refused a request; the message says which server and why."""


class Handle:
    """An outstanding request.

    :meth:`wait` returns ``{partition id: tensor}`` for pulls and pushes, or the
    :class:`~tessera.transport.wire.Verdict` for a push under loss scaling in sync
    mode. ``skipped`` is True when an async server refused a non-finite push.
    """

    def __init__(self, client: "PSClient", server: int, req: int, what: str, keep=None):
        self._client, self._server, self._req, self._what = client, server, req, what
        self._keep = keep  # buffers ZeroMQ may still be sending from
        self._result = None
        self.skipped = False

    def release(self) -> None:
        """Drop the received buffers (after their values were copied out)."""
        self._result = {}

    def wait(self, timeout_s: Optional[float] = None):
        if self._result is None:
            self._result, self.skipped = self._client._finish(self._server, self._req,
                                                              self._what, timeout_s)
            self._keep = None
        return self._result


class PSClient:
    def __init__(self, *, ctx: zmq.Context, shard_map: ShardMap, server_addresses: list[str],
                 secret: str, worker: int, timeout_s: float = 30.0, wire_dtype: str = "float32",
                 check: Callable[[], None] = lambda: None, profiler: SpanRecorder = OFF):
        if len(server_addresses) != shard_map.num_servers:
            raise ValueError(f"{len(server_addresses)} server addresses for a shard map of "
                             f"{shard_map.num_servers} servers")
        self.shard_map = shard_map
        self.worker = worker
        self.timeout_s = timeout_s
        self.wire_dtype = wire_dtype
        self.check = check
        self.servers = [ClientEndpoint(ctx, addr, secret, f"server {i}", sndtimeo_s=timeout_s)
                        for i, addr in enumerate(server_addresses)]
        self.parts = {p.id: p for p in shard_map.partitions}
        self.seq = 0
        self.bytes_pushed = 0
        self.bytes_pulled = 0
        self.profiler = profiler
        #: Latest server send time of a reply seen (aligned clock; profiling only).
        self.last_reply_ns = 0

    def connect(self, timeout_s: Optional[float] = None) -> None:
        for ep in self.servers:
            ep.wait_connected(timeout_s or self.timeout_s, self.check)

    def close(self) -> None:
        for ep in self.servers:
            ep.close()

    # ----------------------------------------------------------------- calls

    def init_params(self, flat: torch.Tensor) -> None:
        """Send every partition's initial values (worker 0 only) and wait for the acks."""
        flat = flat.detach().to("cpu", torch.float32).contiguous()
        pending = []
        for server, ep in enumerate(self.servers):
            ids = [p.id for p in self.shard_map.on_server(server)]
            if not ids:
                continue
            frames = [tensor_to_frame(flat[self.parts[i].start:self.parts[i].stop]) for i in ids]
            req = ep.new_req()
            ep.send(wire.InitParams(req=req, partitions=ids, dtype="float32"), frames)
            pending.append((server, req))
        for server, req in pending:
            self._expect(server, req, "initial values", None, wire.Ack)

    def pull(self, partitions: Optional[list[int]] = None, clock: int = 0,
             commit: Optional[bool] = None) -> list[Handle]:
        """Ask each server for its partitions (all by default) at ``clock``; one handle per server."""
        ids = list(self.parts) if partitions is None else partitions
        by_server: dict[int, list[int]] = {}
        for pid in ids:
            by_server.setdefault(self.parts[pid].server, []).append(pid)
        handles = []
        for server, pids in by_server.items():
            ep = self.servers[server]
            req = ep.new_req()
            ep.send(wire.Pull(req=req, worker=self.worker, partitions=pids, clock=clock,
                              dtype=self.wire_dtype, commit=commit))
            handles.append(Handle(self, server, req, f"pull of partitions {pids} at clock {clock}"))
        return handles

    def push(self, partition: int, grad: torch.Tensor, clock: int, *, scale: float = 1.0,
             nonfinite: str = "") -> Handle:
        """Send one partition's gradient for ``clock``; the handle yields the new values.

        ``grad`` may already be in the wire dtype (then it is sent without a copy).
        """
        info = self.parts[partition]
        payload = grad.detach().to("cpu", torch_dtype(self.wire_dtype)).contiguous()
        if payload.numel() != info.stop - info.start:
            raise ValueError(f"partition {partition} has {info.stop - info.start} elements, "
                             f"gradient has {payload.numel()}")
        frame = tensor_to_frame(payload)
        ep = self.servers[info.server]
        req = ep.new_req()
        self.seq += 1
        ep.send(wire.Push(req=req, worker=self.worker, seq=self.seq, clock=clock,
                          partitions=[partition], dtype=self.wire_dtype, scale=scale,
                          nonfinite=nonfinite,
                          sent_ns=self.profiler.now() if self.profiler.enabled else 0), [frame])
        self.bytes_pushed += frame.nbytes
        return Handle(self, info.server, req, f"push of partition {partition} at clock {clock}",
                      keep=payload)

    def pull_rows(self, table: str, server: int, ids: np.ndarray, clock: int) -> Handle:
        """Rows of ``table`` for unique int64 ``ids`` held by ``server``; wait() -> [n, dim]."""
        ep = self.servers[server]
        req = ep.new_req()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        ep.send(wire.PullRows(req=req, worker=self.worker, table=table, clock=clock,
                              dtype=self.wire_dtype), [ids.tobytes()])
        self.bytes_pushed += ids.nbytes
        return Handle(self, server, req, f"row pull of table {table!r} at clock {clock}",
                      keep=ids)

    def push_rows(self, table: str, server: int, ids: np.ndarray, grads: torch.Tensor,
                  clock: int, scale: float = 1.0) -> Handle:
        """Row-sparse gradient of ``table`` for ``clock`` (possibly no rows); wait() -> None."""
        ep = self.servers[server]
        req = ep.new_req()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        payload = grads.detach().to("cpu", torch_dtype(self.wire_dtype)).contiguous()
        frame = tensor_to_frame(payload)
        self.seq += 1
        ep.send(wire.PushRows(req=req, worker=self.worker, seq=self.seq, clock=clock, table=table,
                              dtype=self.wire_dtype, scale=scale),
                [ids.tobytes(), frame])
        self.bytes_pushed += ids.nbytes + frame.nbytes
        return Handle(self, server, req, f"row push of table {table!r} at clock {clock}",
                      keep=(ids, payload))

    # -------------------------------------------------------------- replies

    def _expect(self, server: int, req: int, what: str, timeout_s, kind):
        try:
            msg, frames = self.servers[server].wait(req, timeout_s or self.timeout_s, what,
                                                    self.check)
        except TransportError:
            raise
        if isinstance(msg, wire.Error):
            raise ServerError(f"{self.servers[server].peer_name} refused {what}: {msg.message}")
        if not isinstance(msg, kind):
            raise ServerError(f"{self.servers[server].peer_name} answered {what} with "
                              f"{type(msg).__name__}")
        return msg, frames

    def _finish(self, server: int, req: int, what: str, timeout_s):
        msg, frames = self._expect(server, req, what, timeout_s,
                                   (wire.Params, wire.Verdict, wire.Rows, wire.Ack))
        if isinstance(msg, wire.Verdict):
            return msg, False
        if isinstance(msg, wire.Ack):
            return True, False
        if isinstance(msg, wire.Rows):
            if len(frames) != 1:
                raise ServerError(f"{self.servers[server].peer_name} sent {len(frames)} frames "
                                  f"for rows of table {msg.table!r}")
            buf = frames[0].buffer
            self.bytes_pulled += len(frames[0])
            rows = frame_to_tensor(buf, msg.dtype, len(buf) // itemsize(msg.dtype))
            return rows, False
        self.last_reply_ns = max(self.last_reply_ns, msg.sent_ns)
        if len(frames) != len(msg.partitions):
            raise ServerError(f"{self.servers[server].peer_name} sent {len(frames)} frames "
                              f"for {len(msg.partitions)} partitions")
        out = {}
        for pid, frame in zip(msg.partitions, frames):
            info = self.parts.get(pid)
            if info is None or info.server != server:
                raise ServerError(f"{self.servers[server].peer_name} sent partition {pid}, "
                                  f"which it does not hold")
            out[pid] = frame_to_tensor(frame.buffer, msg.dtype, info.stop - info.start)
            self.bytes_pulled += len(frame)
        return out, msg.skipped

