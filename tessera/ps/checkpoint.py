"""Checkpoints: each server's state as safetensors, and a JSON manifest written last.

Layout of a checkpoint location (a local/NFS path or any fsspec URL)::

    clock-00000020/server-0.safetensors   partitions and tables server 0 owned at clock 20
    clock-00000020/server-1.safetensors
    clock-00000020/manifest.json          written last, atomically: the checkpoint is complete

A server file holds, per partition ``p``: ``p<id>/values`` (fp32 master) and
``p<id>/state/<name>`` (the torch.optim state: momentum_buffer, exp_avg, step ...);
per table ``t``: ``t/<name>/<tensor>`` (see ``EmbeddingShard.export_state``). Its
safetensors metadata says which elements each partition covers. Only tensors are
stored, so loading executes nothing (no pickle anywhere).

The manifest (written by the coordinator once every server reported its file)
holds the shard map, the clock, the config, the layout and each worker's data
position. Resuming with another server count re-cuts the flat vector: a new
partition reads its elements from whichever saved partitions cover them.

This module imports torch and safetensors only inside the functions that need
them: the coordinator writes manifests without importing torch.
"""

from __future__ import annotations

import json
import posixpath
import re
import time
from pathlib import Path
from typing import Optional

import fsspec

from tessera.errors import TesseraError

_CLOCK_DIR = re.compile(r"^clock-(\d{8})$")
MANIFEST = "manifest.json"
#: The only names a server's checkpoint file may have: a plain file name, never a path.
SHARD_NAME = re.compile(r"server-\d{1,6}\.safetensors")
#: Worker 0's file of a checkpoint in allreduce/hybrid mode (the dense replica, see
#: :mod:`tessera.parallel.dense_checkpoint`); the manifest names it under ``dense``.
DENSE_FILE = "worker-0.safetensors"
#: Pipeline stage ``s``'s file (replica 0's stage-``s`` worker, rank ``s``, writes it):
#: ``worker-<s>.safetensors``; stage 0's is :data:`DENSE_FILE`. The manifest lists them
#: under ``dense.stages``, in stage order.
STAGE_NAME = re.compile(r"worker-\d{1,6}\.safetensors")


def stage_file(stage: int) -> str:
    """The checkpoint file of pipeline stage ``stage`` (stage 0's is :data:`DENSE_FILE`)."""
    return f"worker-{stage}.safetensors"


class CheckpointError(TesseraError):
    """A checkpoint that cannot be read or written; the message names it."""


def write_cursor(url: str, clock: int, worker: int, cursor: dict) -> None:
    """A worker's data position after ``clock`` steps, beside that clock's checkpoint
    (``cursors/clock-<C>/worker-<rank>.json``): what ``tessera.DistributedSampler``
    continues from on ``--resume``."""
    fs, root = fsspec.core.url_to_fs(url)
    where = f"{root.rstrip('/')}/cursors/clock-{clock:08d}"
    fs.makedirs(where, exist_ok=True)
    with fs.open(f"{where}/worker-{worker}.json", "w") as f:
        f.write(json.dumps(cursor))


def read_cursors(url: str, clock: int) -> list[dict]:
    """Every worker's data position saved at ``clock`` (empty if none was)."""
    fs, root = fsspec.core.url_to_fs(url)
    where = f"{root.rstrip('/')}/cursors/clock-{clock:08d}"
    try:
        names = sorted(fs.ls(where, detail=False))
    except (FileNotFoundError, OSError):
        return []
    out = []
    for name in names:
        if name.rsplit("/", 1)[-1].startswith("worker-") and name.endswith(".json"):
            with fs.open(name, "r") as f:
                out.append(json.loads(f.read()))
    return out


def check_shard_name(name, where: str) -> str:
    """``name`` if it is a server file's plain name (``server-<rank>.safetensors``); else
    CheckpointError naming ``where`` it came from. A name from a manifest or a server's
    report is joined into a path: ``../x`` or ``/x`` would read or write outside the
    checkpoint, so nothing else is accepted."""
    if not isinstance(name, str) or not (SHARD_NAME.fullmatch(name)
                                         or STAGE_NAME.fullmatch(name)):
        raise CheckpointError(f"{where}: checkpoint file name {name!r} is not a server file's "
                              f"plain name (server-<rank>.safetensors, or "
                              f"worker-<stage>.safetensors for worker 0's dense replica or a "
                              f"pipeline stage); refusing to use it "
                              f"(the manifest was altered or damaged)")
    return name


