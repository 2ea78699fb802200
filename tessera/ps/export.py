"""A trained model out of a run: one safetensors file a plain PyTorch model loads.

``tessera export RUN_DIR_OR_CHECKPOINT --out model.safetensors`` reads the newest
complete checkpoint (the manifest's layout names every parameter and its shape;
the servers' files hold the flat vector in partitions, cut however the run cut
them; in allreduce and hybrid mode worker 0's file holds the dense replica, and with
pipeline stages each stage's file its part of it) and writes ``{parameter name: tensor}``,
the keys of the model's own
``state_dict()``, so ``model.load_state_dict(safetensors.torch.load_file(path),
strict=False)`` restores it. Embedding tables are written as the rows the run
touched: ``tables.<name>.ids`` (int64, increasing) and ``tables.<name>.rows``
(fp32, one row per id), gathered from every server's shard; a delta checkpoint
(``[checkpoint] delta_every``) is read as its base with each delta applied in order.

At the end of every run worker 0 writes the same format from the live model as
``final.safetensors`` (:func:`tessera.parallel.protocol.DistributedModel.export_state`).
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file

from tessera.ps.checkpoint import (CheckpointError, check_stage_files, find_resume,
                                   read_partition, restore_info, table_shards)


def checkpoint_state(path: str) -> tuple[dict[str, torch.Tensor], dict]:
    """The named tensors of the newest complete checkpoint under ``path``, and its manifest."""
    store, manifest = find_resume(path)
    restore = restore_info(store, manifest)
    total = max((p.stop for p in restore.partitions), default=0)
    files: dict = {}
    values, _ = read_partition(store, restore, files, 0, total) if total else (torch.zeros(0), {})
    out: dict[str, torch.Tensor] = {}
    at = 0
    for spec in manifest.get("layout") or []:
        n = int(spec["numel"])
        if at + n > values.numel():
            raise CheckpointError(f"checkpoint at clock {manifest['clock']}: parameter "
                                  f"{spec['name']!r} ends past the saved vector")
        out[spec["name"]] = values[at:at + n].reshape(spec["shape"]).clone()
        at += n
    if manifest.get("dense"):  # allreduce/hybrid: worker 0's file holds the dense replica
        # Pipeline stages: one file per stage, each under the whole model's keys.
        names = check_stage_files(manifest["dense"], store.url) or [manifest["dense"]["file"]]
        for name in names:
            dense = store.open_shard(restore.clock, name)
            for key in dense.keys():
                if key.startswith("model/"):
                    out[key[len("model/"):]] = dense.get(key).contiguous()
    tables = [t["name"] if isinstance(t, dict) else t for t in manifest.get("tables") or []]
    names = sorted({f for f in restore.files if f})
    for name in tables:
        # Every saved shard (a server's own, any it took over), delta chains applied.
        shards = table_shards(store, restore.clock, name, file_names=names)
        ids = [s["ids"] for s in shards]
        rows = [s["values"] for s in shards]
        if ids:
            all_ids, all_rows = torch.cat(ids), torch.cat(rows)
            order = torch.argsort(all_ids)
            out[f"tables.{name}.ids"] = all_ids[order].contiguous()
            out[f"tables.{name}.rows"] = all_rows[order].contiguous()
    return out, manifest


def export_checkpoint(path: str, out: str) -> tuple[int, int]:
    """Write ``out`` from the newest checkpoint under ``path``; (clock, tensors written)."""
    state, manifest = checkpoint_state(path)
    save_file(state, out, metadata={"clock": str(manifest["clock"]), "source": str(path)})
    return manifest["clock"], len(state)
