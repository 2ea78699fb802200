"""A run directory: where a job's processes read their config and leave their results.

Every way of running a job (local processes, ``tessera node``, Ray actors, one
process) starts the same way: resolve the directory (``--out``, else
``runs/<job>-<time>``), write the resolved ``config.json`` every process reads,
and remove what an earlier run in the same directory left, so that a reader of
``summary.json`` or ``metrics.jsonl`` never mistakes an old file for this run's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tessera.config import config_to_dict
from tessera.config.schema import JobConfig

#: Files a run writes that must not survive from an earlier run in the same directory.
RESULTS = ("coordinator.json", "cluster.json", "summary.json", "metrics.jsonl")


def default_run_dir(cfg: JobConfig) -> Path:
    return Path(cfg.out or f"runs/{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(run_dir: Path, cfg: JobConfig, *stale: str, logs: bool = True) -> None:
    """``logs/`` (unless one process prints for all), the resolved ``config.json``, and no
    file left from an earlier run (``stale`` names backend-specific ones)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if logs:
        (run_dir / "logs").mkdir(exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2))
    for name in (*RESULTS, *stale):
        (run_dir / name).unlink(missing_ok=True)