def check_stage_files(dense: dict, where: str) -> list[str]:
    """The stage files a pipeline checkpoint's ``dense.stages`` names, each checked to be
    exactly ``worker-<s>.safetensors`` for stage ``s`` ([] when it is not a pipeline's)."""
    stages = dense.get("stages")
    if stages is None:
        return []
    if not isinstance(stages, list) or not stages:
        raise CheckpointError(f"{where}: the checkpoint manifest's pipeline stage table is "
                              f"not a list of files")
    names = []
    for s, entry in enumerate(stages):
        name = entry.get("file") if isinstance(entry, dict) else None
        if name != stage_file(s):
            raise CheckpointError(f"{where}: the checkpoint manifest names {name!r} for "
                                  f"pipeline stage {s}, not its plain name {stage_file(s)!r}; "
                                  f"refusing to use it (the manifest was altered or damaged)")
        names.append(name)
    return names


def check_manifest(manifest, where: str) -> dict:
    """A manifest whose clock, server count and file names are what this module wrote;
    CheckpointError (one line naming ``where``) otherwise."""
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{where}: the checkpoint manifest is not a JSON object")
    clock, servers, files = (manifest.get(k) for k in ("clock", "servers", "files"))
    if not isinstance(clock, int) or isinstance(clock, bool) or clock < 0:
        raise CheckpointError(f"{where}: the checkpoint manifest's clock {clock!r} is not a "
                              f"count of steps")
    dense = manifest.get("dense")
    least = 0 if dense is not None else 1  # allreduce: worker 0's file alone, no servers
    if not isinstance(servers, int) or isinstance(servers, bool) or not least <= servers < 10**6:
        raise CheckpointError(f"{where}: the checkpoint manifest's server count {servers!r} "
                              f"is not a {'count' if least == 0 else 'positive number'}")
    if not isinstance(files, dict):
        raise CheckpointError(f"{where}: the checkpoint manifest has no file table")
    for rank, name in files.items():
        check_shard_name(name, f"{where} (server {rank})")
    if dense is not None:
        if not isinstance(dense, dict) or dense.get("file") != DENSE_FILE:
            raise CheckpointError(f"{where}: the checkpoint manifest's dense file must be "
                                  f"{DENSE_FILE}, got {dense!r}")
        check_stage_files(dense, where)
    return manifest


def check_stages(manifest: dict, stages: int, where: str) -> None:
    """CheckpointError (one line naming ``where``) when a dense checkpoint was written with
    another pipeline stage count than ``stages`` (1: no pipeline): each stage's file holds
    that stage's parameters and optimizer state, cut as the run cut the model."""
    dense = manifest.get("dense")
    if not isinstance(dense, dict):
        return  # the servers hold the model: the mode check names what to do
    saved = len(check_stage_files(dense, where)) or 1
    if saved != max(1, stages):
        held = f"{saved} pipeline stages" if saved > 1 else "a model without pipeline stages"
        raise CheckpointError(f"{where}: the checkpoint holds {held}; resume it with "
                              f"--stages {saved} (this job has --stages {max(1, stages)})")


def checkpoint_url(cfg, run_dir) -> str:
    """Where this job's checkpoints go: ``checkpoint.dir`` or ``<run dir>/checkpoints``."""
    return cfg.checkpoint.dir or str(Path(run_dir) / "checkpoints")


