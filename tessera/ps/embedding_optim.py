"""Sparse optimizers for embedding rows: only the rows in a gradient change.

An embedding shard (:mod:`tessera.ps.embedding`) updates only the rows a batch
touched, and keeps optimizer state only for rows that have been updated. The
arithmetic is ``torch.optim``'s, applied to the gathered rows in the same order:

* ``sgd`` and ``adagrad`` (Duchi, Hazan & Singer, JMLR 2011) are identical to the
  dense optimizer wherever the dense one would leave a zero-gradient row unchanged,
  i.e. without weight decay;
* ``adam`` is lazy Adam, exactly ``torch.optim.SparseAdam`` (Kingma & Ba, ICLR 2015,
  with moments updated only for the rows present).

With numba (:mod:`tessera.ps.kernels`) each rule is one compiled pass over the rows, in
place: the same operations in the same order, SGD bit for bit as torch computes it,
Adagrad and Adam within fp32 rounding of it (their square root is correctly rounded,
torch's vectorised one is not always). Without numba, the torch code below runs.

The step count in learning-rate decay and bias correction is the shard's own number
of ``apply`` calls, as torch counts ``step()`` calls. Dense rules (momentum SGD,
AdamW) would change every row at every step and are refused.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from tessera.config.schema import OptimizerConfig
from tessera.ps import kernels
from tessera.ps.embedding_index import gather_rows, scatter_rows

#: Per-row optimizer state arrays, named as ``torch.optim`` names them.
STATE_NAMES = {"sgd": (), "adagrad": ("sum",), "adam": ("exp_avg", "exp_avg_sq")}


def initial_state(optimizer: OptimizerConfig, name: str, n: int, dim: int) -> torch.Tensor:
    """``n`` rows of state array ``name`` as a row never updated holds them."""
    fill = optimizer.initial_accumulator_value if name == "sum" else 0.0
    return torch.full((n, dim), fill, dtype=torch.float32)


def check_sparse_optimizer(table: str, optimizer: OptimizerConfig) -> None:
    """Raise ``ValueError`` unless ``optimizer`` has a sparse form for table ``table``."""
    where = f"embedding table {table!r}"
    if optimizer.name not in STATE_NAMES:
        raise ValueError(
            f"optimizer.name {optimizer.name!r} is not supported by {where}: use 'sgd', "
            "'adagrad' or 'adam' (lazy Adam, as torch.optim.SparseAdam). Dense rules "
            "would change every row at every step.")
    if optimizer.name == "sgd" and optimizer.momentum != 0:
        raise ValueError(
            f"optimizer.momentum = {optimizer.momentum} is not supported by {where} with "
            "sgd: set momentum = 0, or use 'adagrad' or 'adam' for per-row state")
    if optimizer.name == "adam" and (optimizer.weight_decay != 0 or optimizer.amsgrad):
        raise ValueError(
            f"{where} runs adam as torch.optim.SparseAdam, which has no weight_decay or "
            f"amsgrad: got weight_decay = {optimizer.weight_decay}, amsgrad = "
            f"{optimizer.amsgrad}; set weight_decay = 0 and amsgrad = false")


def sparse_step(opt: OptimizerConfig, steps: int, values: torch.Tensor, state: dict,
                index, state_index, grad: torch.Tensor) -> None:
    """One optimizer step on the rows ``index`` (unique int64 numpy slots) of ``values``
    (and of the per-row ``state`` arrays, at ``state_index``); ``steps`` counts this step."""
    if kernels.ENABLED and len(index):
        _kernel_step(opt, steps, values, state, index, state_index, grad)
        return
    # Each branch repeats the per-element operations of torch's single-tensor
    # implementation, in the same order, on the gathered rows (gathered and scattered
    # back whole, :func:`gather_rows`: byte copies, so the arithmetic is unchanged).
    param = gather_rows(values, index)
    if opt.name == "sgd":
        if opt.weight_decay != 0:
            grad = grad.add(param, alpha=opt.weight_decay)
        param.add_(grad, alpha=-opt.lr)
        scatter_rows(values, index, param)
        return
    if opt.name == "adagrad":  # torch.optim.adagrad._single_tensor_adagrad
        state_sum = gather_rows(state["sum"], state_index)
        if opt.weight_decay != 0:
            grad = grad.add(param, alpha=opt.weight_decay)
        clr = _adagrad_lr(opt, steps)
        state_sum.addcmul_(grad, grad, value=1)
        std = state_sum.sqrt().add_(opt.eps)
        param.addcdiv_(grad, std, value=-clr)
        scatter_rows(state["sum"], state_index, state_sum)
    else:  # adam: torch.optim._functional.sparse_adam
        beta1, beta2 = opt.betas
        old_exp_avg = gather_rows(state["exp_avg"], state_index)
        old_exp_avg_sq = gather_rows(state["exp_avg_sq"], state_index)
        exp_avg_update = grad.sub(old_exp_avg).mul_(1 - beta1)
        scatter_rows(state["exp_avg"], state_index, old_exp_avg + exp_avg_update)
        exp_avg_sq_update = grad.pow(2).sub_(old_exp_avg_sq).mul_(1 - beta2)
        scatter_rows(state["exp_avg_sq"], state_index, old_exp_avg_sq + exp_avg_sq_update)
        numer = exp_avg_update.add_(old_exp_avg)
        denom = exp_avg_sq_update.add_(old_exp_avg_sq).sqrt_().add_(opt.eps)
        param.add_(-_adam_step_size(opt, steps) * numer.div_(denom))
    scatter_rows(values, index, param)


def _kernel_step(opt: OptimizerConfig, steps: int, values: torch.Tensor, state: dict,
                 index, state_index, grad: torch.Tensor) -> None:
    """:func:`sparse_step` in one compiled pass over the rows (:mod:`tessera.ps.kernels`):
    the same operations on the same fp32 values, with each Python scalar rounded to fp32
    as torch rounds a scalar argument."""
    f32 = np.float32
    rows, g = values.numpy(), grad.contiguous().numpy()
    if opt.name == "sgd":
        kernels.sgd_rows(rows, index, g, f32(-opt.lr), f32(opt.weight_decay))
    elif opt.name == "adagrad":
        kernels.adagrad_rows(rows, index, state["sum"].numpy(), state_index, g,
                             f32(-_adagrad_lr(opt, steps)), f32(opt.eps),
                             f32(opt.weight_decay))
    else:
        beta1, beta2 = opt.betas
        kernels.adam_rows(rows, index, state["exp_avg"].numpy(), state["exp_avg_sq"].numpy(),
                          state_index, g, f32(1 - beta1), f32(1 - beta2), f32(opt.eps),
                          f32(-_adam_step_size(opt, steps)))


def _adagrad_lr(opt: OptimizerConfig, steps: int) -> float:
    """Adagrad's learning rate at step ``steps``, decayed as torch decays it."""
    return opt.lr / (1 + (steps - 1) * opt.lr_decay)


def _adam_step_size(opt: OptimizerConfig, steps: int) -> float:
    """Adam's step size at step ``steps``: the lr with both bias corrections."""
    beta1, beta2 = opt.betas
    return opt.lr * math.sqrt(1 - beta2 ** steps) / (1 - beta1 ** steps)
