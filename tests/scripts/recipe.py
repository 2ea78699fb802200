"""A current training recipe, run plain (``--plain``) or on a Tessera job.

AdamW with two parameter groups (no weight decay on biases), linear warm-up then
cosine (``LambdaLR``, stepped per optimizer step), global-norm clipping at 1.0,
gradient accumulation over 2 micro-batches, a ``DistributedSampler`` and a
``DataLoader``. Plain, it runs the same recipe in one process at batch W·b, which
sees the same samples at every step (torch's sampler deals positions round-robin,
so the union of W workers' k-th micro-batches is a contiguous slice of the
epoch's order). Writes the final eval loss and parameters to ``--out``.

    python recipe.py --plain --workers 2 --out plain.json
    tessera launch --workers 2 --servers 2 recipe.py --out dist.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import tessera
from tessera.data.datasets import digits_arrays


def build_optimizer(name: str, model: nn.Module, late: bool = False) -> torch.optim.Optimizer:
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if name == "adamw":
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}]
                                 + ([] if late else [{"params": no_decay, "weight_decay": 0.0}]),
                                 lr=3e-3)
    kwargs = {"sgd": dict(lr=0.05, momentum=0.9, nesterov=True), "adam": dict(lr=3e-3),
              "adagrad": dict(lr=0.05), "adadelta": dict(lr=1.0), "rmsprop": dict(lr=1e-3),
              "adamax": dict(lr=3e-3), "nadam": dict(lr=3e-3), "radam": dict(lr=3e-3),
              "asgd": dict(lr=0.05), "rprop": dict(lr=1e-3)}[name]
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adagrad": torch.optim.Adagrad,
           "adadelta": torch.optim.Adadelta, "rmsprop": torch.optim.RMSprop,
           "adamax": torch.optim.Adamax, "nadam": torch.optim.NAdam, "radam": torch.optim.RAdam,
           "asgd": torch.optim.ASGD, "rprop": torch.optim.Rprop}[name]
    return cls([{"params": decay, "weight_decay": 1e-3}, {"params": no_decay}], **kwargs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plain", action="store_true", help="one process, batch W·b, no Tessera")
    ap.add_argument("--workers", type=int, default=2, help="with --plain: the W to match")
    ap.add_argument("--steps", type=int, default=32, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=16, help="samples per worker per step")
    ap.add_argument("--accum", type=int, default=2, help="micro-batches per step")
    ap.add_argument("--optimizer", default="adamw")
    ap.add_argument("--no-clip", action="store_true")
    ap.add_argument("--max-norm", type=float, default=1.0, help="clip_grad_norm_'s max_norm")
    ap.add_argument("--bn", action="store_true", help="a BatchNorm layer (running statistics)")
    ap.add_argument("--loader-workers", type=int, default=0,
                    help="the DataLoader's num_workers (processes forked from this worker)")
    ap.add_argument("--late-group", type=int, default=0,
                    help="adamw: add the biases' group with add_param_group at this step")
    ap.add_argument("--unused", action="store_true",
                    help="an extra head (`aux`) that forward never uses")
    ap.add_argument("--aux-every", type=int, default=0,
                    help="with --unused: forward uses `aux` at the steps divisible by this")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the (wrapped) model, backend aot_eager (no compiler)")
    ap.add_argument("--find-unused", action="store_true",
                    help="tessera.distribute(..., find_unused_parameters=True), DDP's flag")
    ap.add_argument("--zero-unused", action="store_true",
                    help="with --plain: step a parameter without a gradient on zeros, as the "
                         "servers do")
    ap.add_argument("--grad-scaler", action="store_true",
                    help="torch.amp.GradScaler: a scaled loss, unscale_ before the clip, "
                         "scaler.step (DDP's fp16 recipe; allreduce mode)")
    ap.add_argument("--ema", action="store_true",
                    help="an EMA of the model: torch.optim.swa_utils.AveragedModel(model), "
                         "updated after every step")
    ap.add_argument("--device", default="cpu",
                    help="cpu, cuda, or auto: tessera.device() (this worker's own GPU, or the CPU)")
    ap.add_argument("--dist-eval", action="store_true",
                    help="evaluate as a DDP recipe does: each worker its torch.distributed "
                         "rank's share of the test set, sums all_reduce'd")
    ap.add_argument("--barrier-first", action="store_true",
                    help="a torch.distributed.barrier() right after tessera.distribute")
    ap.add_argument("--samples-log", help="append each applied step's sample ids here")
    ap.add_argument("--sleep", type=float, default=0.0, help="seconds per step (slow workers)")
    ap.add_argument("--without-no-sync", action="store_true",
                    help="accumulate without model.no_sync(), as a plain loop does")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(0)
    x, y = digits_arrays()  # sklearn's load_digits(return_X_y=True)
    device = tessera.device() if args.device == "auto" else torch.device(args.device)
    x = torch.tensor(x / 16.0, dtype=torch.float32, device=device)
    y = torch.tensor(y, device=device)
    train = TensorDataset(x[:1500], y[:1500], torch.arange(1500, device=device))
    test_x, test_y = x[1500:], y[1500:]
    model = nn.Sequential(nn.Linear(64, 64), *([nn.BatchNorm1d(64)] if args.bn else []),
                          nn.ReLU(), nn.Linear(64, 10))
    model = (_WithUnused(model) if args.unused else model).to(device)
    inner = model
    optimizer = build_optimizer(args.optimizer, model, late=args.late_group > 0)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    if args.plain:
        sampler = torch.utils.data.DistributedSampler(train, num_replicas=1, rank=0, seed=0)
        micro = args.batch * args.workers // args.accum
    else:
        model, optimizer = tessera.distribute(model, optimizer,
                                              find_unused_parameters=args.find_unused)
        sampler = tessera.DistributedSampler(train, seed=0)
        micro = args.batch // args.accum
        if args.barrier_first:  # (a DDP script's "rank 0 prepares, the others wait")
            torch.distributed.barrier()
    if args.compile:  # as a DDP recipe compiles DDP(model): the wrapper
        model = torch.compile(model, backend="aot_eager")
    # (built on the wrapper, as a DDP recipe builds it on DDP: a deepcopy of the model)
    ema = (torch.optim.swa_utils.AveragedModel(
        model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(0.9))
        if args.ema else None)
    warmup, total = 5, args.steps
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup)
                                                 * 0.5 * (1 + math.cos(math.pi * s / total)))
    loader = DataLoader(train, batch_size=micro, sampler=sampler, drop_last=True,
                        num_workers=args.loader_workers)

    rank = int(os.environ.get("RANK", "0"))  # torchrun's variable; every Tessera worker has it
    # A replacement worker (--max-restarts) starts at the job's step, its data where its
    # predecessor's last applied step left it (tessera.DistributedSampler).
    step, epoch = (0 if args.plain else model.start_step(args.steps)), 0
    norms = []  # clip_grad_norm_'s return value, per step
    scaler = torch.amp.GradScaler(device.type, enabled=args.grad_scaler)
    seen = open(f"{args.samples_log}/worker-{rank}.jsonl", "a") if args.samples_log else None
    while step < args.steps:
        sampler.set_epoch(epoch)
        batches = iter(loader)
        for _ in range(len(loader) // args.accum):
            if step == args.steps:
                break
            if args.late_group and step == args.late_group:  # and the scheduler follows it
                optimizer.add_param_group({"params": biases, "weight_decay": 0.0,
                                           "initial_lr": 3e-3})
                schedule.base_lrs.append(3e-3)
                schedule.lr_lambdas.append(schedule.lr_lambdas[0])
            ids = []
            if args.aux_every:
                inner.use_aux = step % args.aux_every == 0
            for k in range(args.accum):
                xb, yb, ib = next(batches)
                ids += ib.tolist()
                last = k == args.accum - 1
                ctx = model.no_sync() if (not args.plain and not last
                                          and not args.without_no_sync) else _nothing()
                with ctx:
                    loss = F.cross_entropy(model(xb), yb) / args.accum
                    scaler.scale(loss).backward()
            if not args.no_clip:
                scaler.unscale_(optimizer)  # (a no-op without --grad-scaler)
                if args.plain:
                    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
                else:
                    norm = model.clip_grad_norm_(args.max_norm)
                norms.append(float(norm))
            if args.zero_unused:
                for p in model.parameters():
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            scaler.step(optimizer)  # optimizer.step() without --grad-scaler
            scaler.update()
            optimizer.zero_grad()
            schedule.step()
            if ema is not None:
                ema.update_parameters(model)
            step += 1
            if seen is not None:  # applied: these samples count as seen
                seen.write(json.dumps({"epoch": epoch, "step": step, "ids": ids}) + "\n")
                seen.flush()
            time.sleep(args.sleep)
        epoch += 1

    model.eval()
    with torch.no_grad():
        eval_loss = F.cross_entropy(model(test_x), test_y).item()
        ema_loss = F.cross_entropy(ema(test_x), test_y).item() if ema is not None else None
    dist_eval = _dist_eval(model, test_x, test_y, args.plain) if args.dist_eval else None
    state = model.state_dict()
    # Each parameter's step count in optimizer.state_dict() (torch keeps one per parameter).
    names = {id(p): n for n, p in inner.named_parameters()}
    order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
    counts = {order[i]: float(s["step"]) for i, s in optimizer.state_dict()["state"].items()
              if "step" in s}
    out = args.out if rank == 0 else f"{args.out}.rank{rank}"
    with open(out, "w") as f:
        json.dump({"eval_loss": eval_loss, "ema_eval_loss": ema_loss, "steps": step,
                   "dist_eval": dist_eval,
                   "norms": norms,
                   "lr": [g["lr"] for g in optimizer.param_groups], "step_counts": counts,
                   "params": {k: v.reshape(-1).tolist() for k, v in state.items()},
                   "device": str(next(model.parameters()).device)}, f)
    if not args.plain:
        tessera.finish()


def _dist_eval(model, test_x, test_y, plain: bool) -> dict:
    """A DDP recipe's evaluation, unchanged: torch.distributed says which share of the test
    set is this worker's; the loss sum, the correct count and the sample count are summed
    over the workers with ``dist.all_reduce``, then every worker holds the same figures."""
    import torch.distributed as dist
    rank, world = (0, 1) if plain else (dist.get_rank(), dist.get_world_size())
    xs, ys = test_x[rank::world], test_y[rank::world]
    model.eval()
    with torch.no_grad():
        logits = model(xs)
        sums = torch.tensor([F.cross_entropy(logits, ys, reduction="sum").item(),
                             (logits.argmax(1) == ys).sum().item(), len(ys)], dtype=torch.float64)
    if not plain:
        dist.all_reduce(sums)
        dist.barrier()
    return {"loss": sums[0].item() / sums[2].item(), "accuracy": sums[1].item() / sums[2].item(),
            "samples": int(sums[2].item()), "world": world, "backend": (
                None if plain else dist.get_backend())}


class _WithUnused(nn.Module):
    """``body`` plus a head forward uses only while ``use_aux`` (a branch not taken): it has
    no gradient at the other steps."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body, self.aux = body, nn.Linear(64, 10)
        self.use_aux = False

    def forward(self, x):
        out = self.body(x)
        return out + 0.5 * self.aux(x) if self.use_aux else out


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