class CheckpointStore:
    def __init__(self, url: str, *, delta_every: int = 0):
        self.url = url
        #: ``[checkpoint] delta_every``: a server's snapshots between two full ones hold
        #: only the table rows touched since its previous snapshot (0: always full).
        self.delta_every = delta_every
        try:
            self.fs, self.root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:
            raise CheckpointError(f"checkpoint location {url!r}: {exc}") from None
        self.root = self.root.rstrip("/") or "/"

    def dir_of(self, clock: int) -> str:
        return posixpath.join(self.root, f"clock-{clock:08d}")

    def url_of(self, clock: int) -> str:
        """The checkpoint's directory as a URL another process can open."""
        return self.fs.unstrip_protocol(self.dir_of(clock)) if _has_protocol(self.url) \
            else self.dir_of(clock)

    # ----------------------------------------------------------------- write

    def write_shard(self, clock: int, rank: int, tensors: dict, meta: dict) -> tuple[str, int]:
        return self.write_file(clock, f"server-{rank}.safetensors", tensors, meta)

    def write_file(self, clock: int, name: str, tensors: dict, meta: dict) -> tuple[str, int]:
        """One safetensors file of the checkpoint at ``clock`` (``meta``: JSON metadata)."""
        from safetensors.torch import save
        data = save(tensors, metadata={"tessera": json.dumps(meta)})
        directory = self.dir_of(clock)
        self.fs.makedirs(directory, exist_ok=True)
        with self.fs.open(posixpath.join(directory, name), "wb") as f:
            f.write(data)
        return name, len(data)

    def write_manifest(self, clock: int, manifest: dict) -> str:
        """Write the manifest atomically (a temporary name, then a rename)."""
        directory = self.dir_of(clock)
        final = posixpath.join(directory, MANIFEST)
        tmp = posixpath.join(directory, f".{MANIFEST}.tmp{time.monotonic_ns()}")
        with self.fs.open(tmp, "w") as f:
            f.write(json.dumps(manifest, indent=2))
        self.fs.mv(tmp, final)
        return final

    # ------------------------------------------------------------------ read

    def clocks(self) -> tuple[list[int], list[int]]:
        """(complete clocks, incomplete clocks), each ascending."""
        try:
            entries = self.fs.ls(self.root, detail=False) if self.fs.exists(self.root) else []
        except (FileNotFoundError, NotADirectoryError):
            entries = []
        complete, incomplete = [], []
        for entry in entries:
            m = _CLOCK_DIR.match(posixpath.basename(entry.rstrip("/")))
            if not m:
                continue
            clock = int(m.group(1))
            has = self.fs.exists(posixpath.join(self.dir_of(clock), MANIFEST))
            (complete if has else incomplete).append(clock)
        return sorted(complete), sorted(incomplete)

    def manifest(self, clock: int) -> dict:
        path = posixpath.join(self.dir_of(clock), MANIFEST)
        try:
            with self.fs.open(path, "r") as f:
                return json.loads(f.read())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint manifest {path!r} cannot be read: {exc}") from None

    def latest(self) -> Optional[dict]:
        complete, _ = self.clocks()
        return self.manifest(complete[-1]) if complete else None

    def has_manifest(self, clock: int) -> bool:
        """Whether the checkpoint at ``clock`` is complete."""
        try:
            return bool(self.fs.exists(posixpath.join(self.dir_of(clock), MANIFEST)))
        except OSError:
            return False

    def read_meta(self, clock: int, name: str) -> dict:
        """The Tessera metadata of one file of the checkpoint at ``clock``, from its
        safetensors header alone (a few KiB read, whatever the file's size)."""
        import struct
        check_shard_name(name, self.url_of(clock))
        path = posixpath.join(self.dir_of(clock), name)
        try:
            with self.fs.open(path, "rb") as f:
                n = struct.unpack("<Q", f.read(8))[0]
                header = json.loads(f.read(n))
            return json.loads((header.get("__metadata__") or {}).get("tessera", "{}"))
        except (OSError, ValueError, struct.error) as exc:
            raise CheckpointError(f"checkpoint file {path!r} cannot be read: {exc}") from None

    def chain(self, clock: int) -> list[int]:
        """The older checkpoints the one at ``clock`` needs (its delta chain, oldest
        first; [] for a full checkpoint), from its manifest."""
        delta = self.manifest(clock).get("delta") or {}
        return sorted(int(c) for c in delta.get("chain", []))

    def prune(self, keep: int) -> None:
        """Keep the newest ``keep`` complete checkpoints and every checkpoint their delta
        chains need (each delta's base and the deltas between); drop the other complete
        ones and any incomplete one older than the newest complete."""
        complete, incomplete = self.clocks()
        if not complete:
            return
        kept = set(complete[-keep:])
        for clock in complete[-keep:]:
            try:
                kept.update(self.chain(clock))
            except CheckpointError:
                return  # unreadable: delete nothing rather than a chain's base
        doomed = [c for c in complete if c not in kept] + \
            [c for c in incomplete if c < complete[-1]]
        for clock in doomed:
            try:
                self.fs.rm(self.dir_of(clock), recursive=True)
            except FileNotFoundError:
                pass

    def open_shard(self, clock: int, name: str) -> "ShardFile":
        check_shard_name(name, self.url_of(clock))
        return ShardFile(self, posixpath.join(self.dir_of(clock), name))


