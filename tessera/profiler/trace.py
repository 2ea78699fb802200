"""Merge every process's spans into one Chrome trace (``trace.json``).

The format is the Trace Event Format that chrome://tracing and Perfetto read:
complete events (``ph: "X"``) with microsecond ``ts``/``dur``, one ``pid`` per
cluster process named by role and rank through ``process_name`` metadata, and on
workers a second thread track (``tid`` 1) for communication in flight, so that
its overlap with backward is visible at a glance.
"""

from __future__ import annotations

import json
from pathlib import Path

ROLE_ORDER = {"coordinator": 0, "server": 1, "worker": 2}


def load_profiles(run_dir: Path) -> list[dict]:
    docs = []
    for path in sorted((Path(run_dir) / "profile").glob("*.json")):
        try:
            docs.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # a process that died mid-write: the rest of the trace still stands
    docs.sort(key=lambda d: (ROLE_ORDER.get(d["role"], 9), d["rank"]))
    return docs


def build_trace(docs: list[dict]) -> dict:
    starts = [s[2] for d in docs for s in d["spans"]]
    origin = min(starts) if starts else 0
    events: list[dict] = []
    for pid, doc in enumerate(docs):
        name = f"{doc['role']} {doc['rank']}"
        events.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0,
                       "args": {"name": name}})
        events.append({"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0,
                       "args": {"sort_index": pid}})
        events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 0,
                       "args": {"name": "main"}})
        if doc["role"] == "worker":
            events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 1,
                           "args": {"name": "communication in flight"}})
        for span_name, cat, start, dur, args in doc["spans"]:
            ev = {"name": span_name, "cat": cat or doc["role"], "pid": pid,
                  "tid": 1 if cat == "inflight" else 0,
                  "ts": (start - origin) / 1000.0}
            if dur > 0:
                ev.update(ph="X", dur=dur / 1000.0)
            else:
                ev.update(ph="i", s="t")
            if args:
                ev["args"] = args
            events.append(ev)
        if doc.get("torch_events"):
            events.extend(_torch_events(doc, pid, origin))
    errors = [d.get("clock_error_ns", 0) for d in docs]
    return {
        "traceEvents": events,
        "displayTimeUnit": "ms",
        "metadata": {
            "tessera": "cluster trace",
            "processes": [f"{d['role']} {d['rank']}" for d in docs],
            "clock_alignment": "NTP-style offset to the coordinator's clock, min-RTT of 8 probes",
            "clock_error_us_max": max(errors, default=0) / 1000.0,
            "clock_error_us": {f"{d['role']} {d['rank']}": d.get("clock_error_ns", 0) / 1000.0
                               for d in docs},
        },
    }


def _torch_events(doc: dict, pid: int, origin: int) -> list[dict]:
    """PyTorch profiler operator events, moved onto this process's track."""
    out = []
    shift = doc.get("torch_shift_us", 0.0) - origin / 1000.0
    for ev in doc["torch_events"]:
        if ev.get("ph") != "X" or "ts" not in ev or not ev.get("name"):
            continue
        out.append({"name": ev["name"], "cat": "torch." + str(ev.get("cat", "op")), "ph": "X",
                    "pid": pid, "tid": 2, "ts": max(0.0, ev["ts"] + shift),
                    "dur": max(0.0, float(ev.get("dur", 0)))})
    if out:
        out.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 2,
                    "args": {"name": "torch operators"}})
    return out


def write_trace(run_dir: Path, docs: list[dict]) -> Path:
    path = Path(run_dir) / "trace.json"
    path.write_text(json.dumps(build_trace(docs)))
    return path
