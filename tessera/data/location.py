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
    _require_dir(cfg, "point it at a directory holding x.npy and y.npy, or *.npz shards "
                      "with arrays x, y")


def _check_follow(cfg: DataConfig) -> None:
    _require_dir(cfg, "with data.follow, create the directory the shards will be written to")


def _require_dir(cfg: DataConfig, what_to_do: str) -> None:
    """Raise :class:`DataError` naming ``data.path`` unless it is a directory we can open."""
    import fsspec
    try:
        fs, root = fsspec.core.url_to_fs(cfg.path)
        exists = fs.isdir(root)
    except (ValueError, ImportError, OSError) as exc:
        raise DataError(f"data.path {cfg.path!r}: cannot open this location: {exc}") from None
    if not exists:
        raise DataError(f"data.path {cfg.path!r} does not exist or is not a directory; "
                        f"{what_to_do}")
