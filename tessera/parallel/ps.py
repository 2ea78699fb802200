"""Data parallelism over parameter servers: the model wrapper a worker trains.

The wrapper lays the model's parameters (and their gradients) end to end in two
flat buffers, so that a partition of the shard map is a plain slice of each,
sent and received without gathering.

Phases of one step (STYLE: numbered, as the code runs them):

1. Forward runs on the parameters the last step pulled.
2. Backward: a post-accumulate-grad hook on every parameter counts down the
   partitions that parameter touches; when a partition's last gradient has
   arrived, its slice of the flat gradient is pushed at once, so pushes of the
   last layers overlap the backward of the first (DDP's bucketing, in the
   order the PS needs).
3. :meth:`PSDataParallel.step` pushes what backward did not touch (unused
   parameters push zeros), waits for every push's reply (the new values) and
   copies them into the flat parameter buffer: the next forward sees the
   update. The clock advances.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from tessera.ps.client import Handle, PSClient
from tessera.ps.sharding import ShardMap
from tessera.transport.wire import ParamSpec


def param_layout(model: nn.Module) -> list[ParamSpec]:
    return [ParamSpec(name=name, shape=list(p.shape), numel=p.numel())
            for name, p in model.named_parameters() if p.requires_grad]


def flatten_model(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Rebind every trainable parameter (and its grad) to views of two flat buffers."""
    params = [p for p in model.parameters() if p.requires_grad]
    device = params[0].device if params else torch.device("cpu")
    total = sum(p.numel() for p in params)
    flat = torch.empty(total, dtype=torch.float32, device=device)
    flat_grad = torch.zeros(total, dtype=torch.float32, device=device)
    off = 0
    with torch.no_grad():
        for p in params:
            n = p.numel()
            flat[off:off + n].copy_(p.detach().reshape(-1))
            p.data = flat[off:off + n].view_as(p)
            p.grad = flat_grad[off:off + n].view_as(p)
            off += n
    return flat, flat_grad


class PSDataParallel(nn.Module):
    """Wraps ``module`` so that its parameters live on the parameter servers."""

    def __init__(self, module: nn.Module, client: PSClient, shard_map: ShardMap, *,
                 is_first: bool):
        super().__init__()
        self.module = module
        self.client = client
        self.shard_map = shard_map
        self.clock = 0
        self.flat, self.flat_grad = flatten_model(module)
        if self.flat.numel() != shard_map.total_elems:
            raise ValueError(f"model has {self.flat.numel()} trainable elements but the shard map "
                             f"covers {shard_map.total_elems}: workers built different models")
        self._params = [p for p in module.parameters() if p.requires_grad]
        offsets = shard_map.param_offsets()
        self._views = [(p, offsets[i], p.numel()) for i, p in enumerate(self._params)]
        self._parts_of_param = shard_map.partitions_of_param()
        self._needed = {part.id: 0 for part in shard_map.partitions}
        for parts in self._parts_of_param:
            for pid in parts:
                self._needed[pid] += 1
        self._remaining = dict(self._needed)
        self._handles: dict[int, Handle] = {}
        self.comm_wait_s = 0.0
        for i, p in enumerate(self._params):
            p.register_post_accumulate_grad_hook(self._make_hook(i))
        # 0. Start from the servers' values: worker 0 seeds them, everyone pulls.
        if is_first:
            client.init_params(self.flat)
        self._copy_in(client.pull(clock=0))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # --------------------------------------------------------------- phase 2

    def _make_hook(self, index: int):
        p, off, n = self._views[index]

        def hook(param: torch.Tensor) -> None:
            view = self.flat_grad[off:off + n]
            if param.grad is not None and param.grad.data_ptr() != view.data_ptr():
                # Someone replaced .grad (zero_grad(set_to_none=True)): fold it back.
                view.copy_(param.grad.reshape(-1))
                param.grad = view.view_as(param)
            for pid in self._parts_of_param[index]:
                self._remaining[pid] -= 1
                if self._remaining[pid] == 0:
                    self._push(pid)
        return hook

    def _push(self, pid: int) -> None:
        info = self.client.parts[pid]
        self._handles[pid] = self.client.push(pid, self.flat_grad[info.start:info.stop], self.clock)

    # --------------------------------------------------------------- phase 3

    def step(self) -> None:
        """Finish the step: push the rest, wait for new values, advance the clock."""
        for pid, left in self._remaining.items():
            if left > 0 and pid not in self._handles:
                self._push(pid)
        t0 = time.perf_counter()
        results = [h.wait() for h in self._handles.values()]
        self.comm_wait_s += time.perf_counter() - t0
        with torch.no_grad():
            for values in results:
                self._write(values)
            self.flat_grad.zero_()
        self._handles.clear()
        self._remaining = dict(self._needed)
        self.clock += 1

    def zero_grad(self, set_to_none: bool = False) -> None:  # noqa: ARG002 - grads are views
        self.flat_grad.zero_()

    def _copy_in(self, handles: list[Handle]) -> None:
        with torch.no_grad():
            for h in handles:
                self._write(h.wait())

    def _write(self, values: dict[int, torch.Tensor]) -> None:
        for pid, tensor in values.items():
            info = self.client.parts[pid]
            self.flat[info.start:info.stop].copy_(tensor)
