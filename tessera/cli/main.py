"""``tessera``: the command line (DESIGN.md, "Contracts").

    tessera run JOB.toml [--workers N] [--servers M] [--mode sync|async] ...
    tessera launch [--workers N] [--servers M] [--mode ...] SCRIPT.py [ARGS...]

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
        click.option("--mode", type=str, help="sync | async (ps.mode)."),
        click.option("--batch-size", "batch_size", type=int,
                     help="Samples per worker per step (data.batch_size)."),
        click.option("--steps", type=int, help="Training steps (train.steps)."),
        click.option("--epochs", type=int, help="Passes over the data when --steps is unset."),
        click.option("--seed", type=int, help="Seed of model init and data order (train.seed)."),
        click.option("--out", type=str, help="Run directory (default runs/<job>-<time>)."),
        click.option("--partition-mb", "partition_mb", type=float,
                     help="Partition size in MiB (ps.partition_mb)."),
        click.option("--precision", type=str, help="fp32 | bf16 | fp16 (precision)."),
        click.option("--quiet", is_flag=True, help="No progress bar or table."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _overrides(kwargs) -> dict:
    return {"--workers": kwargs["workers"], "--servers": kwargs["servers"],
            "--mode": kwargs["mode"], "--batch-size": kwargs["batch_size"],
            "--steps": kwargs["steps"], "--epochs": kwargs["epochs"], "--seed": kwargs["seed"],
            "--out": kwargs["out"], "--partition-mb": kwargs["partition_mb"],
            "--precision": kwargs["precision"]}


def _load(job, kwargs):
    from tessera.data.location import DataError, check_data_location
    try:
        cfg = load_config(job, _overrides(kwargs))
        check_data_location(cfg.data)
    except (ConfigError, DataError) as exc:
        click.echo(f"tessera: {exc}", err=True)
        sys.exit(2)
    return cfg


@click.group()
@click.version_option(package_name="tessera")
def cli() -> None:
    """Distributed training for PyTorch on sharded parameter servers."""


@cli.command()
@click.argument("job", type=str)
@_run_flags
def run(job: str, **kwargs) -> None:
    """Train the job described by the TOML file JOB on a local cluster."""
    cfg = _load(job, kwargs)
    from tessera.cluster.launcher import Launcher
    sys.exit(Launcher(cfg, quiet=kwargs["quiet"]).run())


@cli.command(context_settings=dict(ignore_unknown_options=True, allow_interspersed_args=False))
@click.option("--job", type=str, default=None, help="Optional TOML job file for the cluster.")
@_run_flags
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def launch(job, script, script_args, **kwargs) -> None:
    """Run your own SCRIPT as every worker of a local cluster (see README)."""
    cfg = _load(job, kwargs)
    from tessera.cluster.launcher import Launcher
    cmd = [sys.executable, script, *script_args]
    sys.exit(Launcher(cfg, worker_cmd=cmd, quiet=kwargs["quiet"]).run())


def main() -> None:
    cli(prog_name="tessera")


if __name__ == "__main__":
    main()
