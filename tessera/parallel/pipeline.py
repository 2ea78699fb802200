"""Pipeline model parallelism: a model cut into stages, one worker process per stage.

Mechanism (who sends what to whom) comes from ``torch.distributed.pipelining``,
which works on Gloo and the CPU in the torch versions we support: a
:class:`~torch.distributed.pipelining.PipelineStage` per process sends
activations forward and gradients backward between neighbouring stages, and
the schedules split each batch into micro-batches:

* GPipe (Huang et al., 2019): all micro-batches forward, then all backward. Every
  stage holds the activations of all M micro-batches at the peak.
* 1F1B (PipeDream-Flush, Narayanan et al., 2019): after a warm-up of at most P
  forwards, each stage alternates one forward and one backward, so it holds the
  activations of at most P micro-batches, not M.

Both have the same bubble, (P - 1) / (M + P - 1) of a step, and both compute
exactly the gradient of the mean loss over the batch: the schedules scale each
micro-batch loss by 1/M (tests hold this against the unsplit model).

What Tessera adds around it (policy):

1. *Cutting*: the model is an ``nn.Sequential``; stage boundaries come from
   :class:`Stage` markers in it, from ``pipeline.split_points`` (names of the
   children where stages 1..P-1 begin), or, by default, from balancing the
   parameter count (the contiguous split minimising the largest stage).
2. *Replicas*: W workers and P stages give W/P pipeline replicas; worker r is
   stage ``r % P`` of replica ``r // P``. After the schedule, the gradients of
   each stage are averaged over its replicas (an all-reduce in the group of
   that stage), and each stage steps its own optimizer.
3. *Evaluation*: a forward-only pass along the replica's pipeline by plain
   point-to-point sends of the activations, without autograd state.
4. *Shapes, computed locally*: every stage is given the shapes of what it
   receives and sends (``PipelineStage``'s static ``input_args`` and
   ``output_args``), computed by running meta copies of the stages up to its own
   on the shape of this process's batch (every stage of a replica is called with
   the same batch). So torch never infers them at run time, which it does by
   ``send_object_list``/``recv_object_list`` (pickle), and no receive is sized
   by a peer: every receive buffer's size comes from the model and the local
   batch, and Gloo refuses a message of another size.
5. *Checkpoints* (``--checkpoint-every N``): the stages step in lock-step (the
   schedule needs every stage of a replica for each step, and the replicas'
   all-reduce every replica), so after step ``N`` every stage holds its part of one
   model state. Replica 0's stage ``s`` (rank ``s``) writes its parameters,
   buffers and optimizer state as ``worker-<s>.safetensors`` (the format of
   :mod:`tessera.parallel.dense_checkpoint`) and reports it; the coordinator
   writes the manifest once every stage has. The replicas are equal (replica 0's
   parameters are broadcast at the start, and each step averages the gradients),
   so one replica's files are the job's: on ``--resume``, or when the launcher
   re-forms the group after a worker died, every replica's stage ``s`` loads file
   ``s`` (another replica count is fine; the stage count must be the same).
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch import nn

from tessera.config.schema import OptimizerConfig, PipelineConfig
from tessera.errors import UsageError
from tessera.parallel.dense_checkpoint import DenseCheckpoints, dense_state, load_dense, read_dense
from tessera.parallel.protocol import DistributedModel
from tessera.profiler.recorder import OFF, SpanRecorder
from tessera.ps.optim import torch_optimizer


class Stage(nn.Identity):
    """Marker module: in an ``nn.Sequential``, a new pipeline stage starts after it."""


class PipelineConfigError(UsageError):
    """A pipeline setting that does not fit the model; the message names the field."""


def stage_boundaries(model: nn.Sequential, num_stages: int,
                     split_points: Optional[list[str]] = None) -> list[int]:
    """Child indices where stages 1..P-1 begin."""
    if not isinstance(model, nn.Sequential):
        raise PipelineConfigError(f"pipeline.stages needs an nn.Sequential model to cut into "
                                  f"stages, got {type(model).__name__}")
    names = [name for name, _ in model.named_children()]
    children = list(model.children())
    markers = [i + 1 for i, m in enumerate(children) if isinstance(m, Stage)]
    if markers:
        if len(markers) != num_stages - 1:
            raise PipelineConfigError(f"pipeline.stages = {num_stages} but the model has "
                                      f"{len(markers)} tessera.pipeline.Stage markers "
                                      f"({len(markers) + 1} stages)")
        return markers
    if split_points:
        if len(split_points) != num_stages - 1:
            raise PipelineConfigError(f"pipeline.split_points names {len(split_points)} points; "
                                      f"{num_stages} stages need {num_stages - 1}")
        out = []
        for point in split_points:
            if point not in names:
                raise PipelineConfigError(f"pipeline.split_points: {point!r} is not a child of "
                                          f"the model; its children are {names}")
            out.append(names.index(point))
        if out != sorted(set(out)) or out[0] == 0:
            raise PipelineConfigError(f"pipeline.split_points must be increasing and after the "
                                      f"first child, got {split_points}")
        return out
    if len(children) < num_stages:
        raise PipelineConfigError(f"pipeline.stages = {num_stages} but the model has only "
                                  f"{len(children)} children to spread over them")
    return _balanced([sum(p.numel() for p in c.parameters()) for c in children], num_stages)


def _balanced(weights: list[int], parts: int) -> list[int]:
    """Contiguous split of ``weights`` into ``parts`` minimising the largest part
    (the linear partition problem, by dynamic programming; n is small)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):
                cost = max(best[k - 1][j], prefix[i] - prefix[j])
                if cost < best[k][i]:
                    best[k][i], cut[k][i] = cost, j
    bounds, i = [], n
    for k in range(parts, 0, -1):
        i = cut[k][i]
        bounds.append(i)
    return sorted(bounds)[1:]


