"""Server-side update rules: the user's ``torch.optim`` class, stepping partitions.

The server does not reimplement optimizers: it runs the very ``torch.optim`` class
the user built on the worker, with the same parameter groups and per-group
hyperparameters, on its fp32 master partitions. That is exact only for
optimizers whose update of an element depends on that element's gradient and
state alone (and on scalars such as the step count, which every slice of a
parameter shares): SGD, Adam, AdamW, Adagrad, Adadelta, RMSprop, Adamax, NAdam,
RAdam, ASGD and Rprop. For them, stepping each slice of the flat vector apart is
the same arithmetic as stepping the whole model on one process; tests hold this
against ``torch.optim`` on an unsplit model, for every class.

A partition is a slice ``[start, stop)`` of the flat vector of trainable
parameters and may cross parameter groups (a bias with no weight decay next to
a weight with it). The rule cuts it into *segments*, one per group it touches,
each an ``nn.Parameter`` that aliases its slice of the partition's master, and
gives each segment its group's hyperparameters: one optimizer per partition,
one param group per segment. Elements in no group (parameters the user left
out of the optimizer) are never changed, as in torch.

Hyperparameters change during training (an lr scheduler, or by hand): a worker
sends the groups' current values with its next push, and :meth:`set_hparams`
writes them into every segment's param group before the update they belong to.

The model's buffers (BatchNorm's running statistics) are a last, non-optimizer
group (``average``): their segments take the workers' mean (sync: the clock's
mean of the values pushed; async and ssp: each push moves them ``1/W`` of the way,
a running mean over the workers), and clipping never scales them.

Optimizers that are not element-wise (LBFGS needs a closure and a line search
over the whole model; Adafactor and Muon shape their update by the matrix;
SparseAdam takes sparse gradients) are refused in one line by
:func:`check_optimizer_class`.

The seam is :class:`UpdateRule`: ``apply(grad)`` updates the master in place.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Protocol

import numpy as np
import torch

from tessera.errors import UsageError
from tessera.ps import kernels
from tessera.transport.wire import OptimGroup, OptimSpec

#: The element-wise ``torch.optim`` classes the servers can run, by class name.
ELEMENTWISE = {name: getattr(torch.optim, name) for name in (
    "SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "RMSprop", "Adamax", "NAdam", "RAdam",
    "ASGD", "Rprop")}

#: Classes the servers step with torch's fused CPU kernel (one call and one pass over a
#: partition per step, where the plain loop makes 5-8: 3.5-12x faster on a 4 MiB
#: partition with one thread). They round the same operations in another order, so
#: they match plain torch to rounding (1-2 ulp per step), not bit for bit
#: (tests/test_optim_spec.py). SGD keeps the plain loop: its fused kernel differs in
#: the last bit with Nesterov momentum, and without momentum the plain loop is one
#: ``add_``; the other classes have no fused kernel (one tensor per group, so foreach
#: would gain nothing).
FUSED = frozenset({"Adam", "AdamW", "Adagrad"})

#: The string form (``optimizer = "adamw"`` in a job file) names one of them.
BY_SHORT_NAME = {name.lower(): name for name in ELEMENTWISE}

#: Why the other optimizers torch ships cannot be split over servers.
_NOT_ELEMENTWISE = {
    "LBFGS": "it needs a closure and a line search over the whole model",
    "Adafactor": "its second moment is factored by rows and columns of each matrix",
    "Muon": "it orthogonalises each weight matrix as a whole",
    "SparseAdam": "it takes sparse gradients; use tessera.nn.ShardedEmbedding for sparse rows",
}

#: Group keys that choose an implementation, not arithmetic: the server picks its own.
_IMPLEMENTATION_KEYS = frozenset({"params", "foreach", "fused", "capturable", "differentiable"})

HParam = Any  # float | int | bool | str | None | list[float] (tuples travel as lists)


def check_optimizer_class(cls: type) -> str:
    """The name of ``cls`` if the servers can run it; else a one-line UsageError."""
    name = cls.__name__
    if ELEMENTWISE.get(name) is cls:
        return name
    why = _NOT_ELEMENTWISE.get(name, "its update is not known to be element-wise per parameter")
    raise UsageError(
        f"optimizer {cls.__module__}.{name} cannot run on the parameter servers: {why}. "
        f"Use one of {', '.join(ELEMENTWISE)} in the ps modes, or --mode allreduce, where "
        f"every worker steps its own optimizer")


def _number(value):
    """A one-element floating-point Tensor (torch takes ``lr=torch.tensor(...)``, and
    ``betas`` of tensors) as its value now; anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value)
    return value


