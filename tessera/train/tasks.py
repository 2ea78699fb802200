"""What the built-in trainer trains: data, model, loss and evaluation, per dataset.

A task hands the training loop (:mod:`tessera.train.trainer`) four things: the
model, this worker's batch for a step, the loss, and the evaluation. Three
kinds exist: classification (digits, mnist, npy shards), ratings (MovieLens,
``eval_rmse``) and clicks (a streamed synthetic click log, ``eval_auc`` next to
``reference_auc``, the AUC of the planted model on the same samples).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tessera.config.schema import JobConfig
from tessera.data.sampler import ShardSampler


class ClassificationTask:
    #: The datasets it trains on (a standby worker loads them ahead: tessera.train.standby).
    DATASETS = ("digits", "mnist", "npy")

    def __init__(self, cfg: JobConfig, rank: int, num_workers: int, data=None):
        from tessera.data.datasets import load_dataset
        self.data = data if data is not None else load_dataset(cfg.data)
        self.cfg = cfg
        self.sampler = ShardSampler(len(self.data.train), batch_size=cfg.data.batch_size,
                                    num_workers=num_workers, rank=rank, seed=cfg.train.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def build_model(self) -> nn.Module:
        from tessera.models import build_model
        return build_model(self.cfg.model, self.data.input_shape, self.data.num_classes)

    def batch(self, step: int, device):
        idx = torch.from_numpy(self.sampler.indices(step))
        return (self.data.train.x[idx].to(device),), self.data.train.y[idx].to(device)

    def loss(self, out, target):
        return F.cross_entropy(out, target).float()

    def eval_batches(self, device):
        x, y = self.data.test.x, self.data.test.y
        for i in range(0, len(y), 1024):
            yield (x[i:i + 1024].to(device),), y[i:i + 1024]

    def metrics(self, outs, targets) -> dict:
        logits, y = torch.cat(outs), torch.cat(targets)
        return {"eval_loss": F.cross_entropy(logits, y, reduction="sum").item() / len(y),
                "eval_accuracy": (logits.argmax(1) == y).float().mean().item()}


class RatingsTask:
    SIDE = ("age_bucket", "gender", "occupation", "genre", "year_bucket")

    def __init__(self, cfg: JobConfig, rank: int, num_workers: int, data=None):
        from tessera.data.movielens import load_movielens
        self.cfg = cfg
        self.d = data if data is not None else load_movielens(
            test_fraction=cfg.data.test_fraction, seed=0)
        self.sizes = {k: v for k, v in self.d.feature_sizes.items() if k in self.SIDE}
        self.sampler = ShardSampler(len(self.d.train_ratings), batch_size=cfg.data.batch_size,
                                    num_workers=num_workers, rank=rank, seed=cfg.train.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def _side(self, users, items):
        cols = []
        for name in self.sizes:
            table = self.d.user_features.get(name)
            cols.append(table[users] if table is not None else self.d.item_features[name][items])
        return torch.stack(cols, 1) if cols else torch.zeros(len(users), 0, dtype=torch.int64)

    def build_model(self) -> nn.Module:
        from tessera.models.recsys import DLRM
        return DLRM(self.cfg.model, num_users=self.d.num_users, num_items=self.d.num_items,
                    side_sizes=self.sizes, global_mean=self.d.global_mean)

    def batch(self, step: int, device):
        idx = torch.from_numpy(self.sampler.indices(step))
        u, i = self.d.train_users[idx], self.d.train_items[idx]
        return (u, i, self._side(u, i)), self.d.train_ratings[idx].to(device)

    def loss(self, out, target):
        return F.mse_loss(out.float(), target)

    def eval_batches(self, device):
        u, i, r = self.d.test_users, self.d.test_items, self.d.test_ratings
        for k in range(0, len(r), 4096):
            yield (u[k:k + 4096], i[k:k + 4096], self._side(u[k:k + 4096], i[k:k + 4096])), \
                r[k:k + 4096]

    def metrics(self, outs, targets) -> dict:
        pred, r = torch.cat(outs).clamp(1, 5), torch.cat(targets)
        mse = ((pred - r) ** 2).mean().item()
        return {"eval_loss": mse, "eval_rmse": math.sqrt(mse)}


class ClicksTask:
    def __init__(self, cfg: JobConfig, rank: int, num_workers: int):
        from tessera.data.clicks import ClickLog
        self.cfg, self.rank, self.num_workers = cfg, rank, num_workers
        self.log = ClickLog(num_fields=cfg.data.num_fields, id_space=cfg.data.id_space,
                            seed=cfg.train.seed)
        self.steps_per_epoch = max(1, cfg.data.samples_per_epoch
                                   // (cfg.data.batch_size * num_workers))
        self._eval = None
        self.num_samples = 0  # a stream: the cursor is a sample offset, never an epoch
        self._clock0, self._batch0 = 0, 0

    def seek(self, clock: int, epoch: int, offset: int) -> None:  # noqa: ARG002 - one epoch
        self._clock0, self._batch0 = clock, offset // self.cfg.data.batch_size

    def total_steps(self, cfg: JobConfig) -> int:
        if cfg.train.steps:
            return cfg.train.steps
        left = cfg.train.epochs * cfg.data.samples_per_epoch // cfg.data.batch_size - self._batch0
        return self._clock0 + max(0, left // self.num_workers)

    def build_model(self) -> nn.Module:
        from tessera.models.recsys import HashedLogReg
        return HashedLogReg(self.cfg.model, id_space=self.cfg.data.id_space)

    def batch(self, step: int, device):
        # Worker r of W takes batches r, r + W, ...: disjoint, and the same global
        # stream for any worker count.
        index = self._batch0 + (step - self._clock0) * self.num_workers + self.rank
        ids, labels = self.log.batch(index, self.cfg.data.batch_size)
        return (ids.to(device),), labels.to(device)

    def loss(self, out, target):
        return F.binary_cross_entropy_with_logits(out.float(), target)

    def eval_batches(self, device):
        if self._eval is None:
            self._eval = self.log.eval_set(self.cfg.data.eval_samples)
        ids, labels, _ = self._eval
        for k in range(0, len(labels), 4096):
            yield (ids[k:k + 4096].to(device),), labels[k:k + 4096]

    def metrics(self, outs, targets) -> dict:
        from tessera.data.clicks import roc_auc
        scores, labels = torch.cat(outs), torch.cat(targets)
        return {"eval_loss": F.binary_cross_entropy_with_logits(scores, labels).item(),
                "eval_auc": roc_auc(scores, labels),
                "reference_auc": roc_auc(self._eval[2], labels)}


class StreamTask:
    """Clicks from a followed location (``[data] follow = true``, :mod:`tessera.data.stream`):
    the click model trained on shards as they arrive, until the stream ends."""

    def __init__(self, cfg: JobConfig, rank: int, num_workers: int):
        from tessera.data.stream import ShardStream
        self.cfg, self.rank, self.num_workers = cfg, rank, num_workers
        self.stream = ShardStream(cfg.data.path, keys=("ids", "y"),
                                  poll_s=cfg.data.follow_poll_s)
        self.num_samples = 0  # a stream: the cursor is a sample position, never an epoch
        self.steps_per_epoch = 1
        self._clock0, self._offset0 = 0, 0
        self.ledger = None  # the trainer opens it in the run directory
        self.check = None  # called while waiting for shards (raises for a failed job)
        self.interrupted = None  # True once the launcher was interrupted
        self._eval = None

    def seek(self, clock: int, epoch: int, offset: int) -> None:  # noqa: ARG002 - no epochs
        self._clock0, self._offset0 = clock, offset

    def total_steps(self, cfg: JobConfig) -> int:
        return cfg.train.steps or 2 ** 62  # until the stream ends (batch() returns None)

    def build_model(self) -> nn.Module:
        from tessera.models.recsys import HashedLogReg
        return HashedLogReg(self.cfg.model, id_space=self.cfg.data.id_space)

    def batch(self, step: int, device):
        """This worker's part of global step ``step``; None once the stream has ended
        before that step's global batch is complete (every worker agrees: the marker is
        looked for before the last listing)."""
        b = self.cfg.data.batch_size
        start = self._offset0 + (step - self._clock0) * b * self.num_workers
        idle = self.cfg.data.follow_idle_s
        if not self.stream.wait_for(start + b * self.num_workers, self.check, self.interrupted,
                                    idle_s=idle, on_idle=self._end_idle_stream
                                    if self.rank == 0 else None):
            return None
        arrays, parts = self.stream.take(start + self.rank * b, start + (self.rank + 1) * b)
        if self.ledger is not None:
            self.ledger.read(step, parts)
        ids = torch.from_numpy(arrays["ids"].astype("int64", copy=False))
        return (ids.to(device),), torch.from_numpy(arrays["y"].astype("float32")).to(device)

    def _end_idle_stream(self) -> None:
        from tessera.data.stream import end_stream
        last = end_stream(self.cfg.data.path)
        print(f"worker 0: no new shard in {self.cfg.data.follow_idle_s:g} s "
              f"([data] follow_idle_s): the stream ends with "
              f"{last or 'the shards there (none)'}", flush=True)

    def loss(self, out, target):
        return F.binary_cross_entropy_with_logits(out.float(), target)

    def eval_batches(self, device):
        if self._eval is None:
            self._eval = self.stream.eval_set() or {}
        if not self._eval:
            return
        ids = torch.from_numpy(self._eval["ids"].astype("int64", copy=False))
        labels = torch.from_numpy(self._eval["y"].astype("float32"))
        for k in range(0, len(labels), 4096):
            yield (ids[k:k + 4096].to(device),), labels[k:k + 4096]

    def metrics(self, outs, targets) -> dict:
        from tessera.data.clicks import roc_auc
        scores, labels = torch.cat(outs), torch.cat(targets)
        return {"eval_loss": F.binary_cross_entropy_with_logits(scores, labels).item(),
                "eval_auc": roc_auc(scores, labels)}


class LanguageTask:
    """Character-level language modelling on the Shakespeare texts: eval_loss in nats/char."""

    def __init__(self, cfg: JobConfig, rank: int, num_workers: int):
        from tessera.data.shakespeare import CharWindows, load_shakespeare
        self.cfg = cfg
        self.corpus = load_shakespeare()
        self.context = cfg.model.context
        self.train = CharWindows(self.corpus.train, self.context)
        self.test = CharWindows(self.corpus.test, self.context)
        self.sampler = ShardSampler(len(self.train), batch_size=cfg.data.batch_size,
                                    num_workers=num_workers, rank=rank, seed=cfg.train.seed)
        self.steps_per_epoch = self.sampler.steps_per_epoch

    def build_model(self) -> nn.Module:
        from tessera.models.transformer import char_transformer
        m = self.cfg.model
        return char_transformer(self.corpus.vocab_size, context=self.context, dim=m.dim,
                                heads=m.heads, layers=m.layers)

    def batch(self, step: int, device):
        x, y = self.train.get(self.sampler.indices(step))
        return (x.to(device),), y.to(device)

    def loss(self, out, target):
        from tessera.models.transformer import lm_loss
        return lm_loss(out.float(), target)

    def eval_batches(self, device):
        n = min(len(self.test), self.cfg.data.eval_samples)
        for k in range(0, n, 256):
            x, y = self.test.get(torch.arange(k, min(k + 256, n)))
            yield (x.to(device),), y

    def metrics(self, outs, targets) -> dict:
        from tessera.models.transformer import lm_loss
        total = sum(lm_loss(o, t).item() * t.numel() for o, t in zip(outs, targets))
        return {"eval_loss": total / sum(t.numel() for t in targets)}


class _Cursor:
    """Resume and step counting for tasks that read through a ShardSampler."""

    sampler: ShardSampler

    @property
    def num_samples(self) -> int:
        return self.sampler.num_samples

    def seek(self, clock: int, epoch: int, offset: int) -> None:
        self.sampler.seek(clock, epoch, offset)

    def total_steps(self, cfg: JobConfig) -> int:
        return cfg.train.steps or self.sampler.steps_until_epoch(cfg.train.epochs)


for _task in (ClassificationTask, RatingsTask, LanguageTask):
    for _name in ("num_samples", "seek", "total_steps"):
        setattr(_task, _name, getattr(_Cursor, _name))


@torch.no_grad()
def evaluate(task, model, device) -> dict:
    """Run the task's evaluation batches through ``model``; metrics where outputs appear
    (under pipelining only the last stage sees outputs; the others return {})."""
    model.eval()
    outs, targets = [], []
    for inputs, target in task.eval_batches(device):
        out = model(*inputs)
        if out is not None:
            outs.append(out.float().cpu())
            targets.append(target.cpu())
    model.train()
    return task.metrics(outs, targets) if outs else {}


def load_ahead(cfg: JobConfig):
    """The data a task of ``cfg`` would load, loaded now (a standby worker's head start,
    tessera.train.standby); None for a task that reads its data as it goes."""
    if cfg.data.dataset == "movielens":
        from tessera.data.movielens import load_movielens
        return load_movielens(test_fraction=cfg.data.test_fraction, seed=0)
    if cfg.data.dataset in ClassificationTask.DATASETS:
        from tessera.data.datasets import load_dataset
        return load_dataset(cfg.data)
    return None


def table_optimizers(cfg: JobConfig) -> set[str]:
    """The sparse optimizers of the built-in task's sharded tables (its recommendation
    models: MovieLens, clicks); empty for a task without tables. A user's own program
    (``tessera launch``) declares its tables as it runs: none are known ahead."""
    if cfg.data.dataset in ("movielens", "clicks"):
        return {cfg.model.embedding_optimizer}
    return set()


def worker_ids_per_lookup(cfg: JobConfig) -> int:
    """Ids a worker of the built-in task looks up in one table per step (0: no tables):
    the click model's one table takes every field of the batch at once."""
    if cfg.data.dataset == "clicks":
        return cfg.data.batch_size * cfg.data.num_fields
    if cfg.data.dataset == "movielens":
        return cfg.data.batch_size
    return 0


def make_task(cfg: JobConfig, rank: int, num_workers: int, data=None):
    """The task of ``cfg``; ``data``: what :func:`load_ahead` loaded for it (or None)."""
    if cfg.data.dataset == "shakespeare":
        return LanguageTask(cfg, rank, num_workers)
    if cfg.data.dataset == "movielens":
        return RatingsTask(cfg, rank, num_workers, data)
    if cfg.data.dataset == "clicks" and cfg.data.follow:
        return StreamTask(cfg, rank, num_workers)
    if cfg.data.dataset == "clicks":
        return ClicksTask(cfg, rank, num_workers)
    return ClassificationTask(cfg, rank, num_workers, data)

