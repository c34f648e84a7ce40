"""Where everything of one feature store lives: the only code that names its files or joins its URL.

Metadata files start with ``_`` so that Parquet readers (pyarrow datasets, pandas, Spark, DuckDB) opening the
store folder as one dataset skip them, as they skip Hive/Spark's ``_SUCCESS``. Stores written before that rule
(``manifest.json``, ``rejects.csv``) are still read.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

MANIFEST = "_manifest.json"
REJECTS = "_rejects.csv"
PROGRESS = "_progress"
LEGACY_MANIFEST = "manifest.json"
LEGACY_REJECTS = "rejects.csv"


def join(url: str, *names: str) -> str:
    """``names`` inside ``url``, a local path or any fsspec URL; always ``/``, never ``os.path`` (URLs stay URLs)."""
    return posixpath.join(url.rstrip("/") or "/", *names)


class StoreLayout:
    """One store's filesystem (fsspec) and the names of its files.

    Example::

        layout = StoreLayout("s3://bucket/stores/cv-train")
        layout.url(layout.manifest_name)          # s3://bucket/stores/cv-train/_manifest.json
        with layout.open("shard-000000-000.parquet", "rb") as f: ...
    """

    def __init__(self, url: str):
        self.store_url = url
        self.fs, self.root = fsspec.core.url_to_fs(url)

    def url(self, *names: str) -> str:
        return join(self.store_url, *names)

    def path(self, *names: str) -> str:
        """Path inside :attr:`fs` (no protocol)."""
        return join(self.root, *names)

    def open(self, name: str, mode: str = "rb", **kwargs: Any) -> IO:
        return self.fs.open(self.path(name), mode, **kwargs)

    def write_atomic(self, name: str, text: str) -> None:
        """``name`` replaced whole or not at all, whatever a kill or a full disk interrupts. On a local or network
        file system: written beside it, fsynced, renamed over it, then the folder fsynced (so the rename outlives a
        crash). On an object store one PUT is already all or nothing."""
        path, data = self.path(name), text.encode("utf-8")
        if not isinstance(self.fs, LocalFileSystem):
            self.fs.pipe_file(path, data)
            return
        tmp = f"{path}.tmp-{os.getpid()}"  # starts with the name's "_": Parquet readers skip it too
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)

    def exists(self, name: str) -> bool:
        return self.fs.exists(self.path(name))

    def size(self, name: str) -> int:
        return int(self.fs.size(self.path(name)))

    def makedirs(self, name: str = "") -> None:
        self.fs.makedirs(self.path(name) if name else self.root, exist_ok=True)

    def remove(self, name: str = "") -> None:
        """Removes ``name`` (recursively), or the whole store."""
        self.fs.rm(self.path(name) if name else self.root, recursive=True)

    def sha256(self, name: str) -> str:
        h = hashlib.sha256()
        with self.open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    # --- names
    @property
    def manifest_name(self) -> str:
        """The manifest to read: the current name, else the name stores had before (``manifest.json``)."""
        if not self.exists(MANIFEST) and self.exists(LEGACY_MANIFEST):
            return LEGACY_MANIFEST
        return MANIFEST

    @property
    def rejects_name(self) -> str:
        if not self.exists(REJECTS) and self.exists(LEGACY_REJECTS):
            return LEGACY_REJECTS
        return REJECTS

    @staticmethod
    def shard_name(chunk: int, part: int, augmented: bool = False) -> str:
        """Shards are named by the chunk of input rows that made them, so any number of workers names them alike;
        a chunk's augmented copies have shards of their own (``shard-CCCCCC-aug-PPP.parquet``)."""
        return f"shard-{chunk:06d}-{'aug-' if augmented else ''}{part:03d}.parquet"

    @staticmethod
    def chunk_marker_name(chunk: int) -> str:
        return f"{PROGRESS}/chunk-{chunk:06d}.json"

    @staticmethod
    def plan_name() -> str:
        return f"{PROGRESS}/plan.json"