def group_hparams(group: dict, where: str) -> dict[str, HParam]:
    """A param group's hyperparameters in wire form (one line naming a bad value)."""
    out: dict[str, HParam] = {}
    for key, value in group.items():
        if key in _IMPLEMENTATION_KEYS:
            continue
        value = _number(value)
        if isinstance(value, tuple):
            value = [_number(v) for v in value]
        ok = value is None or isinstance(value, (bool, int, float, str)) or (
            isinstance(value, list) and all(isinstance(v, (int, float)) for v in value))
        if not ok:
            raise UsageError(f"{where}: hyperparameter {key!r} is a {type(value).__name__}; the "
                             f"servers take numbers, booleans, strings and tuples of numbers")
        out[key] = value
    return out


#: The string form's one group covers every element of any flat vector.
_EVERYTHING = (0, 1 << 62)


def torch_optimizer(cfg, params, **kwargs) -> torch.optim.Optimizer:
    """The string form's ``torch.optim`` optimizer on ``params`` (workers that step
    their own replica: all-reduce, pipeline stages; and single-process references)."""
    return ELEMENTWISE[BY_SHORT_NAME[cfg.name]](params, **kwargs, **cfg.torch_kwargs())


def spec_from_config(cfg) -> OptimSpec:
    """The string form (``optimizer = "sgd"``, ``lr = 0.1``): one group over everything."""
    return OptimSpec(name=BY_SHORT_NAME[cfg.name], groups=[OptimGroup(
        hparams=group_hparams(cfg.torch_kwargs(), f"optimizer {cfg.name!r}"),
        ranges=[_EVERYTHING])])


def with_buffers(spec: OptimSpec, start: int, stop: int) -> OptimSpec:
    """``spec`` with the flat vector's buffer region ``[start, stop)`` as an averaged
    group (and no optimizer group reaching into it)."""
    if stop <= start:
        return spec
    groups = [OptimGroup(hparams=g.hparams, average=g.average,
                         ranges=[(a, min(b, start)) for a, b in g.ranges if a < start])
              for g in spec.groups]
    return OptimSpec(name=spec.name, groups=[
        *groups, OptimGroup(hparams={}, ranges=[(start, stop)], average=True)])


def as_spec(optimizer) -> OptimSpec:
    """An :class:`OptimSpec`, given one or a job file's ``OptimizerConfig``."""
    from tessera.config.schema import OptimizerConfig
    return spec_from_config(optimizer) if isinstance(optimizer, OptimizerConfig) else optimizer


def plain_sgd(group: dict) -> bool:
    """Whether an SGD param group (its hyperparameters) steps as plain SGD, ``p - lr * g``:
    no momentum, weight decay, maximize or differentiable, and a float lr."""
    return (not group.get("momentum") and not group.get("weight_decay")
            and not group.get("maximize") and not group.get("differentiable")
            and isinstance(group.get("lr"), float))


def _kind(value: HParam) -> str:
    if isinstance(value, bool):
        return "flag"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, list):
        return f"tuple of {len(value)}"
    return "text" if isinstance(value, str) else "None"


def _torch_value(value: HParam) -> HParam:
    return tuple(value) if isinstance(value, list) else value


def segments(groups: list, start: int, stop: int) -> list[tuple[int, int, Optional[int]]]:
    """Cut partition ``[start, stop)`` by group: ``(lo, hi, group index or None)``,
    offsets relative to ``start``, in order, covering the partition."""
    cuts = []
    for index, group in enumerate(groups):
        for a, b in group.ranges:
            lo, hi = max(a, start), min(b, stop)
            if lo < hi:
                cuts.append((lo - start, hi - start, index))
    cuts.sort()
    out: list[tuple[int, int, Optional[int]]] = []
    at = 0
    for lo, hi, index in cuts:
        if lo > at:
            out.append((at, lo, None))  # in no group: frozen, as in torch
        out.append((lo, hi, index))
        at = hi
    if at < stop - start:
        out.append((at, stop - start, None))
    return out


