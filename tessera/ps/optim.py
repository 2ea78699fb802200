"""Server-side update rules on fp32 master partitions.

The server does not reimplement optimizers: it runs ``torch.optim`` itself on each
partition, held as one flat fp32 ``Parameter``. SGD (momentum, Nesterov, weight
decay), Adam, AdamW and Adagrad are all element-wise, so stepping each slice of
the flat vector separately is the same arithmetic as stepping the whole model on
one process; tests hold this against ``torch.optim`` on an unsplit model.

The seam is :class:`UpdateRule`: ``apply(grad)`` updates the master in place.
"""

from __future__ import annotations

from typing import Protocol

import torch

from tessera.config.schema import OptimizerConfig

_OPTIMIZERS = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "adagrad": torch.optim.Adagrad,
}


class UpdateRule(Protocol):
    master: torch.Tensor

    def apply(self, grad: torch.Tensor) -> None: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...


class TorchOptimRule:
    """A ``torch.optim`` optimizer stepping one flat fp32 partition."""

    def __init__(self, initial: torch.Tensor, cfg: OptimizerConfig):
        self.param = torch.nn.Parameter(initial.detach().to(torch.float32).clone(),
                                        requires_grad=True)
        # foreach=False: one tensor per optimizer, the plain loop is as fast and
        # matches the reference arithmetic exactly.
        self.optimizer = _OPTIMIZERS[cfg.name]([self.param], foreach=False, **cfg.torch_kwargs())
        self.steps = 0

    @property
    def master(self) -> torch.Tensor:
        return self.param.data

    def apply(self, grad: torch.Tensor) -> None:
        """One optimizer step with ``grad`` (fp32, same length as the partition)."""
        self.param.grad = grad
        self.optimizer.step()
        self.param.grad = None
        self.steps += 1

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore optimizer state saved by :meth:`state_tensors` (a checkpoint)."""
        if state:
            self.optimizer.state[self.param] = {k: v.clone() for k, v in state.items()}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer state as named tensors (for checkpoints and tests)."""
        out = {}
        for key, value in self.optimizer.state.get(self.param, {}).items():
            if isinstance(value, torch.Tensor):
                out[key] = value
        return out


def make_rule(initial: torch.Tensor, cfg: OptimizerConfig) -> UpdateRule:
    return TorchOptimRule(initial, cfg)
