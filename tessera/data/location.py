"""Checks on the shared data location, cheap enough to run before any process starts."""

from __future__ import annotations

from tessera.config.schema import DataConfig
from tessera.errors import TesseraError


class DataError(TesseraError):
    """The data the job names cannot be read; the message says what to fix."""


def is_local(fs) -> bool:
    """Whether an fsspec filesystem is this machine's own (paths can be opened directly)."""
    protocol = getattr(fs, "protocol", "file")
    return "file" in (protocol if isinstance(protocol, tuple) else (protocol,))


def check_data_location(cfg: DataConfig) -> None:
    """Raise :class:`DataError` naming ``data.path`` if it cannot serve a dataset."""
    if cfg.follow:
        _check_follow(cfg)
        return
    if cfg.dataset != "npy":
        return
    import fsspec
    try:
        fs, root = fsspec.core.url_to_fs(cfg.path)
        exists = fs.isdir(root)
    except (ValueError, ImportError, OSError) as exc:
        raise DataError(f"data.path {cfg.path!r}: cannot open this location: {exc}") from None
    if not exists:
        raise DataError(f"data.path {cfg.path!r} does not exist or is not a directory; point it "
                        f"at a directory holding x.npy and y.npy, or *.npz shards with arrays x, y")


def _check_follow(cfg: DataConfig) -> None:
    import fsspec
    try:
        fs, root = fsspec.core.url_to_fs(cfg.path)
        exists = fs.isdir(root)
    except (ValueError, ImportError, OSError) as exc:
        raise DataError(f"data.path {cfg.path!r}: cannot open this location: {exc}") from None
    if not exists:
        raise DataError(f"data.path {cfg.path!r} does not exist or is not a directory; with "
                        f"data.follow, create the directory the shards will be written to")
