"""Half-width all-reduce for DDP on any backend: bf16 or fp16 gradients on the wire.

torch's ``bf16_compress_hook`` is refused by DDP unless CUDA and NCCL 2.10+ are
present (it checks the hook's *name*), although Gloo all-reduces bfloat16 and
float16 tensors fine (torch 2.11+). :func:`half_width_hook` does the same thing
under another name: each gradient bucket is divided by the world size, cast to the
wire dtype, summed by one all-reduce, and copied back into the fp32 bucket, so each
worker sends and receives half the bytes. One rounding per step, as with the
parameter servers' half-width wire (:mod:`tessera.amp.policy`).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

WIRE = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def half_width_hook(wire_dtype: str) -> Callable:
    """A DDP communication hook that all-reduces in ``wire_dtype`` (see module docstring)."""
    dtype = WIRE[wire_dtype]

    # No annotations: DDP checks them against the real classes, and this module's
    # are strings (``from __future__ import annotations``).
    def half_width_allreduce(group, bucket):
        group = group if group is not None else dist.group.WORLD
        buffer = bucket.buffer()
        half = buffer.div(group.size()).to(dtype)
        fut = dist.all_reduce(half, group=group, async_op=True).get_future()

        def back(fut):
            buffer.copy_(fut.value()[0])
            return buffer

        return fut.then(back)

    return half_width_allreduce
