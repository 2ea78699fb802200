"""The servers' update rule is the user's torch.optim class with the user's groups
(issue 13): pure logic, against torch.optim on the unsplit model."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from tessera.errors import UsageError
from tessera.parallel.optimizer import spec_from_optimizer
from tessera.ps.optim import ELEMENTWISE, FUSED, check_optimizer_class, make_rule, with_buffers

KWARGS = {"SGD": dict(lr=0.05, momentum=0.9, nesterov=True), "Adam": dict(lr=3e-3, amsgrad=True),
          "AdamW": dict(lr=3e-3), "Adagrad": dict(lr=0.05, lr_decay=0.01),
          "Adadelta": dict(lr=1.0), "RMSprop": dict(lr=1e-3, centered=True, momentum=0.5),
          "Adamax": dict(lr=3e-3), "NAdam": dict(lr=3e-3), "RAdam": dict(lr=3e-3),
          "ASGD": dict(lr=0.05, t0=2), "Rprop": dict(lr=1e-3)}


def _groups(model: nn.Module, lr: float) -> list[dict]:
    return [{"params": [p for n, p in model.named_parameters() if n.endswith("weight")],
             "weight_decay": 0.01},
            {"params": [p for n, p in model.named_parameters() if n.endswith("bias")],
             "lr": lr * 2}]


def _hparams(opt: torch.optim.Optimizer) -> list[dict]:
    skip = ("params", "foreach", "fused", "capturable", "differentiable")
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items() if k not in skip}
            for g in opt.param_groups]


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_partitions_crossing_groups_step_like_torch(name):
    assert set(KWARGS) == set(ELEMENTWISE)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    ref = copy.deepcopy(model)
    cls, kw = ELEMENTWISE[name], KWARGS[name]
    opt_ref = cls(_groups(ref, kw["lr"]), **kw)
    spec = spec_from_optimizer(cls(_groups(model, kw["lr"]), **kw), model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    cuts = [0, 13, 37, 40, flat.numel()]  # partitions that cut parameters and groups
    rules = [make_rule(flat[a:b], spec, a, b) for a, b in zip(cuts, cuts[1:])]
    for step in range(6):
        ref.zero_grad()
        ref(torch.randn(4, 5)).pow(2).sum().backward()
        grad = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
        if step == 3:  # a scheduler halves every group's lr: sent to the servers
            for group in opt_ref.param_groups:
                group["lr"] *= 0.5
            for rule in rules:
                assert rule.check_hparams(_hparams(opt_ref)) == ""
                rule.set_hparams(_hparams(opt_ref))
        opt_ref.step()
        for (a, b), rule in zip(zip(cuts, cuts[1:]), rules):
            rule.apply(grad[a:b].clone())
    want = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    # Fused kernels (the servers' for Adam, AdamW, Adagrad) round the same operations in
    # another order than torch's plain loop; every other class is bit for bit.
    tol = 1e-6 if name in FUSED else 0.0
    torch.testing.assert_close(torch.cat([r.master for r in rules]), want, rtol=tol, atol=tol)
    again = make_rule(rules[1].master, spec, 13, 37)  # a checkpoint's state restores
    again.load_state(rules[1].state_tensors())
    assert again.state_tensors().keys() == rules[1].state_tensors().keys()


class _Branch(nn.Module):
    """A body, and a head forward uses only while ``aux`` (a branch not taken)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
        self.head = nn.Linear(5, 3)
        self.aux = False

    def forward(self, x):
        return self.body(x) + self.head(x) if self.aux else self.body(x)


