"""Write benchmarks/README.md's results from the JSON lines of a `make bench` run.

`run_all.py` leaves one `<name>.jsonl` per benchmark and an `index.json` in `runs/bench`.
This script turns them into one table per benchmark and a table of the issues' goals (each
goal evaluated from the numbers, never typed in), and replaces what lies between the two
results markers of `benchmarks/README.md`. Nothing outside the markers is touched.

    .venv/bin/python benchmarks/report.py                 # from runs/bench
    .venv/bin/python benchmarks/report.py --stdout        # print instead of writing
    .venv/bin/python benchmarks/report.py --restore       # runs/bench back from the README

``runs/bench`` is not in the repository, so a fresh checkout has none: ``--restore`` writes
it back from the README's results (the JSON lines and each benchmark's command, commit,
date, wall time and exit code), so that a partial rerun (``run_all.py --only NAME``) and
this script then rewrite that benchmark's table and keep every other one.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BEGIN = "<!-- results:begin (written by benchmarks/report.py; edits here are overwritten) -->"
END = "<!-- results:end -->"

Col = tuple[str, Any]  # (header, key or row -> value)


@dataclass
class Table:
    file: str  # the run_all.py name
    bench: str | None  # rows whose "bench" field is this (None: every row of the file)
    title: str
    cols: list[Col]
    where: Callable[[dict], bool] = field(default=lambda r: True)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        if v != v:
            return "nan"
        a = abs(v)
        if a >= 1e6:
            return f"{v / 1e6:.2f}M"
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.3g}" if a < 1 else f"{v:.2f}"
    if isinstance(v, int) and abs(v) >= 10000:
        return f"{v:,d}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def _get(row: dict, key: Any) -> Any:
    if callable(key):
        try:
            return key(row)
        except (KeyError, TypeError, ValueError, ZeroDivisionError):
            return None
    return row.get(key)


def _mega(key: str) -> Callable[[dict], Any]:
    return lambda r: None if r.get(key) is None else r[key] / 1e6


_STRAGGLER_COLS: list[Col] = [
    ("workers", "workers"), ("mode", "mode"), ("samples/s", "tessera_samples_per_s"),
    ("vs sync", "vs_sync_samples_per_s"), ("eval accuracy", "eval_accuracy"),
    ("points vs sync", "vs_sync_accuracy_points")]

TABLES = [
    Table("startup", "startup", "Job start-up: the fork server against fresh processes, "
          "and the warm pool", [
              ("job", "job"), ("rounds", "rounds"),
              ("fork: start to exit s", "fork_wall_s"), ("fresh s", "fresh_wall_s"),
              ("ratio", "fork_vs_fresh_wall"),
              ("fork: start to first step s", "fork_first_step_s"),
              ("fresh s", "fresh_first_step_s"), ("ratio", "fork_vs_fresh_first_step"),
              ("CPU ratio", "fork_vs_fresh_cpu"),
              ("pool: start to exit s", "pool_wall_s"), ("pool / fork", "pool_vs_fork_wall"),
              ("pool: first step s", "pool_first_step_s"),
              ("pool / fork CPU", "pool_vs_fork_cpu")]),
    Table("ps_roundtrip", "ps_roundtrip", "Dense push + pull against raw ZeroMQ and "
          "`torch.distributed.rpc`", [
              ("elements", lambda r: f"{r['elements'] / 1e6:g}M"), ("servers", "servers"),
              ("tessera GB/s", "tessera_gbps"), ("zmq GB/s", "zmq_gbps"),
              ("rpc GB/s", "rpc_gbps"), ("gloo all-reduce GB/s", "gloo_allreduce_gbps"),
              ("zmq + SGD GB/s", "zmq_sgd_gbps"),
              ("tessera / zmq", "tessera_vs_zmq"), ("tessera / rpc", "tessera_vs_rpc"),
              ("tessera / zmq + SGD", "tessera_vs_zmq_sgd"),
              ("CPU ms/iter tessera (worker)", lambda r: f"{r['tessera_cpu_ms_per_iter']:.0f} "
               f"({r['tessera_worker_cpu_ms_per_iter']:.0f})"),
              ("CPU ms/iter zmq (worker)", lambda r: f"{r['zmq_cpu_ms_per_iter']:.0f} "
               f"({r['zmq_worker_cpu_ms_per_iter']:.0f})")]),
    Table("shm_roundtrip", "shm_roundtrip", "Shared memory on one host against loopback TCP", [
        ("elements", lambda r: f"{r['elements'] / 1e6:g}M"), ("servers", "servers"),
        ("shm GB/s", "shm_gbps"), ("tcp GB/s", "tcp_gbps"), ("zmq echo GB/s", "zmq_gbps"),
        ("rpc (same-host channel) GB/s", "rpc_gbps"),
        ("shm / tcp", "shm_vs_tcp"), ("shm / rpc", "shm_vs_rpc"),
        ("CPU ms/iter shm", "shm_cpu_ms_per_iter"),
        ("CPU ms/iter tcp", "tcp_cpu_ms_per_iter"), ("same values", "same_values"),
        ("payload through shm", "shm_payload_share")]),
    Table("server_load", "server_load", "One server under many clients (async 16 KiB pushes)", [
        ("clients", "clients"), ("tessera ops/s", "tessera_ops_per_s"),
        ("zmq echo ops/s", "zmq_ops_per_s"), ("ops ratio", "tessera_ops_vs_zmq"),
        ("zmq + SGD ops/s", "zmq_sgd_ops_per_s"), ("tessera / zmq + SGD", "tessera_ops_vs_zmq_sgd"),
        ("tessera p50 / p99 ms", lambda r: f"{r['tessera_p50_ms']:.2f} / "
         f"{r['tessera_p99_ms']:.2f}"),
        ("echo p50 / p99 ms", lambda r: f"{r['zmq_p50_ms']:.2f} / {r['zmq_p99_ms']:.2f}"),
        ("p99 ratio", "tessera_p99_vs_zmq"),
        ("server CPU µs/op tessera", "tessera_server_cpu_us_per_op"),
        ("echo", "zmq_server_cpu_us_per_op"), ("zmq + SGD", "zmq_sgd_server_cpu_us_per_op"),
        ("lost updates", "tessera_lost_updates")]),
    Table("server_costs", "server_load", "Where a push's server CPU goes (µs per request, "
          "by phase: `server_load.py --systems tessera_costs`)", [
              ("clients", "clients"),
              *[(phase, (lambda p: lambda r: r["tessera_costs_server_cpu_us_per_msg"][p])(phase))
                for phase in ("decode", "validation", "dedup", "copy", "replicate", "apply",
                              "encode", "other")],
              ("serve thread total", lambda r: r["tessera_costs_server_cpu_us_per_msg"]["total"]),
              ("process CPU µs/op", "tessera_costs_server_cpu_us_per_op"),
              ("echo's", "zmq_server_cpu_us_per_op")]),
    Table("sparse_embedding", "sparse_embedding", "Embedding rows: pulls and pushes per "
          "server, against an rpc server and one process", [
              ("servers", "servers"), ("batch", "batch"), ("unique rows", "unique_rows"),
              ("tessera shm", lambda r: r.get("shm", "off")),
              ("tessera pull M rows/s/server", _mega("tessera_pull_rows_per_server_per_s")),
              ("push", _mega("tessera_push_rows_per_server_per_s")),
              ("rpc pull", _mega("rpc_pull_rows_per_server_per_s")),
              ("rpc push", _mega("rpc_push_rows_per_server_per_s")),
              ("local pull", _mega("local_pull_rows_per_s")),
              ("local push", _mega("local_push_rows_per_s")),
              ("tessera / rpc pull", "tessera_vs_rpc_pull"),
              ("push", "tessera_vs_rpc_push"),
              ("tessera / local pull", "tessera_vs_local_pull"),
              ("push", "tessera_vs_local_push")]),
    Table("sparse_embedding", "sparse_embedding_tables", "Every table of a step in one "
          "message per server, against one message per table", [
              ("tables", "tables"), ("servers", "servers"),
              ("unique rows per table", "unique_rows_per_table"),
              ("messages/step batched", "messages_per_step_batched"),
              ("per table", "messages_per_step_per_table"),
              ("step ms batched", "batched_step_ms"), ("per table", "per_table_step_ms"),
              ("per table / batched", "batched_vs_per_table")]),
    Table("sparse_embedding", "sparse_kernels", "The server's per-row loops on rows from "
          "memory (4,100 random rows of a 1.5M-row table per call, dim 64)", [
              ("loop", "kernel"), ("table rows", "table_rows"), ("calls", "calls"),
              ("tessera µs", "tessera_us"), ("plain loop µs", "plain_loop_us"),
              ("numpy take µs", "numpy_take_us"),
              ("torch index_select µs", "torch_index_select_us"),
              ("plain / tessera", "tessera_vs_plain"), ("numpy / tessera", "tessera_vs_numpy"),
              ("torch / tessera", "tessera_vs_torch")]),
    Table("train_throughput", "train_throughput", "MNIST CNN, 2 workers: sync PS against DDP", [
        ("mode", "mode"), ("servers", "servers"), ("steps", "steps"),
        ("tessera samples/s", "tessera_samples_per_s"),
        ("steady", "tessera_steady_samples_per_s"), ("DDP samples/s", "ddp_samples_per_s"),
        ("ratio", "ratio"), ("ratio steady", "ratio_steady")]),
    Table("precision", "precision_wire", "Half-width wire: 25M push + pull", [
        ("elements", "elements"), ("wire", "wire_dtype"), ("ms", "tessera_ms"),
        ("time vs fp32", "vs_fp32_time"), ("CPU vs fp32", "vs_fp32_cpu"),
        ("bytes vs fp32", "vs_fp32_bytes")]),
    Table("precision", "precision_train", "Training under bf16 / fp16 (2 workers, sync PS)", [
        ("model", "model"), ("precision", "precision"), ("compute", "compute"),
        ("samples/s", "tessera_samples_per_s"), ("vs fp32", "vs_fp32_samples_per_s"),
        ("worker CPU vs fp32", "vs_fp32_worker_cpu"), ("eval loss", "eval_loss"),
        ("eval accuracy", "eval_accuracy")]),
    Table("precision", "precision_torch", "The same models in plain torch, one process", [
        ("model", "model"), ("variant", "variant"), ("threads", "threads"),
        ("CPU ms/step", "cpu_ms_per_step"), ("vs fp32", "vs_fp32_speed")]),
    Table("precision", "precision_kernels", "Kernels alone: fp32, bf16 and fp16 on this CPU", [
        ("kernel", "kernel"), ("dtype", "dtype"), ("threads", "threads"),
        ("CPU µs/call", "cpu_us_per_call"), ("speed vs fp32", "vs_fp32_speed")]),
    Table("precision", "precision_cpu", "The CPU's half-precision instructions", [
        ("avx512_bf16", "avx512_bf16"), ("amx_bf16", "amx_bf16"),
        ("avx512_fp16", "avx512_fp16")]),
    Table("profiler_overhead", "profiler_overhead", "Profiler overhead, whole job", [
        ("job", "job"), ("steps", "steps"), ("rounds", "rounds"),
        ("CPU ms/step off", "off_cpu_ms_per_step"), ("on", "profile_cpu_ms_per_step"),
        ("CPU overhead", "cpu_overhead"), ("wall overhead", "overhead")]),
    Table("profiler_overhead", "profiler_inproc", "Profiler overhead, in one process", [
        ("model", "model"), ("blocks", "blocks"), ("steps/block", "block_steps"),
        ("CPU ms/step off", "off_cpu_ms_per_step"),
        ("on", "profile_cpu_ms_per_step"), ("CPU overhead", "cpu_overhead"),
        ("its standard error", "cpu_overhead_se"),
        ("A/A control", "control_cpu_overhead"), ("spans/step", "spans_per_step")]),
    Table("allreduce_vs_ps", "allreduce_vs_ps", "All-reduce, sync and async PS against DDP", [
        ("workers", "workers"), ("steps", "steps"),
        ("tessera allreduce samples/s", "tessera_allreduce_samples_per_s"),
        ("sync PS", "tessera_sync_samples_per_s"), ("async PS", "tessera_async_samples_per_s"),
        ("DDP", "ddp_samples_per_s"), ("allreduce / DDP", "allreduce_vs_ddp"),
        ("sync / DDP", "sync_vs_ddp"), ("async / DDP", "async_vs_ddp")]),
    Table("recipe_throughput", "recipe_throughput", "Your own recipe (examples/recipe.py) "
          "under tessera launch against the same script on DDP", [
        ("workers", "workers"), ("timed steps", "steps"), ("rounds", "rounds"),
        ("sync PS samples/s", "tessera_sync_samples_per_s"),
        ("allreduce", "tessera_allreduce_samples_per_s"), ("DDP", "ddp_samples_per_s"),
        ("sync / DDP", "sync_vs_ddp"), ("allreduce / DDP", "allreduce_vs_ddp"),
        ("test accuracy sync / allreduce / DDP", lambda r: " / ".join(
            _fmt(r[f"{k}_eval_accuracy"]) for k in ("tessera_sync", "tessera_allreduce",
                                                     "ddp")))]),
    Table("metric_collectives", "metric_collectives", "A recipe's metric collectives: the "
          "server modes' group against Gloo (µs per call, 2 workers)", [
        ("call", "call"), ("calls", "calls"), ("rounds", "rounds"),
        ("tessera (sync) µs", "tessera_us"), ("tessera allreduce mode (Gloo) µs",
                                               "tessera_gloo_us"),
        ("plain Gloo (DDP) µs", "gloo_us"), ("tessera / plain Gloo", "tessera_vs_gloo")]),
    Table("stragglers", "stragglers", "A persistent 3x straggler: sync, ssp K=2, async and "
          "the balancing remedy", [*_STRAGGLER_COLS, ("samples per worker", "samples_per_worker"),
                                   ("slow factor", "slow_factor")]),
    Table("stragglers_transient", "stragglers", "Transient stragglers (p = 0.25, 3x)", [
        *_STRAGGLER_COLS, ("delayed steps", "delayed_steps"),
        ("ssp's ceiling vs sync (these draws)", "ceiling_vs_sync"),
        ("no bound's", "unbounded_ceiling_vs_sync"), ("measured / ceiling", "vs_ceiling")]),
    Table("pipeline", "pipeline", "Pipeline stages: GPipe and 1F1B", [
        ("stages", "stages"), ("microbatches", "microbatches"), ("batch", "batch"),
        ("one process s/step", "single_process_step_s"), ("ideal bubble", "ideal_bubble"),
        ("GPipe s/step", "gpipe_step_s"), ("bubble", "gpipe_bubble"),
        ("1F1B s/step", "1f1b_step_s"), ("bubble", "1f1b_bubble"),
        ("1F1B / GPipe peak memory", "1f1b_vs_gpipe_peak_memory")]),
    Table("lm_shakespeare", "lm_shakespeare", "A transformer LM on Shakespeare, 2 workers", [
        ("parameters", lambda r: f"{r['parameters'] / 1e6:.1f}M"), ("steps", "steps"),
        ("PS fp32 samples/s", "ps_fp32_samples_per_s"), ("PS bf16", "ps_bf16_samples_per_s"),
        ("allreduce", "allreduce_samples_per_s"), ("DDP", "ddp_samples_per_s"),
        ("PS fp32 / DDP", "ps_fp32_vs_ddp"), ("PS bf16 / DDP", "ps_bf16_vs_ddp"),
        ("bf16 / fp32 wire", "ps_bf16_vs_ps_fp32"), ("allreduce / DDP", "allreduce_vs_ddp"),
        ("fp32 losses agree", "fp32_final_losses_agree")]),
    Table("table_cache", "table_cache", "Prefetch and a worker row cache against all-local "
          "embeddings", [
              ("id space", "id_space"), ("dim", "dim"), ("batch", "batch"),
              ("local samples/s", "local_samples_per_s"),
              ("tessera", "tessera_samples_per_s"),
              ("+prefetch", "tessera_prefetch_samples_per_s"),
              ("+prefetch 1 clock stale", "tessera_overlap_samples_per_s"),
              ("+cache", "tessera_cached_samples_per_s"),
              ("tessera / local", "tessera_vs_local"),
              ("prefetch / local", "tessera_prefetch_vs_local"),
              ("stale prefetch / local", "tessera_overlap_vs_local"),
              ("cached / local", "tessera_cached_vs_local"),
              ("CPU: best / local", lambda r: max(r.get(f"{s}_vs_local_cpu") or 0 for s in (
                  "tessera", "tessera_prefetch", "tessera_overlap", "tessera_cached"))),
              ("cache hit rate", "cache_hit_rate")]),
    Table("elastic", "elastic", "A hot server: automatic migration against none", [
        ("case", "case"), ("job", "job"), ("slowed", "slow_what"), ("steps", "steps"),
        ("rounds", "rounds"), ("static train s", "static_train_s"),
        ("rebalance train s", "rebalance_train_s"), ("sooner %", "sooner_pct"),
        ("whole run, rebalance / static", "rebalance_vs_static_total"),
        ("metric", "eval_metric"),
        ("static", lambda r: r.get("static_eval", r.get("static_eval_accuracy"))),
        ("rebalance", lambda r: r.get("rebalance_eval", r.get("rebalance_eval_accuracy"))),
        ("pushes acked = applied", "pushes_ok"), ("moves", "rebalance_moves")]),
    Table("replication_cost", None, "What `--replication 2` costs (digits)", [
        ("case", "case"), ("mode", "mode"), ("epochs", "epochs"), ("median s", "median_s"),
        ("vs unreplicated", "vs_unreplicated"), ("vs same servers", "vs_same_servers"),
        ("CPU ms/step", "cpu_ms_per_step")]),
    Table("replicated_batching", None, "Batching with `--replication 2`", [
        ("case", "case"), ("mode", "mode"), ("median s", "median_s"),
        ("vs unbatched", "vs_unbatched"), ("CPU ms/step", "cpu_ms_per_step"),
        ("messages", "messages")]),
    Table("delta_checkpoint", "delta_checkpoint", "Delta checkpoints against full ones", [
        ("shards", "shards"), ("every", "every"), ("rows at end", "rows_at_end"),
        ("checkpoints", lambda r: len(r["bytes_full_run"])),
        ("MB full run", lambda r: sum(r["bytes_full_run"]) / 1e6),
        ("MB delta run", lambda r: sum(r["bytes_delta_run"]) / 1e6),
        ("delta / full bytes", "run_bytes_delta_vs_full"),
        ("export s full", "export_s_full"), ("export s delta chain", "export_s_delta_chain"),
        ("exports identical", "exports_identical")]),
    Table("movielens_seeds", "movielens_seeds", "MovieLens-100k test RMSE on every seed", [
        ("seeds", "seeds"), ("current recipe RMSE", "current_rmse"),
        ("worst", "current_worst_rmse"), ("previous recipe RMSE", "previous_rmse"),
        ("goal", "goal_rmse"), ("met", "current_meets_goal")],
        where=lambda r: "seeds" in r),
    Table("faults", None, "Kills at random moments while training runs", [
        ("case", "case"), ("completed", lambda r: f"{r['completed']}/{r['trials_run']}"),
        ("replaced", "replaced"), ("acked lost", "acked_lost"),
        ("acked − applied", "acked_minus_applied"), ("beyond bound", "beyond_bound"),
        ("metric", "metric"), ("median / worst", lambda r: f"{_fmt(r['metric_median'])} / "
                                                          f"{_fmt(r['metric_worst'])}"),
        ("bar", "bar"), ("recovery s median / max", lambda r: f"{r['recovery_s_median']} / "
                                                              f"{r['recovery_s_max']}")]),
    Table("table_memory", "table_memory", "Table memory under a byte cap", [
        ("distinct ids", "distinct_ids"), ("stream s", "stream_s"), ("cap MB", "cap_mb"),
        ("peak RSS MB", "peak_rss_mb"), ("over cap %", "over_cap_pct"),
        ("evictions", "evictions"), ("unbounded peak RSS MB", "unbounded_peak_rss_mb"),
        ("ids/s", "ids_per_s")]),
    Table("table_memory", "table_memory_auc", "The clicks job, capped against unbounded", [
        ("cap MB/server", "cap_mb_per_server"),
        *[(head, (lambda k: lambda r: f"{r[k]:.5f}")(key)) for head, key in (
            ("unbounded AUC", "unbounded_auc"), ("capped AUC", "capped_auc"),
            ("gap", "auc_gap"), ("reference AUC", "reference_auc"))]]),
]


# ---- goals: (issue, figure, goal, evaluate(data) -> (measured text, met or None)) ----------

def _rows(data: dict, file: str, bench: str | None = None) -> list[dict]:
    return [r for r in data.get(file, []) if bench is None or r.get("bench") == bench]


def _span(vals: list[float]) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "–"
    lo, hi = min(vals), max(vals)
    return f"{_fmt(lo)}" if lo == hi else f"{_fmt(lo)}–{_fmt(hi)}"


def _all_at_least(rows: list[dict], keys: str | tuple[str, ...], bar: float,
                  scale: float = 1.0):
    keys = (keys,) if isinstance(keys, str) else keys
    vals = [r[k] * scale for r in rows for k in keys if r.get(k) is not None]
    if not vals:
        return "not run", None
    return _span(vals), min(vals) >= bar


def _all_at_most(rows: list[dict], key: str, bar: float, digits: int = 0):
    vals = [r[key] for r in rows if r.get(key) is not None]
    if not vals:
        return "not run", None
    text = ", ".join(f"{v:.{digits}f}" for v in vals) if digits else _span(vals)
    return text, max(vals) <= bar


def _embedding(data):
    """Issue 15's figure is one server's rows/s; the 2-server rows (two servers and the
    client on the test machine's 2 cores) are shown beside it, without a goal."""
    keys = ("tessera_pull_rows_per_server_per_s", "tessera_push_rows_per_server_per_s")
    rows = _rows(data, "sparse_embedding")
    text, met = _all_at_least([r for r in rows if r.get("servers") == 1], keys, 3.0, 1e-6)
    more, _ = _all_at_least([r for r in rows if (r.get("servers") or 1) > 1], keys, 0.0, 1e-6)
    if more != "not run":
        text += f" (per server with 2 servers, no goal: {more})"
    return text, met


def _wire(data):
    short = {"bfloat16": "bf16", "float16": "fp16", "bf16": "bf16", "fp16": "fp16"}
    rows = [r for r in _rows(data, "precision", "precision_wire")
            if r.get("wire_dtype") in short]
    vals = {short[r["wire_dtype"]]: r["vs_fp32_time"] for r in rows}
    if not vals:
        return "not run", None
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(vals.items())), max(vals.values()) <= 0.6


