"""Consistency: when a clock is complete, which workers it waits for, when a reply may go.

A server holds *units* that each keep their own clock: the dense partitions of
:mod:`tessera.ps.server` and the embedding tables of :mod:`tessera.ps.table_server`.
Both follow one of three rules, chosen once per job by :func:`make_consistency`
(the only place that reads the mode string):

* :class:`Sync`: a unit at clock ``c`` sums the pushes for ``c`` from every
  expected worker, divides by their number (the mean, as DDP averages), applies
  the optimizer once and moves to ``c + 1``; the pushes are answered then. A pull
  for clock ``c`` waits until the unit has reached ``c``.
* :class:`Async`: each push, scaled by ``1 / workers``, is applied the moment it
  arrives and answered at once; pulls never wait (Hogwild: Niu et al., NIPS 2011;
  as MXNet ``dist_async``). The scaling keeps one learning rate right for both
  modes: W async pushes move the parameters as far as one sync step.
* :class:`SSP` (stale synchronous parallel; Ho et al., "More Effective Distributed
  ML via a Stale Synchronous Parallel Parameter Server", NIPS 2013, as Petuum's
  Bosen ships it): pushes are applied as in async, but a unit counts the clocks
  each worker has pushed, and its clock is the *slowest* live worker's count. The
  reply to worker w's push for clock c (which lets w start clock c + 1) is held
  until that slowest count is at least c + 1 - K: no worker computes more than K
  clocks ahead of the slowest. K = 0 is lock-step; K = infinity is async.

Membership (:class:`Membership`, ``--max-restarts``): a worker the coordinator
declares dead leaves the set a sync clock waits for (the clock completes with the
live workers' pushes, and the shortfall is counted) and the slowest-worker minimum
of ssp. A restarted worker joins again at a future clock; from that clock on its
pushes count again. One membership serves every unit of a server, dense or table.

Two-phase verdicts (loss scaling, fp16, or clipping; sync only): a complete clock is
not applied at once. The server judges the held sum (:meth:`Sync.judge`: finite, which
workers reported overflows, its norm), answers the pushes with that verdict, and
applies or drops the sum once the cluster's decision is known (:meth:`Sync.decided`):
taken by the servers from each other's verdicts (:mod:`tessera.ps.agreement`), or
carried by a worker's pull (with ``--replication 2``). Both take it from the same
verdicts, so a step is skipped on every server or on none.

Waiting: a request that may not be answered yet is a :class:`Waiter` hung on each
of its units; :meth:`Consistency.wake` answers those that became ready after the
units moved. The waiter carries its own ``reply`` callable, so dense replies and
table replies share this one mechanism.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Iterable, Optional

import torch

from tessera.amp.finite import all_finite
from tessera.transport import wire

MODES = ("sync", "async", "ssp")


class RequestError(ValueError):
    """A request a server refuses; the message goes back to the sender."""


#: In a sync refusal: a push for the clock after the unit's, from a worker the unit's
#: clock does not wait for (it joined at the next clock, or pushed this one already).
#: It is in turn for a copy that has not caught up yet: a backup promoted after its
#: primary died may lack the primary's last clock (``answer_early`` answers a clock
#: before its update is on the backup), which the other workers' re-sent pushes
#: complete there. Nothing was applied; the client sends it again (PSClient).
NOT_CAUGHT_UP = "has yet to complete that clock"


class NotABackup(RequestError):
    """A Replicate for a partition or table shard this server holds no copy of. From a
    replacement server that holds no copies yet, the sender learns its backup died and
    a new process took its address (:data:`tessera.ps.replication.REPLACED`)."""


@dataclass(eq=False, kw_only=True)
class Clocked:
    """One unit with its own clock (a dense partition, an embedding table)."""

    clock: int = 0
    #: sync: the workers whose pushes of the current clock are in.
    pushed_by: set[int] = field(default_factory=set)
    #: ssp: clocks pushed by each worker (``clock`` is then the live minimum).
    counts: dict[int, int] = field(default_factory=dict)
    waiters: list["Waiter"] = field(default_factory=list)
    #: Two-phase: the verdict on the held sum of clock ``clock`` (None: not judged).
    verdict: Optional[bool] = None

    @property
    def ready(self) -> bool:
        """Whether the unit can answer at all (a dense partition needs initial values)."""
        return True

    def named(self) -> tuple[str, str]:
        """For error messages: a prefix naming the unit's kind, and the unit itself."""
        return "", "the unit"


