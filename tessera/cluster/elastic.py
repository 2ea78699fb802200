"""Elastic servers, the coordinator's side: which partitions move where, and when.

Two things order moves, and both use the one live-move path of
:mod:`tessera.ps.elastic` (the owner copies a partition whole to its new server,
then answers "moved" for it; clients follow):

- ``tessera scale RUN_DIR --servers N`` (:meth:`Elastic.scale`): the job's dense
  partitions are served by servers ``0 .. N-1`` from now on; those of servers ``>= N``
  move onto them, balanced by bytes, and scaling up again spreads them back. Ranks
  without a process (beyond those launched, or scaled away before) are started by the
  launcher first: they register, every process learns their address (heartbeat replies'
  ``addresses``), and only then are moves to them ordered (:meth:`Elastic.joined`). A
  server scaled away that holds nothing is told to exit (``retired``) once the owners
  after its moves have gone out for ``RETIRE_AFTER_S``: it exits 0, and is never
  counted dead.
- ``[ps] rebalance = true`` (:meth:`Elastic.tick`): every ``WINDOW_S`` the coordinator
  reads each server's busy seconds (time spent serving requests, in its heartbeats);
  when the busiest server was at least ``HOT_RATIO`` times as busy as the least busy one
  for ``HOT_WINDOWS`` windows in a row, it moves partitions from it to that one: as many
  as even out their measured per-partition costs.

The coordinator orders one batch of moves at a time (heartbeat replies carry
``moves``), and takes each done when the old owner reports :class:`wire.Moved`.
"""

from __future__ import annotations

import time

#: Seconds between two load readings (rebalance).
WINDOW_S = 1.0
#: A server this many times as busy as the least busy one is hot ...
HOT_RATIO = 1.5
#: ... for this many windows in a row: then its partitions move.
HOT_WINDOWS = 2
#: ... and busy at least this share of the window (else nobody waits on it).
MIN_BUSY = 0.2
#: Seconds an emptied server scaled away waits before it is told to exit: every client
#: has heard the owners after its moves (heartbeats) by then.
RETIRE_AFTER_S = 2.0


def scale_problem(cfg, tables: list) -> str:
    """Why this job cannot scale its servers ('' when it can)."""
    ps = cfg.ps
    if ps.mode not in ("sync", "async", "ssp"):
        return (f"mode {ps.mode!r} keeps its dense parameters on the workers: only sync, "
                f"async and ssp jobs have server partitions to move")
    if ps.replication == 2:
        return "--replication 2 jobs do not scale (a partition's backup would not follow it)"
    if cfg.precision == "fp16" and ps.mode == "sync":
        return "fp16 sync jobs do not scale (a held clock cannot move)"
    return ""