def _has_protocol(url: str) -> bool:
    return "://" in url


class ShardFile:
    """One server's safetensors file, read by slices (lazily when it is local)."""

    def __init__(self, store: CheckpointStore, path: str):
        from safetensors import safe_open
        from safetensors.torch import load

        from tessera.data.location import is_local
        self.path = path
        try:
            if is_local(store.fs):
                self._file = safe_open(path, framework="pt")
                self._tensors = None
                meta = self._file.metadata() or {}
            else:
                with store.fs.open(path, "rb") as f:
                    data = f.read()
                self._file = None
                self._tensors = load(data)
                meta = _metadata_of(data)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint file {path!r} cannot be read: {exc}") from None
        try:
            self.meta = json.loads(meta.get("tessera", "{}"))
        except ValueError:
            raise CheckpointError(f"checkpoint file {path!r} has no Tessera metadata") from None

    def keys(self) -> list[str]:
        return list(self._file.keys()) if self._file is not None else list(self._tensors)

    def get(self, name: str, lo: Optional[int] = None, hi: Optional[int] = None):
        if self._file is not None:
            if lo is None:
                return self._file.get_tensor(name)
            return self._file.get_slice(name)[lo:hi]
        t = self._tensors[name]
        return t if lo is None else t[lo:hi]


def _metadata_of(data: bytes) -> dict:
    import struct
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    return header.get("__metadata__", {}) or {}


# --------------------------------------------------------------- server side


def partition_tensors(pid: int, rule) -> dict:
    """A partition's master and optimizer state, copied (the master moves on)."""
    out = {f"p{pid}/values": rule.master.detach().clone()}
    for key, value in rule.state_tensors().items():
        out[f"p{pid}/state/{key}"] = value.detach().clone().contiguous()
    return out


def read_partition(store: CheckpointStore, restore, files: dict, start: int, stop: int):
    """Values and optimizer state of elements [start, stop) of the flat vector from a
    checkpoint, whatever partitions they were saved in. Returns (values, state)."""
    import torch
    pieces, state_pieces, scalars = [], {}, {}
    covered = start
    for old in sorted(restore.partitions, key=lambda p: p.start):
        lo, hi = max(start, old.start), min(stop, old.stop)
        if lo >= hi:
            continue
        if lo != covered:
            raise CheckpointError(f"checkpoint {restore.path!r} does not cover elements "
                                  f"{covered}..{lo} of the parameters")
        name = restore.files[old.server] if old.server < len(restore.files) else ""
        if not name:
            raise CheckpointError(f"checkpoint {restore.path!r} has no file for server "
                                  f"{old.server}, which held partition {old.id}")
        if name not in files:
            files[name] = store.open_shard(restore.clock, name)
        f = files[name]
        a, b = lo - old.start, hi - old.start
        pieces.append(f.get(f"p{old.id}/values", a, b))
        prefix = f"p{old.id}/state/"
        for key in f.keys():
            if not key.startswith(prefix):
                continue
            sub = key[len(prefix):]
            full = f.get(key)
            if full.dim() == 0:  # a per-partition scalar (Adam's step): same everywhere,
                scalars.setdefault(sub, full.clone())  # but for pieces a step skipped:
                full = full.expand(old.stop - old.start)  # (then saved per element)
            state_pieces.setdefault(sub, []).append(full[a:b])
        covered = hi
    if covered != stop:
        raise CheckpointError(f"checkpoint {restore.path!r} does not cover elements "
                              f"{covered}..{stop} of the parameters: was it written for "
                              f"another model?")
    values = torch.cat(pieces).to(torch.float32).contiguous()
    state = {k: torch.cat(v).contiguous() for k, v in state_pieces.items()}
    for key, value in scalars.items():  # one value everywhere: a scalar again
        if key in state and bool((state[key] == value).all()):
            state[key] = value
    return values, state


