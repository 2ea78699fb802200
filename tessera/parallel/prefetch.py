"""Prefetch: the rows of step t+1's ids are pulled while step t finishes.

The data loader knows the next batch. A loop names it with ``model.prefetch(*inputs)``
(the built-in trainer does, with ``[model] prefetch = true``), or wraps its batches in
:func:`prefetching`. The lookups the forward will make are found from the module's
``table_lookups(*inputs)`` if it defines one, else by a dry run of its forward (no
gradients, in eval mode, the tables answering zeros without pulling).

When the pulls go out, and what they see (per mode):

* Named during step t (after its forward, before ``step()``): right after step t's
  table pushes leave, for clock t+1, on the same sockets. In sync mode a server holds
  a pull for clock t+1 until clock t is applied (every worker's push of t; this is
  the servers' existing rule, :mod:`tessera.ps.table_server`), so the rows are exactly
  those a pull made at step t+1's forward would get: results are bit-identical to no
  prefetch, and the pull's round trip overlaps the wait for the step's replies. In
  async, ssp and hybrid modes a server handles one worker's requests in order, so the
  rows include this worker's push of t (and the others' as they came, as before).
* Where every table may be served rows >= 1 clock stale (async, ssp, hybrid;
  ``[model] cache_staleness``, with or without a row cache): at once, even during step
  t's forward (the trainer and :func:`prefetching` name batch t+1 before it), for clock
  t; the rows then overlap step t's compute (the server's work for the pull included)
  and count as one clock old when step t+1 takes them (within the bound): they lack
  this worker's push of step t. Cache hits must be fresh enough for clock t+1.
* Named between steps: at once, for the coming clock.

Step t+1's forward with those ids (the same tensors, or equal ones) takes the replies;
a lookup with other ids pulls as usual, and the prefetch waits for its own lookup.
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator, Optional

from torch import nn

from tessera.errors import UsageError
from tessera.parallel.embedding import issue_pulls, record_lookups


def _dry_run_lookups(module: nn.Module, tables, inputs: tuple) -> list:
    """record_lookups in eval mode (BatchNorm statistics and dropout untouched), each
    submodule's mode restored after. A module that names its lookups
    (``table_lookups``) runs nothing, so its modes are left alone (flipping them costs
    ~0.5 ms a step on a small model: nn.Module.__setattr__ per submodule)."""
    if hasattr(module, "table_lookups"):
        return record_lookups(module, tables, inputs)
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        return record_lookups(module, tables, inputs)
    finally:
        for m, training in modes:
            m.training = training


def name_next(model, tables, inputs: tuple, after_push: bool) -> None:
    """model.prefetch(): find the lookups of ``inputs``; send them now, or keep them for
    the step's pushes (:func:`send_named`)."""
    lookups = _dry_run_lookups(model.module, tables, tuple(inputs))
    clock = None if after_push else model._prefetch_clock()
    if clock is None and all(t.row_staleness >= 1 for t in tables):
        # Rows may be a clock old: pull them now, while this step computes (for the
        # current clock, so they count as one clock old when the next step takes them).
        model._next_lookups = None
        issue_pulls(lookups, model.clock, model.clock + 1)
    elif clock is None:
        model._next_lookups = lookups
    else:
        model._next_lookups = None
        issue_pulls(lookups, clock)


def send_named(model, clock: int) -> None:
    """Called by a wrapper right after its table pushes of clock ``clock - 1``."""
    lookups, model._next_lookups = model._next_lookups, None
    if lookups:
        issue_pulls(lookups, clock)


def _default_inputs(batch) -> tuple:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return tuple(batch[:-1])  # (inputs..., target)
    return (batch,)


def prefetching(model, batches: Iterable,
                inputs: Optional[Callable[[object], tuple]] = None) -> Iterator:
    """Iterate ``batches`` (a DataLoader, a generator...) one ahead: when it hands out
    batch t it has named batch t+1 to ``model.prefetch`` (sent with step t's pushes).
    ``inputs(batch)`` gives the forward's positional inputs (default: every element of
    a tuple/list batch but the last, the target; else the batch itself). Each batch
    must be trained with one ``step()``."""
    if not hasattr(model, "prefetch"):
        raise UsageError("tessera.nn.prefetching(model, batches) takes the model "
                         "tessera.distribute() returned")
    pick = inputs or _default_inputs
    it = iter(batches)
    try:
        current = next(it)
    except StopIteration:
        return
    while True:
        try:
            following = next(it)
        except StopIteration:
            yield current
            return
        model.prefetch(*pick(following), after_push=True)
        yield current
        current = following


def configure_caches(tables, model_cfg, ps_cfg) -> None:
    """``[model] cache_rows`` / ``cache_staleness``: how stale every table's rows may be,
    and a row cache on each (none with 0 rows), checked against the mode (sync serves
    rows of the current clock only; ssp within its staleness)."""
    rows, k = model_cfg.cache_rows, model_cfg.cache_staleness
    if not (rows or k) or not tables:
        return
    mode, bound = ps_cfg.mode, ps_cfg.staleness
    if mode == "sync" and k:
        raise UsageError(f"[model] cache_staleness = {k}: sync mode serves every row as of "
                         f"the current clock, so its cache can only be 0 clocks old; set "
                         f"cache_staleness = 0 or use --mode ssp/async")
    if (mode == "ssp" or (mode == "hybrid" and bound)) and k > bound:
        raise UsageError(f"[model] cache_staleness = {k} is over the job's staleness "
                         f"({bound}); rows may be at most --staleness clocks old")
    for t in tables:
        t.use_cache(rows, k)
