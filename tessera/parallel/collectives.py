"""``torch.distributed`` in the server modes: the job's workers as one process group.

A recipe written for DDP asks ``torch.distributed`` who it is and sums its metrics
over the workers: ``dist.get_rank() == 0`` before a print or a save,
``dist.all_reduce(correct)`` after an evaluation, ``dist.barrier()``,
``dist.all_gather_object(predictions)``, torch's own ``DistributedSampler()`` with no
arguments. The collective modes (allreduce, hybrid, pipeline) have a Gloo group for
that. The server modes (sync, async, ssp) move gradients through the parameter
servers and had no group at all, so each of those calls ended the script with torch's
"Default process group has not been initialized".

:func:`join` gives them one, at ``tessera.distribute``, where allreduce mode joins its
Gloo group. :class:`StoreGroup` is a ``torch.distributed.ProcessGroup`` whose
collectives are exchanges through the coordinator's key-value store
(:class:`tessera.parallel.rendezvous.CoordinatorStore`) over each worker's
authenticated connection: no listener and no unauthenticated socket (a Gloo group
would add both to modes that have neither), nothing pickled by Tessera (values
travel as msgpack with their dtype and shape), every wait bounded by the job's
timeout and ended at once when the job fails (the coordinator answers held requests
with the reason).

It is built for what recipes send through it: metrics, counts, a batch of
predictions. Each worker's tensor is at most :func:`max_bytes` (the coordinator's
messages are small by design), and a call costs one round trip to the coordinator
(``benchmarks/metric_collectives.py`` against Gloo). Model-sized collectives belong to
``--mode allreduce``; a larger tensor is refused in one line saying so.

Exactness: every rank reduces the W contributions itself, in rank order, so every
rank ends with the same bits (as Gloo's ring does not promise).

One collective is one round trip per worker: a store ``exchange``
(:mod:`tessera.cluster.store`) publishes this worker's part under
``tessera-pg/<n>/<rank>`` (n: the collective's number) and answers with the other
workers' parts once all are there; the coordinator deletes each part once the workers
that read it have, so the store holds only collectives in flight.
"""

from __future__ import annotations

import threading
from typing import Optional

import msgspec
import torch
import torch.distributed as dist

from tessera.errors import TesseraError, UsageError

#: The backend's name in ``torch.distributed`` (``dist.get_backend()``).
BACKEND = "tessera"
#: The most bytes of one worker's tensor in one collective: each travels in one
#: store message, which the coordinator caps at 1 MiB (``wire.MAX_HEADER_BYTES``).
_MAX_PART_BYTES = 512 << 10
#: ... and all W workers' parts of one all-gather together stay well inside the
#: store's own cap (``tessera.cluster.store.MAX_BYTES``, 16 MiB).
_MAX_CALL_BYTES = 8 << 20
#: How long a worker waits in a collective for the others: Gloo's default. In async
#: and ssp modes workers drift apart, so a metric all_reduce at an epoch's end may
#: wait long for the slowest; a failed job ends the wait at once.
WAIT_S = 1800.0


class CollectiveError(TesseraError):
    """A collective of the server modes' group could not complete: the message names
    the call, its number and the worker."""


class _Part(msgspec.Struct, array_like=True):
    """One worker's contribution to one collective, as stored."""
    op: str
    dtype: str
    shape: list[int]
    #: broadcast, reduce, gather, scatter: the root; else -1.
    root: int
    data: bytes


_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(_Part)


def _reduction(op):
    """``(name, fold)`` of a ``dist.ReduceOp`` (compared by value: not hashable), or None."""
    R = dist.ReduceOp
    for known, name, fold in (
            (R.SUM, "sum", torch.add), (R.AVG, "avg", torch.add),
            (R.PRODUCT, "product", torch.mul), (R.MIN, "min", torch.minimum),
            (R.MAX, "max", torch.maximum), (R.BAND, "band", torch.bitwise_and),
            (R.BOR, "bor", torch.bitwise_or), (R.BXOR, "bxor", torch.bitwise_xor)):
        if op == known:
            return name, fold
    return None


