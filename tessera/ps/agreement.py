"""Servers that decide a held sync clock among themselves: one round trip, not two.

A sync clock is *held* when its update depends on every partition's gradient: under
loss scaling (skip the step everywhere if any partition overflowed) and while the
script clips by the global norm (one coefficient from the norm of all partitions
together). Each server judges its own partitions' means (finite, and their norms:
:meth:`tessera.ps.consistency.Sync.judge`), but the decision needs all of them.

Without agreement the workers decide: each server answers the held pushes with its
verdicts, every worker derives the same decision and sends it with the pull of the
next clock (``Pull.commit``, ``Pull.coef``). That is two round trips per step, and
the second starts only after the worker has woken up for the verdicts: in the recipe
benchmark, clipping cost 12% of a sync step (examples/recipe.py's CNN, 2 workers, 2
servers: 3,100 against 3,500 samples/s without the clip).

With agreement (:func:`tessera.cluster.role.agrees`: sync mode, ``--replication 1``)
each server sends its verdicts to every other server (:class:`~tessera.transport.wire.Judged`,
one-way) as it judges them, and the workers send the pull of the next clock at once,
with the pushes, carrying what the decision needs from the script: how many held
partitions the model has, and the clipping threshold and norm type
(``Pull.agree``/``clip``/``norm_type``; the first pull of a clock to arrive counts, as
the first commit does without agreement). A server decides when it has all of them:
apply only if every verdict is finite; coefficient ``min(1, clip / (norm + 1e-6))`` with
``norm`` the ``norm_type``-norm of the partitions' norms (in partition order, float64:
what each worker computes from the same verdicts for ``clip_grad_norm_``'s return
value). Every server has the same verdicts and inputs, so it takes the same decision;
the pull is answered with the values once it is applied. The verdicts still answer
the pushes, so ``unscale_()`` and ``clip_grad_norm_()`` learn finiteness and the norm
as before.

Not with ``--replication 2``: a promoted backup would need the verdicts and inputs
sent to the dead primary (they are not re-sent), so replicated jobs keep the workers'
decision. A dead server fails an unreplicated job, so no server waits for a dead
peer's verdicts longer than the job lives; the workers' pulls wait with their timeout.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from tessera.ps.consistency import RequestError
from tessera.transport import wire
from tessera.transport.endpoint import TransportError

#: Clocks whose verdicts a server keeps at once (a peer's next clock may arrive before
#: this server decided the current one only by a few messages; more is a broken peer).
KEEP_CLOCKS = 4


def decide(verdicts: dict[int, tuple[bool, float]], clip: float,
           norm_type: float) -> tuple[bool, float, float]:
    """(apply, coefficient, total norm) from every held partition's (finite, norm)."""
    if not all(finite for finite, _ in verdicts.values()):
        return False, 1.0, math.inf
    norms = torch.tensor([verdicts[pid][1] for pid in sorted(verdicts)], dtype=torch.float64)
    total = float(torch.linalg.vector_norm(norms, norm_type)) if len(norms) else 0.0
    coef = min(1.0, clip / (total + 1e-6)) if clip > 0 else 1.0
    return True, coef, total


def check_inputs(msg: wire.Pull, num_partitions: int) -> None:
    """A pull's agreement fields, before any state changes."""
    if msg.commit is not None:
        raise RequestError("a pull carries either the workers' decision (commit) or what the "
                           "servers need to take it (agree), not both")
    if msg.agree > num_partitions:
        raise RequestError(f"agree on {msg.agree} held partitions, but the model has "
                           f"{num_partitions}")
    if not (0.0 <= msg.clip < math.inf):
        raise RequestError(f"clip must be a finite threshold >= 0 (0: no clipping), got "
                           f"{msg.clip}")
    if not msg.norm_type > 0:  # NaN fails too; inf (the max norm) is fine
        raise RequestError(f"norm_type must be > 0, got {msg.norm_type}")


