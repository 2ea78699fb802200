"""The user's ``torch.optim`` optimizer, run by the parameter servers.

``model, optimizer = tessera.distribute(model, torch.optim.AdamW(groups, ...))``
takes the optimizer the script built and describes it to the servers as an
:class:`~tessera.transport.wire.OptimSpec`: the class name, and for each param
group its hyperparameters and the ranges of the flat parameter vector its
parameters occupy. Every server builds the same class with the same groups on
its partitions (:mod:`tessera.ps.optim`).

What the script keeps is a :class:`DistributedOptimizer`, a real
``torch.optim.Optimizer`` whose ``param_groups`` are the script's own, so any
``torch.optim.lr_scheduler`` (or a hand-written warm-up) moves them as usual. In
every mode it is the handle on the wrapper's step; in the parameter-server modes:

1. ``zero_grad()`` clears the flat gradient buffer the model's gradients live in.
2. ``step()`` finishes the distributed step (the pushes went out during backward;
   it waits for the new values and copies them into the model).
3. Before each step's first push, the model compares the groups' hyperparameters
   with those the servers last received (:meth:`DistributedOptimizer.changed_hparams`)
   and sends them with the push when they moved, so the servers apply a changed
   learning rate at the same step as one process would.
4. ``state_dict()``/``load_state_dict()`` carry the param groups (what schedulers
   and scripts change) and the per-element state, which lives on the servers: asked
   of them, or sent to them by worker 0 (:mod:`tessera.parallel.optim_state`). It
   travels in Tessera's checkpoints too.

With all-reduce (and hybrid) the script's optimizer itself steps the replica
after DDP's averaged gradients, so ``state_dict()`` is the script's own.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Optional

import torch
from torch import nn

from tessera.errors import UsageError
from tessera.ps.optim import check_optimizer_class, group_hparams, state_kinds
from tessera.transport.wire import OptimGroup, OptimSpec


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters the flat vector holds, in its order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def describe(optimizer: torch.optim.Optimizer) -> OptimSpec:
    """An optimizer that steps on the workers (all-reduce), named for the manifest."""
    return OptimSpec(name=type(optimizer).__name__, groups=[])


def flat_offsets(model: nn.Module) -> dict[int, tuple[int, int]]:
    """``id(parameter)`` -> its ``[start, stop)`` in the flat vector the servers hold."""
    offsets: dict[int, tuple[int, int]] = {}
    at = 0
    for _, p in trainable(model):
        offsets[id(p)] = (at, at + p.numel())
        at += p.numel()
    return offsets


def spec_from_optimizer(optimizer: torch.optim.Optimizer, model: nn.Module) -> OptimSpec:
    """Describe ``optimizer`` (built on ``model``'s parameters) to the servers."""
    name = check_optimizer_class(type(optimizer))
    offsets = flat_offsets(model)
    groups = []
    for index, group in enumerate(optimizer.param_groups):
        ranges = []
        for p in group["params"]:
            if id(p) not in offsets:
                if not p.requires_grad:
                    continue  # never has a gradient, never changes: as in torch
                raise UsageError(f"{name} param group {index} holds a tensor of shape "
                                 f"{tuple(p.shape)} that is not a parameter of the model given "
                                 f"to tessera.distribute; build the optimizer on "
                                 f"model.parameters()")
            ranges.append(offsets[id(p)])
        groups.append(OptimGroup(hparams=group_hparams(group, f"{name} param group {index}"),
                                 ranges=_merge(ranges)))
    return OptimSpec(name=name, groups=groups)


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for a, b in sorted(ranges):
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return out


class DistributedOptimizer(torch.optim.Optimizer):
    """The optimizer a script steps while the servers run the real one (see module)."""

    def __init__(self, user: torch.optim.Optimizer, finish_step: Callable[[], bool],
                 zero_grad: Callable[[], None], local: bool = False, tables: bool = False):
        # The script's own group dicts: a scheduler built on either object moves them.
        super().__init__(user.param_groups, user.defaults)
        self.user = user
        self.local = local  # the script's optimizer steps here (all-reduce), not on servers
        #: Gradients leave for servers during backward (server modes; tables' rows in
        #: any mode): a torch.amp.GradScaler's scale would go with them (:meth:`step`).
        self._pushes_scaled = not local or tables
        self._tables = tables
        if self._pushes_scaled:
            # torch.amp.GradScaler.step then hands this step its scale and inf check
            # (``grad_scale``, ``found_inf``) instead of unscaling the gradients itself:
            # that is how step() learns a scaler is in use, before anything is applied.
            self._step_supports_amp_scaling = True
        self.user_class = type(user).__name__
        self._finish_step = finish_step
        self._zero_grad = zero_grad
        self._sent: Optional[list[dict]] = None
        #: Whether the last step was applied (False: skipped on every worker, fp16).
        self.applied = True
        #: Server modes: the servers' optimizer state (:class:`ServerState`), set by
        #: the factory; None: the script's optimizer holds its own (all-reduce).
        self.remote = None
        self._built = True  # add_param_group() from here on is the script's

    def add_param_group(self, param_group: dict) -> None:
        """torch's, while ``__init__`` adds the script's groups; afterwards the script's
        optimizer takes the group (all-reduce), and the servers refuse it: they build the
        groups once, at ``tessera.distribute``, and hold only the parameters trainable then."""
        if not getattr(self, "_built", False):
            return super().add_param_group(param_group)
        if not self.local:
            raise UsageError(
                f"{self.user_class}.add_param_group(): the servers build the optimizer's param "
                f"groups once, at tessera.distribute; give the optimizer every group before it "
                f"(a group with lr 0 stays still until a scheduler or your code raises it), or "
                f"use --mode allreduce")
        self.user.add_param_group(param_group)
        if self.param_groups is not self.user.param_groups:
            self.param_groups.append(self.user.param_groups[-1])

    def step(self, closure=None):  # noqa: D102 - see the module docstring
        if closure is not None:
            raise UsageError(f"{self.user_class}.step(closure) cannot run on parameter servers: "
                             f"a closure re-evaluates the whole model inside step(); call "
                             f"loss.backward() and optimizer.step() instead")
        if self._pushes_scaled and (hasattr(self, "found_inf") or
                                    getattr(self, "grad_scale", None) is not None):
            self._refuse_grad_scaler()
        self.applied = self._finish_step()
        return None

    def _refuse_grad_scaler(self) -> None:
        """A ``torch.amp.GradScaler`` steps this optimizer (it set ``found_inf``): the
        gradients went to the servers during backward still multiplied by its scale,
        and each scaler decides on its own worker's gradients only, so the servers would
        apply them scaled (or one worker would skip a step the others take). Refused
        before the step is finished; in sync mode the servers still hold it."""
        scale = getattr(self, "grad_scale", None)
        scale = f" ({float(scale):g})" if isinstance(scale, torch.Tensor) else ""
        what = "the tables' row gradients" if self.local else "the gradients"
        instead = ("" if self.local and self._tables else
                   "; or use --mode allreduce, where GradScaler works as with DDP")
        raise UsageError(
            f"torch.amp.GradScaler cannot step this job: {what} left for the servers during "
            f"backward() still multiplied by its loss scale{scale}, which the servers would "
            f"apply as it is; for fp16, use --precision fp16 (a loss scale every worker "
            f"agrees on) and backward model.scale_loss(loss); for bf16 or fp32, leave the "
            f"scaler out (GradScaler(enabled=False)){instead}")

    def zero_grad(self, set_to_none: bool = True) -> None:  # noqa: ARG002 - grads are views
        self._zero_grad()

    def all_params(self) -> list:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        if self.local:
            return self.user.state_dict()
        if self.remote is None:
            return super().state_dict()
        # The servers' state, keyed by parameter for the moment torch packs it (its own
        # numbering); this object keeps none between calls.
        scalars = {k for k, scalar in state_kinds(type(self.user), self.param_groups).items()
                   if scalar}
        self.state = defaultdict(dict, self.remote.fetch(self.all_params(), scalars))
        try:
            return super().state_dict()
        finally:
            self.state = defaultdict(dict)

    def load_state_dict(self, state_dict: dict) -> None:
        if self.local:
            self.user.load_state_dict(state_dict)
            self.param_groups = self.user.param_groups
            return
        super().load_state_dict(state_dict)  # checks the groups, keys state by parameter
        loaded, self.state = self.state, defaultdict(dict)
        if self.remote is not None:
            self.remote.send(loaded, self.all_params(), self.check_state_names)

    def check_state_names(self, names: dict[str, bool]) -> None:
        """A loaded state's names (True: a scalar) against what this class keeps."""
        keeps = state_kinds(type(self.user), self.param_groups)
        if names != keeps:
            raise UsageError(f"{self.user_class}.load_state_dict(): the state holds "
                             f"{sorted(names)}, but {self.user_class} with these settings "
                             f"keeps {sorted(keeps)}: load a state_dict of the same optimizer "
                             f"class and settings")

    def current_hparams(self) -> list[dict]:
        return [group_hparams(g, f"{self.user_class} param group {i}")
                for i, g in enumerate(self.param_groups)]

    def changed_hparams(self) -> Optional[list[dict]]:
        """The groups' hyperparameters if they changed since last sent (else None)."""
        now = self.current_hparams()
        if now == self._sent:
            return None
        self._sent = now
        return now
