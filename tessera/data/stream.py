"""Training from a stream: a directory (or fsspec URL) that keeps receiving shards.

``[data] follow = true`` reads ``data.path`` as a stream of shards:

* **Shards** are ``.npz`` files (``numpy.savez``) holding, for the click model
  (``dataset = "clicks"``), ``ids`` (int64 ``[n, fields]``: hashed feature ids) and
  ``y`` (``[n]``: 0/1 labels). Their names order the stream: a new shard must sort after
  every shard already there (zero-padded sequence numbers or UTC timestamps:
  ``shard-000017.npz``). Names starting with ``.`` or ``_`` are not shards.
* **Only whole shards are read**: a producer writes ``.NAME.npz.tmp`` (any name starting
  with ``.``) and renames it to ``NAME.npz`` when complete (:func:`write_shard`; a rename
  is atomic on a local or NFS filesystem, and object stores only show an object once it
  is uploaded whole).
* **The end**: the marker ``_END`` names the stream's last shard (:func:`end_stream`:
  the producer after its last shard, or ``tessera stop RUN_DIR`` at any time: the last
  shard there then); the job trains to the end of that shard and finishes as any run
  (final checkpoint, export); shards arriving later are not read. An empty ``_END``
  ends the stream with the shards there when a worker first sees it (only safe when
  nothing is written after it). Without a marker the job follows the location until it
  is interrupted (SIGINT/SIGTERM to ``tessera run``: a checkpoint, then ``--resume``
  continues the stream where it stopped).
* ``_eval.npz`` (same arrays), when present, is the evaluation set.

The stream is the concatenation of the shards in name order; global step ``t`` takes
samples ``[o + t G, o + (t + 1) G)`` of it (``G`` = workers x batch_size, ``o`` the
position a resumed run starts from), and worker ``r`` the ``r``-th ``batch_size`` of
those: every sample, hence every shard, is trained exactly once across the workers.
The checkpoint records the position (samples consumed: the manifest's ``data.offset``
of an endless stream), so a resumed run (any worker count) neither repeats nor skips a
shard. A global batch may span two shards; a remainder shorter than one global batch at
the end of a stream is not trained (a resume with more shards trains it).

Each worker appends what it read to ``<run dir>/stream/worker-<rank>.jsonl``: one line
per step and shard, ``{"step", "shard", "lo", "hi"}`` (sample rows ``[lo, hi)`` of the
shard): the record that shows each shard was trained once.
"""

from __future__ import annotations

import io
import json
import posixpath
import time
from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np

from tessera.data.location import DataError

SHARD_SUFFIX = ".npz"
#: Written by the producer after its last shard: the stream ends with the shards listed.
END_MARKER = "_END"
#: The evaluation set beside the shards (not a shard: names starting with ``_`` are not).
EVAL_FILE = "_eval.npz"
#: Shards kept in memory by a reader (a global batch spans at most two).
CACHED_SHARDS = 4


def is_shard(name: str) -> bool:
    base = name.rstrip("/").rsplit("/", 1)[-1]
    return base.endswith(SHARD_SUFFIX) and not base.startswith((".", "_"))


