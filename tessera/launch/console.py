"""What the launcher shows a person: a progress bar while training, a table at the end."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tessera.config.schema import JobConfig

_console = Console(stderr=False)
_err = Console(stderr=True)


class ProgressView:
    """Follows ``metrics.jsonl`` (written by worker 0) and draws step, loss, samples/s,
    and the rest of each record (evaluation, or a script's own ``tessera.log`` values)."""

    def __init__(self, run_dir: Path, cfg: JobConfig):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.cfg = cfg
        self._offset = 0
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[rate]} samples/s"),
            TextColumn("{task.fields[more]}"), TimeElapsedColumn(), console=_console,
            transient=False)
        self._task = None

    def start(self) -> None:
        cl = self.cfg.cluster
        _console.print(f"[bold]tessera[/] {self.cfg.name}: {cl.workers} workers, {cl.servers} "
                       f"servers, mode {self.cfg.ps.mode}; run directory {self.path.parent}")
        self._progress.start()
        self._task = self._progress.add_task("starting cluster", total=None, loss="-", rate="-",
                                             more="")

    def update(self) -> None:
        if self._task is None or not self.path.exists():
            return
        with open(self.path) as f:
            f.seek(self._offset)
            chunk = f.read()
        if not chunk.endswith("\n"):
            chunk = chunk[:chunk.rfind("\n") + 1]
        self._offset += len(chunk.encode())
        for line in chunk.splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
                continue
            self._progress.update(self._task, description="training", completed=rec["step"],
                                  total=self._total(), **_fields(rec))

    def _total(self):
        if self.cfg.train.steps:
            return self.cfg.train.steps
        try:  # worker 0 writes the step count it derived from the epochs
            return json.loads((self.path.parent / "plan.json").read_text())["steps"]
        except (OSError, ValueError, KeyError):
            return None

    def stop(self) -> None:
        if self._task is not None:
            self._progress.stop()
            self._task = None


def _number(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def _fields(rec: dict) -> dict:
    """The bar's columns from one metrics record: loss, samples/s, and up to three more
    values (``eval_accuracy`` first), whatever the script logged."""
    rest = [(k, v) for k, v in rec.items()
            if k not in ("step", "loss", "samples_per_s", "wall_s", "time")  # time: unix s
            and isinstance(v, (int, float)) and not isinstance(v, bool)]
    rest.sort(key=lambda kv: kv[0] != "eval_accuracy")
    more = "  ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in rest[:3])
    return dict(loss=_number(rec.get("loss"), ".4f"), rate=_number(rec.get("samples_per_s"), ".0f"),
                more=more)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def print_summary(summary: dict, run_dir: Path, quiet: bool = False) -> None:
    if quiet:
        return
    table = Table(title=f"tessera run finished: {run_dir}")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key in ("eval_accuracy", "eval_loss"):
        if key in summary:
            table.add_row(key, f"{summary[key]:.4f}")
    table.add_row("steps", str(summary.get("steps")))
    table.add_row("wall time", f"{summary.get('wall_s', 0):.1f} s")
    table.add_row("throughput", f"{summary.get('samples_per_s', 0):.0f} samples/s")
    table.add_row("bytes pushed", _human_bytes(summary.get("bytes_pushed", 0)))
    table.add_row("bytes pulled", _human_bytes(summary.get("bytes_pulled", 0)))
    table.add_row("mode", f"{summary.get('mode')} ({summary.get('workers')} workers, "
                          f"{summary.get('servers')} servers)")
    _console.print(table)


def print_failure(message: str, run_dir: Path) -> None:
    _err.print(f"tessera: job failed: {message}\n(logs: {run_dir / 'logs'})",
               highlight=False, markup=False)
