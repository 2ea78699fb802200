"""Tensor payloads as raw frames, without copies where the transport allows.

A frame is the bytes of a contiguous CPU tensor, nothing else: dtype and element
count travel in the typed header, and the receiver checks the frame's length
against what *it* expects (its shard map), never trusting a size sent to it.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def torch_dtype(wire_dtype: str) -> torch.dtype:
    return _TORCH[wire_dtype]


def itemsize(wire_dtype: str) -> int:
    return _ITEMSIZE[wire_dtype]


def tensor_to_frame(t: torch.Tensor) -> memoryview:
    """A zero-copy view of ``t``'s bytes. ``t`` must stay alive until sent."""
    if t.device.type != "cpu":
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bytes, as int16
        t = t.view(torch.int16)
    return memoryview(t.reshape(-1).numpy()).cast("B")


def raw(frame):
    """A received frame's bytes: a ``zmq.Frame``'s buffer, or the frame itself (bytes, a
    memoryview, a shared-memory view: :mod:`tessera.transport.shm`)."""
    return frame.buffer if hasattr(frame, "buffer") else frame


def frame_to_tensor(buf, wire_dtype: str, numel: int) -> torch.Tensor:
    """A tensor over ``buf``'s bytes (no copy); raises ValueError on a length mismatch."""
    view = memoryview(buf)
    expected = numel * _ITEMSIZE[wire_dtype]
    if view.nbytes != expected:
        raise ValueError(f"payload of {view.nbytes} bytes where {numel} {wire_dtype} "
                         f"elements ({expected} bytes) were expected")
    if numel == 0:
        return torch.empty(0, dtype=_TORCH[wire_dtype])
    if not view.readonly:
        return torch.frombuffer(view, dtype=_TORCH[wire_dtype])
    # ZeroMQ hands out read-only buffers; torch warns on those, numpy does not.
    arr = np.frombuffer(view, dtype=np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(arr, dtype=_TORCH[wire_dtype])
