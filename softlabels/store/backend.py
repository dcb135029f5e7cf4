"""Storage backends: one small interface over an HDF5 file and a Zarr v3 group.

The reader and writer speak only to :class:`Backend`; the backend is chosen by
path suffix (``.h5``/``.hdf5`` -> HDF5, ``.zarr`` -> Zarr) or explicitly. A store at a
URL (:mod:`softlabels.store.location`) is always Zarr: HDF5 needs a local file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from softlabels.errors import ConfigError, NotAStore, StoreNotFound
from softlabels.store.format import ArraySpec
from softlabels.store.location import store_location

__all__ = ["Backend", "BackendKind", "backend_kind", "open_backend"]

BackendKind = Literal["hdf5", "zarr"]
SUFFIXES: dict[str, BackendKind] = {".h5": "hdf5", ".hdf5": "hdf5", ".zarr": "zarr"}


class Backend(Protocol):
    """The operations the reader and writer need from a storage library."""

    kind: BackendKind
    path: Path | str  # a local path, or a URL (Zarr only)

    def attrs(self) -> dict[str, Any]: ...
    def set_attrs(self, attrs: dict[str, Any]) -> None: ...
    def array_names(self) -> list[str]: ...
    def array_info(self, name: str) -> tuple[tuple[int, ...], np.dtype, tuple[int, ...]]: ...
    def shard_rows(self, name: str) -> int | None: ...
    def unbacked(self, name: str, *, complete: bool = False) -> str | None: ...
    def create_array(self, name: str, spec: ArraySpec, *, chunk_rows: int, shard_rows: int | None,
                     compress: bool) -> None: ...
    def read(self, name: str, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray: ...
    def write(self, name: str, start: int, data: np.ndarray) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    def size_on_disk(self) -> int: ...


def backend_kind(path: str | Path, kind: str | None = None) -> BackendKind:
    """Which backend a path uses: the explicit ``kind``, else its suffix; Zarr for every URL."""
    if kind is not None and kind not in ("hdf5", "zarr"):
        raise ConfigError(f"unknown store backend {kind!r}; use 'hdf5' or 'zarr'")
    path = store_location(path)
    if isinstance(path, str):
        name = path.rsplit("/", 1)[-1].lower()
        if kind == "hdf5" or name.endswith((".h5", ".hdf5")):
            raise ConfigError(f"{path!r}: HDF5 stores are local files; give a local path, or write a Zarr store "
                              "(*.zarr) at the URL")
        return "zarr"
    if kind is not None:
        return kind  # type: ignore[return-value]
    suffix = path.suffix.lower()
    if suffix in SUFFIXES:
        return SUFFIXES[suffix]
    if path.is_dir() and (path / "zarr.json").exists():
        return "zarr"
    if path.is_file():
        return "hdf5"
    raise ConfigError(
        f"cannot tell the store backend of {str(path)!r} from its suffix; "
        "name it *.h5, *.hdf5 or *.zarr, or pass the backend explicitly"
    )


def open_backend(path: str | Path, mode: Literal["r", "r+", "w"], kind: str | None = None) -> Backend:
    """Open (``r``, ``r+``) or create (``w``) a store's backend."""
    path = store_location(path)
    which = backend_kind(path, kind)
    if isinstance(path, Path):
        if mode != "w" and not path.exists():
            raise StoreNotFound(f"no store at {str(path)!r}; check the path (generate one with 'softlabels generate')")
        if which == "hdf5":
            from softlabels.store._hdf5 import HDF5Backend

            return HDF5Backend(path, mode)
        if mode != "w" and not (path / "zarr.json").is_file():
            raise NotAStore(f"{str(path)!r} is not a Zarr v3 store (no zarr.json); check the path")
    from softlabels.store._zarr import ZarrBackend

    return ZarrBackend(path, mode)