def _train_prec(data, model, precision, bar):
    rows = [r for r in _rows(data, "precision", "precision_train") if r.get("model") == model
            and r.get("precision") == precision]
    return _all_at_least(rows, "vs_fp32_samples_per_s", bar)


def _overhead(data):
    """Judged on the in-process pairing (the worker thread's CPU per step, recorder on
    and off in adjacent blocks of one process); the whole-job figure, separate jobs whose
    CPU per step swings more between rounds than the profiler costs, is shown beside it."""
    whole = [r["cpu_overhead"] for r in _rows(data, "profiler_overhead", "profiler_overhead")
             if r.get("cpu_overhead") is not None]
    inproc = [r for r in _rows(data, "profiler_overhead", "profiler_inproc")
              if r.get("cpu_overhead") is not None]
    paired = [r["cpu_overhead"] for r in inproc]
    control = [r["control_cpu_overhead"] for r in inproc if "control_cpu_overhead" in r]
    def pct(vals):
        return ", ".join(f"{100 * v:+.2f}%" for v in vals)
    se = [r["cpu_overhead_se"] for r in inproc if "cpu_overhead_se" in r]
    parts = ([f"{pct(paired)}"
              + (" ± " + ", ".join(f"{100 * v:.2f}" for v in se) if se else "")
              + " paired in one process"
              + (f" (A/A control {pct(control)})" if control else "")] if paired else []) + \
        ([f"whole job {pct(whole)}"] if whole else [])
    if not parts:
        return "not run", None
    return "; ".join(parts), (max(paired) <= 0.01) if paired else None


