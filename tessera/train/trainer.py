"""The built-in worker program that ``tessera run`` starts for a job file.

It is an ordinary user of the public API (:mod:`tessera.api`), the same calls
the README shows for your own script, plus logging and evaluation. Whatever the
mode, the loop is one body over the wrapper's protocol
(:class:`tessera.parallel.protocol.DistributedModel`):

    batch -> forward + backward (pushes overlap; a pipeline runs its schedule)
          -> unscale / finite check (fp16, agreed cluster-wide)
          -> step (update, or wait for the servers' values)
          -> log / evaluate -> profiler step

Checkpoints are the servers' (they save their shards at the clocks the
wrapper's pushes ask for), so no checkpoint call appears here.
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from tessera import api
from tessera.cluster.metrics import MetricsLog
from tessera.train.tasks import evaluate, make_task


class TorchOperatorProfile:
    """PyTorch profiler operator detail for ``num_steps`` steps, into the same trace.

    Its events are shifted onto our aligned clock by matching the profiler's first
    event to the moment we started it (good to ~0.1 ms, enough to read operators
    against our spans).
    """

    def __init__(self, recorder, num_steps: int, first_step: int):
        """Operators of steps ``first_step`` .. ``first_step + num_steps - 1``."""
        self.recorder, self.num_steps, self.first_step = recorder, num_steps, first_step
        self.prof = None
        self.started_ns = 0

    def step(self, done: int) -> None:
        """Called after step ``done``: start or stop recording at the right boundary."""
        if not (self.num_steps and self.recorder.enabled):
            return
        step = done + 1  # the step about to start
        if step == self.first_step:
            self.prof = torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU]
                + ([torch.profiler.ProfilerActivity.CUDA] if torch.cuda.is_available() else []))
            self.prof.__enter__()  # slow (~2 s here); the first operator follows at once
            self.started_ns = self.recorder.now()
        elif step == self.first_step + self.num_steps:
            self.stop()

    def stop(self) -> None:
        if self.prof is None:
            return
        import tempfile
        self.prof.__exit__(None, None, None)
        with tempfile.NamedTemporaryFile(suffix=".json") as f:
            self.prof.export_chrome_trace(f.name)
            events = json.loads(open(f.name).read()).get("traceEvents", [])
        self.prof = None
        stamps = [e["ts"] for e in events if e.get("ph") == "X" and "ts" in e]
        if stamps:
            self.recorder.extra["torch_events"] = [e for e in events if e.get("ph") == "X"]
            self.recorder.extra["torch_shift_us"] = self.started_ns / 1000.0 - min(stamps)


def _finite(value):
    """A float for JSON (strict: no NaN or infinity), or None."""
    return value if value is None or math.isfinite(value) else None


def _report_rejoin(session, first_step: int, marks: dict) -> float:
    """A restarted worker says where its rejoin's time went (the launcher's start or
    hand-over of this process, imports, data, registration, the join)."""
    from tessera.config import env as envvars
    started = envvars.started_at(envvars.process_environ()) or marks["main"]
    parts = {"start and imports": marks["main"] - started, "data": marks["data"] - marks["main"],
             "registration": marks["registered"] - marks["data"],
             "join": marks["joined"] - marks["registered"]}
    detail = ", ".join(f"{k} {v:.2f} s" for k, v in parts.items())
    print(f"worker {session.rank}: rejoined the job at clock {first_step}, "
          f"{marks['joined'] - started:.2f} s after it was restarted ({detail})", flush=True)
    return marks["joined"] - started


def main(data=None) -> None:
    """The worker of ``tessera run``; ``data``: the job's dataset, when a standby worker
    (tessera.train.standby) loaded it ahead."""
    marks = {"main": time.time()}
    job = api.init()
    session, cfg = job.session, job.cfg
    threads = cfg.train.threads or max(1, (os.cpu_count() or 1) // cfg.cluster.workers)
    torch.set_num_threads(threads)
    device = torch.device("cuda" if cfg.train.device == "cuda" and torch.cuda.is_available()
                          else "cpu")
    if cfg.train.device == "cuda" and device.type == "cpu" and session.rank == 0:
        print("worker 0: device = 'cuda' asked for but no GPU is visible; computing on the CPU",
              flush=True)

    # Pipelining: worker r is stage r % P of replica r // P; replicas shard the data.
    num_stages = cfg.pipeline.stages
    replica, replicas = session.rank // num_stages, cfg.cluster.workers // num_stages
    task = make_task(cfg, replica, replicas, data)
    session.data_samples = task.num_samples
    torch.manual_seed(cfg.train.seed)
    model = task.build_model().to(device)
    marks["data"] = time.time()
    model = job.distribute(model, cfg.optimizer, loss_fn=task.loss)
    marks["registered"] = time.time()
    restore = session.view.restore
    if restore is not None:  # resumed: the data position of the checkpoint
        task.seek(restore.clock, restore.epoch, restore.offset)
    steps = task.total_steps(cfg)
    if getattr(task, "stream", None) is not None:  # [data] follow: what each worker read
        from tessera.data.stream import StreamLedger
        task.ledger = StreamLedger(session.run_dir, session.rank)
        task.check = session.check
        # Interrupted while waiting for shards: no push would carry the checkpoint
        # request, so every worker ends its loop at the clock it completed and the
        # servers' final checkpoint is taken there.
        task.interrupted = lambda: session.heartbeat.checkpoint_requested
    # A resumed job starts at the checkpoint's clock; a restarted worker where it joined.
    first_step = model.start_step(steps)
    marks["joined"] = time.time()
    tally = session.tally  # this worker's totals over its lives (restarts)
    rejoined = bool(session.view and session.view.incarnation)
    rejoin_s = _report_rejoin(session, first_step, marks) if rejoined else 0.0
    lead = session.rank == num_stages - 1  # worker 0, or replica 0's last stage
    evaluator = replica == 0 if num_stages > 1 else lead  # a pipelined eval needs every stage
    metrics = MetricsLog(session.run_dir, lead=lead, tensorboard=cfg.train.tensorboard)
    if lead:
        streaming = getattr(task, "stream", None) is not None  # no step count ahead
        (session.run_dir / "plan.json").write_text(json.dumps({"steps": None if streaming
                                                               else steps,
                                                               "first_step": first_step}))

    balance = None
    if cfg.train.balance == "speed":  # sync only (the schema refuses other modes)
        from tessera.train.balance import SpeedBalance
        balance = SpeedBalance(model.client, task.sampler)
        balance.after_step(first_step, joined=True)  # a rejoined worker: the current split
    prof = session.profiler
    torch_prof = TorchOperatorProfile(prof, cfg.profile.torch_steps, first_step=2)
    torch_prof.step(first_step)
    t_start = time.perf_counter()
    cpu_start, eval_cpu = time.process_time(), 0.0  # this process's CPU over the loop
    if tally is not None:
        tally.restart_clock()  # the job's clock: the first life's loop start
    t_window, samples_window = t_start, 0
    loss_value = float("nan")
    eval_s = 0.0
    # [model] prefetch: name the next batch (not under speed balancing: its split moves)
    # (nor on a followed stream: its next batch may not have arrived yet)
    # (with --replication 2 a prefetched row pull whose server died is re-sent to the
    # rows' new server: PSClient.reroute)
    prefetch = (cfg.model.prefetch and balance is None and not cfg.data.follow
                and bool(getattr(model, "tables", None)))
    ahead = None
    for step in range(first_step + 1, steps + 1):
        if balance is not None:
            balance.begin()
        with prof.span("data", "data"):
            if ahead is not None and ahead[0] == step - 1:
                got = ahead[1]  # named to model.prefetch last step
            else:
                got = task.batch(step - 1, device)
        if got is None:  # a followed stream ended (every worker ends at the same step)
            steps = step - 1
            break
        inputs, target = got
        if prefetch and step < steps:  # the next batch's rows: with this step's pushes
            with prof.span("data", "data"):  # (or now, where rows may be a clock old)
                ahead = (step, task.batch(step, device))
            model.prefetch(*ahead[1][0], after_push=True)
        # forward and backward; pushes overlap backward (spans recorded by the wrapper)
        loss = model.forward_backward(inputs, target, task.loss)
        if balance is not None:
            balance.computed()
        # update (or skip everywhere: fp16 overflow), or wait for the servers' values;
        # step() unscales and agrees first (not unscale_() here: with servers that
        # agree, the pull of the next clock then leaves with the pushes)
        model.step()
        if balance is not None:
            balance.after_step(model.clock)
        loss_value = None if loss is None else loss.item()  # None: not the last stage
        # The job's samples this step, as this worker counts them (balance: its share
        # varies, the global batch does not).
        job_samples = (cfg.data.batch_size if balance is not None else len(target)) * replicas
        samples_window += job_samples
        if tally is not None:
            tally.trained(job_samples, loss_value)
        if (rejoined or session.generation) and step == first_step + 1:
            print(f"worker {session.rank}: completed step {step} at unix {time.time():.3f}",
                  flush=True)
        # log / evaluate (the lead writes metrics.jsonl)
        evaluate_now = step % cfg.train.eval_every == 0 or step == steps
        now = time.perf_counter()  # throughput is measured before evaluation, without it
        result = {}
        if evaluator and evaluate_now:
            cpu_eval = time.process_time()
            with prof.span("eval", "eval"):
                result = evaluate(task, model, device)
            eval_cpu += time.process_time() - cpu_eval
            eval_s += time.perf_counter() - now
            if tally is not None:
                tally.add_eval(time.perf_counter() - now)
        if lead and (step % cfg.train.log_every == 0 or evaluate_now):
            metrics.log({"loss": _finite(loss_value),
                         "samples_per_s": samples_window / max(now - t_window, 1e-9),
                         "wall_s": (time.time() - tally.started_unix if tally is not None
                                    else now - t_start),
                         "time": time.time(), **result}, step=step)
            t_window, samples_window = time.perf_counter(), 0
        prof.instant("step", "step", step=step)  # profiler step: this step ends here
        torch_prof.step(step)
    wall = time.perf_counter() - t_start
    loop_cpu = time.process_time() - cpu_start - eval_cpu
    torch_prof.stop()

    # samples/s counts training time only: evaluation is reported apart, as eval_s.
    # Over every life of this worker (--max-restarts): wall from the first life's start.
    done = steps - first_step
    samples = done * cfg.data.batch_size * replicas
    if tally is not None:
        wall = time.time() - tally.started_unix
        samples, eval_s = int(tally.get("samples")), tally.get("eval_s")
        if lead and (loss_value is None or not math.isfinite(loss_value)):
            loss_value = tally.get("last_loss")  # this life ran no step: the last one's
    # This worker's own samples (a pipeline counts each replica's once, at its last stage):
    # the coordinator sums them over the workers for the job's rate, so that workers
    # running at different rates (async, ssp) are each counted as they ran.
    last_stage = session.rank % num_stages == num_stages - 1
    stats = {"steps": steps, "first_step": first_step, "wall_s": wall,
             "final_loss": _finite(loss_value), "eval_s": eval_s,
             "samples_per_s": samples / max(wall - eval_s, 1e-9),
             "own_samples": samples // replicas if last_stage else 0,
             "comm_wait_s": model.comm_wait_s,
             # CPU seconds of this process over its loop, evaluation left out (this life)
             "loop_cpu_s": loop_cpu, "loop_steps": done}
    if rejoined:
        stats.update(rejoined_at_unix=marks["joined"], rejoin_s=rejoin_s)
    if balance is not None:
        stats.update(balance.stats())
    # The evaluated values are the servers' latest, after every worker's last push
    # (async/ssp: the others may still be pushing when this worker ends its loop).
    job.settle()
    if evaluator:
        final = evaluate(task, model, device)
        if lead:
            stats.update(final)
    metrics.close()
    job.finish(**stats)


if __name__ == "__main__":
    from tessera.cluster.role import run_guarded
    from tessera.config import env as _env, nopickle as _nopickle
    _nopickle.install_if_asked(_env.process_environ())  # tests: unpickling ends the process
    run_guarded(main, "worker")
