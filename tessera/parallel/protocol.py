"""The one interface every model wrapper presents, whatever the parallelism.

A training loop (``tessera.train.trainer`` or a user's script) holds a
:class:`DistributedModel` and never asks which kind it is. The names follow
PyTorch's own wrappers, so a recipe reads like one for DDP or FSDP:

====================  =====================================================
call                  meaning
====================  =====================================================
``model(*inputs)``    forward (under the precision policy's autocast)
``forward_backward``  forward, loss and backward of one batch (a pipeline
                      runs its schedule over the micro-batches here)
``scale_loss(loss)``  the loss times the loss scale: backward this
``unscale_()``        unscale the gradients and agree, cluster-wide, whether
                      they are finite (True where nothing is scaled)
``clip_grad_norm_``   FSDP's name: clip, return the total norm
``step() -> bool``    apply the update (or wait for the servers' values);
                      False when the step was skipped (fp16 overflow)
``zero_grad()``       clear the gradients
``no_sync()``         DDP's name: accumulate locally, do not communicate
``state_dict()``      the plain module's keys (parameters and buffers)
``start_step(steps)`` the step a loop starts at (resume, rejoin)
``prefetch(*inputs)`` name the next step's inputs: its table rows are pulled
                      while this step finishes (no-op without tables)
====================  =====================================================

Counters every wrapper keeps: ``comm_wait_s``, ``skipped_steps``,
``overflows``, ``loss_scale``; ``client`` is the parameter-server client or None.

A wrapper that cannot do something yet refuses with a one-line
:class:`~tessera.errors.UsageError` naming its mode and the method, rather than
doing it silently wrong (e.g. parameter-server modes push gradients while
backward runs, so ``no_sync`` and clipping need server-side support).

The settings a factory hands a wrapper come in small frozen groups
(:class:`Amp`, :class:`Hooks`) rather than a score of keyword arguments.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from tessera.amp.policy import PrecisionPolicy, make_policy
from tessera.amp.scaler import LossScaler
from tessera.errors import UsageError
from tessera.profiler.recorder import OFF, SpanRecorder


@dataclass(frozen=True)
class Amp:
    """Mixed precision: where each dtype is used, and the (cluster-wide) loss scaler."""

    #: dtypes of parameters, compute and wire.
    policy: PrecisionPolicy = field(default_factory=lambda: make_policy("fp32", "cpu"))
    #: dynamic loss scaling (disabled unless the policy scales losses).
    scaler: LossScaler = field(default_factory=lambda: LossScaler(enabled=False))


@dataclass(frozen=True)
class Hooks:
    """How a wrapper talks to the rest of its process."""

    #: one line for a person (the worker's log).
    log: Callable[[str], None] = print
    #: this process's span recorder (a no-op unless profiling).
    profiler: SpanRecorder = OFF
    #: asked after each step: has the launcher asked for a checkpoint?
    checkpoint_wanted: Callable[[], bool] = lambda: False
    #: told the new clock after each step (the heartbeat reports it).
    on_clock: Callable[[int], None] = lambda clock: None


class DistributedModel(nn.Module):
    """Base of :class:`~tessera.parallel.ps.PSDataParallel`,
    :class:`~tessera.parallel.hybrid.HybridParallel` and
    :class:`~tessera.parallel.pipeline.PipelineParallel`.

    Subclasses set ``module`` (the plain model, or this process's stage of it),
    ``mode``, ``client``, the counters, and implement :meth:`step`.
    """

    #: the --mode (or "pipeline") this wrapper implements, named in refusals.
    mode: str = ""
    client = None

    def __init__(self) -> None:
        super().__init__()
        self.comm_wait_s = 0.0
        self.skipped_steps = 0
        self.overflows: list[dict] = []

    #: Lookups named by prefetch() during a step, sent right after its table pushes.
    _next_lookups: Optional[list] = None

    def refuse(self, method: str, why: str) -> UsageError:
        return UsageError(f"--mode {self.mode} does not support {method} yet: {why}")

    # ----------------------------------------------------------------- step

    @property
    def loss_scale(self) -> float:
        return 1.0

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` times the loss scale (1 unless the policy scales): backward this."""
        return loss

    def forward_backward(self, inputs: tuple, target: torch.Tensor,
                         loss_fn: Callable) -> Optional[torch.Tensor]:
        """Forward, loss and (scaled) backward of one batch; the loss, detached.

        A pipeline stage runs its schedule over the micro-batches instead and
        returns the loss on its last stage only (None elsewhere).
        """
        loss = loss_fn(self(*inputs), target)
        self.scale_loss(loss).backward()
        return loss.detach()

    def prefetch(self, *inputs, after_push: bool = False) -> None:
        """Name the inputs of the next step's forward, so that its embedding-table rows
        are pulled while this step finishes (:mod:`tessera.parallel.prefetch`). Called
        between a step's forward and its ``step()`` (or with ``after_push=True`` at any
        point before the step's ``step()``), the pulls leave right after the step's table
        pushes, for the next clock; otherwise at once, for the coming step. The next
        forward with those ids takes the rows. No-op without sharded tables."""
        tables = getattr(self, "tables", None)
        if not tables:
            return
        from tessera.parallel.prefetch import name_next
        name_next(self, tables, inputs, after_push)

    def unscale_(self) -> bool:
        """Unscale the gradients; True when they are finite on every worker.

        Optional: :meth:`step` does it if the loop did not. Where no loss is
        scaled there is nothing to check and it returns True.
        """
        return True

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the (unscaled) gradients to ``max_norm``; the total norm before clipping."""
        raise self.refuse("clip_grad_norm_", "gradients leave this worker during backward")

    def step(self) -> bool:
        """Apply this step's update (or take the servers' values); False if skipped."""
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = False) -> None:
        raise NotImplementedError

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Accumulate gradients locally over several backwards, without communicating."""
        raise self.refuse("no_sync()", "gradients are pushed to the servers during backward")

    def start_step(self, max_clock: Optional[int] = None) -> int:  # noqa: ARG002
        """The step a training loop starts at (0 unless the mode resumes or rejoins).
        Write loops as ``for step in range(model.start_step(steps), steps)``."""
        return 0

    # ---------------------------------------------------------------- state

    def state_dict(self, *args, **kwargs):
        """The plain module's state (its own keys, not prefixed by this wrapper)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)

    def __deepcopy__(self, memo):
        """``copy.deepcopy(model)``: the plain module with the values this process holds, a
        model of its own (its parameters fresh tensors, without gradients or hooks). DDP's
        deepcopy is another DDP; a copy of this wrapper would share its sockets and
        buffers. So a recipe's ``AveragedModel(model)`` (an EMA) or ``best =
        copy.deepcopy(model)`` works as with DDP, and the copy's ``state_dict`` has the
        wrapper's keys (the plain module's); ``update_parameters(model)`` reads the
        wrapper's parameters, which are the module's, in the same order."""
        if not self.whole_model:
            raise self.refuse("copy.deepcopy(model)", "this process holds one stage of the "
                              "model; copy the plain model before tessera.distribute")
        if getattr(self, "tables", None):
            raise self.refuse("copy.deepcopy(model)", "the sharded tables' rows live on the "
                              "servers; copy the dense part (a submodule) instead")
        return copy.deepcopy(self.module, memo)

    #: Whether this process holds the whole model (a pipeline stage holds a slice).
    whole_model = True

    def final_values(self) -> None:
        """Bring the model to the job's final values before export (nothing to do
        unless another process may have moved them since this one's last step)."""

    #: Pushes of an earlier step still unanswered (none: a step waits for its own).
    pushes_in_flight = 0

    def wait_pushes(self) -> None:
        """Wait for every push this process sent (a wrapper that lets a step's pushes
        run into the next step: :class:`~tessera.parallel.hybrid.HybridParallel`)."""

    def export_state(self) -> dict[str, torch.Tensor]:
        """The trained model as this process holds it: parameters and buffers under the
        plain module's keys, as separate contiguous CPU tensors (for safetensors)."""
        state = {k: v.detach().to("cpu").clone().contiguous()
                 for k, v in self.state_dict().items() if isinstance(v, torch.Tensor)}
        tables = getattr(self, "tables", None)
        if tables and self.client is not None:  # rows live on the servers: ask for them
            from tessera.parallel.embedding import tables_state
            state.update(tables_state(self.client, tables))
        return state
