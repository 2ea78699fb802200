"""The flat buffers a worker's parameters live in, so a partition is a plain slice.

Every trainable parameter (and its ``.grad``) is rebound to a view of one of two
contiguous buffers laid out in ``named_parameters()`` order, the same order as
the layout worker 0 registers and the shard map cuts: sending or receiving a
partition is then a slice, without gathering.

The model's floating-point buffers that ``state_dict`` holds (BatchNorm's running
mean and variance) follow the parameters in the layout, and live in a third flat
fp32 buffer (:func:`flatten_buffers`): the servers keep them too, averaged over
the workers, so every worker evaluates with the same statistics and checkpoints
and exports hold them. Integer buffers (``num_batches_tracked``) stay local: every
worker counts the same steps.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from tessera.transport.wire import ParamSpec


def shared_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The buffers the servers keep: floating point and in ``state_dict``."""
    persistent = set(model.state_dict(keep_vars=True))
    return [(name, b) for name, b in model.named_buffers()
            if b.is_floating_point() and name in persistent]


def param_layout(model: nn.Module) -> list[ParamSpec]:
    return ([ParamSpec(name=name, shape=list(p.shape), numel=p.numel())
             for name, p in model.named_parameters() if p.requires_grad]
            + [ParamSpec(name=name, shape=list(b.shape), numel=b.numel(), buffer=True)
               for name, b in shared_buffers(model)])


def frozen_digests(model: nn.Module) -> dict[str, str]:
    """A short digest of each frozen parameter (``requires_grad=False``), by name.

    The servers hold only trainable parameters, seeded by worker 0 and pulled by every
    worker; a frozen one stays each worker's own. DDP broadcasts worker 0's at the start;
    here every worker registers these digests and the coordinator refuses a worker whose
    frozen parameters differ from another's, naming the first (a random layer built
    without a common seed would otherwise differ on each worker without a word)."""
    import hashlib
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            data = p.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
            out[name] = hashlib.blake2b(data, digest_size=8).hexdigest()
    return out


def flatten_buffers(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebind the shared buffers to views of one flat fp32 buffer (BatchNorm updates
    them in place there). Returns ``(fp32 copy of the initial values, the flat buffer)``."""
    buffers = shared_buffers(model)
    device = buffers[0][1].device if buffers else torch.device("cpu")
    initial = (torch.cat([b.detach().reshape(-1).to(torch.float32) for _, b in buffers]).cpu()
               if buffers else torch.zeros(0))
    flat = initial.to(device, copy=True)
    off = 0
    for name, b in buffers:
        owner, _, attr = name.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        setattr(module, attr, flat[off:off + b.numel()].view(b.shape))
        off += b.numel()
    return initial, flat


def flatten_model(model: nn.Module, dtype: torch.dtype = torch.float32,
                  grad_zeros: Optional[Callable[[int], Optional[torch.Tensor]]] = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rebind every trainable parameter (and its grad) to views of two flat buffers.
    ``grad_zeros(n)``: where the flat fp32 gradients of a CPU model live, when it
    gives a buffer (``PSClient.shared_zeros``: memory its servers read in place).

    Returns ``(fp32 copy of the initial values, flat params, flat grads)``.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    initial = (torch.cat([p.detach().reshape(-1).to(torch.float32) for p in params]).cpu()
               if params else torch.zeros(0))
    total = initial.numel()
    flat = torch.empty(total, dtype=dtype, device=device)
    flat_grad = None
    if grad_zeros is not None and dtype == torch.float32 and device.type == "cpu" and total:
        flat_grad = grad_zeros(total)
    if flat_grad is None:
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
