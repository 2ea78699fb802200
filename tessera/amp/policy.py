"""The precision policy: one small seam that says which dtype goes where.

| precision | worker parameters & compute      | wire (push and pull) | loss scaling |
|-----------|----------------------------------|----------------------|--------------|
| fp32      | float32                          | float32              | no           |
| bf16      | bfloat16 under torch.autocast    | bfloat16             | no (fp32's exponent range) |
| fp16      | CUDA: float16 under autocast; CPU: float32 (see below) | float16 | dynamic, agreed by the cluster |

Servers always keep fp32 master weights and fp32 optimizer state, and upcast every
gradient before using it, so halving the wire costs one rounding of the gradient
and one of the pulled parameters, nothing that accumulates (Micikevicius et al.,
"Mixed Precision Training", ICLR 2018).

fp16 compute on this kind of CPU (AVX-512 BF16, no AVX-512 FP16) runs matmuls ~40x
slower than fp32, so on CPU ``fp16`` means fp16 on the wire with fp32 compute,
and the policy says so once in the log.

Callers read the fields; nobody checks which policy they hold.
"""

from __future__ import annotations

import contextlib
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


def make_policy(precision: str, device_type: str) -> PrecisionPolicy:
    if precision == "fp32":
        return PrecisionPolicy("fp32", torch.float32, None, "float32", False)
    if precision == "bf16":
        return PrecisionPolicy("bf16", torch.bfloat16, torch.bfloat16, "bfloat16", False)
    if precision == "fp16":
        if device_type == "cuda":
            return PrecisionPolicy("fp16", torch.float16, torch.float16, "float16", True)
        return PrecisionPolicy(
            "fp16", torch.float32, None, "float16", True,
            note="precision fp16 on CPU: gradients and parameters travel as float16 with loss "
                 "scaling, but compute stays float32 (CPU fp16 matmul is ~40x slower than fp32 "
                 "here); use bf16 for faster CPU compute, fp16 compute is for CUDA")
    raise ValueError(f"precision must be fp32, bf16 or fp16, got {precision!r}")
