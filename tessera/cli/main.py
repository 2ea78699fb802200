"""``tessera``: the command line (DESIGN.md, "Contracts").

    tessera run JOB.toml [--workers N] [--servers M] [--mode sync|async] ...
    tessera launch [--workers N] [--servers M] [--mode ...] SCRIPT.py [ARGS...]
    tessera node JOB.toml --coordinator HOST:PORT --nodes N --node-rank K [--host ADDR] ...

A bad file or flag exits with code 2 and one line naming the field and what is
allowed; a failed job exits non-zero naming the process that failed.
"""

from __future__ import annotations

import sys

import click

from tessera.config import ConfigError, load_config


def _run_flags(fn):
    options = [
        click.option("--workers", type=int, help="Worker processes (cluster.workers)."),
        click.option("--servers", type=int, help="Parameter server processes (cluster.servers)."),
        click.option("--mode", type=str, help="sync | async | ssp | hybrid | allreduce (ps.mode)."),
        click.option("--staleness", type=int,
                     help="ssp: clocks a worker may run ahead of the slowest (ps.staleness)."),
        click.option("--batch-size", "batch_size", type=int,
                     help="Samples per worker per step (data.batch_size)."),
        click.option("--steps", type=int, help="Training steps (train.steps)."),
        click.option("--epochs", type=int, help="Passes over the data when --steps is unset."),
        click.option("--seed", type=int, help="Seed of model init and data order (train.seed)."),
        click.option("--out", type=str, help="Run directory (default runs/<job>-<time>)."),
        click.option("--partition-mb", "partition_mb", type=float,
                     help="Partition size in MiB (ps.partition_mb)."),
        click.option("--precision", type=str, help="fp32 | bf16 | fp16 (precision)."),
        click.option("--profile", is_flag=True, default=None,
                     help="Record spans on every process; write trace.json and report.md."),
        click.option("--stages", type=int, help="Pipeline stages P (pipeline.stages)."),
        click.option("--microbatches", type=int, help="Micro-batches per batch."),
        click.option("--schedule", type=str, help="gpipe | 1f1b (pipeline.schedule)."),
        click.option("--checkpoint-every", "checkpoint_every", type=int,
                     help="Checkpoint the servers every N steps (checkpoint.every)."),
        click.option("--checkpoint-dir", "checkpoint_dir", type=str,
                     help="Where checkpoints go: a path or fsspec URL (checkpoint.dir)."),
        click.option("--resume", type=str,
                     help="Continue from the last complete checkpoint of this run directory."),
        click.option("--max-restarts", "max_restarts", type=int,
                     help="Restart a dead worker up to R times (cluster.max_restarts)."),
        click.option("--replication", type=int,
                     help="Copies of each partition: 1, or 2 for a backup (ps.replication)."),
        click.option("--encrypt", is_flag=True, default=None,
                     help="CURVE-encrypt every connection (cluster.encrypt)."),
        click.option("--backend", type=str, help="local | ray (cluster.backend)."),
        click.option("--address", type=str, help="Ray cluster address (cluster.address)."),
        click.option("--host", type=str,
                     help="Address servers and coordinator bind to (cluster.host)."),
        click.option("--quiet", is_flag=True, help="No progress bar or table."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _overrides(kwargs) -> dict:
    return {"--workers": kwargs["workers"], "--servers": kwargs["servers"],
            "--mode": kwargs["mode"], "--staleness": kwargs["staleness"], "--batch-size": kwargs["batch_size"],
            "--steps": kwargs["steps"], "--epochs": kwargs["epochs"], "--seed": kwargs["seed"],
            "--out": kwargs["out"], "--partition-mb": kwargs["partition_mb"],
            "--precision": kwargs["precision"], "--profile": kwargs["profile"],
            "--stages": kwargs["stages"], "--microbatches": kwargs["microbatches"],
            "--schedule": kwargs["schedule"], "--checkpoint-every": kwargs["checkpoint_every"],
            "--checkpoint-dir": kwargs["checkpoint_dir"], "--resume": kwargs["resume"],
            "--max-restarts": kwargs["max_restarts"], "--replication": kwargs["replication"],
            "--encrypt": kwargs["encrypt"], "--backend": kwargs["backend"],
            "--address": kwargs["address"], "--host": kwargs["host"]}


def _load(job, kwargs):
    from tessera.data.location import DataError, check_data_location
    from tessera.ps.checkpoint import CheckpointError, find_resume
    try:
        cfg = load_config(job, _overrides(kwargs))
        check_data_location(cfg.data)
        if cfg.resume:
            store, _ = find_resume(cfg.resume)
            cfg.resume = store.url  # the checkpoint location itself, found once
    except (ConfigError, DataError, CheckpointError) as exc:
        click.echo(f"tessera: {exc}", err=True)
        sys.exit(2)
    return cfg


def _launcher_class(cfg):
    """The local launcher, or the Ray one for ``--backend ray`` (needs ``tessera[ray]``)."""
    if cfg.cluster.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            click.echo("tessera: --backend ray needs Ray: pip install 'tessera[ray]'", err=True)
            sys.exit(2)
        from tessera.cluster.ray_backend import RayLauncher
        return RayLauncher
    from tessera.cluster.launcher import Launcher
    return Launcher


@click.group()
@click.version_option(package_name="tessera")
def cli() -> None:
    """Distributed training for PyTorch on sharded parameter servers."""


@cli.command()
@click.argument("job", type=str)
@click.option("--in-process", "in_process", is_flag=True,
              help="Run it all in this process (1 worker here, coordinator and 1 server as "
                   "threads): to debug, e.g. under pdb.")
@_run_flags
def run(job: str, in_process: bool, **kwargs) -> None:
    """Train the job described by the TOML file JOB on a local cluster."""
    cfg = _load(job, kwargs)
    if in_process:
        from tessera.cluster.inprocess import run_trainer
        sys.exit(run_trainer(cfg, quiet=kwargs["quiet"]))
    sys.exit(_launcher_class(cfg)(cfg, quiet=kwargs["quiet"]).run())


@cli.command(context_settings=dict(ignore_unknown_options=True, allow_interspersed_args=False))
@click.option("--job", type=str, default=None, help="Optional TOML job file for the cluster.")
@_run_flags
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def launch(job, script, script_args, **kwargs) -> None:
    """Run your own SCRIPT as every worker of a local cluster (see README)."""
    cfg = _load(job, kwargs)
    cmd = [sys.executable, script, *script_args]
    sys.exit(_launcher_class(cfg)(cfg, worker_cmd=cmd, quiet=kwargs["quiet"]).run())


@cli.command()
@click.argument("job", type=str)
@click.option("--coordinator", type=str, default=None,
              help="HOST:PORT of the coordinator, which node 0 runs (env TESSERA_COORDINATOR, "
                   "or MASTER_ADDR and MASTER_PORT).")
@click.option("--nodes", type=int, default=None,
              help="Nodes in the job (env NNODES, SLURM_NNODES, WORLD_SIZE).")
@click.option("--node-rank", "node_rank", type=int, default=None,
              help="This node's index, 0..N-1 (env NODE_RANK, SLURM_NODEID, "
                   "JOB_COMPLETION_INDEX, GROUP_RANK).")
@click.option("--secret-file", "secret_file", type=str, default=None,
              help="File holding the job's secret (else env TESSERA_SECRET); same on every node.")
@_run_flags
def node(job: str, coordinator, nodes, node_rank, secret_file, **kwargs) -> None:
    """Run this machine's share of JOB spread over many machines: the same command on
    every node; node 0 also runs the coordinator at --coordinator."""
    import os

    from tessera.cluster.node import NodeLauncher, NodeSettingError, node_settings
    cfg = _load(job, kwargs)
    try:
        settings = node_settings(cfg, coordinator=coordinator, nodes=nodes, node_rank=node_rank,
                                 host=kwargs["host"], secret_file=secret_file, env=os.environ)
    except NodeSettingError as exc:
        click.echo(f"tessera: {exc}", err=True)
        sys.exit(2)
    for warning in settings.warnings:
        click.echo(f"tessera: warning: {warning}", err=True)
    sys.exit(NodeLauncher(cfg, settings, quiet=kwargs["quiet"]).run())


@cli.command()
@click.argument("run_dir", type=str)
def report(run_dir: str) -> None:
    """Show where each step's time went in a run made with --profile."""
    from pathlib import Path

    from rich.console import Console
    from rich.table import Table

    from tessera.profiler.report import write_report
    from tessera.profiler.trace import load_profiles

    path = Path(run_dir)
    docs = load_profiles(path) if path.is_dir() else []
    if not docs:
        click.echo(f"tessera: {run_dir!r} holds no profile; run the job with --profile "
                   f"(profile/*.json is written there)", err=True)
        sys.exit(2)
    rep = write_report(path, docs)
    console = Console()
    table = Table(title=f"ms per step ({path})")
    for col in ("worker", "step", "data", "forward", "backward", "optimizer", "communication",
                "waiting", "overlap", "vs others"):
        table.add_column(col, justify="right")
    for w in rep["workers"]:
        table.add_row(str(w["rank"]), *(f"{w[k]:.2f}" for k in (
            "step_ms", "data_ms", "forward_ms", "backward_ms", "optimizer_ms",
            "communication_ms", "waiting_ms")), f"{w['overlap']:.0%}", f"{w['straggler_ratio']:.2f}x")
    console.print(table)
    servers = Table(title="servers by load")
    for col in ("server", "MB received", "share", "queue ms", "optimizer ms", "hottest partition"):
        servers.add_column(col, justify="right")
    for s in rep["servers"]:
        hot = s["hot_partitions"][0]["id"] if s["hot_partitions"] else "-"
        servers.add_row(str(s["rank"]), f"{s['bytes'] / 1e6:.1f}", f"{s['bytes_share']:.0%}",
                        f"{s['queue_ms']:.1f}", f"{s['apply_ms']:.1f}", f"p{hot}")
    console.print(servers)
    console.print(f"[bold]Bottleneck:[/] {rep['bottleneck']}")
    console.print(f"Details: {path / 'report.md'}, {path / 'report.html'}, {path / 'trace.json'}")


def main() -> None:
    cli(prog_name="tessera")


if __name__ == "__main__":
    main()