def write_shard(url: str, name: str, **arrays: np.ndarray) -> str:
    """Write one shard so that a follower never sees it half-written: a temporary name
    (starting with ``.``), then a rename. Returns the shard's path."""
    import fsspec
    if not is_shard(name) and name != EVAL_FILE:
        raise DataError(f"shard name {name!r} must end in {SHARD_SUFFIX} and not start with "
                        f"'.' or '_'")
    fs, root = fsspec.core.url_to_fs(url)
    fs.makedirs(root, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = posixpath.join(root, f".{name}.tmp{time.monotonic_ns()}")
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    final = posixpath.join(root, name)
    fs.mv(tmp, final)
    return final


def end_stream(url: str, last: Optional[str] = None) -> Optional[str]:
    """Mark the stream complete: it ends with shard ``last`` (default: the last shard
    there now), whatever arrives later. Returns that shard's name (None: no shard yet).
    The marker ``_END`` holds the name, written under a temporary name and renamed."""
    import fsspec
    fs, root = fsspec.core.url_to_fs(url)
    root = root.rstrip("/") or "/"
    if last is None:
        shards = sorted(b for b in (e.rstrip("/").rsplit("/", 1)[-1]
                                    for e in fs.ls(root, detail=False)) if is_shard(b))
        last = shards[-1] if shards else None
    tmp = posixpath.join(root, f".{END_MARKER}.tmp{time.monotonic_ns()}")
    with fs.open(tmp, "w") as f:
        f.write(last or "")
    fs.mv(tmp, posixpath.join(root, END_MARKER))
    return last


class ShardStream:
    """The shards of a followed location read as one sample stream (see the module)."""

    def __init__(self, url: str, *, keys: tuple[str, ...] = ("ids", "y"), poll_s: float = 0.5):
        import fsspec
        self.url, self.keys, self.poll_s = url, keys, poll_s
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ValueError, ImportError) as exc:
            raise DataError(f"data.path {url!r}: cannot open this location: {exc}") from None
        self.root = root.rstrip("/") or "/"
        #: Shards in stream order: name -> samples.
        self.sizes: dict[str, int] = {}
        self.names: list[str] = []
        self.starts: list[int] = []  # stream position of each shard's first sample
        self.ended = False
        self._cache: OrderedDict = OrderedDict()
        self.shards_read = 0
        #: When the last new shard (or the marker) was listed: the idle timeout counts
        #: from there.
        self.grew_at = time.monotonic()

    @property
    def total(self) -> int:
        """Samples in the shards listed so far."""
        return self.starts[-1] + self.sizes[self.names[-1]] if self.names else 0

    def refresh(self) -> bool:
        """List the location again; True if a shard (or the end marker) appeared."""
        try:
            self.fs.invalidate_cache(self.root)
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            raise DataError(f"data.path {self.url!r} does not exist; create the directory "
                            f"the shards will be written to") from None
        bases = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
        # The marker names the stream's last shard (every worker ends at the same one,
        # whatever arrives after it); it is read before the listing that follows, so
        # every shard it ends is listed then.
        ended = END_MARKER in bases
        if ended:
            with self.fs.open(posixpath.join(self.root, END_MARKER), "r") as f:
                last = f.read().strip()
            entries = self.fs.ls(self.root, detail=False)
            bases = sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries)
            if last:
                if last not in bases:
                    raise DataError(f"data.path {self.url!r}: {END_MARKER} ends the stream "
                                    f"with shard {last!r}, which is not there")
                bases = [b for b in bases if b <= last]
                while self.names and self.names[-1] > last:  # listed just before the marker
                    self.sizes.pop(self.names.pop())
                    self.starts.pop()
        new = [b for b in bases if is_shard(b) and b not in self.sizes]
        if new and self.names and new[0] < self.names[-1]:
            raise DataError(f"data.path {self.url!r}: shard {new[0]!r} appeared after "
                            f"{self.names[-1]!r}, which sorts after it; in follow mode "
                            f"new shards must sort after every shard already written "
                            f"(name them with zero-padded sequence numbers or UTC "
                            f"timestamps)")
        for name in new:
            arrays = self._load(name)
            self.starts.append(self.total)
            self.sizes[name] = len(arrays[self.keys[0]])
            self.names.append(name)
        changed = bool(new) or ended != self.ended
        self.ended = ended
        if changed:
            self.grew_at = time.monotonic()
        return changed

    def _load(self, name: str) -> dict:
        if name in self._cache:
            self._cache.move_to_end(name)
            return self._cache[name]
        path = posixpath.join(self.root, name)
        try:
            with self.fs.open(path, "rb") as f:
                data = f.read()
            with np.load(io.BytesIO(data)) as z:
                missing = [k for k in self.keys if k not in z]
                if missing:
                    raise DataError(f"shard {path!r} lacks arrays {missing} (it has "
                                    f"{list(z.keys())}); a shard holds {list(self.keys)}")
                arrays = {k: z[k] for k in self.keys}
        except (OSError, ValueError) as exc:
            raise DataError(f"shard {path!r} cannot be read: {exc}") from None
        n = len(arrays[self.keys[0]])
        if any(len(a) != n for a in arrays.values()):
            raise DataError(f"shard {path!r}: its arrays {list(self.keys)} have different "
                            f"lengths {[len(a) for a in arrays.values()]}")
        self._cache[name] = arrays
        self.shards_read += 1
        while len(self._cache) > CACHED_SHARDS:
            self._cache.popitem(last=False)
        return arrays

    def wait_for(self, stop: int, check=None, interrupted=None, idle_s: float = 0.0,
                 on_idle=None) -> bool:
        """Wait until samples ``[0, stop)`` are listed (True) or the stream ended before
        them (False). ``check()``: called while waiting (raises for a failed job);
        ``interrupted()``: True when the job is asked to stop (SIGINT/SIGTERM to the
        launcher): the wait ends as the stream would (False). ``on_idle()``: called once
        when no shard has arrived for ``idle_s`` seconds (> 0); it ends the stream by
        writing the marker (worker 0 only, so that every worker ends at the shard the
        marker names), and the wait goes on until the marker is listed."""
        self.refresh()
        idled = False
        while self.total < stop and not self.ended:
            if check is not None:
                check()
            if interrupted is not None and interrupted():
                return False
            if (idle_s > 0 and on_idle is not None and not idled
                    and time.monotonic() - self.grew_at >= idle_s):
                idled = True
                on_idle()
            time.sleep(self.poll_s)
            self.refresh()
        return self.total >= stop

    def take(self, start: int, stop: int) -> tuple[dict, list[tuple[str, int, int]]]:
        """Samples ``[start, stop)`` of the stream (listed already) as arrays, and the
        parts of shards they came from: ``(name, lo, hi)``."""
        import bisect
        out: dict[str, list] = {k: [] for k in self.keys}
        parts = []
        at = start
        while at < stop:
            i = bisect.bisect_right(self.starts, at) - 1
            name = self.names[i]
            lo = at - self.starts[i]
            hi = min(self.sizes[name], stop - self.starts[i])
            arrays = self._load(name)
            for k in self.keys:
                out[k].append(arrays[k][lo:hi])
            parts.append((name, lo, hi))
            at = self.starts[i] + hi
        return {k: np.concatenate(v) for k, v in out.items()}, parts

    def eval_set(self) -> Optional[dict]:
        path = posixpath.join(self.root, EVAL_FILE)
        if not self.fs.exists(path):
            return None
        with self.fs.open(path, "rb") as f:
            with np.load(io.BytesIO(f.read())) as z:
                return {k: z[k] for k in self.keys if k in z}


