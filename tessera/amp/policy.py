"""The precision policy: one small seam that says which dtype goes where.

| precision | worker parameters & compute      | wire (push and pull) | loss scaling |
|-----------|----------------------------------|----------------------|--------------|
| fp32      | float32                          | float32              | no           |
| bf16      | bfloat16 under torch.autocast; a CPU without bf16 arithmetic: float32 (see below) | bfloat16 | no (fp32's exponent range) |
| fp16      | CUDA: float16 under autocast; CPU: float32 (see below) | float16 | dynamic, agreed by the cluster |

Servers always keep fp32 master weights and fp32 optimizer state, and upcast every
gradient before using it, so halving the wire costs one rounding of the gradient
and one of the pulled parameters, nothing that accumulates (Micikevicius et al.,
"Mixed Precision Training", ICLR 2018).

fp16 compute on this kind of CPU (AVX-512 BF16, no AVX-512 FP16) runs matmuls ~40x
slower than fp32, so on CPU ``fp16`` means fp16 on the wire with fp32 compute,
and the policy says so once in the log.

bf16 compute pays on a CPU with bf16 arithmetic (x86's AVX-512 BF16 or AMX-BF16, Arm's
BF16 extension): the CNN and the transformer of ``benchmarks/precision.py`` trained 1.2-1.4x
and 1.5-1.6x fp32's samples/s on an EPYC with ``avx512_bf16``. Without it torch emulates bf16
through conversions: on an AVX2-only EPYC the same CNN ran at 0.17x fp32 and the
transformer at 0.13x. So ``cpu_bf16 = "auto"`` (``[amp]``, ``--cpu-bf16``) computes in
bf16 only where ``/proc/cpuinfo`` names such an extension (or the platform has no
``/proc/cpuinfo`` to ask: macOS, where Apple's M2 and later have it), and otherwise sends
bf16 on the wire with fp32 compute, as CPU fp16 does, saying so in the log of
worker 0 and of the first worker on every other host;
``"compute"`` and ``"wire"`` choose either way. Each host decides for its own workers; the
wire, which the cluster agrees on, is bf16 on all of them.

Callers read the fields; nobody checks which policy they hold.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PrecisionPolicy:
    name: str
    #: dtype of the worker's own parameters and gradients.
    param_dtype: torch.dtype
    #: dtype autocast computes in, or None for no autocast.
    autocast_dtype: torch.dtype | None
    #: wire name of the dtype tensors travel in.
    wire_dtype: str
    #: whether the loss is scaled (and overflowing steps skipped cluster-wide).
    loss_scaling: bool
    #: why the policy chose what it chose, for the log ("" when nothing to say).
    note: str = ""

    def autocast(self, device_type: str):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)


#: ``/proc/cpuinfo`` flags that mean bf16 arithmetic torch's CPU kernels use: x86's
#: AVX-512 BF16 and AMX-BF16, Arm's BF16 extension (its ``Features`` line).
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@functools.lru_cache(maxsize=1)
def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset | None:
    """The first CPU's feature flags (x86 ``flags``, Arm ``Features``), or None where
    there is no such file to read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    return frozenset(value.split())
    except OSError:
        return None
    return frozenset()


def cpu_computes_bf16(choice: str = "auto") -> bool:
    """Whether bf16 training on this host's CPU computes in bf16 (``choice``:
    ``"auto"``, ``"compute"`` or ``"wire"``, see the module docstring)."""
    if choice != "auto":
        return choice == "compute"
    flags = cpu_flags()
    return flags is None or bool(BF16_FLAGS & flags)


def make_policy(precision: str, device_type: str, cpu_bf16: str = "auto") -> PrecisionPolicy:
    if precision == "fp32":
        return PrecisionPolicy("fp32", torch.float32, None, "float32", False)
    if precision == "bf16":
        if device_type != "cpu" or cpu_computes_bf16(cpu_bf16):
            return PrecisionPolicy("bf16", torch.bfloat16, torch.bfloat16, "bfloat16", False)
        why = ("as cpu_bf16 = \"wire\" asks" if cpu_bf16 == "wire" else
               "this CPU has no bf16 arithmetic (no avx512_bf16, amx_bf16 or bf16 in "
               "/proc/cpuinfo), and emulated bf16 trained 6-8x slower than float32")
        return PrecisionPolicy(
            "bf16", torch.float32, None, "bfloat16", False,
            note=f"precision bf16 on CPU: gradients and parameters travel as bfloat16, but "
                 f"compute stays float32: {why}; --cpu-bf16 compute (amp.cpu_bf16) computes "
                 f"in bf16 anyway")
    if precision == "fp16":
        if device_type == "cuda":
            return PrecisionPolicy("fp16", torch.float16, torch.float16, "float16", True)
        return PrecisionPolicy(
            "fp16", torch.float32, None, "float16", True,
            note="precision fp16 on CPU: gradients and parameters travel as float16 with loss "
                 "scaling, but compute stays float32 (CPU fp16 matmul is ~40x slower than fp32 "
                 "here); use bf16 for faster CPU compute, fp16 compute is for CUDA")
    raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
