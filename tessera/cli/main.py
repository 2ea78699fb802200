"""``tessera``: the command line (DESIGN.md, "Contracts").

    tessera run JOB.toml [--workers N] [--servers M] [--mode sync|async] ...
    tessera launch [--workers N] [--servers M] [--mode ...] SCRIPT.py [ARGS...]
    tessera node JOB.toml|SCRIPT.py --coordinator HOST:PORT --nodes N --node-rank K [--host ADDR] ...
    tessera export RUN_DIR --out model.safetensors
    tessera stop RUN_DIR        (a [data] follow job: end its stream at the last shard there)
    tessera scale RUN_DIR --servers N   (move a running job's partitions onto N servers)

A bad file or flag exits with code 2 and one line naming the field and what is
allowed; a failed job exits non-zero naming the process that failed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from tessera.config import ConfigError, load_config
from tessera.config.flags import NODE_FLAGS, RUN_FLAGS, Flag, overrides


def _option(flag: Flag):
    """One row of the flag table as a click option."""
    if flag.type is bool:  # a switch: unset (None) leaves the job file's value
        return click.option(flag.name, flag.dest, is_flag=True,
                            default=None if flag.field else False, help=flag.help)
    return click.option(flag.name, flag.dest, type=flag.type, default=None, help=flag.help)


def _flags(table):
    def decorate(fn):
        for flag in reversed(table):
            fn = _option(flag)(fn)
        return fn
    return decorate


_run_flags = _flags(RUN_FLAGS)


def _load(job, kwargs):
    from tessera.data.location import DataError, check_data_location
    from tessera.ps.checkpoint import CheckpointError, check_stages, find_resume
    try:
        cfg = load_config(job, overrides(kwargs))
        check_data_location(cfg.data)
        if cfg.resume:
            store, manifest = find_resume(cfg.resume)
            check_stages(manifest, cfg.pipeline.stages, f"--resume {cfg.resume}")
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
        from tessera.launch.ray_backend import RayLauncher
        return RayLauncher
    from tessera.launch.launcher import Launcher
    return Launcher


def _made(launcher_class, *args, **kwargs):
    """A launcher, or one line and exit 2 when it refuses the job (a UsageError)."""
    from tessera.errors import UsageError
    try:
        return launcher_class(*args, **kwargs)
    except UsageError as exc:
        click.echo(f"tessera: {exc}", err=True)
        sys.exit(2)


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
        from tessera.launch.inprocess import run_trainer
        sys.exit(run_trainer(cfg, quiet=kwargs["quiet"]))
    sys.exit(_made(_launcher_class(cfg), cfg, quiet=kwargs["quiet"]).run())


@cli.command(context_settings=dict(ignore_unknown_options=True, allow_interspersed_args=False))
@click.option("--job", type=str, default=None, help="Optional TOML job file for the cluster.")
@_run_flags
@click.argument("script", type=click.Path(exists=True, dir_okay=False))
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def launch(job, script, script_args, **kwargs) -> None:
    """Run your own SCRIPT as every worker of a local cluster (see README)."""
    cfg = _load(job, kwargs)
    cmd = [sys.executable, script, *script_args]
    sys.exit(_made(_launcher_class(cfg), cfg, worker_cmd=cmd, quiet=kwargs["quiet"]).run())


@cli.command(context_settings=dict(ignore_unknown_options=True))
@click.option("--job", "job_file", type=str, default=None,
              help="With a SCRIPT: an optional TOML job file for the cluster.")
@_flags(NODE_FLAGS)
@_run_flags
@click.argument("job", type=str)
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
def node(job: str, job_file, script_args, coordinator, nodes, node_rank, secret_file,
         **kwargs) -> None:
    """Run this machine's share of a job spread over many machines: the same command on
    every node; node 0 also runs the coordinator at --coordinator. JOB is a TOML job file
    (the built-in trainer), or your own SCRIPT.py, as `tessera launch` runs it; the
    script's own arguments go after `--` (tessera node SCRIPT.py --nodes 2 ... -- --lr 0.1)."""
    from tessera.config.env import process_environ
    from tessera.launch.node import NodeLauncher
    from tessera.launch.node_plan import NodeSettingError, node_settings
    script = job.endswith(".py")
    if script and not Path(job).is_file():
        click.echo(f"tessera: node: script {job!r} does not exist", err=True)
        sys.exit(2)
    if not script and script_args:
        click.echo(f"tessera: node: unexpected arguments {' '.join(script_args)!r} after the "
                   f"job file; only a SCRIPT.py takes arguments", err=True)
        sys.exit(2)
    cfg = _load(job_file if script else job, kwargs)
    try:
        settings = node_settings(cfg, coordinator=coordinator, nodes=nodes, node_rank=node_rank,
                                 host=kwargs["host"], secret_file=secret_file,
                                 env=process_environ())
    except NodeSettingError as exc:
        click.echo(f"tessera: {exc}", err=True)
        sys.exit(2)
    for warning in settings.warnings:
        click.echo(f"tessera: warning: {warning}", err=True)
    worker_cmd = [sys.executable, job, *script_args] if script else None
    sys.exit(_made(NodeLauncher, cfg, settings, worker_cmd=worker_cmd,
                   quiet=kwargs["quiet"]).run())


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
                "waiting", "evaluation", "overlap", "vs others"):
        table.add_column(col, justify="right")
    for w in rep["workers"]:
        table.add_row(str(w["rank"]), *(f"{w[k]:.2f}" for k in (
            "step_ms", "data_ms", "forward_ms", "backward_ms", "optimizer_ms",
            "communication_ms", "waiting_ms", "evaluation_ms")), f"{w['overlap']:.0%}",
            f"{w['straggler_ratio']:.2f}x")
    console.print(table)
    servers = Table(title="servers by load")
    for col in ("server", "MB received", "share", "queue ms", "optimizer ms", "hottest partition"):
        servers.add_column(col, justify="right")
    for s in rep["servers"]:
        hot = s["hot_partitions"][0]["id"] if s["hot_partitions"] else "-"
        servers.add_row(str(s["rank"]), f"{s['bytes'] / 1e6:.1f}", f"{s['bytes_share']:.0%}",
                        f"{s['queue_ms']:.1f}", f"{s['apply_ms']:.1f}", f"p{hot}")
    console.print(servers)
    causes = Table(title="causes, by share of step time")
    for col in ("cause", "ms per step", "share"):
        causes.add_column(col, justify="right")
    for c in rep["causes"]:
        causes.add_row(c["cause"].replace("_", " ") + (f" ({c['who']})" if c["who"] else ""),
                       f"{c['ms']:.2f}", f"{c['share']:.0%}")
    console.print(causes)
    console.print(f"[bold]Bottleneck:[/] {rep['bottleneck']}")
    console.print(f"Details: {path / 'report.md'}, {path / 'report.html'}, {path / 'trace.json'}")