def _straggle(data, file, mode, bar):
    rows = [r for r in _rows(data, file, "stragglers") if r.get("mode") == mode]
    if not rows:
        return "not run", None
    speed = [r["vs_sync_samples_per_s"] for r in rows]
    pts = [r["vs_sync_accuracy_points"] for r in rows]
    more = " (more accurate)" if min(pts) > 0 else ""
    return (f"{_span(speed)}× at {_span(pts)} accuracy points vs sync{more}",
            min(speed) >= bar and min(pts) >= -0.5)


def _table_cache(data):
    rows = _rows(data, "table_cache")
    keys = ("tessera_vs_local", "tessera_prefetch_vs_local", "tessera_overlap_vs_local",
            "tessera_cached_vs_local")
    vals = [max(r.get(k) or 0 for k in keys) for r in rows]
    return (_span(vals), min(vals) >= 0.8) if vals else ("not run", None)


def _faults(data):
    rows = _rows(data, "faults")
    if not rows:
        return "not run", None
    done = sum(r["completed"] for r in rows)
    trials = sum(r["trials_run"] for r in rows)
    lost = sum(r["acked_lost"] for r in rows)
    rec = [r["recovery_s_max"] for r in rows if r.get("recovery_s_max") is not None]
    below = sum(r.get("below_bar", 0) for r in rows)
    return (f"{done}/{trials} completed, {lost} acked lost, {below} below bar, "
            f"recovery max {_fmt(max(rec)) if rec else '–'} s",
            done == trials and lost == 0 and below == 0 and all(x <= 5 for x in rec))