def max_bytes(world_size: int) -> int:
    """The most bytes one worker's tensor may have in one collective of ``world_size``."""
    return min(_MAX_PART_BYTES, _MAX_CALL_BYTES // max(1, world_size))


class _Done(dist._Work):
    """A collective that completed before its call returned (``async_op=True`` too)."""

    def __init__(self, result=None):
        super().__init__()
        self._future = torch.futures.Future()
        self._future.set_result(result)

    def wait(self, timeout=None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True

    def is_success(self) -> bool:
        return True

    def get_future(self):
        return self._future


class StoreGroup(dist.ProcessGroup):
    """The workers of a server-mode job as a ``torch.distributed`` process group
    (module docstring). ``store``: a ``torch.distributed.Store`` that every worker of
    the job reaches; ``prefix``: this group's key namespace."""

    def __init__(self, store: dist.Store, rank: int, world_size: int, *, prefix: str,
                 timeout_s: float):
        super().__init__(rank, world_size)
        self._store, self._me, self._world = store, rank, world_size
        self._prefix, self._timeout_s = prefix, timeout_s
        self._seq = 0
        self._lock = threading.Lock()  # one collective at a time, in call order

    def getBackendName(self) -> str:
        return BACKEND

    # ------------------------------------------------------------ the exchange

    def _pack(self, name: str, t: torch.Tensor, root: int = -1) -> _Part:
        if t.is_sparse or t.layout != torch.strided:
            raise UsageError(f"torch.distributed.{name}: the server modes' process group takes "
                             f"dense tensors, got {t.layout}; use --mode allreduce")
        nbytes = t.numel() * t.element_size()
        cap = max_bytes(self._world)
        if nbytes > cap:
            raise UsageError(
                f"torch.distributed.{name} of a {tuple(t.shape)} {str(t.dtype)[6:]} tensor "
                f"({nbytes:,} bytes): in the server modes (sync, async, ssp) the workers' "
                f"process group carries metrics-sized tensors through the coordinator, at "
                f"most {cap:,} bytes a worker; reduce less at a time, or use --mode allreduce "
                f"(Gloo) for model-sized collectives")
        flat = t.detach().reshape(-1).contiguous()
        data = flat.cpu().view(torch.uint8).numpy().tobytes() if flat.numel() else b""
        return _Part(op=name, dtype=str(t.dtype)[6:], shape=list(t.shape), root=root,
                     data=data)

    @staticmethod
    def _unpack(part: _Part) -> torch.Tensor:
        dtype = getattr(torch, part.dtype)
        if not part.data:
            return torch.empty(part.shape, dtype=dtype)
        return torch.frombuffer(bytearray(part.data), dtype=torch.uint8).view(dtype).reshape(
            part.shape)

    def _exchange(self, name: str, mine: Optional[_Part], senders, readers,
                  root: int = -1) -> dict[int, _Part]:
        """One collective: this rank publishes ``mine`` when it is one of ``senders`` and
        another rank reads it, and, when it is one of ``readers``, gets every other
        sender's part; in one round trip to the coordinator, which deletes each key once
        its readers have read it. Every rank calls it once per collective, in order."""
        n = self._seq
        self._seq += 1
        senders, readers = list(senders), list(readers)
        reads = self._me in readers
        got = {self._me: mine} if reads and mine is not None else {}
        if self._world == 1:
            return got
        what = f"torch.distributed.{name} (collective #{n + 1} of this job's workers)"
        base = f"{self._prefix}/{n}"
        others = sum(r != self._me for r in readers)
        publish = self._me in senders and others > 0
        want = [r for r in senders if r != self._me] if reads else []
        try:
            if n == 0 and self._store.add(f"{self._prefix}/lives/{self._me}", 1) > 1:
                # A replacement (--max-restarts): its script starts over, the others'
                # is where it was; no numbering could pair their calls.
                raise CollectiveError(
                    f"{what}: this worker replaced one that had called torch.distributed "
                    f"collectives; its script starts over while the other workers' go on, so "
                    f"their calls cannot pair up. With --max-restarts in the server modes, "
                    f"log metrics with tessera.log (worker 0) instead of collectives")
            values = self._store.exchange(
                [f"{base}/{r}" for r in want], publish=f"{base}/{self._me}" if publish else "",
                value=_encoder.encode(mine) if publish else b"", readers=others,
                wait_s=self._timeout_s)
            if values is None:
                missing = [r for r in want if not self._store.check([f"{base}/{r}"])]
                raise CollectiveError(
                    f"{what}: worker {', '.join(map(str, missing or want))} did not reach it "
                    f"within {self._timeout_s:g} s. In the server modes every worker must call "
                    f"the same torch.distributed collectives in the same order")
        except CollectiveError:
            raise
        except TesseraError as exc:  # the job failed, the coordinator is gone
            raise CollectiveError(f"{what}: {exc}") from None
        for r, raw in zip(want, values):
            part = _decoder.decode(raw)
            if part.op != name or part.root != root:
                theirs = part.op + (f" with root {part.root}" if part.root >= 0 else "")
                raise CollectiveError(
                    f"{what}: worker {r} called {theirs} at this point, this worker "
                    f"{name}" + (f" with root {root}" if root >= 0 else "") +
                    ": every worker must call the same collectives in the same order")
            got[r] = part
        return got

    def _same(self, name: str, parts: dict[int, _Part], want: _Part) -> None:
        for r, p in parts.items():
            if p.dtype != want.dtype or p.shape != want.shape:
                raise CollectiveError(
                    f"torch.distributed.{name}: worker {r} passed a {tuple(p.shape)} "
                    f"{p.dtype} tensor, this worker a {tuple(want.shape)} {want.dtype} "
                    f"tensor: every worker must pass the same shape and dtype")

    def _reduce(self, name: str, t: torch.Tensor, op, root: int, readers) -> None:
        kind = _reduction(op)
        if kind is None:
            raise UsageError(f"torch.distributed.{name}: this ReduceOp is not supported by the server "
                             f"modes' process group (SUM, AVG, PRODUCT, MIN, MAX, BAND, BOR, "
                             f"BXOR are); use --mode allreduce")
        mine = self._pack(name, t, root)
        parts = self._exchange(name, mine, range(self._world), readers, root)
        if self._me not in readers:
            return
        self._same(name, parts, mine)
        label, fold = kind
        acc = self._unpack(parts[0]).clone()
        for r in range(1, self._world):
            acc = fold(acc, self._unpack(parts[r]))
        if label == "avg":
            if not acc.is_floating_point() and not acc.is_complex():
                raise UsageError(f"torch.distributed.{name}: ReduceOp.AVG of an integer tensor; "
                                 f"use SUM and divide")
            acc = acc / self._world
        with torch.no_grad():
            t.copy_(acc.to(t.dtype))

    def _call(self, fn, *args):
        with self._lock:
            fn(*args)

    # ------------------------------------------------------------ torch's calls

    def allreduce(self, tensors, opts=None):
        for t in tensors:
            self._call(self._reduce, "all_reduce", t, opts.reduceOp, -1, range(self._world))
        return _Done(tensors)

    def allreduce_coalesced(self, tensors, opts=None):
        return self.allreduce(tensors, opts)

    def reduce(self, tensors, opts=None):
        root = opts.rootRank
        for t in tensors:
            self._call(self._reduce, "reduce", t, opts.reduceOp, root, [root])
        return _Done(tensors)

    def broadcast(self, tensors, opts=None):
        root = opts.rootRank

        def one(t):
            mine = self._pack("broadcast", t, root) if self._me == root else None
            parts = self._exchange("broadcast", mine, [root], range(self._world), root)
            if self._me != root:
                want = self._pack("broadcast", t, root)
                self._same("broadcast", parts, want)
                with torch.no_grad():
                    t.copy_(self._unpack(parts[root]))
        for t in tensors:
            self._call(one, t)
        return _Done(tensors)

    def _all_gather(self, name: str, outs, t) -> None:
        mine = self._pack(name, t)
        parts = self._exchange(name, mine, range(self._world), range(self._world))
        self._same(name, parts, mine)
        if len(outs) != self._world:
            raise UsageError(f"torch.distributed.{name}: {len(outs)} output tensors "
                             f"for {self._world} workers")
        with torch.no_grad():
            for r, out in enumerate(outs):
                out.copy_(self._unpack(parts[r]))

    def allgather(self, output_tensors, input_tensors, opts=None):
        for outs, t in zip(output_tensors, input_tensors):
            self._call(self._all_gather, "all_gather", outs, t)
        return _Done(output_tensors)

    def all_gather_single(self, output_tensor, input_tensor, opts=None):
        """``all_gather_into_tensor`` (torch 2.13 calls it ``all_gather_single``; older
        torch ``_allgather_base``): every worker's tensor, in worker order, into one
        output of ``world_size`` times as many elements (stacked or concatenated)."""
        name = "all_gather_into_tensor"
        if output_tensor.numel() != self._world * input_tensor.numel():
            raise UsageError(
                f"torch.distributed.{name}: an output of {output_tensor.numel():,} elements "
                f"for {self._world} workers' {input_tensor.numel():,}; it must hold "
                f"world_size x the input's")
        if output_tensor.dtype != input_tensor.dtype:
            raise UsageError(f"torch.distributed.{name}: a {str(output_tensor.dtype)[6:]} "
                             f"output for a {str(input_tensor.dtype)[6:]} input")
        rows = list(output_tensor.view(self._world, *input_tensor.shape))
        self._call(self._all_gather, name, rows, input_tensor)
        return _Done([output_tensor])

    def _allgather_base(self, output_tensor, input_tensor, opts=None):
        return self.all_gather_single(output_tensor, input_tensor, opts)

    def gather(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank

        def one(t):
            mine = self._pack("gather", t, root)
            parts = self._exchange("gather", mine, range(self._world), [root], root)
            if self._me == root:
                self._same("gather", parts, mine)
                with torch.no_grad():
                    for r, out in enumerate(output_tensors[0]):
                        out.copy_(self._unpack(parts[r]))
        for t in input_tensors:
            self._call(one, t)
        return _Done(output_tensors)

    def scatter(self, output_tensors, input_tensors, opts=None):
        root = opts.rootRank

        def one(out):
            # The root publishes the W parts as one list; each rank reads its own.
            if self._me == root:
                ins = input_tensors[0]
                if len(ins) != self._world:
                    raise UsageError(f"torch.distributed.scatter: {len(ins)} tensors to "
                                     f"scatter over {self._world} workers")
                packed = [self._pack("scatter", x, root) for x in ins]
                total = sum(len(p.data) for p in packed)
                if total > max_bytes(1):
                    raise UsageError(f"torch.distributed.scatter of {total:,} bytes: at most "
                                     f"{max_bytes(1):,} in the server modes; use --mode "
                                     f"allreduce")
                mine = _Part(op="scatter", dtype="", shape=[], root=root,
                             data=_encoder.encode(packed))
            else:
                mine = None
            parts = self._exchange("scatter", mine, [root], range(self._world), root)
            own = msgspec.msgpack.decode(parts[root].data, type=list[_Part])[self._me]
            want = self._pack("scatter", out, root)
            self._same("scatter", {root: own}, want)
            with torch.no_grad():
                out.copy_(self._unpack(own))
        for out in output_tensors:
            self._call(one, out)
        return _Done(output_tensors)

    def barrier(self, opts=None):
        self._call(lambda: self._exchange("barrier", _Part("barrier", "", [], -1, b""),
                                          range(self._world), range(self._world)))
        return _Done()

    def _refuse(self, name: str):
        raise UsageError(f"torch.distributed.{name} is not supported by the server modes' "
                         f"process group (all_reduce, reduce, broadcast, all_gather, "
                         f"all_gather_into_tensor, gather, scatter, barrier and the *_object "
                         f"forms are); use --mode allreduce for it")

    def reduce_scatter(self, *args, **kwargs):
        self._refuse("reduce_scatter")

    def reduce_scatter_single(self, *args, **kwargs):
        self._refuse("reduce_scatter_tensor")

    def _reduce_scatter_base(self, *args, **kwargs):
        self._refuse("reduce_scatter_tensor")

    def alltoall(self, *args, **kwargs):
        self._refuse("all_to_all")

    def alltoall_base(self, *args, **kwargs):
        self._refuse("all_to_all_single")

    def send(self, *args, **kwargs):
        self._refuse("send")

    def recv(self, *args, **kwargs):
        self._refuse("recv")

    def recv_anysource(self, *args, **kwargs):
        self._refuse("recv")


#: The group's keys in the store. A server-mode job never re-forms its workers (a dead
#: worker is replaced alone), and a re-formed job starts a new coordinator with a new
#: store, so one namespace per store is enough.
PREFIX = "tessera-pg"


def _create(store, rank: int, world_size: int, timeout) -> StoreGroup:
    """torch's backend hook (``dist.Backend.register_backend``): the group over the
    store :func:`join` passed (torch hands it over wrapped in a ``PrefixStore``)."""
    while isinstance(store, dist.PrefixStore):
        store = store.underlying_store
    return StoreGroup(store, rank, world_size, prefix=PREFIX,
                      timeout_s=timeout.total_seconds())


def join(store: dist.Store, *, rank: int, world_size: int, timeout_s: float) -> bool:
    """Make the job's workers ``torch.distributed``'s default group (module docstring);
    False, doing nothing, when this process already has one (the script made its own)."""
    import datetime
    if not dist.is_available() or dist.is_initialized():
        return False
    if not hasattr(dist.Backend, BACKEND.upper()):  # once per process
        dist.Backend.register_backend(BACKEND, _create, devices=["cpu", "cuda"])
    dist.init_process_group(BACKEND, store=store, rank=rank, world_size=world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def leave() -> None:
    """Destroy the default group when it is one :func:`join` formed (a job that ended
    without ``tessera.finish()``); a group of the script's own stays."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == BACKEND:
        dist.destroy_process_group()
