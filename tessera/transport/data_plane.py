"""Data-plane messages: between workers and parameter servers (and server to backup).

Dense partitions (:class:`InitParams`, :class:`Push`, :class:`Pull`,
:class:`Params`, :class:`Verdict`, :class:`Judged`, :class:`Join`, :class:`Replicate`,
:class:`OptimState`) and
embedding-table rows (:class:`PullRows`, :class:`Rows`, :class:`PushRows`).
Tensor payloads follow the header as raw frames (:mod:`tessera.transport.frames`).
"""

from __future__ import annotations

from typing import Optional

import msgspec

from tessera.transport.control_plane import HParam
from tessera.transport.header import MESSAGE


class InitParams(msgspec.Struct, **MESSAGE):
    """Initial values of partitions (from worker 0), one payload frame each."""

    req: int
    partitions: list[int]
    dtype: str = "float32"


class Pull(msgspec.Struct, **MESSAGE):
    """Ask for partitions' current values, once the server has reached ``clock``."""

    req: int
    worker: int
    partitions: list[int]
    clock: int = 0
    dtype: str = "float32"
    #: After held pushes (sync: loss scaling, or clipping): apply (True) or skip
    #: (False) the update of clock ``clock - 1`` that the partitions hold pending a verdict.
    commit: Optional[bool] = None
    #: With ``commit = True``: the held mean gradient is multiplied by this first
    #: (gradient clipping's coefficient, the same on every worker).
    coef: float = 1.0
    #: > 0 (servers that agree among themselves, ``commit`` None): the decision on the
    #: held clock ``clock - 1`` is the servers' own, taken once each has the
    #: :class:`Judged` verdicts of this many held partitions (every one of the model's);
    #: the pull is sent with the pushes, not after their verdicts (one round trip).
    agree: int = 0
    #: With ``agree``: clip the held mean by the ``norm_type``-norm of all of them
    #: together to at most this (0: no clipping).
    clip: float = 0.0
    norm_type: float = 2.0


class Push(msgspec.Struct, **MESSAGE):
    """Gradients of partitions for ``clock``; one payload frame per partition.

    The reply is a :class:`Params` with the partitions' values after the update
    this push took part in (one round trip for push and pull, DESIGN.md), or,
    when it is held (``hold``: clipping, or loss scaling without ``judged``), a
    :class:`Verdict`.
    """

    req: int
    worker: int
    seq: int
    clock: int
    partitions: list[int]
    dtype: str = "float32"
    #: The loss scale the gradients carry; the server divides by it in fp32.
    scale: float = 1.0
    #: Name of the first parameter (in backward order) whose gradient in this push
    #: is not finite on the sending worker; "" when all are finite.
    nonfinite: str = ""
    #: Sender's clock (aligned to the coordinator's) when sent; 0 when not profiling.
    sent_ns: int = 0
    #: > 0 (worker 0 only): servers write a checkpoint when they reach this clock.
    checkpoint: int = 0
    #: Sync: hold the clock's mean gradient and answer with a :class:`Verdict`; the
    #: servers decide among themselves (a worker's next :class:`Pull` carries ``agree``)
    #: or a worker's next :class:`Pull` carries the cluster's ``commit`` (and ``coef``).
    hold: bool = False
    #: > 0 (with ``hold``): the verdict carries the ``norm_type``-norm of the mean
    #: gradient (``inf``: the max norm), for clipping by the global norm.
    norm_type: float = 0.0
    #: Worker 0, when they changed: every param group's hyperparameters (an lr
    #: scheduler moved them), applied before this clock's update.
    hparams: Optional[list[dict[str, HParam]]] = None
    #: Sync, ``[train] balance = "speed"``: this push counts ``weight`` times in its
    #: clock's mean (the sender's share of the global batch over the even share), so
    #: that the mean is over every sample of the step however the batch was split.
    weight: float = 1.0
    #: Balance: the sender's measured samples/s (0: none); echoed in :attr:`Params.rates`.
    rate: float = 0.0
    #: Sync under loss scaling, not held: the sender's *word* on its whole gradient of
    #: this clock (every partition, for every server) travels with its pushes:
    #: ``nonfinite`` names its first overflow ("" where all was finite). A clock none of
    #: whose words names one is applied at once, as an fp32 clock is; else it is skipped,
    #: and every server skips it (each has every worker's word). Answered with
    #: :class:`Params` (``skipped``, with the ``overflows``), never with a :class:`Verdict`.
    judged: bool = False
    #: With ``judged``: the push left during backward, before the sender knew its word
    #: (``nonfinite`` then names the first overflow of this push's own partitions); the
    #: word follows, in a later judged push that is not pending or in a :class:`Word`. The
    #: server sums the push at once and completes the clock once every worker's word is in.
    pending: bool = False
    #: ``tessera.distribute(..., find_unused_parameters=True)``: for each partition (in
    #: ``partitions``' order), the element ranges ``[lo, hi)`` (flat pairs, relative to
    #: the partition's start, sorted) of the parameters the sender's step gave no
    #: gradient (a branch not taken); None where it used them all. A sync clock leaves a
    #: range alone where every push of the clock names it (no worker used it), as torch
    #: skips a parameter whose ``.grad`` is None; async applies each push's own.
    unused: Optional[list[list[int]]] = None