def _mnist(data):
    rows = _rows(data, "train_throughput")
    if not rows:
        return "not run", None
    steady = [r["ratio_steady"] for r in rows]
    return (f"{_span(steady)} (whole loop with its evaluations and first steps: "
            f"{_span([r['ratio'] for r in rows])})", min(steady) >= 1.0)


def _all_true(rows: list[dict], key: str):
    if not rows:
        return "not run", None
    ok = all(r[key] for r in rows)
    return _fmt(ok), ok


def _movielens(data):
    rows = _rows(data, "movielens_seeds", "movielens_seeds")
    if not rows:
        return "not run", None
    return f"worst {rows[-1]['current_worst_rmse']}", rows[-1]["current_meets_goal"]


def _dense_rpc(data):
    """Tessera against rpc in two pairs that move bytes alike: over TCP (ps_roundtrip,
    rpc's tensors over its TCP connection too), and on one host by each system's own
    same-host path (shm_roundtrip: Tessera's shared memory, rpc's cross-memory attach)."""
    tcp = [r for r in _rows(data, "ps_roundtrip") if r.get("rpc_channels") == "basic"]
    host = _rows(data, "shm_roundtrip")
    parts = [(name, _all_at_least(rows, key, 1.2)) for name, rows, key in (
        ("over TCP", tcp, "tessera_vs_rpc"), ("one host", host, "shm_vs_rpc"))]
    if all(ok is None for _, (_, ok) in parts):
        return "not run", None
    return ("; ".join(f"{name} {text}" for name, (text, _) in parts),
            all(ok is True for _, (_, ok) in parts))