@pytest.mark.parametrize("name", sorted(KWARGS))
def test_a_parameter_no_worker_used_is_skipped_like_torch_and_restores_so(name):
    """``find_unused_parameters``: the servers step the partitions with the ranges of the
    parameters that got no gradient left alone (``keep``): torch skips a parameter whose
    ``.grad`` is None, its values, state and step count alike. Each class, partitions
    cutting parameters and groups, equals torch; a rule rebuilt mid-run from its
    ``state_tensors`` (a checkpoint, a backup's copy) carries each parameter's own step
    count on (Adam's bias correction reads it)."""
    torch.manual_seed(0)
    model = _Branch()
    ref = copy.deepcopy(model)
    cls, kw = ELEMENTWISE[name], KWARGS[name]
    opt_ref = cls(_groups(ref, kw["lr"]), **kw)
    spec = spec_from_optimizer(cls(_groups(model, kw["lr"]), **kw), model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    cuts = [0, 13, 37, 50, flat.numel()]  # the head (50..68) shares the last with a bias
    rules = [make_rule(flat[a:b], spec, a, b) for a, b in zip(cuts, cuts[1:])]
    saved: list = []
    for step in range(8):
        ref.aux = model.aux = step % 3 == 1
        opt_ref.zero_grad(set_to_none=True)
        ref(torch.randn(4, 5)).pow(2).sum().backward()
        grads, unused, at = [], [], 0
        for p in ref.parameters():
            grads.append(torch.zeros(p.numel()) if p.grad is None else p.grad.reshape(-1))
            if p.grad is None:
                unused.append((at, at + p.numel()))
            at += p.numel()
        grad = torch.cat(grads)
        opt_ref.step()
        if step == 4:  # rebuilt from their state, as a checkpoint restores them
            rules = [make_rule(r.master, spec, a, b) for r, a, b in zip(rules, cuts, cuts[1:])]
            for rule, old in zip(rules, saved):
                rule.load_state(old)
        for a, b, rule in zip(cuts, cuts[1:], rules):
            keep = [x for lo, hi in unused if max(lo, a) < min(hi, b)
                    for x in (max(lo, a) - a, min(hi, b) - a)]
            rule.apply(grad[a:b].clone(), keep or None)
        saved = [r.state_tensors() for r in rules]
    want = torch.cat([p.detach().reshape(-1) for p in ref.parameters()])
    tol = 1e-6 if name in FUSED else 0.0
    torch.testing.assert_close(torch.cat([r.master for r in rules]), want, rtol=tol, atol=tol)
    if "step" in saved[-1]:  # the head's count is its own: 3 steps of 8 (at 1, 4, 7)
        assert saved[-1]["step"].dim() == 1
        assert saved[-1]["step"][-1] == 3 and saved[-1]["step"][0] == 8


def test_a_restored_partition_keeps_each_groups_own_scalars():
    """ASGD's ``eta`` follows each group's lr, and its next step reads it: a partition
    spanning two groups with different lrs, rebuilt from its ``state_tensors`` mid-run (a
    checkpoint), steps on as the one never rebuilt. The state kept one scalar per
    partition before, and the bias's group then took the weight's eta (0.057 off after 3
    more steps)."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.ASGD([{"params": [model.weight], "lr": 0.05},
                            {"params": [model.bias], "lr": 0.1}], lr=0.05, t0=2)
    spec = spec_from_optimizer(opt, model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    n = flat.numel()
    kept, rebuilt = make_rule(flat.clone(), spec, 0, n), make_rule(flat.clone(), spec, 0, n)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        grad = torch.randn(n, generator=gen)
        if step == 3:
            state = rebuilt.state_tensors()
            assert state["eta"].shape == (n,)  # one per element: the groups' differ
            rebuilt = make_rule(rebuilt.master.clone(), spec, 0, n)
            rebuilt.load_state(state)
        kept.apply(grad.clone())
        rebuilt.apply(grad.clone())
    torch.testing.assert_close(rebuilt.master, kept.master, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [torch.optim.LBFGS, torch.optim.SparseAdam,
                                 torch.optim.Adafactor])
def test_other_optimizers_are_refused_in_one_line(cls):
    with pytest.raises(UsageError) as info:
        check_optimizer_class(cls)
    message = str(info.value)
    assert cls.__name__ in message and "--mode allreduce" in message and "\n" not in message


def test_a_subclass_is_not_taken_for_its_base():
    class MyAdam(torch.optim.Adam):
        pass
    with pytest.raises(UsageError, match="MyAdam"):
        check_optimizer_class(MyAdam)


def test_hyperparameters_keep_their_kind():
    model = nn.Linear(3, 2)
    spec = spec_from_optimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    rule = make_rule(torch.zeros(8), spec, 0, 8)
    assert "was a number, got a text" in rule.check_hparams([{"lr": "fast"}])
    assert "NaN" in rule.check_hparams([{"lr": float("nan")}])


def test_a_tensor_lr_travels_as_its_value_each_step():
    """torch takes ``lr=torch.tensor(...)`` (a scheduler then fills it in place): the
    servers get its value, and a change in place is a change of the hyperparameter (it
    was refused as a Tensor); so do ``betas`` of tensors; any other tensor stays refused."""
    from tessera.parallel.optimizer import DistributedOptimizer
    model = nn.Linear(3, 2)
    user = torch.optim.AdamW(model.parameters(), lr=torch.tensor(0.01))
    spec = spec_from_optimizer(user, model)
    assert spec.groups[0].hparams["lr"] == pytest.approx(0.01)
    handle = DistributedOptimizer(user, lambda: True, lambda: None)
    assert handle.changed_hparams()[0]["lr"] == pytest.approx(0.01)  # first: always sent
    assert handle.changed_hparams() is None
    user.param_groups[0]["lr"].fill_(0.005)
    assert handle.changed_hparams()[0]["lr"] == pytest.approx(0.005)
    betas = spec_from_optimizer(torch.optim.Adam(model.parameters(),
                                                 betas=(torch.tensor(0.8), torch.tensor(0.9))),
                                model).groups[0].hparams["betas"]
    assert betas == pytest.approx([0.8, 0.9])
    odd = torch.optim.SGD(model.parameters(), lr=0.1)
    odd.param_groups[0]["mask"] = torch.zeros(3)
    with pytest.raises(UsageError, match="'mask' is a Tensor"):
        spec_from_optimizer(odd, model)


def test_a_tensor_outside_the_model_is_named():
    model = nn.Linear(3, 2)
    stray = nn.Parameter(torch.zeros(4))
    with pytest.raises(UsageError, match="not a parameter of the model"):
        spec_from_optimizer(torch.optim.SGD([*model.parameters(), stray], lr=0.1), model)


def test_buffers_are_averaged_not_stepped_and_never_clipped():
    model = nn.Linear(2, 2)
    spec = with_buffers(spec_from_optimizer(torch.optim.SGD(model.parameters(), lr=1.0), model),
                        6, 8)  # 6 parameter elements, then 2 buffer elements
    sync = make_rule(torch.zeros(8), spec, 0, 8)
    grad = torch.ones(8)
    sync.apply(sync.clip(grad.clone(), 0.5))
    torch.testing.assert_close(sync.master, torch.tensor([-0.5] * 6 + [1.0, 1.0]))
    run = make_rule(torch.zeros(2), spec, 6, 8, average_keep=0.75)  # async, 4 workers
    run.apply(torch.full((2,), 0.25))  # a worker pushed 1.0, scaled by 1/4
    torch.testing.assert_close(run.master, torch.full((2,), 0.25))