def read_flat(url: str, clock: Optional[int] = None):
    """The whole flat parameter vector and optimizer state of a checkpoint (for tests
    and tools): returns (manifest, values, {state name: flat tensor})."""
    store = CheckpointStore(url)
    manifest = store.manifest(clock) if clock is not None else store.latest()
    if manifest is None:
        raise CheckpointError(f"no complete checkpoint under {url!r}")
    restore = restore_info(store, manifest)
    total = max((p.stop for p in restore.partitions), default=0)
    values, state = read_partition(store, restore, {}, 0, total)
    return manifest, values, state


def restore_info(store: CheckpointStore, manifest: dict):
    """The :class:`~tessera.transport.wire.Restore` a ClusterView carries for ``manifest``."""
    from tessera.transport import wire
    check_manifest(manifest, store.url)
    servers = manifest["servers"]
    files = [manifest["files"].get(str(r), "") for r in range(servers)]
    data = manifest.get("data", {})
    return wire.Restore(path=store.url, clock=manifest["clock"],
                        partitions=[wire.PartitionInfo(p["id"], p["start"], p["stop"], p["server"])
                                    for p in manifest["partitions"]],
                        files=files, epoch=data.get("epoch", 0), offset=data.get("offset", 0),
                        samples=data.get("samples", 0),
                        global_batch=data.get("workers", 0) * data.get("batch_size", 0))


def find_resume(path: str) -> tuple[CheckpointStore, dict]:
    """The store and latest complete manifest for ``--resume PATH`` (a run directory
    or a checkpoint location). Raises CheckpointError naming what is missing."""
    candidates = [path.rstrip("/") + "/checkpoints", path]
    for url in candidates:
        try:
            store = CheckpointStore(url)
            manifest = store.latest()
        except (CheckpointError, OSError):
            continue
        if manifest is not None:
            return store, check_manifest(manifest, f"--resume {path}")
    raise CheckpointError(f"--resume {path!r}: no complete checkpoint there (looked for "
                          f"clock-*/manifest.json in {path}/checkpoints and in {path}); run "
                          f"with --checkpoint-every N to write some")


# ------------------------------------------------------------ delta checkpoints
#
# A table shard saved as a delta (``[checkpoint] delta_every``) holds, under its usual
# prefix (``t/<table>/`` or ``t/<table>@s<owner>/``), only the rows touched since the
# shard's previous snapshot (``EmbeddingShard.export_touched``), plus ``stored`` (rows
# stored at this clock), for a table that evicts ``all_ids`` (every id stored), and
# ``since`` (0-d int64: the clock of the checkpoint it applies to). The file's metadata lists those clocks under ``delta_of``; the manifest
# names the whole chain under ``delta.chain`` (what pruning keeps). Partitions (the dense
# state) are always saved whole.

#: Row-aligned keys of a table shard's exported state (the rest: ``steps``, ``pending_*``).
_ROW_KEYS = ("ids", "values", "last", "has_state")


def apply_delta(base: dict, delta: dict, where: str = "") -> dict:
    """The export of a table shard at a delta's clock: ``base`` (its export at the
    delta's ``since`` clock, itself resolved) with the rows of ``delta`` put over it and
    the rows dropped since removed. Bit-identical to the export a full snapshot would
    have written at that clock."""
    import numpy as np
    import torch
    touched = delta["ids"].numpy()
    base_ids = base["ids"].numpy()
    keep = ~np.isin(base_ids, touched, assume_unique=True)
    if "all_ids" in delta:  # a table that evicts: the rows dropped since are missing there
        keep &= np.isin(base_ids, delta["all_ids"].numpy(), assume_unique=True)
    kept_ids = base_ids[keep]
    stored = int(delta["stored"].item())
    if len(kept_ids) + len(touched) != stored:
        raise CheckpointError(f"{where}: the delta checkpoint's rows do not add up with its "
                              f"base ({len(kept_ids)} kept + {len(touched)} touched rows, "
                              f"{stored} stored): the chain is damaged")
    order = torch.from_numpy(np.argsort(np.concatenate([kept_ids, touched]), kind="stable"))
    keep_t = torch.from_numpy(keep)
    out = {}
    for key, value in delta.items():
        if key in ("all_ids", "since", "stored"):
            continue
        if key in _ROW_KEYS or key.startswith("state."):
            if key not in base:
                raise CheckpointError(f"{where}: the delta checkpoint holds {key!r} but its "
                                      f"base does not (another optimizer?)")
            out[key] = torch.cat([base[key][keep_t], value])[order].contiguous()
        else:  # the step count and admission counts are saved whole
            out[key] = value
    return out