@dataclass(eq=False)
class Waiter:
    """A request answered (``reply(self)``) once all ``units`` are ready and at ``clock``."""

    clock: int
    units: list
    reply: Callable[["Waiter"], None]

    def ready(self) -> bool:
        clock = self.clock
        for u in self.units:  # (a loop: a generator costs each reply a frame and calls)
            if not (u.ready and u.clock >= clock):
                return False
        return True


class Membership:
    """The workers a clock waits for: live ones, each from the clock it joined at."""

    def __init__(self, num_workers: int):
        self.num_workers = num_workers
        self.live: set[int] = set(range(num_workers))
        #: A rejoined worker counts for clocks from this one on (sync).
        self.joined_at: dict[int, int] = {}
        self.incarnations: dict[int, int] = {}
        #: Clocks each worker has pushed (async progress, for checkpoints).
        self.worker_clock: dict[int, int] = {}

    def expected(self, clock: int) -> set[int]:
        """The workers whose pushes a sync clock ``clock`` waits for."""
        return {w for w in self.live if self.joined_at.get(w, 0) <= clock}

    def depart(self, worker: int, incarnation: int) -> bool:
        """Stop waiting for ``worker`` (its incarnation died); False if already gone
        or if a newer incarnation has joined since."""
        if worker not in self.live or self.incarnations.get(worker, 0) > incarnation:
            return False
        self.live.discard(worker)
        return True

    def join(self, worker: int, incarnation: int) -> None:
        self.incarnations[worker] = max(self.incarnations.get(worker, 0), incarnation)
        self.live.add(worker)

    def finish(self, worker: int) -> bool:
        """Stop waiting for ``worker``: it sent its final report (its last pushes were
        answered), so it pushes no more; False if already not waited for."""
        if worker not in self.live:
            return False
        self.live.discard(worker)
        return True

    def pushed(self, worker: int, clock: int) -> None:
        self.worker_clock[worker] = max(self.worker_clock.get(worker, 0), clock + 1)


class Consistency:
    """The rule shared by all units of one server; subclasses set the policy."""

    name: ClassVar[str]
    #: Pushes of a clock are summed and applied once (sync), not applied one by one.
    sums_clock: ClassVar[bool] = False
    #: A push is answered as soon as it is applied (no waiting on other workers).
    answers_at_once: ClassVar[bool] = True

    def __init__(self, num_workers: int, staleness: int = 0):
        self.members = Membership(num_workers)
        self.staleness = staleness

    # -- policy (overridden per mode)

    def pull_clock(self, asked: int) -> int:
        """The clock a unit must reach before a pull asking for ``asked`` is answered."""
        return 0

    def push_clock(self, pushed: int) -> int:
        """The clock a unit must reach before the reply to a push for ``pushed`` goes."""
        return 0

    def updated(self, unit: Clocked) -> None:
        """One update was applied to ``unit``."""
        unit.clock += 1

    def replayed(self, unit: Clocked, primary_clock: int) -> None:
        """A backup applied its primary's update, made at ``primary_clock``."""
        unit.clock += 1

    def complete(self, unit: Clocked) -> bool:
        """Whether ``unit``'s current clock has every push it waits for (sync)."""
        return False

    def check_turn(self, unit: Clocked, worker: int, clock: int) -> None:
        """Refuse a push that is not ``worker``'s next one on ``unit`` (sync)."""

    def stale_push(self, units: list[Clocked], worker: int, clock: int) -> bool:
        """True for a push whose clock all ``units`` have passed (sync: it was applied,
        or its clock completed without it); refuses one out of turn."""
        return False

    def counted(self, units: Iterable[Clocked], worker: int, pushed: int) -> None:
        """``worker`` finished clock ``pushed`` on ``units`` (whether or not applied)."""

    def advance(self, units: Iterable[Clocked]) -> None:
        """Move the units' clocks as far as the workers' progress allows, answering waiters."""

    def join(self, units: list[Clocked], worker: int, clock: int) -> Optional[int]:
        """``worker`` rejoins at ``clock``: the clock its reply waits for, or None (at once)."""
        return None

    def taken_over(self, unit: Clocked) -> None:
        """A backup unit became primary: restart its per-worker bookkeeping."""

    def progress(self, units: Iterable[Clocked]) -> int:
        """The clock every worker has completed, as far as these units know."""
        return min((st.clock for st in units), default=0)

    # -- balance (``[train] balance = "speed"``, sync only)

    def report(self, worker: int, clock: int, weight: float, rate: float) -> None:
        """Check a push's balance fields before any state changes (and, in sync, keep
        its rate for the replies of ``clock + 1``)."""
        if weight != 1.0:
            raise RequestError(f"a weighted push (weight {weight}: train.balance = 'speed') "
                               f"needs sync mode; this server runs {self.name}")

    def rates(self, clock: int) -> Optional[list[list[float]]]:
        """What a reply at ``clock`` carries: every worker's [rate, weight] reported with
        its pushes of ``clock - 1`` (None: none)."""
        return None

    # -- waiting (shared)

    def wait_or_answer(self, w: Waiter) -> None:
        if w.ready():
            w.reply(w)
        else:
            for u in w.units:
                u.waiters.append(w)

    def wake(self, units: Iterable[Clocked]) -> None:
        """Answer every request waiting on ``units`` that is now ready."""
        for u in units:
            still = []
            for w in u.waiters:
                if not w.ready():
                    still.append(w)
                    continue
                w.reply(w)
                for other in w.units:
                    if other is not u:
                        other.waiters.remove(w)
            u.waiters = still