def cut(model: nn.Sequential, boundaries: list[int]) -> list[nn.Sequential]:
    """The stages, each keeping its children's names in ``model`` (so a stage's
    ``state_dict`` keys are the whole model's)."""
    children = list(model.named_children())
    edges = [0, *boundaries, len(children)]
    return [nn.Sequential(OrderedDict(children[a:b])) for a, b in zip(edges, edges[1:])]


class PipelineParallel(DistributedModel):
    """This process's stage of a pipelined, possibly replicated, model.

    :meth:`forward_backward` runs the schedule over the micro-batches;
    :meth:`step` steps this stage's optimizer. ``no_sync`` and
    ``clip_grad_norm_`` are refused (the schedule runs forward and backward
    together; the norm spans every stage); ``state_dict`` holds this stage's
    entries under the whole model's keys.
    """

    mode = "pipeline"

    whole_model = False  # this stage's slice only: no final.safetensors from one stage

    def __init__(self, model: nn.Sequential, *, rank: int, num_workers: int,
                 plan: PipelineConfig, optimizer: OptimizerConfig, loss_fn: Callable,
                 device=torch.device("cpu"), profiler: SpanRecorder = OFF,
                 checkpoints: Optional[DenseCheckpoints] = None):
        super().__init__()
        from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe

        num_stages, microbatches, schedule = plan.stages, plan.microbatches, plan.schedule
        self.num_stages, self.stage_index = num_stages, rank % num_stages
        self.replica, self.num_replicas = rank // num_stages, num_workers // num_stages
        self.microbatches = microbatches
        self.profiler = profiler
        boundaries = stage_boundaries(model, num_stages, plan.split_points)
        pieces = cut(model, boundaries)
        self.module = pieces[self.stage_index].to(device)
        self.device = device
        # Meta copies of the stages up to this one (no memory): the shapes this stage
        # receives and sends, for any batch, without asking a peer. A plain list, so
        # they are not submodules (state_dict, .to(), parameters() never see them).
        self._meta_stages = [_meta_copy(p) for p in pieces[:self.stage_index + 1]]
        self._shape_cache: dict = {}
        # Every process must create every group, in the same order.
        pipe_groups = [dist.new_group(list(range(r * num_stages, (r + 1) * num_stages)))
                       for r in range(self.num_replicas)]
        stage_groups = [dist.new_group([r * num_stages + s for r in range(self.num_replicas)])
                        for s in range(num_stages)]
        self.pipe_ranks = list(range(self.replica * num_stages, (self.replica + 1) * num_stages))
        self.pipe_group = pipe_groups[self.replica]
        self.stage_group = stage_groups[self.stage_index]
        self.schedule_kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}[schedule]
        self.loss_fn = loss_fn
        # Built at the first batch, whose shape fixes the stage's static shapes.
        self.pipe_stage = self.schedule = None
        self.batch_meta: Optional[tuple] = None
        params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = (torch_optimizer(optimizer, params)
                          if params else None)
        self.clock = 0
        self.checkpoints = checkpoints or DenseCheckpoints()
        self._asked = False  # the launcher's request, as the workers last agreed on it
        if self.num_replicas > 1:
            self._sync_replicas()

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    # --------------------------------------------------------------- shapes

    def stage_shapes(self, inputs: tuple, grad: bool = False) -> tuple[tuple, tuple]:
        """(what this stage receives, what it sends) for a batch shaped as ``inputs``, as
        meta tensors: the meta stages up to this one run on meta copies of ``inputs``.
        With ``grad``, as in training: what a stage receives requires grad (floating
        point), and so does what it sends where it depends on parameters or inputs
        that do (the schedule sends gradients back for those)."""
        key = (tuple((tuple(t.shape), t.dtype) for t in inputs), grad)
        if key not in self._shape_cache:
            acts = tuple(torch.empty(shape, dtype=dtype, device="meta") for shape, dtype in key[0])
            received = acts
            try:
                with torch.set_grad_enabled(grad), torch.random.fork_rng(devices=[]):
                    for k, piece in enumerate(self._meta_stages):
                        if k > 0:  # crossing a stage boundary, as a received activation
                            acts = tuple(t.detach().requires_grad_(grad and t.is_floating_point())
                                         for t in acts)
                        received = acts
                        acts = _as_tuple(piece(*acts))
            except Exception as exc:  # a module that cannot run on the meta device
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise PipelineConfigError(
                    f"pipeline stage {self.stage_index}: the shapes between stages are computed "
                    f"on the meta device, and this model's forward fails there "
                    f"({type(exc).__name__}: {first}); use modules that run on "
                    f"torch.device('meta')") from None
            if len(self._shape_cache) > 16:
                self._shape_cache.clear()
            self._shape_cache[key] = (received, acts)
        return self._shape_cache[key]

    def _build(self, inputs: tuple) -> None:
        """The stage and schedule for batches shaped as ``inputs`` (static shapes: torch
        exchanges no metadata objects, so nothing is pickled between stages)."""
        from torch.distributed.pipelining import PipelineStage
        rows = inputs[0].shape[0]
        if rows % self.microbatches:
            raise PipelineConfigError(f"a batch of {rows} rows does not split into "
                                      f"pipeline.microbatches = {self.microbatches}: make the "
                                      f"batch size a multiple of --microbatches")
        micro = tuple(torch.empty((t.shape[0] // self.microbatches, *t.shape[1:]),
                                  dtype=t.dtype, device="meta") for t in inputs)
        received, sent = self.stage_shapes(micro, grad=True)
        self.pipe_stage = PipelineStage(self.module, self.stage_index, self.num_stages,
                                        self.device, input_args=received, output_args=sent,
                                        group=self.pipe_group)
        self.schedule = self.schedule_kind(self.pipe_stage, n_microbatches=self.microbatches,
                                           loss_fn=self.loss_fn)
        self.batch_meta = _meta_of(inputs)

    def _check_batch(self, inputs: tuple) -> None:
        self._check_inputs(inputs)
        if self.schedule is None:
            self._build(inputs)
        elif _meta_of(inputs) != self.batch_meta:
            raise PipelineConfigError(
                f"pipeline stages are built for batches shaped {_shapes(self.batch_meta)}, "
                f"got {_shapes(_meta_of(inputs))}: every training batch must have the same "
                f"shape (drop the last, smaller batch)")

    # ------------------------------------------------------------- training

    def compute_gradients(self, inputs: tuple, target: torch.Tensor) -> Optional[float]:
        """Run the schedule over the micro-batches; average gradients over replicas.

        Returns the batch's mean loss on the last stage, None elsewhere.
        """
        losses: list[torch.Tensor] = []
        self._check_batch(tuple(inputs))
        with self.profiler.span("pipeline", "compute", schedule=type(self.schedule).__name__):
            if self.num_stages == 1:
                self.schedule.step(*inputs, target=target, losses=losses)
            elif self.is_first:
                self.schedule.step(*inputs)
            elif self.is_last:
                self.schedule.step(target=target, losses=losses)
            else:
                self.schedule.step()
        if self.num_replicas > 1:
            with self.profiler.span("allreduce", "comm"):
                self._average_replicas()
        return float(torch.stack([x.detach() for x in losses]).mean()) if losses else None

    def _average_replicas(self) -> None:
        """Average this stage's gradients over its replicas: first which parameters have
        one on any replica (a branch one replica's batches did not take leaves it None
        there), then those, zeros where a replica has none, in one all-reduce per dtype,
        as DDP with ``find_unused_parameters`` averages them. A parameter no replica used
        keeps no gradient, as in one process. (Each replica all-reduced only its own
        gradients that were not None, one collective each: where replicas differed, they
        paired one parameter's gradient with another's, or waited on each other.)"""
        params = [p for p in self.module.parameters() if p.requires_grad]
        used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32)
        dist.all_reduce(used, op=dist.ReduceOp.MAX, group=self.stage_group)
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for p, anywhere in zip(params, used.tolist()):
            if anywhere:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = torch._utils._flatten_dense_tensors(grads)
            dist.all_reduce(flat, group=self.stage_group)
            flat.div_(self.num_replicas)
            for g, avg in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                g.copy_(avg)

    def forward_backward(self, inputs: tuple, target: torch.Tensor,
                         loss_fn: Callable = None) -> Optional[torch.Tensor]:  # noqa: ARG002
        """The schedule's forward and backward over the micro-batches (its loss_fn was
        given at construction); the batch's mean loss on the last stage, else None."""
        loss = self.compute_gradients(inputs, target)
        return None if loss is None else torch.tensor(loss, dtype=torch.float64)

    def step(self) -> bool:
        """Step this stage's optimizer on the replica-averaged gradients (then, every
        ``--checkpoint-every`` steps, replica 0's stage writes its file)."""
        if self.optimizer is not None:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=False)
        self.clock += 1
        self._maybe_checkpoint()
        return True

    # ------------------------------------------------------------ checkpoints

    def _sync_replicas(self) -> None:
        """Replica 0's parameters of this stage on every replica (as DDP broadcasts rank
        0's at construction): with equal starts and averaged gradients the replicas stay
        equal, so replica 0's checkpoint files are every replica's."""
        with torch.no_grad():
            for p in self.module.parameters():
                dist.broadcast(p.data, self.stage_index, group=self.stage_group)

    def _maybe_checkpoint(self) -> None:
        """Every ``--checkpoint-every`` steps replica 0's stage saves its part (the other
        replicas hold the same values; no barrier: each stage's state after step N is
        its own, and the manifest waits for every stage's report).

        The launcher's request (SIGINT/SIGTERM) reaches each worker's heartbeat at its own
        moment, so every ``agree_every`` steps all workers all-reduce (MAX) whether they
        saw it: all then know it at the same clock, and replica 0's stages save that one
        (once per request)."""
        ck = self.checkpoints
        due = bool(ck.every and self.clock % ck.every == 0)
        if ck.agree_every and self.clock % ck.agree_every == 0:
            flag = torch.tensor([1.0 if ck.wanted() else 0.0])
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            asked = bool(flag.item() > 0)
            due = due or (asked and not self._asked)
            self._asked = asked
        if ck.save is None or not due:
            return
        with self.profiler.span("checkpoint", "checkpoint"):
            tensors, meta = dense_state(self.module, self.optimizer, None, self.clock)
            meta["stage"] = {"index": self.stage_index, "stages": self.num_stages}
            ck.save(self.clock, tensors, meta)

    def restore(self, url: str, clock: int, manifest: dict) -> None:
        """Load this stage's file of the checkpoint at ``clock`` (every replica loads
        replica 0's); training continues from that clock."""
        tensors, meta, where = read_dense(url, clock, manifest, stage=self.stage_index)
        saved = meta.get("stage") or {}
        if saved.get("index") != self.stage_index or saved.get("stages") != self.num_stages:
            from tessera.ps.checkpoint import CheckpointError
            raise CheckpointError(f"--resume: {where} is not stage {self.stage_index} of "
                                  f"{self.num_stages} (its metadata says {saved or 'none'})")
        self.clock = load_dense(tensors, meta, self.module, self.optimizer, None, where)

    def start_step(self, max_clock: Optional[int] = None) -> int:  # noqa: ARG002
        return self.clock

    def zero_grad(self, set_to_none: bool = False) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def no_sync(self) -> contextlib.AbstractContextManager:
        raise self.refuse("no_sync()", "the schedule runs forward and backward of every "
                          "micro-batch in one call; raise pipeline.microbatches instead")

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        raise self.refuse("clip_grad_norm_", "the total norm spans every stage")

    def train_step(self, inputs: tuple, target: torch.Tensor) -> Optional[float]:
        """``forward_backward`` then ``step``: the batch's mean loss on the last stage."""
        loss = self.compute_gradients(inputs, target)
        self.step()
        return loss

    # ------------------------------------------------------------ evaluation

    @torch.no_grad()
    def forward(self, *inputs):
        """Forward-only along this replica's pipeline: the output on the last stage,
        None on the others. Every stage of the replica must call it together, with the
        same inputs: each sizes what it receives from them (no size crosses the wire)."""
        self._check_inputs(inputs)
        received, _ = self.stage_shapes(tuple(inputs))
        prev = self.pipe_ranks[self.stage_index - 1] if not self.is_first else None
        nxt = self.pipe_ranks[self.stage_index + 1] if not self.is_last else None
        if self.is_first:
            acts = tuple(t.to(self.device) for t in inputs)
        else:
            acts = tuple(torch.empty(m.shape, dtype=m.dtype, device=self.device)
                         for m in received)
            for t in acts:
                dist.recv(t, prev)
        out = self.module(*acts)
        if nxt is not None:
            for t in _as_tuple(out):
                dist.send(t.contiguous(), nxt)
            return None
        return out

    def _check_inputs(self, inputs) -> None:
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise PipelineConfigError("every pipeline stage must be given the batch's inputs "
                                      "(model.train_step((x,), y) and model(x) on every "
                                      "stage): each computes its shapes from them")


def _meta_copy(piece: nn.Module) -> nn.Module:
    """``piece`` on the meta device (shapes only), in eval mode, apart from ``piece``."""
    return copy.deepcopy(piece).to("meta").eval()


def _as_tuple(out) -> tuple:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def _meta_of(inputs: tuple) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in inputs)


def _shapes(meta: tuple) -> str:
    return ", ".join(f"{list(shape)} {str(dtype).replace('torch.', '')}" for shape, dtype in meta)
