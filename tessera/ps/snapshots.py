"""A server's side of checkpoints: when to snapshot, copying state, writing in the background.

:mod:`tessera.ps.checkpoint` owns the files (store, shards, manifest); this module
decides *when* a server snapshots and *what* goes in, and restores from a checkpoint.

When: every ``checkpoint_every`` clocks in sync mode, or at the clock worker 0's push
asks for (``Push.checkpoint``: the trainer's rule in async/ssp, or an interrupted
launcher). In sync mode a snapshot at clock ``c`` waits until every partition of this
server has reached ``c``; no partition passes ``c`` before all have reached it, because
a worker pushes ``c + 1`` only after every partition answered its push of ``c``. So
the snapshot is a consistent cut without stopping anyone (the same argument as
Chandy and Lamport's snapshots, with the clock as the marker).

What: each partition's fp32 master and optimizer state, and every table's rows, copied
at that clock in the serve thread (cheap: memory bandwidth), then written by a daemon
thread so that serving goes on while the bytes go to disk or object storage. The serve
loop reports finished writes (``on_checkpoint``) and failures, with the location.
"""

from __future__ import annotations

import threading

from tessera.ps.consistency import Consistency
from tessera.ps.options import ServerHooks, ServerOptions
from tessera.transport import wire


class Snapshots:
    """Checkpoint snapshots of one server's partitions, backups and tables."""

    def __init__(self, options: ServerOptions, hooks: ServerHooks, store, *, tables,
                 parts: dict, backups: dict, policy: Consistency, new_rule, stats: dict):
        self.rank, self.num_servers = options.rank, options.num_servers
        self.store, self.every = store, options.checkpoint_every
        self.on_checkpoint, self.timeout_s = hooks.on_checkpoint, options.timeout_s
        self.policy, self.parts, self.backups, self.tables = policy, parts, backups, tables
        self.new_rule, self.stats = new_rule, stats
        #: The clock a checkpoint is due at (asked by a push or by ``every``).
        self.target = 0
        self.last = -1
        self._writes: list = []
        #: Delta checkpoints: this life's snapshots since the last full one, newest last,
        #: each (clock, its depth: 1 for the full one, then 1 more per delta, per table
        #: shard (name, owner) the clock a delta against it counts touches from: the
        #: shard's clock at that snapshot). A delta applies to the newest of them whose
        #: manifest is written.
        self._bases: list[tuple[int, int, dict]] = []

    def progress(self) -> int:
        """The clock every worker has completed, as far as this server knows."""
        units = [st for st in self.parts.values() if st.rule is not None]
        if self.tables is not None:  # tables are checkpointed at the same clock
            units += self.tables.units()
        return self.policy.progress(units)

    def ask(self, clock: int) -> None:
        """A push asked for a checkpoint at ``clock``."""
        if clock > self.last:
            self.target = max(self.target, clock)

    def maybe(self) -> None:
        if self.store is None:
            return
        periodic = self.policy.sums_clock
        progress = self.progress() if periodic else 0
        if self.every and progress > self.last and progress > 0 and progress % self.every == 0:
            self.target = max(self.target, progress)
        target = self.target
        if target <= 0 or target <= self.last:
            return
        if periodic and progress < target:
            return  # every partition reaches ``target`` before any passes it (see above)
        self.snapshot(target)

    def snapshot(self, clock: int) -> None:
        from tessera.ps.checkpoint import partition_tensors
        self.last = clock
        tensors: dict = {}
        parts = []
        for pid, st in sorted(self.parts.items()):
            if st.rule is None:
                continue
            tensors.update(partition_tensors(pid, st.rule))
            parts.append([pid, st.info.start, st.info.stop])
        tables = []
        base = self._base()
        since_now: dict = {}
        delta_of: set = set()
        if self.tables is not None:
            import torch
            for ts in self.tables.units():
                name = ts.spec.name
                # A shard taken over from a dead server is saved beside this one's own.
                at = f"t/{name}/" if ts.owner == self.rank else f"t/{name}@s{ts.owner}/"
                since = base[2].get((name, ts.owner)) if base else None
                if since is not None:  # only the rows touched since the base snapshot
                    state = ts.shard.export_touched(since)
                    state["since"] = torch.tensor(base[0], dtype=torch.int64)
                    delta_of.add(base[0])
                else:
                    state = ts.shard.export_state()
                for key, value in state.items():
                    tensors[at + key] = value
                since_now[(name, ts.owner)] = min(ts.clock, clock)
                if name not in tables:
                    tables.append(name)
        if not delta_of:
            self._bases = [(clock, 1, since_now)]
        else:
            self._bases.append((clock, base[1] + 1, since_now))
        meta = {"rank": self.rank, "clock": clock, "partitions": parts, "tables": tables,
                "mode": self.policy.name, "delta_of": sorted(delta_of)}
        store, rank = self.store, self.rank
        # The table shards too (as -(k + 1)): where a scaled job's checkpoint finds them.
        shards = sorted({-ts.owner - 1 for ts in self.tables.units()}) \
            if self.tables is not None else []
        result: dict = {"parts": [p[0] for p in parts] + shards}

        def write() -> None:
            try:
                result["file"], result["nbytes"] = store.write_shard(clock, rank, tensors, meta)
            except Exception as exc:  # reported by the serve loop, with the location
                result["error"] = f"{type(exc).__name__}: {exc}"

        thread = threading.Thread(target=write, name=f"checkpoint-{clock}", daemon=True)
        thread.start()
        self._writes.append((thread, (clock, result)))

    def _base(self) -> tuple[int, int, dict] | None:
        """The snapshot this one may save table deltas against, or None for a full one:
        ``delta_every`` asks for deltas, and of this life's snapshots since the last full
        one, the newest whose checkpoint is complete (its manifest written: a delta must
        apply to a checkpoint a resume can read; the newest may still be waiting for its
        manifest), if fewer than ``delta_every - 1`` deltas lead to it."""
        every = getattr(self.store, "delta_every", 0)
        if every < 2:
            return None
        for base in reversed(self._bases):
            if self.store.has_manifest(base[0]):
                return base if base[1] < every else None
        return None

    def finish_writes(self) -> None:
        still = []
        for thread, (clock, result) in self._writes:
            if thread.is_alive():
                still.append((thread, (clock, result)))
                continue
            if "error" in result:
                print(f"server {self.rank}: checkpoint at clock {clock} could not be written to "
                      f"{self.store.url}: {result['error']}", flush=True)
                continue
            self.stats["checkpoints"] += 1
            self.on_checkpoint(clock, result["file"], result["nbytes"], result["parts"])
        self._writes = still

    def final(self) -> None:
        """At the end of a run with checkpoints, save the final state and wait for writes."""
        if self.store is not None and self.every:
            clock = self.progress()
            if clock > self.last and clock > 0:
                self.snapshot(clock)
        for thread, _ in self._writes:
            thread.join(timeout=self.timeout_s * 4)
        self.finish_writes()

    def restore(self, restore: wire.Restore) -> None:
        """Load this server's partitions (however the map cuts them now), backups and
        table rows from a checkpoint."""
        from tessera.ps.checkpoint import CheckpointStore, read_partition
        store = CheckpointStore(restore.path)
        files: dict = {}
        workers = range(self.policy.members.num_workers)
        for st in [*self.parts.values(), *self.backups.values()]:
            values, state = read_partition(store, restore, files, st.info.start, st.info.stop)
            st.rule = self.new_rule(values, st.info)
            st.rule.load_state(state)
            st.clock = restore.clock
            st.counts = {w: restore.clock for w in workers}
        # Into another location, the restored state is this run's first checkpoint;
        # never rewrite the files of the complete checkpoint being read.
        same = self.store is not None and self.store.url == restore.path
        self.last = restore.clock if same else -1
        self.policy.members.worker_clock = {w: restore.clock for w in workers}
        if self.tables is not None:
            self._restore_tables(store, restore, files)

    def _restore_tables(self, store, restore: wire.Restore, files: dict) -> None:
        from tessera.ps.checkpoint import table_shards
        from tessera.ps.embedding_ids import owner_of
        del files  # table_shards opens what it reads, older checkpoints of a delta chain too
        for table in self.tables.tables:
            # Every saved shard (each server's own, any taken over), deltas applied.
            for state in table_shards(store, restore.clock, table,
                                      file_names=sorted({n for n in restore.files if n})):
                self._import_table(table, state, owner_of)
        for ts in [*self.tables.tables.values(), *self.tables.backups.values()]:
            ts.clock = restore.clock
            ts.counts = {w: restore.clock for w in range(self.policy.members.num_workers)}

    def _import_table(self, table: str, state: dict, owner_of) -> None:
        """Rows of one saved shard into this server's shard and backup copy (replication)."""
        owners = owner_of(state["ids"].numpy(), self.num_servers)
        pending = state.get("pending_ids")
        p_owners = owner_of(pending.numpy(), self.num_servers) if pending is not None else None
        targets = [(self.rank, self.tables.tables[table])]
        if table in self.tables.backups:
            targets.append((self.tables.backup_of, self.tables.backups[table]))
        for rank, ts in targets:
            ts.shard.import_state(state, owners == rank,
                                  keep_pending=p_owners == rank if p_owners is not None else None)