class Elastic:
    """Move orders, the servers in use, and the load readings."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.launched = cfg.cluster.servers
        #: Servers partitions may be placed on (scale down: the first N).
        self.active = set(range(self.launched))
        #: Server ranks with a process serving (registered, not retired).
        self.running = set(range(self.launched))
        #: Ranks the launcher is starting for a scale up (moves wait for them).
        self.joining: set[int] = set()
        self._deferred: dict[int, int] = {}  # partition sizes of the scale that waits
        self._deferred_shards = False  # whether that scale moves table shards too
        #: Elements one table shard holds (all tables; :func:`shard_elems`): what a shard
        #: weighs against dense partitions when a scale places them.
        self.shard_elems = 0
        self._joining_since = 0.0
        #: Emptied servers scaled away -> when they were found empty; then told to exit.
        self.emptied: dict[int, float] = {}
        self.retired: set[int] = set()
        #: Whether a server was started mid-job (heartbeat replies then carry addresses).
        self.started_any = False
        #: Partition -> the server to move it to, until its owner reports it moved.
        self.orders: dict[int, int] = {}
        #: Whether any partition ever moved (owners then go out with every heartbeat).
        self.moved = False
        self.moves: list[dict] = []
        self._busy: dict[int, tuple[float, float, float]] = {}
        self._rates: dict[int, float] = {}
        self._table_rates: dict[int, float] = {}  # the part of _rates serving table rows
        #: What one table shard was last measured to cost each server that served one
        #: (busy share per second): a shard is not moved back onto a server it was slow on.
        self._shard_cost: dict[int, float] = {}
        self._window_at = time.monotonic()
        self._hot = (-1, 0)  # (server, windows in a row)
        self._quiet_until = 0.0
        #: Checkpoint clock -> server -> the partitions its file holds.
        self._files: dict[int, dict[int, set]] = {}

    # ------------------------------------------------------------------- scale

    def scale(self, n: int, owner: dict[int, int], sizes: dict[int, int], state: str,
              problem: str, shards: dict[int, int] | None = None) -> str:
        """Order the moves that put every partition on servers 0..n-1; the refusal
        ('' when ordered)."""
        if state != "running":
            return f"the job is not running (it is {state})"
        if problem:
            return problem
        if n < 1:
            return f"--servers must be at least 1, got {n}"
        units = len(owner) + len(shards or {})
        if n > max(units, self.launched):
            what = f"{len(owner)} dense partitions" + \
                (f" and {len(shards)} table shards" if shards else "")
            return (f"--servers {n}: the job has {what}, so at most "
                    f"{max(units, self.launched)} servers can serve it (lower "
                    f"--partition-mb at launch for more)")
        if n == len(self.active):
            return f"the job is already served by {n} server{'s' * (n != 1)}"
        if self.orders or self.joining:
            parts = sorted(p for p in self.orders if p >= 0)
            moving = sorted(-p - 1 for p in self.orders if p < 0)  # table shard k: -(k + 1)
            what = " and ".join(([f"partitions {parts}"] if parts else []) +
                                ([f"the table rows of servers {moving}"] if moving else []))
            busy = (f"{what} are still moving" if self.orders else
                    f"servers {sorted(self.joining)} are still starting")
            return f"{busy}; scale again once they are placed"
        stopping = sorted(r for r in self.running if r < n and r not in self.active)
        if stopping:
            return (f"server{'s' * (len(stopping) != 1)} {stopping} scaled away before "
                    f"{'are' if len(stopping) != 1 else 'is'} still stopping; scale again "
                    f"in a few seconds")
        self.active = set(range(n))
        self.joining = self.active - self.running
        if self.joining:  # the launcher starts them; the moves follow their joining
            self._deferred = dict(sizes)
            self._deferred_shards = bool(shards)
            self._joining_since = time.monotonic()
            self.retired -= self.joining
            print(f"coordinator: scale to {n} servers: starting server"
                  f"{'s' * (len(self.joining) != 1)} {sorted(self.joining)}", flush=True)
            return ""
        self._order(self._plan(owner, sizes, shards), f"scale to {n} servers")
        return ""

    def joined(self, rank: int, owner: dict[int, int],
               shards: dict[int, int] | None = None) -> None:
        """Server ``rank`` (started for a scale up) registered: once all have, the moves
        (of partitions, and of table shards: ``shards``, where each is now)."""
        self.running.add(rank)
        self.joining.discard(rank)
        self.emptied.pop(rank, None)
        if not self.joining and (self._deferred or self._deferred_shards):
            sizes, self._deferred = self._deferred, {}
            shards = shards if self._deferred_shards else None
            self._deferred_shards = False
            self._order(self._plan(owner, sizes, shards), f"scale to {len(self.active)} servers")

    def _plan(self, owner: dict[int, int], sizes: dict[int, int],
              shards: dict[int, int] | None) -> dict[int, int]:
        """The moves of a scale: table shards first (:func:`place_shards`), then the
        dense partitions around them (:func:`place`, a shard weighing ``shard_elems``)."""
        plan = place_shards(shards or {}, self.active, owner, sizes, self.shard_elems,
                            self.launched)
        where = {k: plan.get(-k - 1, s) for k, s in (shards or {}).items()}
        base = {s: 0 for s in self.active}
        for s in where.values():
            if s in base:
                base[s] += self.shard_elems
        plan.update(place(owner, sizes, self.active, base))
        return plan

    def join_overdue(self, timeout_s: float) -> None:
        """Servers started for a scale up that did not register within ``timeout_s``:
        the scale is dropped (the job goes on with the servers it has)."""
        if not self.joining or time.monotonic() - self._joining_since < timeout_s:
            return
        print(f"coordinator: server{'s' * (len(self.joining) != 1)} {sorted(self.joining)} "
              f"did not join within {timeout_s:.0f} s (see {'their logs' if len(self.joining) != 1 else 'its log'}); the scale to {len(self.active)} servers "
              f"is dropped", flush=True)
        self.active = {r for r in self.active if r in self.running}
        self.joining.clear()
        self._deferred, self._deferred_shards = {}, False

    def retire(self, owner: dict[int, int]) -> list[int]:
        """Servers scaled away that hold nothing and have been empty ``RETIRE_AFTER_S``:
        they are told to exit (newly told ones are printed)."""
        now = time.monotonic()
        held = set(owner.values()) | set(self.orders.values())
        for r in sorted(self.running - self.active - self.retired):
            if r in held:
                self.emptied.pop(r, None)
                continue
            since = self.emptied.setdefault(r, now)
            if now - since >= RETIRE_AFTER_S:
                self.retired.add(r)
                print(f"coordinator: server {r} holds no partitions after the scale to "
                      f"{len(self.active)} servers: it stops", flush=True)
        return sorted(self.retired)

    def exited(self, rank: int) -> None:
        """A retired server reported its last stats: it is gone (a scale up restarts it)."""
        if rank in self.retired:
            self.running.discard(rank)

    def _order(self, plan: dict[int, int], why: str) -> None:
        if not plan:
            return
        self.orders.update(plan)
        self.moves.append({"why": why, "at_unix": time.time(), "partitions": dict(plan)})
        moves = [f"partition {p}->{s}" if p >= 0 else f"table shard {-p - 1}->{s}"
                 for p, s in sorted(plan.items(), key=lambda kv: (kv[0] < 0, abs(kv[0])))]
        print(f"coordinator: {why}: moving {', '.join(moves)}", flush=True)

    def done(self, rank: int, target: int, pids: list[int], owner: dict[int, int],
             shards: dict[int, int] | None = None) -> list[int]:
        """A server moved ``pids`` to ``target`` (table shard k as ``-(k + 1)``, whose
        owner ``shards`` keeps): the ones that were ordered."""
        shards = {} if shards is None else shards

        def where(pid: int):
            return shards.get(-pid - 1) if pid < 0 else owner.get(pid)

        taken = [pid for pid in pids if self.orders.get(pid) == target and where(pid) == rank]
        for pid in taken:
            if pid < 0:
                shards[-pid - 1] = target
            else:
                owner[pid] = target
            del self.orders[pid]
        if taken:
            self.moved = True
            self._quiet_until = time.monotonic() + HOT_WINDOWS * WINDOW_S
            self._hot = (-1, 0)
        return taken

    # ---------------------------------------------------------------- rebalance

    def load(self, rank: int, busy_s: float, table_busy_s: float = 0.0) -> None:
        """A server's heartbeat: its busy seconds so far, and the part serving table rows."""
        now = time.monotonic()
        last = self._busy.get(rank)
        if last is None:
            self._busy[rank] = (now, busy_s, table_busy_s)
            return
        if now - last[0] >= WINDOW_S:
            self._rates[rank] = max(0.0, busy_s - last[1]) / (now - last[0])
            self._table_rates[rank] = max(0.0, table_busy_s - last[2]) / (now - last[0])
            self._busy[rank] = (now, busy_s, table_busy_s)

    def tick(self, owner: dict[int, int], shards: dict[int, int] | None = None) -> None:
        """Rebalance: once a window, move partitions (or a table shard: ``shards``, where
        each is served) off a server that stays hot."""
        now = time.monotonic()
        if not self.cfg.ps.rebalance or now - self._window_at < WINDOW_S:
            return
        self._window_at = now
        if self.orders or now < self._quiet_until:
            return
        rates = {r: v for r, v in self._rates.items() if r in self.active}
        if len(rates) < 2:
            return
        hot = max(rates, key=rates.get)
        cool = min(rates, key=rates.get)
        if rates[hot] < MIN_BUSY or rates[hot] < HOT_RATIO * max(rates[cool], 1e-3):
            self._hot = (-1, 0)
            return
        self._hot = (hot, self._hot[1] + 1 if self._hot[0] == hot else 1)
        if self._hot[1] < HOT_WINDOWS:
            return
        plan = hot_moves(hot, cool, rates, self._table_rates, owner, shards or {},
                         self._shard_cost)
        self._order(plan, f"server {hot} is hot ({rates[hot]:.0%} busy vs {rates[cool]:.0%} "
                          f"on server {cool})")

    def saved(self, clock: int, rank: int, pids: list[int]) -> None:
        """A server's checkpoint file at ``clock`` holds ``pids``."""
        self._files.setdefault(clock, {})[rank] = set(pids)
        for old in sorted(self._files)[:-16]:
            del self._files[old]

    def files_complete(self, clock: int, files: dict, partitions: set) -> bool:
        """Whether the servers' files of the checkpoint at ``clock`` hold every partition."""
        held = self._files.get(clock, {})
        have = set().union(*(held.get(r, set()) for r in files)) if files else set()
        return bool(partitions) and partitions <= have

    def file_owners(self, clock: int, owner: dict[int, int]) -> dict[int, int]:
        """Partition -> the server whose file of the checkpoint at ``clock`` holds it: its
        owner, or (a partition that moved about that clock) the server it moved from."""
        files = self._files.get(clock)
        if not self.moved or not files:
            return owner
        out = dict(owner)
        for pid, s in owner.items():
            if pid not in files.get(s, ()):
                held = sorted(r for r, pids in files.items() if pid in pids)
                if held:
                    out[pid] = held[0]
        return out

    def summary(self) -> dict:
        return {"servers_active": sorted(self.active), "moves": self.moves,
                "servers_stopped": sorted(self.retired)}