def _shard_prefixes(keys, table: str) -> list[str]:
    """The table shard prefixes of ``table`` in one file's keys (its own, taken-over)."""
    return sorted({k[:k.index("/", len(f"t/{table}")) + 1] for k in keys
                   if k.startswith(f"t/{table}/") or k.startswith(f"t/{table}@s")})


def _owner_of_prefix(prefix: str, file: str, table: str) -> int:
    """The shard (original owner) a prefix saves: ``t/<table>@s<k>/`` is shard ``k``,
    ``t/<table>/`` the writing server's own (``server-<rank>``)."""
    rest = prefix[len(f"t/{table}"):-1]
    if rest.startswith("@s"):
        return int(rest[2:])
    return int(file.split("-", 1)[1].split(".", 1)[0])


def table_shards(store: CheckpointStore, clock: int, table: str, files: dict | None = None,
                 file_names=None) -> list[dict]:
    """Every saved shard of ``table`` in the checkpoint at ``clock``, each as the
    ``export_state`` dict of that clock: delta shards are resolved through their chain
    (base, then each delta in order). ``files``: open :class:`ShardFile` by clock and
    name (a cache); ``file_names``: the checkpoint's files (default: its manifest's)."""
    files = {} if files is None else files
    if file_names is None:
        manifest = check_manifest(store.manifest(clock), store.url_of(clock))
        file_names = sorted(set(manifest["files"].values()))
    out = []
    for name in [n for n in file_names if n and SHARD_NAME.fullmatch(n)]:
        for owner, prefix in _prefixes_of_file(store, clock, name, table, files):
            out.append(_resolve(store, clock, name, table, owner, prefix, files))
    return out


def _open(store, clock: int, name: str, files: dict) -> "ShardFile":
    if (clock, name) not in files:
        files[(clock, name)] = store.open_shard(clock, name)
    return files[(clock, name)]


def _prefixes_of_file(store, clock: int, name: str, table: str, files: dict):
    """(owner, prefix) of each shard of ``table`` saved in one file."""
    keys = _open(store, clock, name, files).keys()
    return [(_owner_of_prefix(p, name, table), p) for p in _shard_prefixes(keys, table)]


def _resolve(store, clock: int, name: str, table: str, owner: int, prefix: str,
             files: dict) -> dict:
    """The state a shard's prefix saves, its delta chain applied (memoised in ``files``)."""
    memo = ("state", clock, table, owner)
    if memo in files:
        return files[memo]
    f = _open(store, clock, name, files)
    state = {k[len(prefix):]: f.get(k) for k in f.keys() if k.startswith(prefix)}
    if "since" in state:
        since = int(state["since"].item())
        base = _find_shard(store, since, table, owner, files, prefer=name)
        state = apply_delta(base, state, f"{store.url_of(clock)}/{name} table {table!r}")
    files[memo] = state
    return state


def _find_shard(store, clock: int, table: str, owner: int, files: dict,
                prefer: str = "") -> dict:
    """Shard ``owner`` of ``table`` as saved (resolved) in the checkpoint at ``clock``;
    from file ``prefer`` first (the server that wrote the delta saved its base too)."""
    if not store.has_manifest(clock):
        raise CheckpointError(f"{store.url}: a delta checkpoint needs the checkpoint at clock "
                              f"{clock}, which is missing or incomplete (pruned by hand?)")
    manifest = check_manifest(store.manifest(clock), store.url_of(clock))
    names = sorted(set(manifest["files"].values()), key=lambda n: (n != prefer, n))
    for name in names:
        if not SHARD_NAME.fullmatch(name):
            continue
        for got, prefix in _prefixes_of_file(store, clock, name, table, files):
            if got == owner:
                return _resolve(store, clock, name, table, owner, prefix, files)
    raise CheckpointError(f"{store.url_of(clock)}: holds no shard {owner} of table {table!r}, "
                          f"which a later delta checkpoint applies to")
