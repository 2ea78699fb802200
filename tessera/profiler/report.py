"""From spans to a finding: where each step's time went, and the main bottleneck.

Per worker, each step is broken into data loading, compute (forward and
backward), optimizer/copy (writing pulled values into the model), and the time
spent sending pushes from backward's hooks (taken out of backward) and in
``step()`` waiting for the servers' replies, which the servers' own
counters split into *waiting for other workers* (a push sat at the server until
the last worker's push of the same clock arrived) and *communication* (the
rest). *Overlap* is the share of the time communication was in flight (first
push sent .. last reply sent) that backward was still running.

Servers are ranked by bytes received, queue time (worker send .. server
receive, on aligned clocks) and optimizer time; their hottest partitions named.

The finding ranks the *causes* of step time by the milliseconds each costs per
step, prints every share, and names the largest:

- a straggler: the slowest worker's compute and data time beyond the median of
  the others' (what every synchronous step waits for it);
- a hot server: the part of the workers' communication that balanced servers
  would save. A worker's exposed communication waits for its busiest server, so
  with the top server holding share ``h`` of the pushed bytes against a fair
  ``1/S``, balancing saves ``communication * (1 - (1/S) / h)``;
- communication: the rest of the exposed communication;
- compute (forward and backward), data loading, optimizer/copy: the median
  worker's (the straggler's excess is counted above, not here);
- evaluation: the evaluating worker's evaluation time per step (the trainer's
  ``eval`` windows, and every forward run without gradients, as a user's own
  validation loop runs them). It is counted apart from compute: a worker that
  evaluates is not a straggler, though in sync mode every worker waits for it;
- other: what is left of the step (logging, Python).

``STRAGGLER_RATIO`` and ``HOT_SERVER_FACTOR`` only decide which workers and servers
the report flags (``stragglers``, each server's ``hot``); they no longer pick the
finding, so a straggler 0.4 ms slow is not named over communication that costs
1.8 ms of a 4.9 ms step.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Optional

from tessera.profiler.recorder import EVAL_SPAN

STRAGGLER_RATIO = 1.3
HOT_SERVER_FACTOR = 1.25
_EVAL_NAMES = ("eval", EVAL_SPAN[0])  # the trainer's window, a forward without gradients


def _sum(spans, name):
    return sum(s[3] for s in spans if s[0] == name) / 1e6  # ms


def _union_ms(spans, names, lo: int, hi: int) -> float:
    """The time between ``lo`` and ``hi`` (ns) covered by spans named in ``names``, nested
    or overlapping ones once (a forward without gradients inside the trainer's ``eval``
    window), in ms."""
    marks = sorted((max(lo, s[2]), min(hi, s[2] + s[3])) for s in spans
                   if s[0] in names and s[3] > 0 and s[2] < hi and s[2] + s[3] > lo)
    total, end = 0, None
    for a, b in marks:
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total / 1e6


def _overlap(spans) -> float:
    back = [(s[2], s[2] + s[3]) for s in spans if s[0] == "backward"]
    flight = [(s[2], s[2] + s[3]) for s in spans if s[0] == "in flight" and s[3] > 0]
    total = sum(b - a for a, b in flight)
    if not total:
        return 0.0
    covered = 0
    for a, b in flight:
        for c, d in back:
            covered += max(0, min(b, d) - max(a, c))
    return min(1.0, covered / total)


def _worker_row(doc: dict, servers: list[dict]) -> dict:
    spans = doc["spans"]
    steps = sum(1 for s in spans if s[0] == "wait") or 1
    per = {k: _sum(spans, k) / steps for k in ("data", "forward", "backward", "wait", "copy",
                                                "send")}
    # A worker waits on every server at once: average the per-partition barrier time
    # of each server, then over servers.
    per_server = []
    for srv in servers:
        parts = max(1, sum(1 for k in srv["counters"] if k.startswith("bytes.p")))
        per_server.append(srv["counters"].get(f"barrier_ns.w{doc['rank']}", 0.0) / parts)
    barrier_ms = min(per["wait"], (statistics.mean(per_server) if per_server else 0.0) / 1e6 / steps)
    train = [s for s in spans if s[0] in ("data", "forward", "backward", "wait", "copy")]
    lo, hi = (min(s[2] for s in train), max(s[2] + s[3] for s in train)) if train else (0, 0)
    wall = (hi - lo) / 1e6 / steps
    compute = per["forward"] + per["backward"]
    # Evaluation within the training steps (one after the last step is not in a step).
    evaluation = _union_ms(spans, _EVAL_NAMES, lo, hi) / steps
    return {
        "rank": doc["rank"], "steps": steps, "step_ms": wall,
        "data_ms": per["data"], "forward_ms": per["forward"], "backward_ms": per["backward"],
        "compute_ms": compute, "optimizer_ms": per["copy"],
        # Communication: waiting for the replies beyond the barrier, and sending the
        # pushes from backward's hooks (taken out of backward).
        "waiting_ms": barrier_ms,
        "communication_ms": max(0.0, per["wait"] - barrier_ms) + per["send"],
        "evaluation_ms": evaluation,
        "other_ms": max(0.0, wall - compute - per["data"] - per["copy"] - per["wait"]
                        - per["send"] - evaluation),
        "overlap": _overlap(spans),
    }


def _server_row(doc: dict) -> dict:
    c = doc["counters"]
    parts = sorted({int(k.split(".p")[1]) for k in c if k.startswith("bytes.p")})
    hot = sorted(({"id": p, "bytes": int(c.get(f"bytes.p{p}", 0)),
                   "apply_ms": c.get(f"apply_ns.p{p}", 0) / 1e6} for p in parts),
                 key=lambda r: (-r["bytes"], -r["apply_ms"]))
    return {
        "rank": doc["rank"],
        "bytes": int(sum(v for k, v in c.items() if k.startswith("bytes.w"))),
        "queue_ms": sum(v for k, v in c.items() if k.startswith("queue_ns.w")) / 1e6,
        "apply_ms": sum(v for k, v in c.items() if k.startswith("apply_ns.p")) / 1e6,
        "pushes": int(c.get("pushes", 0)),
        "partitions": len(parts),
        "hot_partitions": hot[:3],
    }


def analyze(docs: list[dict], summary: Optional[dict] = None) -> dict:
    servers_docs = [d for d in docs if d["role"] == "server"]
    workers = [_worker_row(d, servers_docs) for d in docs if d["role"] == "worker"]
    servers = [_server_row(d) for d in servers_docs]
    total_bytes = sum(s["bytes"] for s in servers) or 1
    for s in servers:
        s["bytes_share"] = s["bytes"] / total_bytes
        s["hot"] = len(servers) > 1 and s["bytes_share"] > HOT_SERVER_FACTOR / len(servers)
    for w in workers:
        others = [o["compute_ms"] + o["data_ms"] for o in workers if o is not w]
        base = statistics.median(others) if others else 0.0
        w["straggler_ratio"] = (w["compute_ms"] + w["data_ms"]) / base if base > 0 else 1.0
    stragglers = sorted((w for w in workers if w["straggler_ratio"] >= STRAGGLER_RATIO),
                        key=lambda w: -w["straggler_ratio"])
    servers_ranked = sorted(servers, key=lambda s: (-s["bytes"], -s["queue_ms"]))
    report = {
        "bottleneck": "", "kind": "",
        "workers": workers, "stragglers": [w["rank"] for w in stragglers],
        "servers": servers_ranked,
        "samples_per_s": (summary or {}).get("samples_per_s"),
        "clock_error_us_max": max((d.get("clock_error_ns", 0) for d in docs), default=0) / 1e3,
    }
    report["causes"] = _causes(workers, servers_ranked)
    report["kind"], report["bottleneck"] = _finding(report["causes"])
    return report


def _causes(workers: list[dict], servers: list[dict]) -> list[dict]:
    """What each cause costs per step (ms) and its share of the mean step, largest first."""
    if not workers:
        return []
    med = lambda key: statistics.median(w[key] for w in workers)  # noqa: E731
    step = statistics.mean(w["step_ms"] for w in workers) or 1.0
    causes = []
    slow = max(workers, key=lambda w: w["compute_ms"] + w["data_ms"])
    others = [o for o in workers if o is not slow]
    if others:
        base = {k: statistics.median(o[f"{k}_ms"] for o in others)
                for k in ("forward", "backward", "data")}
        excess = sum(slow[f"{k}_ms"] - base[k] for k in base)
        if excess > 0:
            phase = max(base, key=lambda k: slow[f"{k}_ms"] - base[k])
            ref = base[phase]
            ratio = slow[f"{phase}_ms"] / ref if ref > 0 else float("inf")
            causes.append({"cause": "straggler", "who": f"worker {slow['rank']}", "ms": excess,
                           "detail": f"worker {slow['rank']} is {ratio:.1f}x slower in {phase} "
                                     f"({slow[f'{phase}_ms']:.1f} ms vs {ref:.1f} ms per step): "
                                     f"every synchronous step waits for it; if it is always "
                                     f"slower, --balance speed gives it less of each batch "
                                     f"(sync stays exact); if now and then, --mode ssp; or "
                                     f"find what slows that worker's machine"})
        compute = statistics.median(o["compute_ms"] for o in others)
        data = statistics.median(o["data_ms"] for o in others)
    else:
        compute, data = med("compute_ms"), med("data_ms")
    comm = statistics.mean(w["communication_ms"] for w in workers)
    hot_ms = 0.0
    if len(servers) > 1 and comm > 0:
        top, fair = servers[0], 1.0 / len(servers)
        if top["bytes_share"] > fair:
            hot_ms = comm * (1.0 - fair / top["bytes_share"])
            part = top["hot_partitions"][0] if top["hot_partitions"] else None
            where = f" (partition {part['id']} is its largest)" if part else ""
            causes.append({"cause": "hot_server", "who": f"server {top['rank']}", "ms": hot_ms,
                           "detail": f"server {top['rank']} holds {top['bytes_share']:.0%} of "
                                     f"pushed bytes{where}, {top['bytes_share'] / fair:.1f}x its "
                                     f"fair share: even out ps.server_weights, add servers or "
                                     f"lower the partition size (--partition-mb)"})
    overlap = statistics.mean(w["overlap"] for w in workers)
    causes.append({"cause": "communication", "who": "", "ms": comm - hot_ms,
                   "detail": f"workers wait for the servers' replies ({overlap:.0%} of "
                             f"communication overlaps backward): try --precision bf16 to halve "
                             f"the bytes, add servers, or raise the batch size"})
    causes.append({"cause": "compute", "who": "", "ms": compute,
                   "detail": "forward and backward: the job is compute-bound; more workers or "
                             "a faster device would help"})
    causes.append({"cause": "data", "who": "", "ms": data,
                   "detail": "loading batches: more DataLoader workers, or data nearer the "
                             "workers"})
    causes.append({"cause": "optimizer", "who": "", "ms": med("optimizer_ms"),
                   "detail": "writing the pulled values into the model"})
    judge = max(workers, key=lambda w: w["evaluation_ms"])
    if judge["evaluation_ms"] > 0:  # (sync: every worker's step waits for it)
        causes.append({"cause": "evaluation", "who": f"worker {judge['rank']}",
                       "ms": judge["evaluation_ms"],
                       "detail": f"worker {judge['rank']} evaluates in the training loop "
                                 f"({judge['evaluation_ms']:.2f} ms per step on average); "
                                 f"in sync mode the others' steps wait for it: evaluate "
                                 f"less often (train.eval_every) or on fewer batches"})
    named = sum(c["ms"] for c in causes)
    causes.append({"cause": "other", "who": "", "ms": max(0.0, step - named),
                   "detail": "the rest of the step: logging, Python"})
    for c in causes:
        c["ms"] = max(0.0, c["ms"])
        c["share"] = c["ms"] / step
    return sorted(causes, key=lambda c: -c["ms"])


def _label(cause: dict) -> str:
    return cause["cause"].replace("_", " ") + (f" ({cause['who']})" if cause["who"] else "")


def _finding(causes: list[dict]) -> tuple[str, str]:
    if not causes:
        return "none", "no worker spans were recorded"
    top = causes[0]
    step = top["ms"] / top["share"] if top["share"] else 0.0
    ranked = ", ".join(f"{_label(c)} {c['share']:.0%}" for c in causes if c["share"] >= 0.005)
    return top["cause"], (f"{_label(top)} costs {top['ms']:.2f} ms of each {step:.2f} ms step "
                          f"({top['share']:.0%}): {top['detail']}. Ranked by share of step "
                          f"time: {ranked}")


# ----------------------------------------------------------------- outputs


def to_markdown(report: dict) -> str:
    lines = ["# Tessera profile", "", f"**Bottleneck:** {report['bottleneck']}", "",
             "## Causes, by share of step time", "", "| cause | ms per step | share |",
             "|---|---|---|"]
    lines += [f"| {_label(c)} | {c['ms']:.2f} | {c['share']:.0%} |"
              for c in report.get("causes", [])]
    lines.append("")
    if report.get("samples_per_s"):
        lines += [f"Throughput: {report['samples_per_s']:.0f} samples/s. "
                  f"Clock alignment error: at most {report['clock_error_us_max']:.0f} µs.", ""]
    lines += ["## Workers (ms per step)", "",
              "| worker | step | data | forward | backward | optimizer | communication | "
              "waiting for others | evaluation | overlap | vs others |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in report["workers"]:
        lines.append(f"| {w['rank']} | {w['step_ms']:.2f} | {w['data_ms']:.2f} | "
                     f"{w['forward_ms']:.2f} | {w['backward_ms']:.2f} | {w['optimizer_ms']:.2f} | "
                     f"{w['communication_ms']:.2f} | {w['waiting_ms']:.2f} | "
                     f"{w['evaluation_ms']:.2f} | {w['overlap']:.0%} | "
                     f"{w['straggler_ratio']:.2f}x |")
    lines += ["", "Stragglers (slowest first): " +
              (", ".join(f"worker {r}" for r in report["stragglers"]) or "none"), "",
              "## Servers (by load)", "",
              "| server | bytes received | share | queue ms | optimizer ms | pushes | hottest partitions |",
              "|---|---|---|---|---|---|---|"]
    for s in report["servers"]:
        hot = ", ".join(f"p{p['id']} ({p['bytes'] / 1e6:.1f} MB)" for p in s["hot_partitions"])
        lines.append(f"| {s['rank']} | {s['bytes'] / 1e6:.1f} MB | {s['bytes_share']:.0%} | "
                     f"{s['queue_ms']:.1f} | {s['apply_ms']:.1f} | {s['pushes']} | {hot} |")
    lines += ["", "Open `trace.json` in https://ui.perfetto.dev or chrome://tracing for the "
              "timeline; `report.html` draws the breakdown."]
    return "\n".join(lines) + "\n"


_COLORS = {"data": "#8dd3c7", "forward": "#80b1d3", "backward": "#bebada",
           "optimizer": "#fdb462", "communication": "#fb8072", "waiting": "#d9d9d9",
           "evaluation": "#b3de69", "other": "#f0f0f0", "queue": "#fb8072", "apply": "#fdb462"}


def to_html(report: dict) -> str:
    """Stacked bars per process, as a self-contained page (inline SVG, no scripts)."""
    rows = [(f"worker {w['rank']}", [(k, w[f"{k}_ms"]) for k in
             ("data", "forward", "backward", "optimizer", "communication", "waiting",
              "evaluation", "other")])
            for w in report["workers"]]
    steps = max((w["steps"] for w in report["workers"]), default=1)
    rows += [(f"server {s['rank']}", [("apply", s["apply_ms"] / steps),
                                      ("queue", s["queue_ms"] / steps / max(1, s["pushes"] / steps))])
             for s in report["servers"]]
    scale_max = max((sum(v for _, v in parts) for _, parts in rows), default=1.0) or 1.0
    width, bar_h, left = 720, 26, 90
    svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width + left + 20}" '
           f'height="{len(rows) * (bar_h + 10) + 60}" font-family="sans-serif" font-size="12">']
    for i, (label, parts) in enumerate(rows):
        y = 10 + i * (bar_h + 10)
        svg.append(f'<text x="0" y="{y + 17}">{label}</text>')
        x = left
        for key, value in parts:
            w = width * value / scale_max
            if w <= 0:
                continue
            svg.append(f'<rect x="{x:.1f}" y="{y}" width="{w:.1f}" height="{bar_h}" '
                       f'fill="{_COLORS[key]}"><title>{key}: {value:.2f} ms</title></rect>')
            x += w
        svg.append(f'<text x="{x + 4:.1f}" y="{y + 17}">{sum(v for _, v in parts):.2f} ms</text>')
    y = 20 + len(rows) * (bar_h + 10)
    x = left
    for key in ("data", "forward", "backward", "optimizer", "communication", "waiting",
                "evaluation", "apply", "queue"):
        svg.append(f'<rect x="{x}" y="{y}" width="12" height="12" fill="{_COLORS[key]}"/>'
                   f'<text x="{x + 16}" y="{y + 11}">{key}</text>')
        x += 28 + 7 * len(key)  # (about 7 px a character at 12 px)
    svg.append("</svg>")
    return ("<!doctype html><meta charset='utf-8'><title>Tessera profile</title>"
            "<body style='font-family:sans-serif;max-width:900px;margin:2em auto'>"
            f"<h1>Tessera profile</h1><p><b>Bottleneck:</b> {report['bottleneck']}</p>"
            "<h2>Time per step, by process</h2>"
            "<p>Workers: ms per step by phase. Servers: optimizer ms per step, and mean queue ms "
            "per push.</p>" + "".join(svg) + "</body>")


def write_report(run_dir: Path, docs: list[dict]) -> dict:
    run_dir = Path(run_dir)
    summary = None
    if (run_dir / "summary.json").exists():
        summary = json.loads((run_dir / "summary.json").read_text())
    report = analyze(docs, summary)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2))
    (run_dir / "report.md").write_text(to_markdown(report))
    (run_dir / "report.html").write_text(to_html(report))
    return report