def hot_moves(hot: int, cool: int, rates: dict[int, float], table_rates: dict[int, float],
              owner: dict[int, int], shards: dict[int, int],
              shard_cost: dict[int, float] | None = None) -> dict[int, int]:
    """Rebalance's moves off server ``hot`` onto ``cool`` (busy shares per second:
    ``rates``, of which serving table rows ``table_rates``): k dense partitions, k evening
    out the two servers' measured per-partition costs, or one table shard (keyed
    ``-(k + 1)``) when the hot server's load is in its shards: a shard is a coarse unit,
    so it moves only when ``cool``'s busy plus what a shard costs there (its own measured
    per-shard cost where it serves one, else what one cost it when it last did, else the
    hot server's) stays below ``hot``'s, and when that lowers the larger of the two more
    than the partitions would. ``shard_cost`` (server -> what one shard costs it) is
    updated with this window's measurements: the caller keeps it, for later windows."""
    costs = {} if shard_cost is None else shard_cost
    for r in rates:
        n = sum(1 for s in shards.values() if s == r)
        if n and table_rates.get(r, 0.0) > 0:
            costs[r] = min(table_rates[r], rates[r]) / n
    mine = sorted(pid for pid, s in owner.items() if s == hot)
    theirs = sum(1 for s in owner.values() if s == cool)
    served = sorted(k for k, s in shards.items() if s == hot)
    table = min(table_rates.get(hot, 0.0), rates[hot]) if served else 0.0
    options = []
    if len(mine) >= (2 if not served else 1) and rates[hot] > table:
        # Per-partition costs as measured: move k so that c_hot (n_hot - k) ~ c_cool (n_cool + k).
        c_hot = (rates[hot] - table) / len(mine)
        c_cool = rates[cool] / theirs if theirs else c_hot / HOT_RATIO
        k = int((c_hot * len(mine) - c_cool * theirs) / (c_hot + c_cool))
        k = max(1, min(len(mine) - (0 if served else 1), k))
        options.append((max(rates[hot] - c_hot * k, rates[cool] + c_hot * k), 1,
                        {pid: cool for pid in mine[-k:]}))
    if served and table > 0:
        share = costs[hot]
        # What a shard costs on ``cool`` is cool's own cost (as for partitions: a slow
        # server's cost is its own, not the shard's); never measured there: this one.
        there = costs.get(cool, share)
        if rates[cool] + there < rates[hot]:
            # One it is not the home of first (it moved here before).
            k = max(served, key=lambda k: (k != hot, k))
            options.append((max(rates[hot] - share, rates[cool] + there), 0,
                            {-k - 1: cool}))
    return min(options, key=lambda o: (o[0], o[1]))[2] if options else {}


