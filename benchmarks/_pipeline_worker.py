"""Worker script of benchmarks/pipeline.py (run by `tessera launch`): times pipelined
steps of a char transformer and records each stage's peak activation memory."""

import json
import sys
import time
import weakref

import torch

import tessera
from tessera.models.transformer import char_transformer, lm_loss

steps, batch = int(sys.argv[1]), int(sys.argv[2])
session = tessera.init()
torch.set_num_threads(1)
torch.manual_seed(0)
model = tessera.distribute(char_transformer(80, context=64, dim=64, heads=4, layers=6),
                           "adamw", lr=1e-3, loss_fn=lm_loss)
x = torch.randint(0, 80, (batch, 64))
y = torch.randint(0, 80, (batch, 64))

live = {"now": 0, "peak": 0}


class _Held:
    __slots__ = ("t", "__weakref__")

    def __init__(self, t):
        self.t = t


def pack(t):
    # Count the bytes autograd keeps for backward until the graph lets go of them.
    held = _Held(t)
    n = t.numel() * t.element_size()
    live["now"] += n
    live["peak"] = max(live["peak"], live["now"])
    weakref.finalize(held, lambda: live.__setitem__("now", live["now"] - n))
    return held


def unpack(held):
    return held.t


times = []
with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
    for step in range(steps):
        t0 = time.perf_counter()
        model.train_step((x,), y)
        times.append(time.perf_counter() - t0)
(session.run_dir / f"bench-{tessera.rank()}.json").write_text(json.dumps(
    {"step_s": times[2:] if len(times) > 3 else times, "peak_activation_bytes": live["peak"],
     "stage": model.stage_index}))
tessera.finish(steps=steps)