@cli.command()
@click.argument("path", type=str)
@click.option("--out", required=True, type=str, help="The safetensors file to write.")
def export(path: str, out: str) -> None:
    """Write the trained model of a run directory or checkpoint location as one
    safetensors file of state_dict keys (tables: touched rows and their ids)."""
    from tessera.ps.checkpoint import CheckpointError
    from tessera.ps.export import export_checkpoint
    try:
        clock, count = export_checkpoint(path, out)
    except (CheckpointError, OSError) as exc:
        click.echo(f"tessera: export: {exc}", err=True)
        sys.exit(2)
    click.echo(f"tessera: wrote {out}: {count} tensors from the checkpoint at clock {clock}")


@cli.command()
@click.argument("run_dir", type=str)
def stop(run_dir: str) -> None:
    """End the stream a [data] follow job trains on at the last shard there now: the
    job trains it, writes its final checkpoint and exits (writes _END in data.path)."""
    import json
    from tessera.data.location import DataError
    from tessera.data.stream import end_stream
    try:
        data = json.loads((Path(run_dir) / "config.json").read_text())["data"]
    except (OSError, ValueError, KeyError):
        click.echo(f"tessera: stop: {run_dir!r} is not a run directory (no config.json "
                   f"with a data section); give the directory `tessera run` printed", err=True)
        sys.exit(2)
    if not data.get("follow"):
        click.echo(f"tessera: stop: the job in {run_dir} does not follow a stream ([data] "
                   f"follow = false); interrupt `tessera run` (Ctrl-C or SIGTERM) to stop it "
                   f"with a checkpoint", err=True)
        sys.exit(2)
    try:
        last = end_stream(data["path"])
    except (DataError, OSError) as exc:
        click.echo(f"tessera: stop: {exc}", err=True)
        sys.exit(2)
    click.echo(f"tessera: the stream in {data['path']} ends with "
               f"{last or 'the shards there when the job next looks'}; the job trains it, "
               f"writes its final checkpoint and exits")


@cli.command()
@click.argument("run_dir", type=str)
@click.option("--servers", "servers", type=int, required=True,
              help="How many parameter servers serve the job's partitions from now on.")
def scale(run_dir: str, servers: int) -> None:
    """Move a running job's dense partitions live onto SERVERS servers (0..SERVERS-1):
    workers keep training; requests that reach a former owner are re-sent."""
    from tessera.cluster.elastic import request_scale
    path = Path(run_dir)
    if servers < 1:
        click.echo(f"tessera: scale: --servers must be at least 1, got {servers}", err=True)
        sys.exit(2)
    if not (path / "config.json").is_file():
        click.echo(f"tessera: scale: {run_dir!r} is not a run directory (no config.json); "
                   f"give the directory `tessera run` printed", err=True)
        sys.exit(2)
    if (path / "summary.json").is_file() or not (path / "cluster.json").is_file():
        click.echo(f"tessera: scale: the job in {run_dir} is not running "
                   f"({'it has finished' if (path / 'summary.json').is_file() else 'no cluster is up'})",
                   err=True)
        sys.exit(2)
    try:
        ok, message = request_scale(path, servers, timeout_s=15.0)
    except TimeoutError:
        click.echo(f"tessera: scale: the job in {run_dir} is not running (its launcher did "
                   f"not answer within 15 s)", err=True)
        sys.exit(2)
    except OSError as exc:
        click.echo(f"tessera: scale: {exc}", err=True)
        sys.exit(2)
    if not ok:
        click.echo(f"tessera: scale: {message.removeprefix('coordinator: ')}", err=True)
        sys.exit(2)
    click.echo(f"tessera: {message}; the job goes on training")


def main() -> None:
    cli(prog_name="tessera")


if __name__ == "__main__":
    main()
