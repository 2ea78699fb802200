"""``optimizer.state_dict()`` and ``load_state_dict()`` in the server modes.

The servers run the script's ``torch.optim`` class on their partitions, so the
per-element state (Adam's moments, SGD's momentum buffer) and the scalars (``step``)
are theirs (:mod:`tessera.ps.optim_state`). :class:`ServerState` moves them between
the servers' layout (per partition: one flat tensor per state name over the
partition's elements, a scalar once) and torch's (per parameter: tensors of the
parameter's shape), so that a script's own checkpoint (``torch.save({"model": ...,
"optimizer": optimizer.state_dict()})``) holds what one process's would, and loading
it continues the same moments.

Only worker 0's load reaches the servers (every worker of a DDP script loads the
same file), before its next pushes; a restarted worker or a resumed job
(``--max-restarts``, ``--resume``) leaves the servers' state alone, as it does their
values: theirs is the job's. The servers keep one scalar per partition where torch
keeps one per parameter (they step every partition at every clock; with
``find_unused_parameters`` a parameter a step skipped keeps a count of its own, which
:meth:`ServerState.fetch` gives it, and a loaded state whose parameters' counts differ
gives each its own), and the state must cover every parameter the servers hold (a
state_dict saved before a parameter's first step lacks it).
"""

from __future__ import annotations

from typing import Callable, Mapping, Optional

import torch

from tessera.errors import UsageError


class ServerState:
    """The servers' optimizer state, in torch's per-parameter form (see the module)."""

    def __init__(self, client, partitions: list, offsets: dict[int, tuple[int, int]],
                 may_send: Callable[[], Optional[str]], log: Callable[[str], None]):
        self.client = client
        #: The partitions of parameters (not buffers), by start.
        self.parts = sorted(partitions, key=lambda p: p.start)
        #: id(parameter) -> its [start, stop) in the flat vector.
        self.offsets = offsets
        self._may_send, self._log = may_send, log

    def _overlapping(self, a: int, b: int) -> list:
        return [p for p in self.parts if p.start < b and p.stop > a]

    def fetch(self, params: list, scalars: frozenset = frozenset()) -> dict:
        """parameter -> {name: tensor}, as torch's ``optimizer.state`` (parameters the
        servers have not stepped yet have none). ``scalars``: the names the class keeps
        as scalars, which a partition sends per element where its pieces' differ (a
        parameter no worker used at some step, ``find_unused_parameters``: each
        parameter's own count, :meth:`tessera.ps.optim.TorchOptimRule.state_tensors`)."""
        per_part = self.client.optim_state()
        out = {}
        for p in params:
            if id(p) not in self.offsets:
                continue  # frozen: no state, as in torch
            a, b = self.offsets[id(p)]
            pieces: dict[str, list] = {}
            entry: dict[str, torch.Tensor] = {}
            for part in self._overlapping(a, b):
                for key, t in per_part.get(part.id, {}).items():
                    if t.dim() == 0:
                        entry.setdefault(key, t.clone())
                    else:
                        lo, hi = max(a, part.start) - part.start, min(b, part.stop) - part.start
                        pieces.setdefault(key, []).append(t[lo:hi])
            for key, got in pieces.items():
                flat = torch.cat(got)
                if flat.numel() == b - a:
                    entry[key] = flat[0].clone() if key in scalars \
                        else flat.reshape(p.shape).clone()
            if entry:
                out[p] = entry
        return out

    def send(self, state: Mapping, params: list,
             check: Callable[[dict[str, bool]], None] = lambda kinds: None) -> None:
        """Give the servers ``state`` (torch's ``optimizer.state``: parameter -> {name:
        tensor}), if this worker's load is the job's (see the module); ``check`` refuses
        names the optimizer does not keep, before anything is sent."""
        held = [p for p in params if id(p) in self.offsets]
        have = [p for p in held if state.get(p)]
        if not have:
            return
        skip = self._may_send()
        if skip is not None:
            if skip:
                self._log(skip)
            return
        if len(have) != len(held):
            raise UsageError(
                f"optimizer.load_state_dict(): the state holds {len(have)} of the "
                f"{len(held)} parameters the servers step (a state_dict saved before some "
                f"parameters had their first step?), but the servers keep one state over "
                f"each partition: save it after a step that updated every parameter")
        first = state[have[0]]
        kinds = {k: v.dim() == 0 for k, v in first.items() if isinstance(v, torch.Tensor)}
        check(kinds)
        total = max(b for _, b in self.offsets.values())
        flat = {k: torch.zeros(total) for k, scalar in kinds.items() if not scalar}
        for p in have:
            got = {k: v.dim() == 0 for k, v in state[p].items() if isinstance(v, torch.Tensor)}
            if got != kinds:
                raise UsageError(f"optimizer.load_state_dict(): parameters hold different "
                                 f"state ({sorted(kinds)} and {sorted(got)})")
            a, b = self.offsets[id(p)]
            for k in flat:
                value = state[p][k]
                if value.numel() != b - a:
                    raise UsageError(f"optimizer.load_state_dict(): state {k!r} of a parameter "
                                     f"of {b - a} elements has {value.numel()}")
                flat[k][a:b] = value.detach().reshape(-1).to("cpu", torch.float32)
        stepped = {part.id for p in have for part in self._overlapping(*self.offsets[id(p)])}
        per_part = {}
        for part in self.parts:
            if part.id not in stepped:
                continue  # (a parameter trainable but in no param group: torch skips it)
            per_part[part.id] = {k: (self._scalar(state, have, part, k) if scalar
                                     else flat[k][part.start:part.stop])
                                 for k, scalar in kinds.items()}
        self.client.load_optim_state(per_part)

    def _scalar(self, state: Mapping, have: list, part, key: str) -> torch.Tensor:
        """Scalar ``key`` (``step``) of partition ``part``: one value where its parameters
        agree; else one per element, each its parameter's (a state saved with
        ``find_unused_parameters``, where a parameter some steps left alone counts fewer
        steps), which the server cuts into pieces of their own
        (:meth:`tessera.ps.optim.TorchOptimRule.load_state`)."""
        values = []
        for p in have:
            a, b = self.offsets[id(p)]
            if a < part.stop and b > part.start:
                value = state[p][key].detach().to("cpu", torch.float32).reshape(())
                values.append((max(a, part.start) - part.start,
                               min(b, part.stop) - part.start, value))
        first = values[0][2]
        if all(torch.equal(v, first) for *_, v in values):
            return first
        spread = torch.full((part.stop - part.start,), float(first))
        for lo, hi, value in values:
            spread[lo:hi] = value
        return spread
