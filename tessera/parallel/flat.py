"""The flat buffers a worker's parameters live in, so a partition is a plain slice.

Every trainable parameter (and its ``.grad``) is rebound to a view of one of two
contiguous buffers laid out in ``named_parameters()`` order, the same order as
the layout worker 0 registers and the shard map cuts: sending or receiving a
partition is then a slice, without gathering.
"""

from __future__ import annotations

import torch
from torch import nn

from tessera.transport.wire import ParamSpec


def param_layout(model: nn.Module) -> list[ParamSpec]:
    return [ParamSpec(name=name, shape=list(p.shape), numel=p.numel())
            for name, p in model.named_parameters() if p.requires_grad]


def flatten_model(model: nn.Module, dtype: torch.dtype = torch.float32
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebind every trainable parameter (and its grad) to views of two flat buffers.

    Returns ``(fp32 copy of the initial values, flat params, flat grads)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    initial = (torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params]).cpu()
               if params else torch.zeros(0))
    total = initial.numel()
    flat = torch.empty(total, dtype=dtype, device=device)
    flat_grad = torch.zeros(total, dtype=dtype, device=device)
    off = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            flat[off:off + n].copy_(p.detach().reshape(-1))
            p.data = flat[off:off + n].view_as(p)
            p.grad = flat_grad[off:off + n].view_as(p)
            off += n
    return initial, flat, flat_grad
