"""Reading one shard: its row groups (the unit a streaming loader fetches), its footer and ``n_frames`` column (what
a loader's catalog needs), or all of it as utterances. Features keep their stored dtype (float16 stays float16) and
are views of Arrow's buffers, not copies.

Example::

    reader = ShardReader("s3://bucket/store/shard-000000-000.parquet", n_mel=40)
    frames = reader.row_group_frames()          # one int array per row group, from the footer and n_frames alone
    rows = reader.read_row_group(0)             # ids, labels, features of row group 0 (page checksums verified)
    for u in reader.utterances(): ...           # the whole shard, with transcripts
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import IO, Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dstrain.store.manifest import (
    FEATURES,
    ID,
    LABELS,
    N_FRAMES,
    TRANSCRIPT,
    StoreError,
)


@dataclass
class Utterance:
    id: str
    transcript: str
    labels: np.ndarray
    """int32 [n_labels]"""
    features: np.ndarray
    """[n_frames, n_mel] log mel filterbank, float32 or float16 as stored"""


@dataclass
class Rows:
    """Decoded rows of a shard or of one of its row groups."""

    ids: list[str]
    labels: list[np.ndarray]
    """int32 [n_labels] per row."""
    features: list[np.ndarray]
    """``[n_frames, n_mel]`` per row, in the stored dtype."""
    transcripts: list[str] | None = None
    """Only when asked for (the loader does not need them)."""

    def __len__(self) -> int:
        return len(self.ids)


def decode_rows(table: pa.Table, n_mel: int) -> Rows:
    """The list columns of a shard table as per-row arrays: one pass over the offsets, no per-row Arrow calls."""
    labels = table.column(LABELS).combine_chunks()
    feats = table.column(FEATURES).combine_chunks()
    lv, lo = labels.values.to_numpy(zero_copy_only=False), labels.offsets.to_numpy()
    fv, fo = feats.values.to_numpy(zero_copy_only=False), feats.offsets.to_numpy()
    n = len(table)
    return Rows(
        ids=table.column(ID).to_pylist(),
        labels=[lv[lo[i] : lo[i + 1]].astype(np.int32, copy=False) for i in range(n)],
        features=[fv[fo[i] : fo[i + 1]].reshape(-1, n_mel) for i in range(n)],
        transcripts=table.column(TRANSCRIPT).to_pylist() if TRANSCRIPT in table.column_names else None,
    )


class ShardError(StoreError):
    """A shard that cannot be read: ``problem`` says what is wrong with ``url``."""

    def __init__(self, url: str, problem: str, fix: str):
        super().__init__(f"{url}: {problem}; {fix}")
        self.url, self.problem = url, problem


class ShardReader:
    """One Parquet shard. Every read error is a :class:`StoreError` naming the shard (and row group) and the fix."""

    COLUMNS = (ID, TRANSCRIPT, LABELS, N_FRAMES, FEATURES)
    FIX = "check the store with dstrain shards info and re-run dstrain preprocess to rebuild it"

    def __init__(self, url: str, n_mel: int):
        self.url, self.n_mel = url, n_mel

    def _fail(self, e: BaseException, where: str = "") -> ShardError:
        if isinstance(e, FileNotFoundError):
            return ShardError(self.url, "shard missing", self.FIX)
        return ShardError(self.url, f"{where}unreadable ({e})", f"the shard is truncated or corrupt: {self.FIX}")

    def _open(self) -> IO:
        try:
            return fsspec.open(self.url, "rb").open()
        except (FileNotFoundError, OSError) as e:
            raise self._fail(e) from None

    def row_group_frames(self) -> list[np.ndarray]:
        """The ``n_frames`` of every row of every row group: the footer and one small column, nothing else."""
        try:
            with self._open() as f:
                pf = pq.ParquetFile(f)
                return [
                    np.asarray(
                        pf.read_row_group(i, columns=[N_FRAMES], use_threads=False).column(0).to_numpy(), np.int64
                    )
                    for i in range(pf.num_row_groups)
                ]
        except (pa.ArrowInvalid, OSError) as e:
            raise self._fail(e) from None

    def read_row_group(self, index: int, transcripts: bool = False) -> Rows:
        """One row group, its pages' checksums verified (a flipped bit is an error, not a wrong feature value)."""
        columns = [ID, LABELS, FEATURES] + ([TRANSCRIPT] if transcripts else [])
        try:
            with self._open() as f:
                # use_threads=False: a streaming loader's own threads read in parallel; Arrow's pool only competes.
                table = pq.ParquetFile(f, page_checksum_verification=True).read_row_group(
                    index, columns=columns, use_threads=False
                )
        except (pa.ArrowInvalid, OSError) as e:
            raise self._fail(e, f"row group {index} ") from None
        return decode_rows(table, self.n_mel)

    def read(self) -> Rows:
        """The whole shard, transcripts included."""
        try:
            with self._open() as f:
                table = pq.ParquetFile(f, page_checksum_verification=True).read(columns=list(self.COLUMNS))
        except (pa.ArrowInvalid, OSError) as e:
            raise self._fail(e) from None
        return decode_rows(table, self.n_mel)

    def utterances(self) -> Iterator[Utterance]:
        rows = self.read()
        for i, uid in enumerate(rows.ids):
            yield Utterance(uid, rows.transcripts[i], rows.labels[i], rows.features[i])  # type: ignore[index]