def _replication(data):
    """Issue 14: 3 servers with --replication 2 against 2 unreplicated ones, every mode
    measured (and, shown beside it, against 3 unreplicated servers)."""
    rows = [r for r in _rows(data, "replication_cost") if r["case"] == "3 servers --replication 2"]
    if not rows:
        return "not run", None
    text = ", ".join(f"{r['mode']} {_fmt(r['vs_unreplicated'])} (vs 3 unreplicated servers: "
                     f"{_fmt(r['vs_same_servers'])})" for r in rows)
    return text, all(r["vs_unreplicated"] <= 1.3 for r in rows)


GOALS = [
    ("15", "dense push+pull vs raw pyzmq, every size", "≥ 0.9×",
     lambda d: _all_at_least(_rows(d, "ps_roundtrip"), "tessera_vs_zmq", 0.9)),
    ("15", "dense push+pull vs `torch.distributed.rpc`, every size (like for like: "
     "both over TCP; both by their same-host paths)", "≥ 1.2×", _dense_rpc),
    ("15", "server under 64 clients: ops/s vs echo", "≥ 0.8×",
     lambda d: _all_at_least(_rows(d, "server_load"), "tessera_ops_vs_zmq", 0.8)),
    ("15", "server under 64 clients: p99 vs echo", "≤ 2×",
     lambda d: _all_at_most(_rows(d, "server_load"), "tessera_p99_vs_zmq", 2.0)),
    ("15", "embedding rows, 1 server (the issue's figure), pull and push (M rows/s)", "≥ 3",
     _embedding),
    ("15", "embedding rows vs one process (pull + push iteration)", "≥ 0.5×",
     lambda d: _all_at_least(_rows(d, "sparse_embedding"), "tessera_vs_local", 0.5)),
    ("15", "MNIST CNN, sync PS vs DDP (measured as DDP is: steady steps, no evaluation)",
     "≥ 1.0×", _mnist),
    ("15", "half-width wire, 25M push+pull time vs fp32", "≤ 0.6×", _wire),
    ("15", "training under bf16 vs fp32 (MNIST CNN), samples/s", "≥ 1.0×",
     lambda d: _train_prec(d, "cnn", "bf16", 1.0)),
    ("15", "training under fp16 vs fp32 (MNIST CNN), samples/s", "≥ 1.0×",
     lambda d: _train_prec(d, "cnn", "fp16", 1.0)),
    ("15", "training under bf16 vs fp32 (char transformer), samples/s", "≥ 1.2×",
     lambda d: _train_prec(d, "transformer", "bf16", 1.2)),
    ("15", "training under fp16 vs fp32 (char transformer), samples/s", "≥ 1.2×",
     lambda d: _train_prec(d, "transformer", "fp16", 1.2)),
    ("15", "profiler overhead (a worker's CPU per step)", "≤ 1%", _overhead),
    ("15", "shared memory vs loopback TCP, 10M+", "≥ 3×",
     lambda d: _all_at_least([r for r in _rows(d, "shm_roundtrip")
                              if r["elements"] >= 10_000_000], "shm_vs_tcp", 3.0)),
    ("15", "transformer LM: sync PS (fp32 wire) vs DDP", "≥ 1.0×",
     lambda d: _all_at_least(_rows(d, "lm_shakespeare"), "ps_fp32_vs_ddp", 1.0)),
    ("15", "transformer LM: bf16 wire vs fp32 wire", "≥ 1.2×",
     lambda d: _all_at_least(_rows(d, "lm_shakespeare"), "ps_bf16_vs_ps_fp32", 1.2)),
    ("15", "transient stragglers: ssp K=2 vs sync, ≤ 0.5 points", "≥ 1.5×",
     lambda d: _straggle(d, "stragglers_transient", "ssp", 1.5)),
    ("15", "persistent 3x straggler: remedy vs sync, ≤ 0.5 points", "≥ 1.5×",
     lambda d: _straggle(d, "stragglers", "balance", 1.5)),
    ("16", "Zipf tables far larger than a worker: best Tessera vs local", "≥ 0.8×",
     _table_cache),
    ("16", "byte cap over 10^8 distinct ids: peak over cap", "≤ 5%",
     lambda d: _all_at_most(_rows(d, "table_memory", "table_memory"), "over_cap_pct", 5.0)),
    ("16", "clicks AUC, capped vs unbounded", "gap ≤ 0.005",
     lambda d: _all_at_most(_rows(d, "table_memory", "table_memory_auc"), "auc_gap", 0.005,
                            digits=5)),
    ("16", "hot server: automatic migration finishes sooner", "≥ 30%",
     lambda d: _all_at_least(_rows(d, "elastic"), "sooner_pct", 30.0)),
    ("16", "delta chain restores what a full checkpoint does", "identical",
     lambda d: _all_true(_rows(d, "delta_checkpoint"), "exports_identical")),
    ("16", "MovieLens test RMSE, every seed", "≤ 0.92", _movielens),
    ("14", "kills at random moments: completed, nothing acked lost, recovery", "all; 0; ≤ 5 s",
     _faults),
    ("14", "3 servers with --replication 2 vs 2 unreplicated (digits wall time)", "≤ 1.3×",
     _replication),
]


