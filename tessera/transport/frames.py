"""Tensor payloads as raw frames, without copies where the transport allows.

A frame is the bytes of a contiguous CPU tensor, nothing else: dtype and element
count travel in the typed header, and the receiver checks the frame's length
against what *it* expects (its shard map), never trusting a size sent to it.
"""

from __future__ import annotations

import warnings

import torch

_TORCH = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def torch_dtype(wire_dtype: str) -> torch.dtype:
    return _TORCH[wire_dtype]


def itemsize(wire_dtype: str) -> int:
    return _ITEMSIZE[wire_dtype]


def tensor_to_frame(t: torch.Tensor) -> memoryview:
    """A zero-copy view of ``t``'s bytes. ``t`` must stay alive until sent.

    Few torch calls on purpose: a worker and a server make one per partition per step,
    and on the test VM code that has not run for a few milliseconds (a round trip's
    wait) runs 5-8 times slower than in a loop, so each call counts several times over
    (benchmarks/HISTORY.md, "Session 55")."""
    if not t.is_cpu:
        t = t.to("cpu")
    if not t.is_contiguous():
        t = t.contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: same bytes, as int16
        t = t.view(torch.int16)
    if t.numel() == 0:
        return memoryview(b"")
    # (a C-contiguous array of any shape casts to its bytes: no reshape needed)
    return memoryview(t.numpy()).cast("B")


def raw(frame):
    """A received frame's bytes: a ``zmq.Frame``'s buffer, or the frame itself (bytes, a
    memoryview, a shared-memory view: :mod:`tessera.transport.shm`). A buffer is taken
    as it is, and a ``zmq.Frame`` asked once: each ask makes a new memoryview."""
    if isinstance(frame, (bytes, memoryview)):
        return frame
    return getattr(frame, "buffer", frame)


def frame_to_tensor(buf, wire_dtype: str, numel: int) -> torch.Tensor:
    """A tensor over ``buf``'s bytes (no copy); raises ValueError on a length mismatch."""
    view = memoryview(buf)
    expected = numel * _ITEMSIZE[wire_dtype]
    if view.nbytes != expected:
        raise ValueError(f"payload of {view.nbytes} bytes where {numel} {wire_dtype} "
                         f"elements ({expected} bytes) were expected")
    if numel == 0:
        return torch.empty(0, dtype=_TORCH[wire_dtype])
    if view.readonly and torch.is_warn_always_enabled():
        return _quietly(view, _TORCH[wire_dtype])
    return torch.frombuffer(view, dtype=_TORCH[wire_dtype])


def _quietly(view: memoryview, dtype: torch.dtype) -> torch.Tensor:
    """``torch.frombuffer`` of a read-only buffer (ZeroMQ hands out read-only frames)
    without torch's warning that it does not support non-writable tensors."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(view, dtype=dtype)


# torch gives that warning once per process (``TORCH_WARN_ONCE``), unless
# ``torch.set_warn_always(True)``: it is given here, silenced, at import, so that
# :func:`frame_to_tensor` need not enter ``warnings.catch_warnings`` for every frame
# (it copies the warning filters on every use: 2 µs in a loop, one frame per partition
# per message on both ends).
_quietly(memoryview(bytes(4)), torch.float32)