def place(owner: dict[int, int], sizes: dict[int, int], active: set[int],
          base: dict[int, int] | None = None) -> dict[int, int]:
    """Moves (partition -> server) that empty the servers outside ``active`` and even
    out the bytes among the active ones (greedy: largest partitions first); ``base``:
    what each server holds besides (its table shards' elements)."""
    load = {s: (base or {}).get(s, 0) for s in active}
    for pid, s in owner.items():
        if s in load:
            load[s] += sizes[pid]
    plan: dict[int, int] = {}
    for pid in sorted((p for p, s in owner.items() if s not in active), key=lambda p: -sizes[p]):
        target = min(load, key=lambda s: (load[s], s))
        plan[pid] = target
        load[target] += sizes[pid]
    where = {pid: plan.get(pid, s) for pid, s in owner.items()}
    while True:  # spread from the fullest server while that lowers the largest load
        hi = max(load, key=lambda s: (load[s], -s))
        lo = min(load, key=lambda s: (load[s], s))
        fits = [pid for pid, s in where.items() if s == hi and load[lo] + sizes[pid] < load[hi]]
        if hi == lo or not fits:
            break
        pid = min(fits, key=lambda p: (abs((load[hi] - sizes[p]) - (load[lo] + sizes[p])), p))
        where[pid] = lo
        load[hi] -= sizes[pid]
        load[lo] += sizes[pid]
        if owner[pid] == lo:
            plan.pop(pid, None)
        else:
            plan[pid] = lo
    return plan


