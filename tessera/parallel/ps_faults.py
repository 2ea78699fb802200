"""What a parameter-server worker does when something went wrong: it was restarted,
or its gradients overflowed.

* :class:`Rejoin`: a restarted worker (``--max-restarts``) joins the running job. In
  async and ssp modes it takes the current values at once; in sync mode it asks the
  servers for their clocks and joins at a clock every server has yet to reach (``Join``;
  a server already past it answers "too late" and the worker offers a later one), never
  past the run's last step. Worker 0 also decides here when to ask for a checkpoint.
* :class:`OverflowReport`: under fp16 loss scaling, a skipped step names the first
  parameter, in backward order, whose gradient overflowed on some worker (every worker
  runs the same model, so this worker's order ranks the others' reports too).

Both are mixins of :class:`tessera.parallel.ps.PSDataParallel`, apart so that the
step itself reads in one place.
"""

from __future__ import annotations

from typing import Optional

import torch

from tessera.amp.finite import all_finite
from tessera.transport.wire import Overflow


class Rejoin:
    def start_step(self, max_clock: Optional[int] = None) -> int:
        """The step a training loop starts at: 0, a resumed job's checkpoint clock, or
        where a restarted worker joined (``max_clock``: the run's last step, never joined
        past). Write loops as ``for step in range(model.start_step(steps), steps)``."""
        if max_clock is not None:
            self.max_clock = max_clock
        self.ensure_joined()
        return self.clock

    def ensure_joined(self) -> None:
        """A restarted worker joins the running job (done by the first forward, or
        earlier by a trainer that sets ``max_clock`` first)."""
        if self._incarnation:
            incarnation, self._incarnation = self._incarnation, 0
            self._join(incarnation)
            self._ckpt_flag = self._checkpoint_flag()

    def _join(self, incarnation: int) -> None:
        """A restarted worker takes current values and, in sync mode, a clock that every
        server has yet to reach, from which its pushes count (see ParameterServer)."""
        from tessera.ps.client import ServerError
        if self.mode != "sync":
            handles = self.client.join(self.clock, incarnation, tables=bool(self.tables))
            self._copy_in(handles)
            self.log(f"worker {self.client.worker}: rejoined at clock {self.clock}")
            return
        for _ in range(50):
            current = self.client.pull(clock=0)
            clocks = []
            for h in current:
                self._consume(h, h.wait())
                clocks.append(h.clock)
            target = max(clocks) + 2
            if self.max_clock is not None and target > self.max_clock:
                if max(clocks) >= self.max_clock:  # the others finished: nothing left to do
                    self.clock = max(clocks)
                    return
                target = self.max_clock
            try:
                self._copy_in(self.client.join(target, incarnation, tables=bool(self.tables)))
            except ServerError as exc:
                if "too late" not in str(exc):
                    raise
                continue
            self.clock = target
            self.log(f"worker {self.client.worker}: rejoined at clock {target}")
            return
        raise ServerError("could not join: the servers moved past every clock offered")

    def _checkpoint_flag(self) -> int:
        """Worker 0 asks the servers for a checkpoint at clock + 1 (0: not now)."""
        if not self.is_first:
            return 0
        wanted = bool(self.checkpoint_wanted())
        ask = wanted and not self._ckpt_asked
        self._ckpt_asked = wanted
        periodic = (self.mode != "sync" and self.checkpoint_every
                    and (self.clock + 1) % self.checkpoint_every == 0)
        return self.clock + 1 if ask or periodic else 0



class OverflowReport:
    def _first_nonfinite(self, pid: int, wire_grad: torch.Tensor) -> str:
        """Name of the first parameter, in backward order, with a non-finite gradient."""
        start = self.client.parts[pid].start
        order = sorted(self._params_of_part[pid], key=lambda i: self._fired.get(i, 1 << 30))
        for index in order:
            _, off, n = self._views[index]
            lo, hi = max(off, start) - start, min(off + n, start + wire_grad.numel()) - start
            if not all_finite(wire_grad[lo:hi]):
                return self._names[index]
        return self._names[order[0]] if order else "?"

    def _backward_rank(self, name: str) -> int:
        """Where parameter ``name``'s gradient came in this backward (only on overflow)."""
        return self._fired.get(self._names.index(name), 1 << 30) if name in self._names \
            else 1 << 30


    def _report_overflow(self, overflows: list[Overflow], bad: list[int]) -> None:
        """Log a skipped fp16 step: who overflowed where (``overflows``, from the verdicts
        or the replies), else the partitions whose sum was not finite (``bad``)."""
        # Every worker runs the same model, so this worker's backward order ranks the
        # parameters the others named: the first in backward order is reported first.
        order = {self._names[i]: k for i, k in self._fired.items()}
        culprits = sorted({(o.worker, o.param): o for o in overflows}.values(),
                          key=lambda o: (order.get(o.param, 1 << 30), o.worker))
        old = self.scaler.scale
        new = old * self.scaler.backoff_factor
        if culprits:
            first = culprits[0]
            where = f"on worker {first.worker} in parameter '{first.param}'"
            others = sorted({(o.worker, o.param) for o in culprits[1:]} - {(first.worker, first.param)})
            if others:
                where += " (also " + ", ".join(f"worker {w} '{p}'" for w, p in others[:5]) + ")"
        else:
            where = f"in the sum of the workers' gradients of partitions {bad}"
        event = {"step": self.clock + 1, "where": where, "scale": old, "new_scale": new}
        self.overflows.append(event)
        self.log(f"worker {self.client.worker}: fp16 gradient overflow at step {self.clock + 1} "
                 f"{where}; step skipped on every worker and server; loss scale {old:g} -> {new:g}")