class StreamLedger:
    """``<run dir>/stream/worker-<rank>.jsonl``: what this worker read, per step and shard."""

    def __init__(self, run_dir, rank: int):
        where = Path(run_dir) / "stream"
        where.mkdir(parents=True, exist_ok=True)
        self._f = open(where / f"worker-{rank}.jsonl", "a", buffering=1)

    def read(self, step: int, parts) -> None:
        for name, lo, hi in parts:
            self._f.write(json.dumps({"step": step, "shard": name, "lo": lo, "hi": hi}) + "\n")

    def close(self) -> None:
        self._f.close()


def read_ledgers(run_dir) -> list[dict]:
    """Every worker's ledger lines of a run (tests, tools)."""
    out = []
    for path in sorted((Path(run_dir) / "stream").glob("worker-*.jsonl")):
        rank = int(path.stem.split("-", 1)[1])
        for line in path.read_text().splitlines():
            if line.strip():
                out.append({"worker": rank, **json.loads(line)})
    return out


def produce_clicks(url: str, *, shards: int, size: int, every_s: float = 0.0, first: int = 0,
                   num_fields: int = 26, id_space: int = 100_000_000, seed: int = 0,
                   end: bool = False, eval_samples: int = 0) -> None:
    """A producer for trying ``follow``: ``shards`` shards of ``size`` samples of the
    synthetic click log (:class:`tessera.data.clicks.ClickLog`), one every ``every_s``
    seconds, named ``shard-<n>.npz`` from ``first``; then ``_END`` if ``end``."""
    from tessera.data.clicks import ClickLog
    log = ClickLog(num_fields=num_fields, id_space=id_space, seed=seed)
    if eval_samples:
        ids, y = log.batch(10**9, eval_samples)
        write_shard(url, EVAL_FILE, ids=ids.numpy(), y=y.numpy())
    for n in range(first, first + shards):
        ids, y = log.batch(n, size)
        write_shard(url, f"shard-{n:06d}.npz", ids=ids.numpy(), y=y.numpy())
        time.sleep(every_s)
    if end:
        end_stream(url)


if __name__ == "__main__":  # python -m tessera.data.stream DIR --shards N ...
    import argparse
    ap = argparse.ArgumentParser(description="write click-log shards into DIR, as a stream")
    ap.add_argument("dir")
    ap.add_argument("--shards", type=int, default=20)
    ap.add_argument("--size", type=int, default=4096, help="samples per shard")
    ap.add_argument("--every-s", type=float, default=1.0, help="seconds between shards")
    ap.add_argument("--first", type=int, default=0, help="number of the first shard")
    ap.add_argument("--fields", type=int, default=26)
    ap.add_argument("--id-space", type=int, default=100_000_000)
    ap.add_argument("--eval", type=int, default=0, help="also write _eval.npz of N samples")
    ap.add_argument("--end", action="store_true", help="write _END after the last shard")
    a = ap.parse_args()
    produce_clicks(a.dir, shards=a.shards, size=a.size, every_s=a.every_s, first=a.first,
                   num_fields=a.fields, id_space=a.id_space, end=a.end, eval_samples=a.eval)