def shard_elems(tables: list, launched: int) -> int:
    """Elements one table shard (every table's rows hashed to one server) holds, as a
    scale weighs it against dense partitions: per table its ``memory_bytes`` cap (a
    shard's whole size), else ``num_embeddings / launched`` rows, else its ``max_rows``
    budget, else (unbounded) more than any dense partition set: ``2**40``."""
    total = 0
    for t in tables:
        if t.memory_bytes:
            total += t.memory_bytes // 4
        elif t.num_embeddings:
            total += -(-t.num_embeddings // max(1, launched)) * t.dim
        elif t.max_rows:
            total += t.max_rows * t.dim
        else:
            total += 1 << 40
    return total


def place_shards(shards: dict[int, int], active: set[int], owner: dict[int, int] | None = None,
                 sizes: dict[int, int] | None = None, elems: int = 0,
                 launched: int | None = None) -> dict[int, int]:
    """Moves of table shards (keyed ``-(k + 1)`` -> server) that empty the servers outside
    ``active``: shard ``k`` goes home to server ``k`` when that one is active (scaling up
    moves shards back), else to the active server serving the fewest shards.

    Then each server started mid-job (rank ``>= launched``: no rows hash to it) that
    serves no shard takes one, from the server with the largest load (dense ``sizes`` of
    its partitions in ``owner``, plus ``elems`` per shard) that serves one, when that
    lowers the largest load (a shard is a coarse unit); :func:`place` then evens out the
    dense partitions around the shards."""
    plan = _shards_home(shards, active)
    if launched is None or not shards:
        return plan
    where = {k: plan.get(-k - 1, s) for k, s in shards.items()}
    load = {s: 0.0 for s in active}
    for pid, s in (owner or {}).items():  # those of servers scaled away: shared out
        for r in ([s] if s in active else active):
            load[r] += (sizes or {}).get(pid, 0) / (1 if s in active else len(active))
    for s in where.values():
        load[s] += elems
    for new in sorted(r for r in active if r >= launched and r not in where.values()):
        hi = max(set(where.values()), key=lambda s: (load[s], -s))
        if load[new] + elems >= load[hi]:
            continue
        # One it is not the home of, if it serves several.
        k = max((k for k, s in where.items() if s == hi), key=lambda k: (k != hi, k))
        where[k] = new
        load[hi] -= elems
        load[new] += elems
    return {-k - 1: s for k, s in sorted(where.items()) if s != shards[k]}


def _shards_home(shards: dict[int, int], active: set[int]) -> dict[int, int]:
    load = {s: 0 for s in active}
    for k, s in shards.items():
        if s in load:
            load[s] += 1
    plan: dict[int, int] = {}
    for k, s in sorted(shards.items()):
        if k in active and s != k:
            target = k
        elif s not in active:
            target = min(load, key=lambda r: (load[r], r))
        else:
            continue
        plan[-k - 1] = target
        load[target] += 1
        if s in load:
            load[s] -= 1
    return plan


# ------------------------------------------------------ tessera scale <-> the launcher
#
# The job's secret never touches the disk, so ``tessera scale`` does not talk to the
# coordinator itself: it drops a request file in ``RUN_DIR/control/``, which the job's
# launcher (connected to the coordinator with the secret) forwards as :class:`wire.Scale`
# and answers with a file next to it.

CONTROL_DIR = "control"


def pending_requests(run_dir) -> list:
    """The scale requests waiting in ``run_dir``: [(path, servers or None if malformed)]."""
    import json
    from pathlib import Path
    folder = Path(run_dir) / CONTROL_DIR
    if not folder.is_dir():
        return []
    out = []
    for path in sorted(folder.glob("scale-*.request")):
        try:
            servers = json.loads(path.read_text())["servers"]
            out.append((path, servers if isinstance(servers, int) else None))
        except (OSError, ValueError, KeyError, TypeError):
            out.append((path, None))
    return out


def answer_request(path, ok: bool, message: str) -> None:
    """Answer a scale request (the launcher) and drop it."""
    import json
    import os
    answer = path.with_suffix(".answer")
    tmp = path.with_suffix(".answer.tmp")
    tmp.write_text(json.dumps({"ok": ok, "message": message}))
    os.replace(tmp, answer)
    path.unlink(missing_ok=True)


def request_scale(run_dir, servers: int, timeout_s: float) -> tuple[bool, str]:
    """``tessera scale``: ask the job's launcher; (ok, message). Raises TimeoutError."""
    import json
    import os
    import uuid
    from pathlib import Path
    folder = Path(run_dir) / CONTROL_DIR
    folder.mkdir(exist_ok=True)
    name = f"scale-{uuid.uuid4().hex[:12]}"
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps({"servers": servers}))
    request = folder / f"{name}.request"
    os.replace(tmp, request)
    answer = folder / f"{name}.answer"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if answer.exists():
            got = json.loads(answer.read_text())
            answer.unlink(missing_ok=True)
            return bool(got.get("ok")), str(got.get("message", ""))
        time.sleep(0.05)
    request.unlink(missing_ok=True)
    raise TimeoutError(f"no answer within {timeout_s:g} s")