class Sync(Consistency):
    name = "sync"
    sums_clock = True
    answers_at_once = False

    def __init__(self, num_workers: int, staleness: int = 0):
        super().__init__(num_workers, staleness)
        #: Balance: clock -> every worker's reported [samples/s, weight] (0: not reported).
        self._rates: dict[int, list[list[float]]] = {}

    def report(self, worker: int, clock: int, weight: float, rate: float) -> None:
        """Balance (``[train] balance = "speed"``): a push counts ``weight`` times in
        the clock's mean (its share of the global batch over the even share, so that
        the mean stays the mean over every sample of the step), and its sender's
        measured ``rate`` (samples/s) and weight go back to every worker with the
        replies of ``clock + 1``, where each derives the same split of the next step."""
        if not 0.0 < weight <= self.members.num_workers:
            raise RequestError(f"push weight must be in (0, {self.members.num_workers}] "
                               f"(the share of the global batch over the even share), "
                               f"got {weight}")
        if rate == 0.0:
            return
        if not 0.0 < rate < float("inf"):
            raise RequestError(f"push rate must be a positive finite samples/s, got {rate}")
        row = self._rates.get(clock)
        if row is None:
            for old in [c for c in self._rates if c < clock - 3]:
                del self._rates[old]
            row = self._rates[clock] = [[0.0, 0.0] for _ in range(self.members.num_workers)]
        row[worker] = [rate, weight]

    def rates(self, clock: int) -> Optional[list[list[float]]]:
        return self._rates.get(clock - 1)

    def pull_clock(self, asked: int) -> int:
        return asked

    def push_clock(self, pushed: int) -> int:
        return pushed + 1

    def stale_push(self, units: list[Clocked], worker: int, clock: int) -> bool:
        if worker not in self.members.live:
            raise RequestError(f"worker {worker} left the job (declared dead); a "
                               f"restarted worker joins again with a Join request")
        for u in units:
            if clock >= u.clock:
                break
        else:  # every unit is past this clock
            return True
        for u in units:
            if u.verdict is not None:
                where, name = u.named()
                raise RequestError(f"{where}{name} waits for the commit of clock {u.clock}; "
                                   f"pull with commit before pushing again")
            self.check_turn(u, worker, clock)
        return False

    def check_turn(self, unit: Clocked, worker: int, clock: int) -> None:
        if clock == unit.clock + 1 and (worker in unit.pushed_by or
                                        worker not in self.members.expected(unit.clock)):
            # A rejoined worker's first push to a promoted copy one clock behind the
            # primary that answered its Join (NOT_CAUGHT_UP): in turn once the others'
            # re-sent pushes complete clock ``unit.clock`` here.
            where, name = unit.named()
            raise RequestError(f"{where}push for clock {clock} but {name} is at clock "
                               f"{unit.clock} and {NOT_CAUGHT_UP} (a copy taking over from "
                               f"a server that died); sent again")
        if clock != unit.clock:
            where, name = unit.named()
            raise RequestError(f"{where}push for clock {clock} but {name} is at clock "
                               f"{unit.clock} (sync mode)")
        if worker in unit.pushed_by:
            where, name = unit.named()
            raise RequestError(f"{where}worker {worker} already pushed {name} for clock {clock}")

    def complete(self, unit: Clocked) -> bool:
        return bool(unit.pushed_by) and unit.pushed_by >= self.members.expected(unit.clock)

    def join(self, units: list[Clocked], worker: int, clock: int) -> Optional[int]:
        late = [u for u in units if u.clock > clock]
        if late:
            where, name = late[0].named()
            raise RequestError(f"join at clock {clock} is too late: {where}{name} is at "
                               f"clock {late[0].clock}")
        # Counted from ``clock`` on; a clock before it no longer waits for this worker.
        self.members.joined_at[worker] = clock
        return clock

    # -- two-phase verdicts (loss scaling)

    @staticmethod
    def judge(unit) -> wire.Verdict:
        """Judge a complete clock's held sum (``unit.accum``): finite, with no overflow
        reported. The unit holds the sum until the decision; the Verdict goes to its
        pushers (``req`` set per pusher)."""
        unit.verdict = not unit.overflows and all_finite(unit.accum)
        norm = 0.0
        if unit.norm_type and unit.verdict:
            # The norm of the mean: p-norms are homogeneous, so |sum| / n (one pass, and
            # only for a clock a worker will clip); the sum was divided already where the
            # clock's first push was not held.
            n = max(1, len(unit.pushed_by))
            norm = float(torch.linalg.vector_norm(unit.accum, unit.norm_type)) \
                * unit.divided_by / n
        return wire.Verdict(req=0, partitions=[unit.info.id], clock=unit.clock,
                            finite=unit.verdict, overflows=unit.overflows, norm=norm)

    @staticmethod
    def decided(units: list, clock: int, apply: bool) -> list:
        """The units whose held sum of ``clock`` the cluster's decision settles now
        (others were settled by another worker's pull); refuses to apply a non-finite sum."""
        due = [u for u in units if u.verdict is not None and u.clock == clock]
        for u in due:
            if apply and not u.verdict:
                raise RequestError(f"commit to apply clock {clock}, but partition {u.info.id}'s "
                                   f"gradient sum is not finite")
        return due