class Agreement:
    """One server's side: its verdicts out to the other servers, theirs in, the decision."""

    def __init__(self, rank: int, partitions: set[int], *,
                 peers: Callable[[], list[int]], connect: Optional[Callable[[int], object]]):
        self.rank = rank
        #: Every held-able partition of the model (what a peer's verdict may name).
        self.partitions = partitions
        self._peer_ranks, self._connect = peers, connect
        self._peers: dict[int, object] = {}
        #: clock -> partition -> (finite, norm).
        self.book: dict[int, dict[int, tuple[bool, float]]] = {}
        #: clock -> (held partitions in the model, clip, norm_type): the first pull's.
        self.inputs: dict[int, tuple[int, float, float]] = {}
        #: Clocks decided here (their late messages are ignored).
        self.decided_through = -1
        #: This server's own verdicts of its last clocks, for a server it hears of later.
        self.mine: dict[int, dict[int, tuple[bool, float]]] = {}
        #: The servers this one has sent its verdicts to.
        self._sent_to: set[int] = set()

    def judged(self, clock: int, pid: int, finite: bool, norm: float) -> None:
        """This server's verdict on its partition ``pid`` at ``clock``: kept, and sent to
        every other server."""
        self._note(clock, pid, finite, norm)
        self.mine.setdefault(clock, {})[pid] = (finite, norm)
        self._bound(self.mine)
        for rank in self._peer_ranks():
            self._send(rank, clock, {pid: (finite, norm)})

    def follow(self) -> None:
        """A server this one heard of since it last sent verdicts (started mid-job by
        ``tessera scale``, its address in a later heartbeat) gets the kept ones: a
        partition moved to it may be deciding a clock this server judged already."""
        if not self.mine:
            return
        ranks = self._peer_ranks()
        for rank in [r for r in self._peers if r not in ranks]:  # scaled away, or dead: a
            self._peers.pop(rank).close()  # rank started again is a new process, reached anew
            self._sent_to.discard(rank)
        for rank in ranks:
            if rank not in self._sent_to:
                for clock, verdicts in sorted(self.mine.items()):
                    self._send(rank, clock, verdicts)

    def _send(self, rank: int, clock: int, verdicts: dict[int, tuple[bool, float]]) -> None:
        if self._connect is None:
            raise RequestError("this server cannot reach the other servers to agree on a "
                               "held clock")
        pids = sorted(verdicts)
        msg = wire.Judged(req=0, sender=self.rank, clock=clock, partitions=pids,
                          finite=[verdicts[p][0] for p in pids],
                          norms=[verdicts[p][1] for p in pids])
        peer = self._peers.get(rank)
        try:
            if peer is None:
                peer = self._connect(rank)
                if peer is None:  # declared dead meanwhile: the job is failing
                    return
                self._peers[rank] = peer
            peer.send(msg)
        except TransportError as exc:  # the pusher hears it, in one line
            raise RequestError(f"server {self.rank} cannot send its verdict on clock "
                               f"{clock} to server {rank}: {exc}") from None
        self._sent_to.add(rank)

    def heard(self, msg: wire.Judged) -> None:
        """Another server's verdicts (checked before any is kept)."""
        n = len(msg.partitions)
        if len(msg.finite) != n or len(msg.norms) != n:
            raise RequestError(f"Judged from server {msg.sender}: {n} partitions but "
                               f"{len(msg.finite)} verdicts and {len(msg.norms)} norms")
        unknown = [pid for pid in msg.partitions if pid not in self.partitions]
        if unknown:
            raise RequestError(f"Judged from server {msg.sender} names partitions {unknown} "
                               f"this job does not have")
        if any(not (norm >= 0) for norm in msg.norms):  # NaN too
            raise RequestError(f"Judged from server {msg.sender}: a norm must be >= 0")
        if msg.clock <= self.decided_through:
            return  # decided already (a duplicate)
        for pid, finite, norm in zip(msg.partitions, msg.finite, msg.norms):
            self._note(msg.clock, pid, finite, norm)

    def asked(self, clock: int, needs: int, clip: float, norm_type: float) -> None:
        """A worker's pull of ``clock + 1`` brought what the decision of ``clock`` needs."""
        if clock > self.decided_through:
            self.inputs.setdefault(clock, (needs, clip, norm_type))
            self._bound(self.inputs)

    def decision(self, clock: int) -> Optional[tuple[bool, float]]:
        """(apply, coefficient) once every verdict and the inputs of ``clock`` are in;
        None until then."""
        inputs, verdicts = self.inputs.get(clock), self.book.get(clock)
        if inputs is None or verdicts is None or len(verdicts) < inputs[0]:
            return None
        apply, coef, _ = decide(verdicts, inputs[1], inputs[2])
        return apply, coef

    def forget(self, clock: int) -> None:
        """``clock`` is decided here: drop it and everything before it."""
        self.decided_through = max(self.decided_through, clock)
        for book in (self.book, self.inputs):
            for c in [c for c in book if c <= clock]:
                del book[c]

    def close(self) -> None:
        for peer in self._peers.values():
            peer.close()
        self._peers.clear()

    def _note(self, clock: int, pid: int, finite: bool, norm: float) -> None:
        self.book.setdefault(clock, {}).setdefault(pid, (finite, norm))
        self._bound(self.book)

    @staticmethod
    def _bound(book: dict) -> None:
        while len(book) > KEEP_CLOCKS:
            del book[min(book)]
