"""A script that saves and resumes its own checkpoint: ``torch.save`` of the model's and
the optimizer's ``state_dict()``, loaded again with ``load_state_dict`` (the optimizer's
after ``tessera.distribute``, or with ``--load-before`` before it). Plain (``--plain``) it
runs one process at batch W·b; the W workers of a sync job take the W b-sized chunks of
the same global batches, so the two must end alike.

    python optim_state.py --plain --steps 6 --save a.pt
    tessera launch --workers 2 --servers 2 optim_state.py --load a.pt --steps 12 --out b.json
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F
from torch import nn

import tessera
from tessera.data.datasets import digits_arrays


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", action="store_true")
    ap.add_argument("--workers", type=int, default=2, help="with --plain: the W to match")
    ap.add_argument("--batch", type=int, default=16, help="samples per worker per step")
    ap.add_argument("--steps", type=int, default=12, help="the step to end at")
    ap.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd", "rprop"])
    ap.add_argument("--load", help="a checkpoint this script saved: continue from it")
    ap.add_argument("--load-before", action="store_true",
                    help="load the optimizer's state before tessera.distribute")
    ap.add_argument("--load-other-class", action="store_true",
                    help="a mistake: load SGD's state into this script's Adam")
    ap.add_argument("--save", help="where worker 0 saves model, optimizer and step at the end")
    ap.add_argument("--out", help="JSON: final parameters and the optimizer's state_dict()")
    args = ap.parse_args()

    x, y = digits_arrays()
    x = torch.tensor(x / 16.0, dtype=torch.float32)
    y = torch.tensor(y)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if args.optimizer == "adamw":
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                       {"params": rest, "weight_decay": 0.0}], lr=1e-2)
    elif args.optimizer == "sgd":
        optimizer = torch.optim.SGD([{"params": decay}, {"params": rest}], lr=0.05,
                                    momentum=0.9)
    else:
        optimizer = torch.optim.Rprop([{"params": decay}, {"params": rest}], lr=1e-3)
    start = 0
    ckpt = torch.load(args.load) if args.load else None
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])  # the parameters, before distribute as ever
        start = ckpt["step"]
    if args.load_other_class:
        sgd = torch.optim.SGD([{"params": decay}, {"params": rest}], lr=0.1, momentum=0.9)
        model(x[:8]).sum().backward()
        sgd.step()
        model.zero_grad()
        ckpt = {"optimizer": sgd.state_dict()}
    if ckpt is not None and args.load_before:
        optimizer.load_state_dict(ckpt["optimizer"])
    rank, world, batch = 0, 1, args.batch * args.workers
    if not args.plain:
        model, optimizer = tessera.distribute(model, optimizer)
        rank, world, batch = tessera.rank(), tessera.num_workers(), args.batch
        if ckpt is not None and not args.load_before:
            optimizer.load_state_dict(ckpt["optimizer"])
    glob = batch * world
    for step in range(start, args.steps):
        at = (step * glob) % (len(x) - glob) + rank * batch
        loss = F.cross_entropy(model(x[at:at + batch]), y[at:at + batch])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    state = optimizer.state_dict()
    if rank == 0 and args.save:
        torch.save({"model": model.state_dict(), "optimizer": state, "step": args.steps},
                   args.save)
    if rank == 0 and args.out:
        with open(args.out, "w") as f:
            json.dump({"params": {k: v.reshape(-1).tolist() for k, v in model.state_dict().items()},
                       "state": {str(i): {k: v.reshape(-1).tolist() for k, v in s.items()}
                                 for i, s in state["state"].items()},
                       "lr": [g["lr"] for g in state["param_groups"]]}, f)
    if not args.plain:
        tessera.finish()


if __name__ == "__main__":
    main()