class Async(Consistency):
    name = "async"

    def progress(self, units: Iterable[Clocked]) -> int:
        wc = self.members.worker_clock
        return min((wc.get(w, 0) for w in self.members.live), default=0)


class SSP(Consistency):
    name = "ssp"
    answers_at_once = False

    def pull_clock(self, asked: int) -> int:
        return asked - self.staleness

    def push_clock(self, pushed: int) -> int:
        return pushed + 1 - self.staleness

    def updated(self, unit: Clocked) -> None:
        pass  # the clock is the slowest worker's, not the number of updates

    def replayed(self, unit: Clocked, primary_clock: int) -> None:
        unit.clock = max(unit.clock, primary_clock)

    def check_turn(self, unit: Clocked, worker: int, clock: int) -> None:
        """Refuse a push that is not ``worker``'s next one on ``unit`` (sync)."""

    def stale_push(self, units: list[Clocked], worker: int, clock: int) -> bool:
        """True for a push whose clock all ``units`` have passed (sync: it was applied,
        or its clock completed without it); refuses one out of turn."""
        return False

    def counted(self, units: Iterable[Clocked], worker: int, pushed: int) -> None:
        for u in units:
            u.counts[worker] = max(u.counts.get(worker, 0), pushed + 1)

    def advance(self, units: Iterable[Clocked]) -> None:
        live = self.members.live
        moved = []
        for u in units:
            slowest = min((u.counts.get(w, 0) for w in live), default=0)
            if slowest > u.clock:
                u.clock = slowest
                moved.append(u)
        self.wake(moved)

    def join(self, units: list[Clocked], worker: int, clock: int) -> Optional[int]:
        for u in units:  # not behind the slowest: it must not hold the others back
            u.counts[worker] = max(u.counts.get(worker, 0), u.clock, clock)
        return None

    def taken_over(self, unit: Clocked) -> None:
        unit.counts = {w: unit.clock for w in self.members.live}


def make_consistency(mode: str, num_workers: int, staleness: int = 0) -> Consistency:
    """The rule for ``mode`` (one of :data:`MODES`)."""
    rules = {"sync": Sync, "async": Async, "ssp": SSP}
    if mode not in rules:
        raise ValueError(f"server mode {mode!r} is not one of {', '.join(MODES)}")
    return rules[mode](num_workers, staleness)
