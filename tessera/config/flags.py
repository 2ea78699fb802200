"""The command line's flags, written once.

Each :class:`Flag` names the option, the config field it overrides (dotted
path into :class:`~tessera.config.schema.JobConfig`), its value type and its
help line. Two readers use this one table:

* the CLI (:mod:`tessera.cli.main`) turns every row into a click option of
  ``tessera run``, ``launch`` and ``node`` (and :data:`NODE_FLAGS` into the
  options only ``tessera node`` has);
* the loader (:mod:`tessera.config.load`) maps a flag to its field when it
  applies overrides, and names the flag in an error about that field
  (``--workers (cluster.workers): ...``), since that is what the user typed.

Allowed values are not repeated here: the schema's ``Literal`` types and
``__post_init__`` checks own them, and the loader's errors quote them.

A flag with ``field=None`` steers the launcher, not the job (``--quiet``, and
``tessera node``'s placement flags).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tessera.config import env as envvars


@dataclass(frozen=True)
class Flag:
    name: str  # "--batch-size"
    field: Optional[str]  # "data.batch_size"; None: an option of the launcher itself
    type: type  # int, float, str, or bool (an on/off switch, unset when absent)
    help: str

    @property
    def dest(self) -> str:
        """The keyword the command receives: ``--batch-size`` -> ``batch_size``."""
        return self.name.removeprefix("--").replace("-", "_")


#: The flags of ``tessera run``, ``launch`` and ``node``, in ``--help`` order.
RUN_FLAGS: tuple[Flag, ...] = (
    Flag("--workers", "cluster.workers", int, "Worker processes (cluster.workers)."),
    Flag("--servers", "cluster.servers", int, "Parameter server processes (cluster.servers)."),
    Flag("--mode", "ps.mode", str, "sync | async | ssp | hybrid | allreduce (ps.mode)."),
    Flag("--staleness", "ps.staleness", int,
         "ssp: clocks a worker may run ahead of the slowest (ps.staleness)."),
    Flag("--batch-size", "data.batch_size", int,
         "Samples per worker per step (data.batch_size)."),
    Flag("--steps", "train.steps", int, "Training steps (train.steps)."),
    Flag("--epochs", "train.epochs", int, "Passes over the data when --steps is unset."),
    Flag("--seed", "train.seed", int, "Seed of model init and data order (train.seed)."),
    Flag("--out", "out", str, "Run directory (default runs/<job>-<time>)."),
    Flag("--partition-mb", "ps.partition_mb", float, "Partition size in MiB (ps.partition_mb)."),
    Flag("--batch-kib", "ps.batch_kib", float,
         "Pushes of smaller partitions go to a server batched, up to this many KiB in one "
         "message (ps.batch_kib; 0: off)."),
    Flag("--rebalance", "ps.rebalance", bool,
         "Move partitions off a server that stays hot (ps.rebalance)."),
    Flag("--precision", "precision", str, "fp32 | bf16 | fp16 (precision)."),
    Flag("--cpu-bf16", "amp.cpu_bf16", str,
         "bf16 on a CPU: auto (bf16 compute where the CPU has bf16 arithmetic, else "
         "fp32 compute with bf16 on the wire) | compute | wire (amp.cpu_bf16)."),
    Flag("--tensorboard", "train.tensorboard", bool,
         "Also write metrics as TensorBoard scalars under <run dir>/tensorboard."),
    Flag("--balance", "train.balance", str,
         "off | speed: split sync batches by worker speed (train.balance)."),
    Flag("--profile", "profile.enabled", bool,
         "Record spans on every process; write trace.json and report.md."),
    Flag("--stages", "pipeline.stages", int, "Pipeline stages P (pipeline.stages)."),
    Flag("--microbatches", "pipeline.microbatches", int, "Micro-batches per batch."),
    Flag("--schedule", "pipeline.schedule", str, "gpipe | 1f1b (pipeline.schedule)."),
    Flag("--checkpoint-every", "checkpoint.every", int,
         "Checkpoint the servers every N steps (checkpoint.every)."),
    Flag("--checkpoint-dir", "checkpoint.dir", str,
         "Where checkpoints go: a path or fsspec URL (checkpoint.dir)."),
    Flag("--resume", "resume", str,
         "Continue from the last complete checkpoint of this run directory."),
    Flag("--max-restarts", "cluster.max_restarts", int,
         "Restart a dead worker up to R times (cluster.max_restarts)."),
    Flag("--replication", "ps.replication", int,
         "Copies of each partition: 1, or 2 for a backup (ps.replication)."),
    Flag("--encrypt", "cluster.encrypt", bool, "CURVE-encrypt every connection (cluster.encrypt)."),
    Flag("--shm", "cluster.shm", str,
         "auto | off: shared memory between a worker and a server on one host (cluster.shm)."),
    Flag("--backend", "cluster.backend", str, "local | ray (cluster.backend)."),
    Flag("--address", "cluster.address", str, "Ray cluster address (cluster.address)."),
    Flag("--host", "cluster.host", str,
         "Address servers and coordinator bind to (cluster.host)."),
    Flag("--quiet", None, bool, "No progress bar or table."),
)

#: The flags only ``tessera node`` has (each also read from launcher variables).
NODE_FLAGS: tuple[Flag, ...] = (
    Flag("--coordinator", None, str,
         f"HOST:PORT of the coordinator, which node 0 runs (env {envvars.COORDINATOR}, "
         f"or {envvars.MASTER_ADDR} and {envvars.MASTER_PORT})."),
    Flag("--nodes", None, int, f"Nodes in the job (env {', '.join(envvars.NODES)})."),
    Flag("--node-rank", None, int,
         f"This node's index, 0..N-1 (env {', '.join(envvars.NODE_RANK)})."),
    Flag("--secret-file", None, str,
         f"File holding the job's secret (else env {envvars.SECRET}); same on every node."),
)

#: Flag -> dotted path of the field it overrides (DESIGN.md contract).
FLAG_FIELDS: dict[str, str] = {f.name: f.field for f in RUN_FLAGS if f.field is not None}


def overrides(values: dict) -> dict:
    """Flag -> value for every config flag, from a command's keywords (``dest`` names)."""
    return {f.name: values[f.dest] for f in RUN_FLAGS if f.field is not None}
