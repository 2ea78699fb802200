"""Checkpoint rounds as the coordinator sees them: reports in, manifests out.

A checkpoint at clock ``c`` is complete when every live server has written its
file for ``c`` and told the coordinator (:class:`~tessera.transport.wire.CheckpointSaved`).
Only then is the round's ``manifest.json`` written, last and atomically, so a
reader that finds a manifest finds every file it names; a crash half-way
leaves files without a manifest, which :class:`~tessera.ps.checkpoint.CheckpointStore`
ignores and prunes.

The manifest records what a resumed job needs besides the tensors: the shard
map (a dead primary's partitions point at its backup's file), the model layout
and tables (a resumed model must match), the optimizer, the config, and each
worker's data position. Data positions are derived, not reported: every clock
consumed ``replicas * batch_size`` samples since the cursor this run started
from (:func:`~tessera.data.sampler.advance_cursor`; the replicas are the workers,
or with pipeline stages the ``workers / stages`` pipelines, whose stages share a batch).

The same object answers the resume side at start: which checkpoint
``--resume`` named, whether worker 0's model matches it, and what the servers
restore.

No torch here: the coordinator starts in a fraction of a second.
"""

from __future__ import annotations

import posixpath
import queue
import threading
import time
from pathlib import Path
from typing import Optional

import msgspec

from tessera.config.schema import JobConfig
from tessera.ps.sharding import ShardMap
from tessera.transport import wire

#: Manifests handed to the writer thread and not yet written, at most.
MANIFEST_QUEUE = 4