def load(out: Path) -> tuple[dict[str, list[dict]], dict]:
    index_path = out / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {}
    data = {}
    for path in sorted(out.glob("*.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    pass
        data[path.stem] = rows
    return data, index


def _plural(n: int) -> str:
    return "" if n == 1 else "s"


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return out


def _same_code(commits: list[str]) -> str:
    """Whether the measured code (tessera/, examples/) is the same at these commits."""
    shas = [c.split("+")[0] for c in commits]
    if len(shas) < 2 or any("+" in c for c in commits):
        return ""
    try:
        same = all(subprocess.run(["git", "diff", "--quiet", shas[0], sha, "--", "tessera",
                                   "examples"], cwd=ROOT, timeout=30).returncode == 0
                   for sha in shas[1:])
    except (OSError, subprocess.TimeoutExpired):
        return ""
    if same:
        return (" `tessera/` and `examples/` are the same at these commits (only benchmarks "
                "or docs changed between them).")
    try:
        files = subprocess.run(["git", "diff", "--name-only", shas[0], shas[-1], "--",
                                "tessera", "examples"], cwd=ROOT, timeout=30,
                               capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.TimeoutExpired):
        files = []
    return (f" **`tessera/` differs between these commits** (`git diff {shas[0]} {shas[-1]}`: "
            f"{', '.join(f'`{f}`' for f in files) or 'see git'}): a row measures the code of "
            f"its own commit.")


def render(data: dict[str, list[dict]], index: dict) -> str:
    lines = [BEGIN, ""]
    commits: dict[str, int] = {}
    for v in index.values():
        if v.get("commit"):
            commits[v["commit"]] = commits.get(v["commit"], 0) + 1
    dates = sorted(v["date"] for v in index.values() if v.get("date"))
    foreign = [r["foreign_cpu_pct"] for rows in data.values() for r in rows
               if isinstance(r.get("foreign_cpu_pct"), (int, float))]
    measured = ", ".join(f"commit `{c}` ({n} benchmark{_plural(n)})"
                         for c, n in commits.items()) or "commit unknown"
    lines += [
        "## Results",
        "",
        f"Written by `benchmarks/report.py` from one `make bench` run: {measured}, "
        f"{dates[0] if dates else '?'} to {dates[-1] if dates else '?'} UTC."
        f"{_same_code(list(commits))} "
        f"`foreign_cpu_pct` (the machine's CPU used by other processes meanwhile) over all "
        f"lines: median {statistics.median(foreign) if foreign else float('nan'):.1f}, "
        f"max {max(foreign) if foreign else float('nan'):.1f}.",
        "",
        "### The issues' goals",
        "",
    ]
    rows = []
    for issue, figure, goal, fn in GOALS:
        try:
            measured, met = fn(data)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            measured, met = f"unreadable ({type(exc).__name__}: {exc})", None
        rows.append([issue, figure, goal, measured,
                     "not run" if met is None else ("**met**" if met else "not met")])
    lines += _markdown_table(["issue", "figure", "goal", "measured", ""], rows)
    met = sum(r[4] == "**met**" for r in rows)
    lines += ["", f"{met} of {len(rows)} goals met in this run.", ""]
    for t in TABLES:
        rows_t = [r for r in data.get(t.file, [])
                  if (t.bench is None or r.get("bench") == t.bench) and t.where(r)]
        info = index.get(t.file, {})
        lines += [f"### {t.title}", ""]
        cmd = " ".join(info.get("argv", [])) or "?"
        meta = f"`{cmd}`"
        if info:
            meta += (f": commit `{info.get('commit')}`, {info.get('date')} UTC, "
                     f"{info.get('wall_s')} s, exit {info.get('rc')}")
        lines += [meta, ""]
        if not rows_t:
            lines += ["Not run in this `make bench` run" + (
                f" (exit {info['rc']}; see `runs/bench/{t.file}.log`)." if info.get("rc")
                else "."), ""]
            continue
        cols = [c for c in t.cols if any(_get(r, c[1]) is not None for r in rows_t)]
        body = [[_fmt(_get(r, c[1])) for c in cols] + [_fmt(r.get("foreign_cpu_pct"))]
                for r in rows_t]
        lines += _markdown_table([c[0] for c in cols] + ["foreign CPU %"], body)
        lines += ["", "<details><summary>JSON lines</summary>", "", "```"]
        lines += [json.dumps(r) for r in rows_t]
        lines += ["```", "", "</details>", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


#: A table's run line as :func:`render` writes it.
_RUN_LINE = re.compile(r"^`(?P<cmd>[^`]*)`: commit `(?P<commit>[^`]*)`, (?P<date>\S+ \S+) UTC, "
                       r"(?P<wall>[-\d.]+) s, exit (?P<rc>-?\d+)$", re.M)


def restore(text: str, out: Path) -> int:
    """Write ``<name>.jsonl`` and ``index.json`` into ``out`` from the results block that
    :func:`render` wrote into ``text``; returns the number of benchmarks found."""
    if BEGIN not in text or END not in text:
        raise ValueError("no results block (its markers) in the README")
    block = text[text.index(BEGIN):text.index(END)]
    file_of = {t.title: t.file for t in TABLES}
    lines: dict[str, list[str]] = {}
    index: dict[str, dict] = {}
    for section in block.split("\n### ")[1:]:
        title, _, body = section.partition("\n")
        name = file_of.get(title.strip())
        if name is None:  # the goals table
            continue
        run = _RUN_LINE.search(body)
        if run:
            index[name] = {"argv": run["cmd"].split(" "), "rc": int(run["rc"]),
                           "wall_s": float(run["wall"]), "commit": run["commit"],
                           "date": run["date"]}
        kept = lines.setdefault(name, [])
        for fenced in re.findall(r"```\n(.*?)```", body, re.S):
            kept += [x for x in fenced.splitlines() if x.startswith("{") and x not in kept]
    out.mkdir(parents=True, exist_ok=True)
    for name, kept in lines.items():
        if kept:
            (out / f"{name}.jsonl").write_text("\n".join(kept) + "\n")
    (out / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    return len(index)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench"), help="run_all.py's output")
    ap.add_argument("--readme", default=str(HERE / "README.md"))
    ap.add_argument("--stdout", action="store_true", help="print the results, write nothing")
    ap.add_argument("--restore", action="store_true",
                    help="write --out back from the README's results (a fresh checkout)")
    args = ap.parse_args()
    out = Path(args.out)
    if args.restore:
        if out.is_dir() and any(out.glob("*.jsonl")):
            print(f"report.py: --out {out} already holds a run; --restore writes only into "
                  f"an empty or missing directory", file=sys.stderr)
            return 2
        try:
            n = restore(Path(args.readme).read_text(), out)
        except (OSError, ValueError) as exc:
            print(f"report.py: cannot restore from {args.readme}: {exc}", file=sys.stderr)
            return 2
        print(f"report.py: wrote {n} benchmarks' lines into {out}", file=sys.stderr)
        return 0
    if not out.is_dir():
        print(f"report.py: --out {out} does not exist; run `make bench` first", file=sys.stderr)
        return 2
    text = render(*load(out))
    if args.stdout:
        sys.stdout.write(text)
        return 0
    readme = Path(args.readme)
    old = readme.read_text()
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + text
    readme.write_text(new)
    n = sum(1 for _ in out.glob("*.jsonl"))
    print(f"report.py: wrote the results of {n} benchmarks to {readme}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
