"""Reduced precision that pays on the CPU: the one-pass finiteness test, the models'
half-width fast paths (same names, fp32 unchanged, bf16 within rounding), and the CNN
trained under bf16 on a real cluster as well as under fp32."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F

from tessera.amp import all_finite
from tessera.config.schema import ModelConfig
from tessera.models import build_model, channels_last, transformer
from tessera.models.transformer import char_transformer
from tests.harness import ROOT, run_job

MNIST = str(ROOT / "examples" / "mnist.toml")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite(dtype):
    base = torch.randn(10_000).to(dtype)
    cases = [base, torch.zeros(0, dtype=dtype)]
    for bad in (float("inf"), float("-inf"), float("nan")):
        t = base.clone()
        t[1234] = bad
        cases.append(t)
    both = base.clone()
    both[3], both[7] = float("inf"), float("-inf")  # their sum is NaN: still caught
    cases.append(both)
    big = torch.full((1000,), torch.finfo(dtype).max, dtype=dtype)  # a sum past fp32's range
    cases.append(big)
    for t in cases:
        assert all_finite(t) == bool(torch.isfinite(t).all()), t
    assert all_finite(torch.arange(5))  # integers are always finite


def test_cnn_keeps_names_and_exact_fp32_results():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="cnn", channels=[16, 32]), (1, 28, 28), 10)
    plain = torch.nn.Sequential(*net.children())  # the model before: same modules, NCHW
    assert isinstance(net, torch.nn.Sequential)
    assert list(net.state_dict()) == list(plain.state_dict()) == [
        "0.weight", "0.bias", "3.weight", "3.bias", "7.weight", "7.bias", "9.weight", "9.bias"]
    x = torch.randn(8, 1, 28, 28)
    y = torch.randint(0, 10, (8,))
    grads = []
    for model in (net, plain):
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out, y).backward()
        grads.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.equal(a, b) for a, b in zip(grads[0][1], grads[1][1]))


def test_cnn_half_width_takes_channels_last_within_rounding():
    torch.manual_seed(0)
    net = build_model(ModelConfig(name="cnn", channels=[16, 32]), (1, 28, 28), 10)
    x = torch.randn(8, 1, 28, 28)
    view = channels_last(x)
    assert view.data_ptr() == x.data_ptr() and torch.equal(view, x)  # one channel: no copy
    assert view.is_contiguous(memory_format=torch.channels_last)
    three = torch.randn(2, 3, 5, 5)
    assert torch.equal(channels_last(three), three)
    fp32 = net(x)
    half = net.to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = half(x)
        before = torch.nn.Sequential(*half.children())(x)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), before.float(), atol=2e-2, rtol=2e-2)
    assert torch.allclose(out.float(), fp32, atol=5e-2, rtol=5e-2)


def test_transformer_attends_in_fp32_for_half_inputs_on_cpu():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 16, 8) for _ in range(3))
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.equal(transformer._causal_attention(q, k, v, 0.0), exact)  # fp32: unchanged
    half = transformer._causal_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.0)
    assert half.dtype == torch.bfloat16
    assert torch.allclose(half.float(), exact, atol=3e-2, rtol=3e-2)
    torch.manual_seed(0)
    net = char_transformer(65, context=16, dim=32, heads=4, layers=2)
    codes = torch.randint(0, 65, (2, 16))
    fp32 = net(codes)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.to(torch.bfloat16)(codes)
    assert torch.allclose(out.float(), fp32, atol=5e-2, rtol=5e-2)


def test_cnn_trains_under_bf16_as_well_as_fp32_on_a_cluster(tmp_path):
    """The channels_last bf16 path on real workers and a server (sync, 2 + 1): the same
    quality as fp32 within the tolerance the half-width tests allow, half the bytes. The
    two jobs run side by side (their start-up is most of the time)."""
    flags = ("--steps", "40", "--workers", "2", "--servers", "1")
    with ThreadPoolExecutor(2) as pool:
        runs = {p: pool.submit(run_job, MNIST, tmp_path / p, *flags, "--precision", p,
                               timeout_s=240) for p in ("fp32", "bf16")}
        fp32, bf16 = runs["fp32"].result(), runs["bf16"].result()
    assert bf16["precision"] == "bf16" and fp32["precision"] == "fp32"
    assert bf16["eval_accuracy"] >= fp32["eval_accuracy"] - 0.03, (bf16, fp32)
    assert abs(bf16["eval_loss"] - fp32["eval_loss"]) <= 0.1, (bf16, fp32)
    assert bf16["bytes_pushed"] <= 0.55 * fp32["bytes_pushed"]
