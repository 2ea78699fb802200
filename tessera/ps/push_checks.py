"""What a server checks in a push before any state changes.

A push that fails a check is answered with an :class:`~tessera.transport.wire.Error`
naming the field and forgotten (:class:`~tessera.ps.consistency.RequestError`):
ids and payload lengths are checked by the server itself, the rest here. Workers are
authenticated, so these guard against bugs and version skew as much as malice; every
bound a peer could exceed is checked before it is used.
"""

from __future__ import annotations

import math

from tessera.ps.consistency import RequestError
from tessera.transport import wire


def check_push(msg: wire.Push, states: list, num_workers: int) -> None:
    """Initialised partitions, a worker of this job, sane counters and loss scale."""
    for st in states:
        if st.rule is None:
            raise RequestError(f"partition {st.info.id} has not been initialised yet "
                               f"(worker 0 sends initial values first)")
    if not 0 <= msg.worker < num_workers:
        raise RequestError(f"worker {msg.worker} is not in this job "
                           f"(workers are 0..{num_workers - 1})")
    if msg.seq < 0:
        raise RequestError(f"push sequence numbers start at 0, got {msg.seq}")
    if msg.clock < 0:
        raise RequestError(f"push clocks start at 0, got {msg.clock}")
    if not (0 < msg.scale < math.inf):
        raise RequestError(f"loss scale must be a positive finite number, got {msg.scale}")
    if msg.checkpoint < 0 or msg.checkpoint > msg.clock + 1:
        raise RequestError(f"a push for clock {msg.clock} can only ask for a checkpoint at "
                           f"clock {msg.clock + 1}, got {msg.checkpoint}")
    if msg.norm_type < 0 or msg.norm_type != msg.norm_type:
        raise RequestError(f"norm_type must be >= 0 (0: no norm), got {msg.norm_type}")
    if msg.unused is not None:
        if len(msg.unused) != len(states):
            raise RequestError(f"unused names the ranges of {len(msg.unused)} partitions; "
                               f"the push carries {len(states)}")
        for st, ranges in zip(states, msg.unused):
            check_ranges(ranges, st.numel, f"unused ranges of partition {st.info.id}")


def check_ranges(ranges: list[int], numel: int, what: str) -> None:
    """``ranges``: flat ``lo, hi`` pairs, sorted and disjoint, inside ``[0, numel)``."""
    if len(ranges) % 2:
        raise RequestError(f"{what}: an odd count ({len(ranges)}) of range ends")
    at = 0
    for lo, hi in zip(ranges[::2], ranges[1::2]):
        if not at <= lo < hi <= numel:
            raise RequestError(f"{what}: [{lo}, {hi}) is not a sorted, disjoint range of "
                               f"the partition's {numel} elements")
        at = hi


def check_held(msg: wire.Push, states: list, held: bool, policy) -> None:
    """A held push (loss scaling, clipping) and the hyperparameters worker 0 sends."""
    if held and len(states) != 1:
        raise RequestError("a held push (loss scaling, clipping) carries one partition")
    if held and not policy.sums_clock:
        raise RequestError(f"only sync mode holds a clock's gradient for a verdict "
                           f"(this server runs {policy.name})")
    if msg.judged and (msg.hold or not policy.sums_clock):
        raise RequestError(f"a judged push (the worker's own verdict on its whole gradient) "
                           f"is a sync clock's, and not held (this server runs {policy.name}"
                           f"{', the push asks to be held' if msg.hold else ''})")
    if msg.pending and not msg.judged:
        raise RequestError("a push whose word is pending (a Word follows) must be judged")
    if msg.hparams is None:
        return
    if msg.worker != 0:
        raise RequestError("only worker 0 sends hyperparameters")
    for st in states:
        if len(msg.hparams) != st.rule.num_groups:
            raise RequestError(f"hyperparameters of {len(msg.hparams)} param groups sent; "
                               f"the optimizer has {st.rule.num_groups}")
        why = st.rule.check_hparams(msg.hparams)
        if why:
            raise RequestError(f"hyperparameters refused: {why}")
