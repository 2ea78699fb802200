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
    """The channels_last bf16 path on real workers and a server (sync, 2 + 1), forced
    with ``--cpu-bf16 compute`` on any CPU, and the wire-only bf16 a CPU without bf16
    arithmetic gets (``--cpu-bf16 wire``, fp32 compute): the same quality as fp32 within
    the tolerance the half-width tests allow, half the bytes, and worker 0 says which it
    computed in. The three jobs run side by side (their start-up is most of the time)."""
    flags = ("--steps", "40", "--workers", "2", "--servers", "1")
    kinds = {"fp32": ("--precision", "fp32"),
             "bf16": ("--precision", "bf16", "--cpu-bf16", "compute"),
             "wire": ("--precision", "bf16", "--cpu-bf16", "wire")}
    with ThreadPoolExecutor(3) as pool:
        runs = {k: pool.submit(run_job, MNIST, tmp_path / k, *flags, *f, timeout_s=300)
                for k, f in kinds.items()}
        got = {k: run.result() for k, run in runs.items()}
    fp32 = got["fp32"]
    assert fp32["precision"] == "fp32"
    for kind in ("bf16", "wire"):
        half = got[kind]
        assert half["precision"] == "bf16"
        assert half["eval_accuracy"] >= fp32["eval_accuracy"] - 0.03, (kind, half, fp32)
        assert abs(half["eval_loss"] - fp32["eval_loss"]) <= 0.1, (kind, half, fp32)
        assert half["bytes_pushed"] <= 0.55 * fp32["bytes_pushed"], kind
    said = {k: (tmp_path / k / "logs" / "worker-0.log").read_text() for k in ("bf16", "wire")}
    assert "compute stays float32: as cpu_bf16 = \"wire\" asks" in said["wire"], said["wire"]
    assert "compute stays float32" not in said["bf16"], said["bf16"]


def test_bf16_computes_in_bf16_only_on_a_cpu_with_bf16_arithmetic(tmp_path):
    """``cpu_bf16 = "auto"``: bf16 compute where /proc/cpuinfo names avx512_bf16,
    amx_bf16 or Arm's bf16, else fp32 compute with the bf16 wire; where there is no
    /proc/cpuinfo (macOS), bf16 compute. ``compute``/``wire`` choose; a GPU always
    computes in bf16; a wrong value is refused naming the flag."""
    from tessera.amp import policy
    from tessera.config.load import ConfigError, load_config

    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu sse4_2 avx avx2 fma\n\n"
                   "processor\t: 1\nflags\t\t: fpu avx512_bf16\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve bf16 i8mm\n")
    assert policy.cpu_flags(str(x86)) == {"fpu", "sse4_2", "avx", "avx2", "fma"}  # the first
    assert "bf16" in policy.cpu_flags(str(arm))
    assert policy.cpu_flags(str(tmp_path / "none")) is None

    def chosen(flags, choice="auto", device="cpu"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(policy, "cpu_flags", lambda: flags)
            made = policy.make_policy("bf16", device, choice)
        assert made.wire_dtype == "bfloat16" and not made.loss_scaling
        return made.param_dtype, made.autocast_dtype, bool(made.note)

    bf16 = (torch.bfloat16, torch.bfloat16, False)
    wire = (torch.float32, None, True)
    assert chosen(policy.cpu_flags(str(x86))) == wire
    assert chosen(frozenset({"avx2", "avx512_bf16"})) == bf16
    assert chosen(frozenset({"avx2", "amx_bf16"})) == bf16
    assert chosen(policy.cpu_flags(str(arm))) == bf16
    assert chosen(None) == bf16
    assert chosen(frozenset({"avx2"}), "compute") == bf16
    assert chosen(frozenset({"avx512_bf16"}), "wire") == wire
    assert chosen(frozenset({"avx2"}), device="cuda") == bf16
    assert load_config(MNIST, {"--cpu-bf16": "wire"}).amp.cpu_bf16 == "wire"
    with pytest.raises(ConfigError, match="--cpu-bf16"):
        load_config(MNIST, {"--cpu-bf16": "fast"})
