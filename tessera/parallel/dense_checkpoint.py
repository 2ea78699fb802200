"""A dense replica's checkpoint (``--mode allreduce`` and ``--mode hybrid``): one file.

In the process-group modes every worker holds the whole dense model and the same
optimizer state (same initial values, same averaged gradients), so worker 0 alone
writes them, beside the servers' files of the same clock::

    clock-00000020/worker-0.safetensors   model/<state_dict key>    parameters and buffers
                                          optim/<param index>/<key> torch.optim state tensors
    clock-00000020/server-<r>.safetensors (hybrid) the servers' tables at the same clock
    clock-00000020/manifest.json          written last by the coordinator

Everything that is not a tensor (the optimizer's ``param_groups``, non-tensor
per-parameter state, the fp16 loss scaler, the clock) is a small JSON document in
the file's safetensors metadata, decoded with ``json`` into plain types: loading
executes nothing (no pickle, no ``torch.load``). Tuples (Adam's ``betas``) come
back as tuples, taken from the live optimizer's own groups.

On ``--resume`` (or a restart of the group) every worker loads worker 0's file:
the replicas are identical, so they stay so.

Pipeline stages (:mod:`tessera.parallel.pipeline`) write the same format, one file
per stage (``worker-<s>.safetensors``, replica 0's stage ``s``), listed in the
manifest under ``dense.stages``; :func:`read_dense` with ``stage`` reads one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from tessera.ps.checkpoint import DENSE_FILE, CheckpointError

__all__ = ["DENSE_FILE", "DenseCheckpoints", "dense_state", "load_dense", "read_dense"]
FORMAT = "tessera-dense-1"


def _plain(value, where: str):
    """A JSON-safe copy of ``value`` (numbers, strings, bools, None, lists, dicts)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, where) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    raise CheckpointError(f"{where}: a value of type {type(value).__name__} cannot be saved "
                          f"in a checkpoint (only tensors, numbers, strings and lists)")


def _like(value, template):
    """``value`` (decoded JSON) with the tuples of ``template`` restored."""
    if isinstance(template, tuple) and isinstance(value, list):
        return tuple(_like(v, t) for v, t in zip(value, template))
    return value