class Join(msgspec.Struct, **MESSAGE):
    """A restarted worker joins sync training at ``clock``: servers count its pushes
    from that clock on. Answered with the partitions' values at ``clock`` (a Params),
    or an Error when a partition is already past it (ask again later)."""

    req: int
    worker: int
    incarnation: int
    clock: int
    partitions: list[int]
    dtype: str = "float32"


class ReplicaUpdate(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    """One update of a ``batch`` :class:`Replicate`: its partition, and the fields a
    single ``grad``/``sum``/``init`` Replicate carries for it."""

    kind: str
    partition: int
    clock: int
    pushes: int = 0
    worker: int = -1
    seq: int = -1
    hparams: Optional[list[dict[str, HParam]]] = None
    keep: Optional[list[int]] = None


class Replicate(msgspec.Struct, **MESSAGE):
    """Primary -> backup: apply this update (or initial values) to your copy.

    ``kind`` ``init``: frames are initial values; ``grad``: frames are the fp32
    gradient the primary applied, which the backup applies with the same optimizer
    (so both copies stay bit-identical). ``pushes`` worker pushes went into it;
    ``worker``/``seq`` name the push for async dedupe (-1 for a sync sum).
    """

    req: int
    kind: str
    partitions: list[int]
    clock: int
    pushes: int = 0
    worker: int = -1
    seq: int = -1
    #: The param groups' hyperparameters the primary applied this update with.
    hparams: Optional[list[dict[str, HParam]]] = None
    #: ``grad``/``sum``: the element ranges the update leaves alone (no worker used
    #: them: :attr:`Push.unused`), as the primary did.
    keep: Optional[list[int]] = None
    #: ``kind`` ``copy`` (re-replication: a full copy of a partition to a new backup):
    #: the primary's rank, the frames' names (``values``, then optimizer state) and
    #: dtypes (``[]`` appended: a 0-d tensor), and the primary's per-worker sequence
    #: numbers (async/ssp dedupe); ``clock``, ``pushes``: its clock and applied pushes.
    source: int = -1
    names: list[str] = []
    dtypes: list[str] = []
    last_seq: dict[int, int] = {}
    #: ``kind`` ``rows``: the table whose shard (of server ``partitions[0]``) this
    #: updates; frames are the ids (int64) and the fp32 gradient rows applied.
    #: ``kind`` ``tablecopy`` (re-replication of a table shard): the table whose shard
    #: ``partitions[0]`` this copies whole; frames named by ``names`` (its exported state),
    #: with ``source``, ``dtypes``, ``last_seq``, ``members``, ``clock``, ``pushes`` as a copy.
    table: str = ""
    #: ``kind`` ``batch``: the updates one turn of the primary's serve loop forwarded, in
    #: the order it applied them, one frame each (``partitions`` names them too); the
    #: backup applies them in that order and acknowledges them with one Ack.
    updates: list[ReplicaUpdate] = []
    #: ``kind`` ``copy``: the primary's live workers (worker -> incarnation), so that a
    #: replacement server, which sees no Join, knows restarted workers; ``kind`` ``join``
    #: (no partitions, no frames): worker ``worker`` joined again as incarnation ``seq``
    #: at clock ``clock``.
    members: dict[int, int] = {}


class Overflow(msgspec.Struct, forbid_unknown_fields=True, array_like=True):
    worker: int
    param: str


class Verdict(msgspec.Struct, **MESSAGE):
    """Whether the mean of every worker's gradients for a partition and clock is
    finite, and (when asked) its norm.

    Every worker gets the same verdicts, takes the same decision (apply only if all
    partitions are finite; clip by the norm of all partitions together) and sends it
    with its next :class:`Pull` as ``commit`` and ``coef``.
    """

    req: int
    partitions: list[int]
    clock: int
    finite: bool
    overflows: list[Overflow] = []
    #: The ``norm_type``-norm of the partition's mean gradient (0 when not asked).
    norm: float = 0.0


class Word(msgspec.Struct, **MESSAGE):
    """Worker -> each server it sent a ``pending`` judged push of ``clock`` and no push
    carrying its word: its word on its whole gradient of that clock, ``overflow`` the
    first parameter (in backward order) whose gradient overflowed, "" where all was
    finite. Not answered (the pushes' replies are)."""

    req: int
    worker: int
    clock: int
    overflow: str = ""


class Judged(msgspec.Struct, **MESSAGE):
    """Server -> every other server: the verdicts this server took on held partitions of
    clock ``clock`` (``partitions[i]``: ``finite[i]``, ``norms[i]``; as in
    :class:`Verdict`), so that each server decides the clock itself (:class:`Pull`
    ``agree``). Not answered."""

    req: int
    sender: int
    clock: int
    partitions: list[int]
    finite: list[bool]
    norms: list[float]


class Params(msgspec.Struct, **MESSAGE):
    """Values of partitions (one payload frame each) as of server clock ``clock``."""

    req: int
    partitions: list[int]
    clock: int
    dtype: str = "float32"
    #: Async mode: the push was not applied because its gradient was not finite.
    #: Sync (:attr:`Push.judged`): the clock before ``clock`` was skipped, and
    #: ``overflows`` names each worker whose gradient overflowed, and where.
    skipped: bool = False
    overflows: list[Overflow] = []
    #: Server's aligned clock when it sent this reply (for the profiler's overlap figure).
    sent_ns: int = 0
    #: Balance (sync): every worker's ``[Push.rate, Push.weight]`` of clock ``clock - 1``
    #: (index: worker; zeros where unknown), the same in every reply at ``clock``; None
    #: when no worker reported a rate.
    rates: Optional[list[list[float]]] = None


class OptimState(msgspec.Struct, **MESSAGE):
    """Partitions' optimizer state: what the ``torch.optim`` class keeps per element
    (Adam's ``exp_avg``, ...) and its scalars (``step``), float32. A worker's
    ``optimizer.state_dict()`` asks for it (no ``names``, no frames) and is answered with
    an ``OptimState``; worker 0's ``optimizer.load_state_dict()`` sends it (``load``),
    answered with an Ack once every partition holds it. Frames: for each partition, for
    each of its ``names``, the partition's elements, or one element for a name that
    ``scalar`` marks."""

    req: int
    partitions: list[int]
    load: bool = False
    #: Per partition: its state's names, and whether each is a scalar.
    names: list[list[str]] = []
    scalar: list[list[bool]] = []


class PullRows(msgspec.Struct, **MESSAGE):
    """Rows of ``table`` for the ids in payload frame 0 (int64, unique), at ``clock``.
    ``shard``: the server the ids hash to (-1: the receiver); after that server died,
    its backup serves the shard."""

    req: int
    worker: int
    table: str
    clock: int = 0
    dtype: str = "float32"
    shard: int = -1
    #: Several tables in one message (one pull per server per step, as TorchRec's
    #: EmbeddingBagCollection batches its tables): ``table`` is "" and table
    #: ``tables[i]`` asks for the ids of payload frame ``ids_frame[i]``; tables looked up
    #: with the same ids share one frame (the ids travel once). Answered with one
    #: :class:`Rows` naming the same ``tables``, frame i holding table i's rows.
    tables: list[str] = []
    ids_frame: list[int] = []


class Rows(msgspec.Struct, **MESSAGE):
    """Reply to :class:`PullRows`: payload frame 0 holds the rows, [n, dim] in ``dtype``
    (a pull of several ``tables``: frame i holds table i's rows)."""

    req: int
    table: str
    clock: int
    dtype: str = "float32"
    #: Reply to :class:`DumpRows`: more rows follow (ask again from ``start`` + n).
    more: bool = False
    tables: list[str] = []


class DumpRows(msgspec.Struct, **MESSAGE):
    """Every row of ``table`` this server holds (a run's export): answered with a
    :class:`Rows` whose frame 0 holds the rows [n, dim] fp32 and frame 1 their ids
    (int64, increasing), from the ``start``-th id on; a reply holds at most
    ``MAX_ROWS_REPLY_BYTES`` of rows (``more``: ask again for the rest)."""

    req: int
    table: str
    start: int = 0


class SnapshotTables(msgspec.Struct, **MESSAGE):
    """From worker 0 in hybrid mode: copy every table's rows as of ``clock`` into the
    checkpoint at ``clock`` now (every worker's row pushes of the clocks before are
    applied, none after: the workers wait at a barrier). Answered with :class:`Ack`
    once copied; the file is reported to the coordinator when written."""

    req: int
    clock: int


class PushRows(msgspec.Struct, **MESSAGE):
    """Row-sparse gradient of ``table`` for ``clock``: frame 0 ids (int64, unique),
    frame 1 gradients [n, dim] in ``dtype``. Every worker pushes every table to every
    server once per clock, with no rows if it touched none there. Answered with
    :class:`Ack` once the worker may go on (sync: once the clock is applied; ssp: within the bound)."""

    req: int
    worker: int
    seq: int
    clock: int
    table: str
    dtype: str = "float32"
    scale: float = 1.0
    #: The server the ids hash to (-1: the receiver); see :class:`PullRows`.
    shard: int = -1
    #: Several tables in one push (``table`` ""), all for ``clock`` under one ``seq``:
    #: the payload is the distinct id frames (table ``tables[i]`` uses frame
    #: ``ids_frame[i]``; tables with the same ids share one), then one gradient frame
    #: per table, in ``tables`` order. Answered with one :class:`Ack`.
    tables: list[str] = []
    ids_frame: list[int] = []
