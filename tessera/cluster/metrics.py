"""A run's metrics: ``metrics.jsonl``, the progress bar's source, and TensorBoard.

Worker 0 (the lead) writes one JSON object per logged step to
``<run dir>/metrics.jsonl``: the built-in trainer's ``step``, ``loss``,
``samples_per_s``, ``wall_s`` and evaluation results, or whatever a script passes
to ``tessera.log({...}, step=N)``. The launcher's progress bar follows that file
(:class:`tessera.launch.console.ProgressView`), so a script's own metrics show
there too. With ``train.tensorboard`` (``--tensorboard``) every numeric value is
also written as a TensorBoard scalar under ``<run dir>/tensorboard/``, through
``torch.utils.tensorboard`` (the ``tensorboard`` package, ``pip install
'tessera[tensorboard]'``).

Other workers' calls are accepted and dropped: one writer keeps the file one
ordered series, as rank-0 logging does under DDP.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional

from tessera.errors import UsageError


class MetricsLog:
    def __init__(self, run_dir: Path, *, lead: bool, tensorboard: bool = False):
        self.lead = lead
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._writer = None
        self._last_step = 0
        if lead and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UsageError("train.tensorboard (--tensorboard) needs the tensorboard "
                                 "package: pip install 'tessera[tensorboard]'") from None
            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))

    def log(self, values: dict[str, Any], step: Optional[int] = None) -> None:
        """One record at ``step`` (default: one past the last); non-JSON values refused."""
        if not isinstance(values, dict) or not all(isinstance(k, str) for k in values):
            raise UsageError(f"tessera.log takes a dict of name -> value, got "
                             f"{type(values).__name__}")
        step = self._last_step + 1 if step is None else int(step)
        self._last_step = step
        if not self.lead:
            return
        record = {"step": step}
        for key, value in values.items():
            if hasattr(value, "item"):  # a 0-d tensor or numpy scalar
                value = value.item()
            if not isinstance(value, (int, float, str, bool)) and value is not None:
                raise UsageError(f"tessera.log: {key!r} is a {type(value).__name__}; log "
                                 f"numbers, strings or booleans")
            record[key] = value
        if self._file is None:
            self._file = open(self.path, "a")
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(
                        value, bool) and math.isfinite(value):
                    self._writer.add_scalar(key, value, global_step=step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
