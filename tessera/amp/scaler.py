"""Dynamic loss scaling that every worker of a job agrees on.

The rule is GradScaler's (start at 2^16, halve and skip the step on overflow,
double after ``growth_interval`` clean steps). What is new is who decides: in
sync parameter-server mode the servers report, for every partition of a clock,
whether the *sum* of the workers' gradients was finite and which workers sent
non-finite values. Every worker sees the same verdicts, so every worker takes
the same decision (skip or apply) and its scaler moves the same way: the scales
stay identical across the cluster without a message of their own.
"""

from __future__ import annotations


class LossScaler:
    def __init__(self, *, init_scale: float = 65536.0, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, enabled: bool = True):
        self.enabled = enabled
        self.scale = float(init_scale) if enabled else 1.0
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        if not self.enabled:
            return
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps >= self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0