def dense_state(module: torch.nn.Module, optimizer: Optional[torch.optim.Optimizer],
                scaler, clock: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of the replica after ``clock`` steps (copies: training goes on)."""
    tensors: dict[str, torch.Tensor] = {}
    for key, value in module.state_dict().items():
        if isinstance(value, torch.Tensor):
            tensors[f"model/{key}"] = value.detach().to("cpu").clone().contiguous()
    meta: dict = {"format": FORMAT, "clock": clock, "optimizer": None}
    if optimizer is not None:
        sd = optimizer.state_dict()
        extra: dict = {}
        for index, entries in sd["state"].items():
            for key, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim/{index}/{key}"] = value.detach().to("cpu").clone().contiguous()
                else:
                    extra.setdefault(str(index), {})[key] = _plain(value, f"optimizer state {key!r}")
        meta["optimizer"] = {"type": type(optimizer).__name__,
                             "param_groups": _plain(sd["param_groups"], "optimizer param_groups"),
                             "state": extra}
    if scaler is not None:
        meta["scaler"] = {"enabled": scaler.enabled, "scale": scaler.scale,
                          "clean_steps": scaler.clean_steps,
                          "skipped_steps": scaler.skipped_steps}
    return tensors, meta


def load_dense(tensors: dict[str, torch.Tensor], meta: dict, module: torch.nn.Module,
               optimizer: Optional[torch.optim.Optimizer], scaler, where: str) -> int:
    """Load a file written by :func:`dense_state` into the live replica; returns its clock."""
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{where} is not a dense replica checkpoint "
                              f"(format {meta.get('format')!r})")
    model = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    own = module.state_dict()
    missing = sorted(set(own) - set(model))
    extra = sorted(set(model) - set(own))
    wrong = [k for k in own if k in model and tuple(own[k].shape) != tuple(model[k].shape)]
    if missing or extra or wrong:
        what = (f"the model has {missing[0]!r}, which the checkpoint lacks" if missing else
                f"the checkpoint has {extra[0]!r}, which the model lacks" if extra else
                f"{wrong[0]!r} is {list(own[wrong[0]].shape)} in the model and "
                f"{list(model[wrong[0]].shape)} in the checkpoint")
        raise CheckpointError(f"--resume: the model does not match {where} ({what}); resume "
                              f"with the same model")
    with torch.no_grad():  # in place: the wrappers hold views of these tensors
        for key, value in own.items():
            value.copy_(model[key].to(value.dtype))
    saved = meta.get("optimizer")
    if optimizer is not None:
        if saved is None or saved.get("type") != type(optimizer).__name__:
            got = saved.get("type") if saved else "none"
            raise CheckpointError(f"--resume: {where} holds {got} optimizer state, this job "
                                  f"uses {type(optimizer).__name__}; resume with the same "
                                  f"optimizer")
        state: dict = {}
        for key, value in tensors.items():
            if key.startswith("optim/"):
                _, index, name = key.split("/", 2)
                state.setdefault(int(index), {})[name] = value
        for index, entries in (saved.get("state") or {}).items():
            state.setdefault(int(index), {}).update(entries)
        live = optimizer.state_dict()["param_groups"]
        groups = saved["param_groups"]
        if len(groups) != len(live):
            raise CheckpointError(f"--resume: {where} has {len(groups)} optimizer parameter "
                                  f"groups, this job {len(live)}")
        groups = [{k: _like(v, g.get(k)) for k, v in saved_g.items()}
                  for saved_g, g in zip(groups, live)]
        try:
            optimizer.load_state_dict({"state": state, "param_groups": groups})
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"--resume: the optimizer state in {where} does not fit "
                                  f"this job's optimizer: {exc}") from None
    sc = meta.get("scaler")
    if scaler is not None and sc is not None and scaler.enabled and sc.get("enabled"):
        scaler.scale = float(sc["scale"])
        scaler.clean_steps = int(sc["clean_steps"])
        scaler.skipped_steps = int(sc["skipped_steps"])
    return int(meta["clock"])


@dataclass(frozen=True)
class DenseCheckpoints:
    """When and how a dense replica checkpoints (the factory fills it in)."""

    #: ``--checkpoint-every``: a checkpoint after every ``every`` steps (0: none).
    every: int = 0
    #: Worker 0 only: write ``(clock, tensors, meta)`` and report it to the coordinator.
    save: Optional[Callable[[int, dict, dict], None]] = None
    #: Asked after each step: has the launcher asked for a checkpoint (SIGINT/SIGTERM)?
    wanted: Callable[[], bool] = lambda: False
    #: Pipeline stages: every this many steps all workers agree (one all-reduce of a flag)
    #: whether any saw the launcher's request, so that every stage saves the same clock
    #: (0: never; allreduce's worker 0 alone decides, every step).
    agree_every: int = 0


def read_dense(url: str, clock: int, manifest: dict, stage: Optional[int] = None):
    """The tensors and metadata of the dense file of the checkpoint at ``clock``: worker
    0's replica, or (``stage``) the file of that pipeline stage."""
    from tessera.ps.checkpoint import CheckpointStore, check_stage_files
    dense = manifest.get("dense")
    if not dense:
        raise CheckpointError(
            f"--resume: the checkpoint at clock {clock} in {url} was written in mode "
            f"{manifest.get('mode')!r}, where the dense parameters are on the servers; resume "
            f"it in that mode (allreduce and hybrid resume their own checkpoints)")
    stages = check_stage_files(dense, url)
    if (stage is not None) != bool(stages) or (stage is not None and stage >= len(stages)):
        have = f"{len(stages)} pipeline stages" if stages else "no pipeline stages"
        raise CheckpointError(f"--resume: the checkpoint at clock {clock} in {url} holds "
                              f"{have}; resume it with --stages {len(stages) or 1}")
    store = CheckpointStore(url)
    f = store.open_shard(clock, DENSE_FILE if stage is None else stages[stage])
    return {k: f.get(k) for k in f.keys()}, f.meta, f.path