class UpdateRule(Protocol):
    master: torch.Tensor

    num_groups: int

    def apply(self, grad: torch.Tensor) -> None: ...

    def clip(self, grad: torch.Tensor, coef: float) -> torch.Tensor: ...

    def check_hparams(self, hparams: list[dict[str, HParam]]) -> str: ...

    def set_hparams(self, hparams: list[dict[str, HParam]]) -> None: ...

    def state_tensors(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...


class TorchOptimRule:
    """The user's ``torch.optim`` class stepping one flat fp32 partition, by group."""

    def __init__(self, initial: torch.Tensor, spec, start: int, stop: int,
                 average_keep: float = 0.0, alloc=None):
        # ``alloc(numel)``: where the master lives (a NumPy fp32 array, or None: a
        # fresh tensor); a server's endpoint puts it where same-host clients can read
        # replies from without a copy (ServerEndpoint.shared_empty).
        place = alloc(initial.numel()) if alloc is not None else None
        if place is not None:
            self.master = torch.from_numpy(place)
            self.master.copy_(initial.detach().reshape(-1))
        else:
            self.master = initial.detach().to(torch.float32).clone()
        cls = ELEMENTWISE[spec.name]
        self._segments: list[tuple[int, int, int, torch.nn.Parameter]] = []
        #: Buffer segments: master <- keep * master + pushed (0: sync's mean replaces it).
        self._averaged: list[tuple[int, int]] = []
        self._keep = average_keep
        param_groups = []
        for lo, hi, index in segments(spec.groups, start, stop):
            if index is None:
                continue
            if spec.groups[index].average:
                self._averaged.append((lo, hi))
                continue
            # Parameter(view) shares the view's storage: the optimizer's in-place
            # update lands in the master, which replies send without a gather.
            param = torch.nn.Parameter(self.master[lo:hi], requires_grad=True)
            hp = {k: _torch_value(v) for k, v in spec.groups[index].hparams.items()}
            param_groups.append({**hp, **_kernel(spec.name), "params": [param]})
            self._segments.append((lo, hi, index, param))
        self.optimizer = cls(param_groups, foreach=False) if param_groups else None
        #: The optimizer's parameters, ``(lo, hi, param)`` in order: one per segment, until
        #: an update leaves part of one alone (``keep``: a model parameter no worker used);
        #: from then on that part is a piece of its own, with its own state and step count,
        #: as torch keeps them per parameter (:meth:`_cut`).
        self._pieces = [(lo, hi, param) for lo, hi, _, param in self._segments]
        #: A segment that is the whole partition takes the gradient without a slice.
        self._whole = len(self._segments) == 1 and self._segments[0][:2] == (0, self.master.numel())
        # The class's step without torch.optim's profiling wrapper (profile_hook_step:
        # a record_function and the step hooks, none of which a server registers). That
        # wrapper cost more than SGD's arithmetic on a partition of a few thousand
        # elements, and a replicated server steps twice per update (its own copy and
        # the one it backs up): benchmarks/replication_cost.py.
        step = type(self.optimizer).step if self.optimizer is not None else None
        self._raw_step = getattr(step, "__wrapped__", None) if getattr(step, "hooked", False) \
            else None
        self.num_groups = sum(not g.average for g in spec.groups)
        self._initial = [dict(g.hparams) for g in spec.groups if not g.average]
        self.steps = 0
        #: Whether the step is plain SGD's one ``add_`` (:meth:`takes_half`): None until
        #: asked, reset when the hyperparameters change.
        self._plain: Optional[bool] = None

    def takes_half(self, hparams: Optional[list] = None) -> bool:
        """Whether :meth:`apply` may be given a bf16/fp16 gradient as it came off the wire
        (with ``hparams``, the groups' values about to be set): plain SGD (no momentum,
        weight decay or maximize) on one group over the whole partition, whose step is
        ``master.add_(grad, alpha=-lr)``: ``add_`` reads the half-width gradient as fp32,
        bit for bit what casting it first and running torch's SGD gives, without the
        cast's pass and buffer."""
        if not self._whole or self._averaged or type(self.optimizer) is not torch.optim.SGD:
            return False
        lo, hi, index, _ = self._segments[0]
        group = dict(self.optimizer.param_groups[0])
        if hparams is not None and index < len(hparams):
            group.update(hparams[index])
        return plain_sgd(group)

    def _is_plain(self) -> bool:
        """:meth:`takes_half` with the current hyperparameters, asked once."""
        plain = self._plain
        if plain is None:
            plain = self._plain = self.takes_half()
        return plain

    def apply(self, grad: torch.Tensor, keep: Optional[list[int]] = None) -> None:
        """One optimizer step with ``grad`` (fp32, same length as the partition; bf16 or
        fp16 only where :meth:`takes_half` said so). ``keep``: element ranges (flat
        ``lo, hi`` pairs, :attr:`tessera.transport.wire.Push.unused`) of parameters no
        worker used this step: torch's step skips them (their ``.grad`` is None), values,
        state and step count alike, as it skips a parameter whose ``.grad`` is None."""
        if keep and self.optimizer is not None:
            ranges = list(zip(keep[::2], keep[1::2]))
            for lo, hi in ranges:
                self._cut(lo)
                self._cut(hi)
            self._step(grad, ranges)
            return
        self._step(grad)

    def _cut(self, at: int) -> None:
        """Make ``at`` a boundary between pieces: the piece across it becomes two, each
        with its slice of the piece's element-wise state and a copy of its scalars."""
        for k, (lo, hi, param) in enumerate(self._pieces):
            if lo < at < hi:
                break
        else:
            return
        halves = [(lo, at, torch.nn.Parameter(self.master[lo:at])),
                  (at, hi, torch.nn.Parameter(self.master[at:hi]))]
        state = self.optimizer.state.pop(param, None)
        if state:
            for a, b, half in halves:
                self.optimizer.state[half] = {
                    key: (value.view(-1)[a - lo:b - lo].clone()
                          if value.dim() > 0 and value.numel() == hi - lo else value.clone())
                    if isinstance(value, torch.Tensor) else value
                    for key, value in state.items()}
        for group in self.optimizer.param_groups:
            params = group["params"]
            for i, q in enumerate(params):
                if q is param:
                    params[i:i + 1] = [half for *_, half in halves]
                    break
        self._pieces[k:k + 1] = halves
        self._whole, self._plain = False, None

    def _step(self, grad: torch.Tensor, keep: tuple = ()) -> None:
        """The step, pieces inside a ``keep`` range (``(lo, hi)`` pairs) without a gradient."""
        if keep:
            grad = grad.to(torch.float32)
        elif grad.dtype != torch.float32:  # plain SGD: torch's own step, on the wire dtype
            self.master.add_(grad, alpha=-self.optimizer.param_groups[0]["lr"])
            self.steps += 1
            return
        elif self._is_plain():
            # Plain SGD: torch's step is this one add_ (_single_tensor_sgd without momentum,
            # weight decay or maximize), bit for bit, without the ~5 us of Python around it
            # that a small partition pays per push (benchmarks/server_load.py).
            self.master.add_(grad, alpha=-self.optimizer.param_groups[0]["lr"])
            self.steps += 1
            return
        if self.optimizer is not None:
            if self._whole and not keep:
                self._pieces[0][2].grad = grad
            else:
                for lo, hi, param in self._pieces:
                    if not any(a <= lo and hi <= b for a, b in keep):
                        param.grad = grad[lo:hi]
            if self._raw_step is not None:
                self._raw_step(self.optimizer)
            else:
                self.optimizer.step()
            for *_, param in self._pieces:
                param.grad = None
        for lo, hi in self._averaged:
            if self._keep:
                self.master[lo:hi].mul_(self._keep).add_(grad[lo:hi])
            else:
                self.master[lo:hi].copy_(grad[lo:hi])
        self.steps += 1

    def folds(self, scale: float) -> bool:
        """Whether :meth:`apply_folded` may step this partition with ``scale``: plain SGD
        (:meth:`takes_half`) and ``scale`` a power of two no larger than 1 (an async
        push's 1/workers with 1, 2, 4, ... workers)."""
        return 0.0 < scale <= 1.0 and math.frexp(scale)[0] == 0.5 and self._is_plain()

    def apply_folded(self, grad: torch.Tensor, scale: float) -> None:
        """Where :meth:`folds`: plain SGD from ``grad * scale`` as one ``add_`` with
        ``alpha = -lr * scale``, reading the fp32 gradient where it lies. The same bits as
        ``torch.mul(grad, scale)`` then :meth:`apply`: a power-of-two scale makes both
        products exact, so the one rounding of the fused multiply-add sees the same
        value (but where ``grad * scale`` would be subnormal, below 2^-126 in magnitude:
        there the product torch rounds loses bits this one keeps). One pass over the
        gradient instead of two, and one kernel call instead of two, which a small
        partition pays per push (benchmarks/server_load.py)."""
        self.master.add_(grad, alpha=-self.optimizer.param_groups[0]["lr"] * scale)
        self.steps += 1

    def fuses_half(self) -> bool:
        """Whether :meth:`apply_half` may step this partition: plain SGD
        (:meth:`takes_half`) and the compiled kernels loaded."""
        return self._is_plain() and kernels.ENABLED

    def apply_half(self, grad, grad_dtype: str, scale: float, reply: torch.Tensor,
                   reply_dtype: str) -> None:
        """Where :meth:`fuses_half`: one plain SGD step from ``grad`` (a numpy array: a
        ``grad_dtype`` gradient, bf16/fp16 as its uint16 bits, or a sync clock's fp32
        mean) times ``scale``, writing the new values in ``reply_dtype`` (bf16 or fp16)
        into ``reply`` as it goes (:data:`tessera.ps.kernels.SGD_HALF`: the same bits as
        casting the gradient, :meth:`apply` and casting the master, in one pass instead
        of three)."""
        kernels.SGD_HALF[grad_dtype, reply_dtype](
            self.master.numpy(), grad, np.float32(scale),
            np.float32(-self.optimizer.param_groups[0]["lr"]), kernels.array_of(reply))
        self.steps += 1

    def clip(self, grad: torch.Tensor, coef: float) -> torch.Tensor:
        """``grad`` with its optimizer segments scaled by ``coef`` (clipping), in place."""
        if coef != 1.0:
            for lo, hi, _, _ in self._segments:
                grad[lo:hi].mul_(coef)
        return grad

    def set_hparams(self, hparams: list[dict[str, HParam]]) -> None:
        """The groups' current hyperparameters (an lr scheduler moved them)."""
        self._plain = None
        if self.optimizer is None:
            return
        for (_, _, index, _), group in zip(self._segments, self.optimizer.param_groups):
            if index < len(hparams):
                for key, value in hparams[index].items():
                    group[key] = _torch_value(value)

    def check_hparams(self, hparams: list[dict[str, HParam]]) -> str:
        """Why ``hparams`` cannot replace the groups' values ("" if it can): each value
        keeps the kind (number, flag, tuple, text) it had when the optimizer was built."""
        for index, (now, first) in enumerate(zip(hparams, self._initial)):
            for key, value in now.items():
                if key in first and _kind(value) != _kind(first[key]) and first[key] is not None:
                    return (f"param group {index}: {key!r} was a {_kind(first[key])}, "
                            f"got a {_kind(value)}")
                if isinstance(value, float) and value != value:
                    return f"param group {index}: {key!r} is NaN"
        return ""

    def hparams(self) -> list[dict[str, HParam]]:
        """Each segment's group values (for tests and checkpoints)."""
        if self.optimizer is None:
            return []
        return [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Optimizer state as named tensors over the whole partition: element-wise
        state concatenated over the pieces (zeros where no group), scalars once; where
        the pieces' scalars differ (a piece skipped, :meth:`_cut`), one per element, each
        its piece's (0 where a piece has none yet), which :meth:`load_state` cuts again."""
        if self.optimizer is None:
            return {}
        numel = self.master.numel()
        out: dict[str, torch.Tensor] = {}
        scalars: dict[str, list] = {}
        for lo, hi, param in self._pieces:
            for key, value in self.optimizer.state.get(param, {}).items():
                if not isinstance(value, torch.Tensor):
                    continue
                if value.dim() == 0 or value.numel() != hi - lo:
                    out.setdefault(key, value)
                    scalars.setdefault(key, []).append((lo, hi, value))
                    continue
                if key not in out:
                    out[key] = torch.zeros(numel, dtype=value.dtype)
                out[key][lo:hi] = value.reshape(-1)
        for key, got in scalars.items():
            first = got[0][2]
            if first.dim() == 0 and (len(got) < len(self._pieces)
                                     or any(not torch.equal(v, first) for *_, v in got)):
                spread = out[key] = torch.zeros(numel, dtype=first.dtype)
                for lo, hi, value in got:
                    spread[lo:hi] = value
        return out

    @property
    def class_name(self) -> str:
        return type(self.optimizer).__name__ if self.optimizer is not None else "(no optimizer)"

    def state_kinds(self) -> dict[str, bool]:
        """The state names the class keeps for this partition's groups, each True for a
        scalar (``step``): learned from one step of the class on a 2-element stand-in per
        group (its state is made lazily, at the first step)."""
        if self.optimizer is None:
            return {}
        return state_kinds(type(self.optimizer), self.optimizer.param_groups)

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore optimizer state saved by :meth:`state_tensors` (a checkpoint): a scalar
        given per element (pieces' step counts that differ) cuts the pieces again where
        it changes, and each piece takes its own."""
        self._plain = None
        if not state or self.optimizer is None:
            return
        numel = self.master.numel()
        kinds = self.state_kinds()
        spread = {key for key, value in state.items()
                  if kinds.get(key) and value.dim() == 1 and value.numel() == numel != 1}
        for key in spread:
            value = state[key]
            for at in (torch.nonzero(value[1:] != value[:-1]).reshape(-1) + 1).tolist():
                self._cut(at)
        for lo, hi, param in self._pieces:
            seg = {}
            for key, value in state.items():
                if key in spread:
                    seg[key] = value[lo].clone()
                elif value.dim() == 1 and value.numel() == numel and numel != 1:
                    seg[key] = value[lo:hi].clone()
                else:
                    seg[key] = value.clone()
            self.optimizer.state[param] = seg


def state_kinds(cls: type, groups: list[dict]) -> dict[str, bool]:
    """The state names ``cls`` keeps for param groups with these settings, each True for
    a scalar (``step``): learned from one step on a 2-element stand-in per group (a
    class makes its state lazily, at the first step)."""
    kinds: dict[str, bool] = {}
    for group in groups:
        stand_in = torch.nn.Parameter(torch.zeros(2))
        stand_in.grad = torch.zeros(2)
        opt = cls([{**{k: v for k, v in group.items() if k != "params"},
                    "params": [stand_in]}])
        opt.step()
        for key, value in opt.state[stand_in].items():
            if isinstance(value, torch.Tensor):
                kinds[key] = value.dim() == 0
    return kinds


def _kernel(name: str) -> dict:
    """How a group steps: fused (:data:`FUSED`) or torch's plain per-tensor loop."""
    return {"fused": True, "foreach": False} if name in FUSED else {"foreach": False}


def make_rule(initial: torch.Tensor, spec, start: int, stop: int,
              average_keep: float = 0.0, alloc=None) -> UpdateRule:
    """The update rule of partition ``[start, stop)``; ValueError names what is wrong with
    ``spec`` (it came over the wire: a class the servers do not run, a bad value)."""
    if spec.name not in ELEMENTWISE:
        raise ValueError(f"optimizer {spec.name!r} is not one the servers run "
                         f"({', '.join(ELEMENTWISE)})")
    try:
        return TorchOptimRule(initial, spec, start, stop, average_keep, alloc)
    except (ValueError, TypeError, KeyError) as exc:
        raise ValueError(f"optimizer {spec.name}: {exc}") from None