class CheckpointRounds:
    """Reports per clock, the clocks completed, and the checkpoint a run resumes from."""

    def __init__(self, cfg: JobConfig, run_dir: Path):
        from tessera.ps.checkpoint import CheckpointStore, checkpoint_url, find_resume
        self.cfg = cfg
        self.store = CheckpointStore(checkpoint_url(cfg, run_dir),
                                     delta_every=cfg.checkpoint.delta_every)
        #: clock -> server rank -> (file name, bytes)
        self.reports: dict[int, dict[int, tuple[str, int]]] = {}
        #: clock -> worker rank -> (its dense file, bytes): worker 0's in allreduce/hybrid
        #: mode; with pipeline stages, replica 0's stage s (rank s) writes stage s's.
        self.dense_reports: dict[int, dict[int, tuple[str, int]]] = {}
        #: Clocks whose manifest is written, in order.
        self.completed: list[int] = []
        # The manifest writer thread: (clock, manifest) in, (clock, error) out.
        self._queue: queue.Queue = queue.Queue(maxsize=MANIFEST_QUEUE)
        self._done: queue.Queue = queue.Queue()
        self._inflight: set[int] = set()
        self._retry_at: dict[int, float] = {}
        self._writer: Optional[threading.Thread] = None
        self.resume_manifest: Optional[dict] = None
        self.resume_store = None
        if cfg.resume:
            self.resume_store, self.resume_manifest = find_resume(cfg.resume)
        #: Pipeline stages (1: none); each writes its own file of a round.
        self.stages = max(1, cfg.pipeline.stages)
        # The data cursor at the start of this run: (clock, epoch, offset).
        data = (self.resume_manifest or {}).get("data", {})
        self.cursor0 = ((self.resume_manifest or {}).get("clock", 0), data.get("epoch", 0),
                        data.get("offset", 0))

    # ---------------------------------------------------------------- resume

    def restore(self) -> Optional[wire.Restore]:
        """What the servers load at start (None: a fresh run)."""
        if self.resume_manifest is None:
            return None
        from tessera.ps.checkpoint import restore_info
        return restore_info(self.resume_store, self.resume_manifest)

    @property
    def resumed_from(self) -> Optional[str]:
        if self.resume_manifest is None:
            return None
        return f"{self.resume_store.url} clock {self.resume_manifest['clock']}"

    def mismatch(self, msg: wire.Register) -> str:
        """Why worker 0's model cannot resume from the checkpoint ("" if it can)."""
        m = self.resume_manifest
        if m is None:
            return ""
        if bool(m.get("dense")) != self.dense:
            where, modes = (("in worker 0's file", "allreduce or hybrid") if m.get("dense")
                            else ("on the servers", "sync, async or ssp"))
            return (f"--resume {self.cfg.resume}: the checkpoint was written in mode "
                    f"{m.get('mode')!r}, which keeps the dense parameters {where}; resume "
                    f"it in {modes} mode")
        from tessera.ps.checkpoint import CheckpointError, check_stages
        try:
            check_stages(m, self.stages, f"--resume {self.cfg.resume}")
        except CheckpointError as exc:
            return str(exc)
        saved = [(p["name"], list(p["shape"])) for p in m["layout"]]
        now = [(p.name, list(p.shape)) for p in msg.layout or []]
        if saved != now:
            diff = next(((a, b) for a, b in zip(saved, now) if a != b), None)
            detail = (f"parameter {diff[1][0]!r} {diff[1][1]} where the checkpoint has "
                      f"{diff[0][0]!r} {diff[0][1]}" if diff else
                      f"{len(now)} parameters where the checkpoint has {len(saved)}")
            return (f"--resume {self.cfg.resume}: the model does not match the checkpoint "
                    f"({detail}); resume with the same model")
        saved_tables = {t["name"]: t["dim"] for t in m.get("tables", [])}
        now_tables = {t.name: t.dim for t in msg.tables}
        if saved_tables != now_tables:
            return (f"--resume {self.cfg.resume}: the model's tables {now_tables} do not match "
                    f"the checkpoint's {saved_tables}")
        return ""

    # ---------------------------------------------------------------- rounds

    @property
    def dense(self) -> bool:
        """Whether worker 0 writes the dense replica (allreduce/hybrid: no dense partitions
        on the servers), so that a round is complete only with its file too."""
        return self.cfg.ps.mode in ("allreduce", "hybrid")

    @property
    def on_request(self) -> bool:
        """Whether a checkpoint can be taken when the launcher asks (SIGINT/SIGTERM): the
        servers' (PS modes), worker 0's alone (allreduce), or the pipeline stages' at a
        clock they agree on (every few steps); not in hybrid mode (tables and replica
        would have to agree on a clock first)."""
        cfg = self.cfg
        if cfg.ps.mode == "hybrid":
            return False
        return bool(cfg.cluster.servers) or cfg.ps.mode == "allreduce"

    def report(self, msg: wire.CheckpointSaved) -> str:
        """Record a written file; a refusal (one line) for a report that cannot be right."""
        if msg.role == "worker":
            from tessera.ps.checkpoint import DENSE_FILE, stage_file
            if self.stages > 1:
                if not 0 <= msg.rank < self.stages or msg.file != stage_file(msg.rank):
                    return (f"worker {msg.rank} reported checkpoint file {msg.file!r}: with "
                            f"{self.stages} pipeline stages only workers 0..{self.stages - 1} "
                            f"(replica 0) write one each, worker-<rank>.safetensors")
            elif not self.dense or msg.rank != 0 or msg.file != DENSE_FILE:
                return (f"worker {msg.rank} reported checkpoint file {msg.file!r}: only worker "
                        f"0 writes one ({DENSE_FILE}), in allreduce or hybrid mode")
            self.dense_reports.setdefault(msg.clock, {})[msg.rank] = (msg.file, msg.nbytes)
            self.reports.setdefault(msg.clock, {})
            return ""
        from tessera.ps.checkpoint import CheckpointError, check_shard_name
        try:
            check_shard_name(msg.file, f"server {msg.rank}'s report of its checkpoint at "
                                       f"clock {msg.clock}")
        except CheckpointError as exc:  # never written into a manifest
            print(f"coordinator: {exc}", flush=True)
            return ""
        self.reports.setdefault(msg.clock, {})[msg.rank] = (msg.file, msg.nbytes)
        return ""

    def missing_files(self, clock: int, files: dict[int, tuple[str, int]],
                      workers: Optional[dict[int, tuple[str, int]]] = None) -> list[str]:
        """Reported files of ``clock`` that this process does not see in the checkpoint
        location: servers (or pipeline stages) on other nodes wrote somewhere else (a path
        that is not shared)."""
        directory = self.store.dir_of(clock)
        try:
            self.store.fs.invalidate_cache(directory)  # object stores cache listings
            there = {posixpath.basename(p.rstrip("/"))
                     for p in self.store.fs.ls(directory, detail=False)}
        except (FileNotFoundError, OSError):
            there = set()
        return [f"{role} {r}'s {name}" for role, table in (("server", files),
                                                            ("worker", workers or {}))
                for r, (name, _) in sorted(table.items()) if name not in there]

    def complete(self, live: set[int], manifest_of, on_complete, ready=None) -> None:
        """Write the manifest of every clock all ``live`` servers (and, in allreduce/hybrid
        mode, worker 0 with the dense replica) have reported, last. Raises CheckpointError
        (at a later call: the writer thread lists the store) when a reported file is not in
        the checkpoint location.

        ``manifest_of(clock, files)`` builds a manifest; ``on_complete()`` runs after
        each one is written (the coordinator answers who waits for a checkpoint).
        ``ready(clock, files)``, when given, says instead of ``live`` whether the servers'
        files are all there (elastic servers: the files hold every partition).

        The writes (and the pruning after each) happen on a writer thread, so that a
        slow object store never holds up the coordinator's loop (heartbeats, the
        membership): this call hands them over and reports the ones finished since
        the last call. The hand-over queue is bounded (:data:`MANIFEST_QUEUE`); while
        it is full, a round's reports wait here and it is handed over later.
        """
        self._collect(on_complete)
        newest = max(self.completed, default=-1)
        for clock in sorted(self.reports):
            if clock < newest and clock not in self._inflight:
                # Superseded: a newer checkpoint completed first (a server's older write
                # finished later), and pruning removes this one's files. Never written.
                self._forget(clock)
                continue
            got = self.reports[clock]
            enough = ready(clock, got) if ready is not None else live <= set(got)
            if not enough or clock in self.completed or clock in self._inflight \
                    or time.monotonic() < self._retry_at.get(clock, 0.0):
                continue
            if self.dense and len(self.dense_reports.get(clock, {})) < self.stages:
                continue
            try:
                stages = dict(self.dense_reports.get(clock, {})) if self.stages > 1 else None
                self._queue.put_nowait((clock, (dict(got), stages), manifest_of(clock, got)))
            except queue.Full:
                break  # the store is slow: hand it over at a later call
            self._inflight.add(clock)
            self._start_writer()

    def flush(self, timeout_s: float, on_complete) -> None:
        """Wait (at most ``timeout_s``) for the manifests handed over to be written."""
        deadline = time.monotonic() + timeout_s
        while self._inflight and time.monotonic() < deadline:
            time.sleep(0.05)
            self._collect(on_complete)
        if self._inflight:
            print(f"coordinator: checkpoint manifests at clocks {sorted(self._inflight)} were "
                  f"not written to {self.store.url} within {timeout_s:g} s", flush=True)

    def _collect(self, on_complete) -> None:
        while True:
            try:
                clock, error, missing = self._done.get_nowait()
            except queue.Empty:
                return
            self._inflight.discard(clock)
            if missing and clock < max(self.completed, default=-1):
                # Handed over just before a newer round's manifest pruned its files (the
                # store drops an incomplete checkpoint older than the newest complete).
                self._forget(clock)
                continue
            if missing:
                from tessera.ps.checkpoint import CheckpointError
                raise CheckpointError(
                    f"checkpoint at clock {clock}: {', '.join(missing)} reported written but "
                    f"not in {self.store.url_of(clock)} as the coordinator sees it: the "
                    f"checkpoint location must be one every node shares (--checkpoint-dir: "
                    f"a shared filesystem path or an fsspec URL such as s3://bucket/path)")
            if error:  # the reports stay: tried again a little later
                self._retry_at[clock] = time.monotonic() + 5.0
                print(f"coordinator: checkpoint manifest at clock {clock} could not be "
                      f"written to {self.store.url}: {error}", flush=True)
                continue
            print(f"coordinator: checkpoint at clock {clock} complete "
                  f"({self.store.url_of(clock)})", flush=True)
            self.completed.append(clock)
            self._forget(clock)
            on_complete()

    def _forget(self, clock: int) -> None:
        """Drop the reports of a round written, or superseded by a newer one."""
        self.reports.pop(clock, None)
        self.dense_reports.pop(clock, None)

    def _start_writer(self) -> None:
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="manifest-writer",
                                            daemon=True)
            self._writer.start()

    def _write_loop(self) -> None:
        """The writer thread: each round's files checked, its manifest written, then
        pruning, in order; results go back."""
        while True:
            clock, files, manifest = self._queue.get()
            error = ""
            try:
                missing = self.missing_files(clock, *files)  # a listing of the store
                if not missing:
                    manifest = self.with_chain(clock, files[0], manifest)
            except Exception as exc:
                missing, error = [], f"{type(exc).__name__}: {exc}"
            if missing or error:
                self._done.put((clock, error, missing))
                continue
            try:
                self.store.write_manifest(clock, manifest)
            except Exception as exc:  # reported by the coordinator's loop
                error = f"{type(exc).__name__}: {exc}"
            else:
                try:
                    self.store.prune(self.cfg.checkpoint.keep)
                except Exception as exc:  # the checkpoint is complete; older ones stay
                    print(f"coordinator: old checkpoints in {self.store.url} could not be "
                          f"pruned: {type(exc).__name__}: {exc}", flush=True)
            self._done.put((clock, error, []))

    def with_chain(self, clock: int, files: dict[int, tuple[str, int]], manifest: dict) -> dict:
        """``manifest`` with its delta chain (``delta.of``: the checkpoints its servers'
        table deltas apply to; ``delta.chain``: every older checkpoint a resume reads,
        oldest first, which pruning keeps), read from the files' metadata; unchanged for
        a checkpoint of full files. Raises CheckpointError when a delta's checkpoint is
        not complete (a resume could not read it)."""
        if self.store.delta_every < 2:
            return manifest
        from tessera.ps.checkpoint import CheckpointError
        deps: set[int] = set()
        for name, _ in files.values():
            deps.update(int(c) for c in self.store.read_meta(clock, name).get("delta_of", []))
        if not deps:
            return manifest
        chain = set(deps)
        for dep in deps:
            if not self.store.has_manifest(dep):
                raise CheckpointError(f"checkpoint at clock {clock}: its table deltas apply to "
                                      f"the checkpoint at clock {dep}, which is not complete")
            chain.update(self.store.chain(dep))
        return {**manifest, "delta": {"of": sorted(deps), "chain": sorted(chain)}}

    def manifest(self, clock: int, files: dict[int, tuple[str, int]], *, shard_map: ShardMap,
                 layout: list, tables: list, optimizer, samples: int,
                 dead_servers: set[int], owners: Optional[dict] = None) -> dict:
        """The manifest of the checkpoint at ``clock`` (``files``: server -> (name, bytes);
        ``owners``: partition -> the server holding it now, after failovers)."""
        from tessera.data.sampler import advance_cursor
        cfg = self.cfg
        # The data is sharded over the data-parallel replicas: every worker, or (pipeline
        # stages) every pipeline replica, whose stages all take the same batch.
        w, b = cfg.cluster.workers // self.stages, cfg.data.batch_size
        c0, e0, o0 = self.cursor0
        epoch, offset = advance_cursor(e0, o0, clock - c0, w * b, samples)
        owner = {p.id: p.server for p in shard_map.partitions}
        if owners:  # a dead primary's partitions: the file of the server that took over
            owner.update(owners)
        for pid, server in owner.items():
            if server in dead_servers:
                owner[pid] = (server + 1) % cfg.cluster.servers
        dense = {}
        if clock in self.dense_reports:
            got = self.dense_reports[clock]
            name, _ = got[0]
            dense = {"dense": {"file": name, "bytes": sum(n for _, n in got.values())}}
            if self.stages > 1:  # one file per stage, replica 0's (the replicas are equal)
                dense["dense"]["stages"] = [{"file": got[s][0], "bytes": got[s][1]}
                                            for s in range(self.stages)]
        return {
            **dense,
            "format": 1,
            "clock": clock,
            "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "mode": cfg.ps.mode,
            # Elastic servers: ranks started mid-job (tessera scale) hold files too.
            "servers": max([cfg.cluster.servers, *(s + 1 for s in owner.values()),
                            *(r + 1 for r in files)]),
            "files": {str(r): f for r, (f, _) in sorted(files.items())},
            "bytes": sum(n for _, n in files.values()) + dense.get("dense", {}).get("bytes", 0),
            "partitions": [{"id": p.id, "start": p.start, "stop": p.stop, "server": owner[p.id]}
                           for p in shard_map.partitions],
            "layout": [msgspec.to_builtins(p) for p in layout],
            "tables": [msgspec.to_builtins(t) for t in tables],
            "optimizer": msgspec.to_builtins(optimizer),
            "data": {"epoch": epoch, "offset": offset, "samples": samples,
                     "workers": w, "batch_size": b,
                     "positions": [{"worker": r, "epoch": epoch, "offset": offset + r * b}
                                   for r in range(w)]},
            "config": msgspec.to_builtins(cfg),
        }
