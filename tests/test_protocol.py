"""The wrapper protocol (tessera.parallel.protocol) in one process: what each wrapper
supports matches plain PyTorch, and what it does not is refused in one line."""

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tessera.config.schema import OptimizerConfig, PipelineConfig
from tessera.errors import UsageError
from tessera.parallel.hybrid import HybridParallel
from tessera.parallel.pipeline import PipelineParallel
from tessera.parallel.ps import PSDataParallel

SGD = OptimizerConfig(name="sgd", lr=0.1)


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))


def _batch(i):
    gen = torch.Generator().manual_seed(i)
    return torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen)


def test_allreduce_supports_the_recipe_like_ddp(group):
    model = _model()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    wrapped = HybridParallel(model, None, optimizer=SGD, tables=[])
    assert wrapped.state_dict().keys() == ref.state_dict().keys()
    for i in range(3):
        x, y = _batch(i)
        with wrapped.no_sync():  # accumulate one micro-batch locally, then the last
            wrapped.forward_backward((x[:8],), y[:8], lambda o, t: F.cross_entropy(o, t) / 2)
        wrapped.forward_backward((x[8:],), y[8:], lambda o, t: F.cross_entropy(o, t) / 2)
        assert wrapped.unscale_()
        norm = wrapped.clip_grad_norm_(0.5)
        assert wrapped.step()
        F.cross_entropy(ref(x), y).backward()
        ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(norm, ref_norm)
        torch.testing.assert_close(list(model.parameters()), list(ref.parameters()))
    wrapped.load_state_dict(_model().state_dict())
    torch.testing.assert_close(wrapped.state_dict(), _model().state_dict())


def test_one_stage_pipeline_matches_plain_sgd_and_refuses_the_rest(group):
    model = _model()
    ref = copy.deepcopy(model)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    wrapped = PipelineParallel(model, rank=0, num_workers=1,
                               plan=PipelineConfig(stages=1, microbatches=2), optimizer=SGD,
                               loss_fn=F.cross_entropy)
    assert wrapped.state_dict().keys() == ref.state_dict().keys()
    x, y = _batch(0)
    loss = wrapped.forward_backward((x,), y, F.cross_entropy)
    assert wrapped.step()
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    opt.step()
    torch.testing.assert_close(float(loss), ref_loss.item())
    torch.testing.assert_close(list(wrapped.module.parameters()), list(ref.parameters()))
    with pytest.raises(UsageError, match=r"--mode pipeline does not support no_sync\(\)"):
        wrapped.no_sync()
    with pytest.raises(UsageError, match="--mode pipeline does not support clip_grad_norm_"):
        wrapped.clip_grad_norm_(1.0)


def test_parameter_server_modes_refuse_what_needs_the_servers():
    wrapped = PSDataParallel.__new__(PSDataParallel)  # the refusals need no servers
    nn.Module.__init__(wrapped)
    wrapped.mode = "ssp"
    wrapped.tables = ["a table"]
    for call, method in [(lambda: wrapped.no_sync().__enter__(), "no_sync()"),
                         (lambda: wrapped.clip_grad_norm_(1.0), "clip_grad_norm_"),
                         (lambda: wrapped.load_state_dict({}), "load_state_dict()")]:
        with pytest.raises(UsageError) as info:
            call()
        assert str(info.value).startswith(f"--mode ssp does not support {method} yet: ")
        assert "\n" not in str(info.value)
