"""A synthetic click log with a known answer, for scale tests of sparse models.

Click-through-rate data (Criteo's display-ads logs are the standard example:
13 counts and 26 hashed categorical fields per impression) is what parameter
servers were built for: a handful of ids per sample drawn from a vocabulary of
hundreds of millions of rows, most of them rare. :class:`ClickLog` produces
data of that shape, at any size, without a file:

* **Fields and ids.** Each of ``num_fields`` fields takes one of
  ``vocab_per_field`` categories, drawn from a truncated Zipf law
  ``P(rank k) ~ (k + 1) ** -zipf_a``: with the defaults the top category of a
  field is 20% of its samples, the top 3 a third, and three quarters of the
  100,000 categories are seen less than once per 10^6 samples. As in
  Criteo's pipeline and Weinberger et al.'s hashing trick ("Feature Hashing
  for Large Scale Multitask Learning", ICML 2009), the embedding row of
  (field, category) is ``hash(field, category) % id_space``: with the
  defaults 2.6 million categories land in 10^8 rows and about 2.5% of them
  share a row with another one.
* **Planted model.** Every (field, category) has a true weight, a
  deterministic function of (seed, field, category) computed by hashing
  whenever it is needed, never stored: a standard normal (Box-Muller on two
  24-bit pieces of one hash), shifted per field to mean 0 under the Zipf law and scaled
  so that the logit ``bias + sum_f w[f, cat_f]`` has standard deviation
  ``logit_std``. A sample is a click with probability ``sigmoid(logit)``.
  ``bias`` is set so the click rate is about ``ctr`` (see :meth:`__init__`).
  The planted logit is the Bayes-optimal score, so its AUC (0.794-0.801 over
  seeds 0-5 with the defaults, click rate 0.252-0.255) is the ceiling a trained
  model approaches.
* **Streaming and deterministic.** Batch ``index`` is a pure function of
  (seed, index): every worker generates its own batches (worker r of W takes
  indices r, r + W, ...) and a rerun sees the same data. Sample j of a batch
  does not depend on the batch size, so ``batch(i, 8)`` is the first 8 rows of
  ``batch(i, 4096)``. The evaluation set comes from an index that training
  never reaches (2^64 - 1).

Random numbers are splitmix64 (Steele, Lea & Flood, "Fast Splittable
Pseudorandom Number Generators", OOPSLA 2014) on counters, vectorised in
numpy: a batch of 4,096 x 26 costs ~15-20 ms of CPU. Ids are integer hashes,
bit-identical on every machine; weights go through numpy's log and cos, whose
SIMD versions may differ in the last bit between CPUs, which would flip a
label only if a uniform fell within ~1e-7 of its click probability.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_MASK64 = (1 << 64) - 1
_GAMMA = np.uint64(0x9E3779B97F4A7C15)  # splitmix64's increment: 2^64 / golden ratio
# Tags keep the three uses of the hash (row ids, weights, samples) independent.
_TAG_ID, _TAG_WEIGHT, _TAG_SAMPLE = 0x1D5, 0x3E1687, 0x5A3F1E
# Training indices lie in [0, 2^63); the evaluation stream is index 2^64 - 1.
_MAX_INDEX = 1 << 63
_EVAL_INDEX = _MASK64
_HEAD = 8192  # categories per field whose weights __init__ visits to centre and scale them
_CHUNK = 65_536  # samples generated at once: bounds the temporaries at ~15 MB per field


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Stafford's "Mix13"): a bijection of uint64 with full avalanche."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _key(*parts: int) -> np.uint64:
    """One 64-bit key from small integers: hash chaining, splitmix64 style."""
    h = np.uint64(0)
    with np.errstate(over="ignore"):
        for p in parts:
            h = _mix(np.asarray(h + np.uint64(p & _MASK64) * _GAMMA + _GAMMA, dtype=np.uint64))[()]
    return np.uint64(h)


def _stream(key: np.uint64, counters: np.ndarray) -> np.ndarray:
    """The splitmix64 sequence that starts at ``key``, at the given positions."""
    with np.errstate(over="ignore"):
        return _mix(key + (counters.astype(np.uint64) + np.uint64(1)) * _GAMMA)


def _uniform(bits: np.ndarray) -> np.ndarray:
    """Top 53 bits as a float64 in [0, 1)."""
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


class ClickLog:
    """An endless, deterministic click log with a planted logistic model (see the module doc)."""

    def __init__(self, *, num_fields: int = 26, id_space: int = 10**8,
                 vocab_per_field: int = 100_000, zipf_a: float = 1.2, seed: int = 0,
                 ctr: float = 0.25, logit_std: float = 1.35):
        """``ctr``: the click rate aimed at; ``logit_std``: the spread of the planted
        logit, which sets how separable clicks are (1.35 gives a planted AUC of ~0.80)."""
        for name, value in (("num_fields", num_fields), ("id_space", id_space),
                            ("vocab_per_field", vocab_per_field)):
            if int(value) != value or value < 1:
                raise ValueError(f"ClickLog {name}={value!r} must be a positive integer")
        if id_space > _MAX_INDEX:
            raise ValueError(f"ClickLog id_space={id_space} must fit in int64 (at most 2^63)")
        if not zipf_a > 0:
            raise ValueError(f"ClickLog zipf_a={zipf_a} must be > 0 (1.0-1.5 looks like real "
                              f"click logs; larger is a heavier head)")
        if not 0.0 < ctr < 1.0:
            raise ValueError(f"ClickLog ctr={ctr} must lie strictly between 0 and 1")
        if not logit_std >= 0.0:
            raise ValueError(f"ClickLog logit_std={logit_std} must be >= 0")
        self.num_fields, self.id_space = num_fields, id_space
        self.vocab_per_field = vocab_per_field
        self.zipf_a, self.seed, self.logit_std = zipf_a, seed, logit_std

        # Inverse-CDF sampling of the Zipf law: searchsorted of a uniform in the CDF.
        p = np.arange(1, vocab_per_field + 1, dtype=np.float64) ** -zipf_a
        p /= p.sum()
        self._cdf = np.cumsum(p)
        self._cdf[-1] = 1.0

        self._weight_keys = [_key(_TAG_WEIGHT, seed, f) for f in range(num_fields)]
        self._id_keys = [_key(_TAG_ID, f) for f in range(num_fields)]
        self._sample_key = _key(_TAG_SAMPLE, seed)

        # Centre each field's weights under the Zipf law and scale them all so that the
        # logit has mean `bias` and standard deviation `logit_std`: without this, the few
        # head categories (a third of the mass sits in the top 3) would move the click
        # rate by +-0.06 from seed to seed. The head is summed exactly; the tail (6% of
        # the mass with the defaults) is taken at its expectation, mean 0 and variance 1,
        # which is off by ~3e-4 and makes this 10x cheaper than visiting 2.6M categories.
        head = min(vocab_per_field, _HEAD)
        p_head, p_tail = p[:head], float(p[head:].sum())
        self._field_mean = np.empty(num_fields)
        variance = 0.0
        for f in range(num_fields):
            z = self._normal(f, np.arange(head))
            m = self._field_mean[f] = p_head @ z
            variance += p_head @ (z - m) ** 2 + p_tail * (1.0 + m * m)
        self._scale = logit_std / math.sqrt(variance)
        # E[sigmoid(b + s Z)] ~= sigmoid(b / sqrt(1 + pi s^2 / 8)) for Z ~ N(0, 1) (the
        # probit approximation, MacKay 1992); the logit is a sum of 26 independent terms,
        # close to normal, so the click rate lands within ~0.01 of `ctr`.
        self.bias = math.log(ctr / (1 - ctr)) * math.sqrt(1 + math.pi * logit_std**2 / 8)

    def _normal(self, field: int, categories: np.ndarray) -> np.ndarray:
        """The standard-normal draw behind the weight of (field, category): Box-Muller."""
        bits = _stream(self._weight_keys[field], categories)
        # Two 24-bit uniforms from one hash, in float32: plenty for a weight, and half the
        # time of float64 (log and cos are a third of a batch's cost).
        u1 = (bits >> np.uint64(40)).astype(np.float32) * np.float32(2.0**-24)
        u2 = (bits & np.uint64(0xFFFFFF)).astype(np.float32) * np.float32(2.0**-24)
        z = np.sqrt(np.float32(-2.0) * np.log1p(-u1)) * np.cos(np.float32(2.0 * math.pi) * u2)
        return z.astype(np.float64)

    def _generate(self, index: int, start: int, n: int):
        """Samples start..start+n-1 of batch ``index``: (ids, labels, planted logits)."""
        key = _key(self._sample_key, index)
        lanes = self.num_fields + 1  # one uniform per field, one for the label
        row = (np.arange(start, start + n, dtype=np.uint64) * np.uint64(lanes))
        ids = np.empty((n, self.num_fields), dtype=np.int64)
        logits = np.full(n, self.bias)
        for f in range(self.num_fields):
            u = _uniform(_stream(key, row + np.uint64(f)))
            cat = np.minimum(np.searchsorted(self._cdf, u, side="right"), self.vocab_per_field - 1)
            with np.errstate(over="ignore"):
                rows = _stream(self._id_keys[f], cat) % np.uint64(self.id_space)
            ids[:, f] = rows.astype(np.int64)
            logits += self._scale * (self._normal(f, cat) - self._field_mean[f])
        u = _uniform(_stream(key, row + np.uint64(self.num_fields)))
        labels = (u < 1.0 / (1.0 + np.exp(-logits))).astype(np.float32)
        return ids, labels, logits

    def _samples(self, index: int, n: int):
        parts = [self._generate(index, s, min(_CHUNK, n - s)) for s in range(0, n, _CHUNK)]
        ids, labels, logits = (np.concatenate(a) for a in zip(*parts))
        return (torch.from_numpy(ids), torch.from_numpy(labels),
                torch.from_numpy(logits.astype(np.float32)))

    def _check(self, index: int, batch_size: int) -> None:
        if int(index) != index or not 0 <= index < _MAX_INDEX:
            raise ValueError(f"ClickLog batch index={index!r} must be an integer in [0, 2^63)")
        if int(batch_size) != batch_size or batch_size < 1:
            raise ValueError(f"ClickLog batch_size={batch_size!r} must be a positive integer")

    def batch(self, index: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids int64 [batch_size, num_fields] in [0, id_space), labels float32 [batch_size])."""
        ids, labels, _ = self.batch_with_logits(index, batch_size)
        return ids, labels

    def batch_with_logits(self, index: int, batch_size: int):
        """:meth:`batch` plus the planted model's logits (float32 [batch_size])."""
        self._check(index, batch_size)
        return self._samples(int(index), int(batch_size))

    def eval_set(self, num_samples: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, labels, planted logits) of ``num_samples`` samples no training batch holds.

        A longer evaluation set extends a shorter one: ``eval_set(1000)`` is the
        first 1000 samples of ``eval_set(50_000)``.
        """
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"ClickLog eval_set num_samples={num_samples!r} must be a "
                             f"positive integer")
        return self._samples(_EVAL_INDEX, int(num_samples))


def roc_auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve, exactly: the Mann-Whitney U statistic of the scores.

    AUC = P(score of a random click > score of a random non-click), ties
    counting one half; computed from average ranks in O(n log n).
    """
    s = torch.as_tensor(scores).detach().cpu().double().numpy().ravel()
    y = torch.as_tensor(labels).detach().cpu().double().numpy().ravel()
    if s.shape != y.shape:
        raise ValueError(f"roc_auc: {s.size} scores but {y.size} labels; pass one label per score")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores hold NaN or infinity; check the model's outputs")
    positive = y == 1
    if not (positive | (y == 0)).all():
        raise ValueError(f"roc_auc: labels must be 0 or 1, got {np.unique(y)[:10].tolist()}")
    num_pos = int(positive.sum())
    num_neg = y.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError(f"roc_auc: needs both classes, got {num_pos} positives and {num_neg} "
                         f"negatives; evaluate on more samples")
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)  # 1-based rank of the last member of each group of ties
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    u = ranks[positive].sum() - num_pos * (num_pos + 1) / 2.0
    return float(u / (num_pos * num_neg))
