"""Reading one shard: utterances in stored order, the features in their stored dtype (float16 stays float16)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dstrain.store.manifest import FEATURES, ID, LABELS, N_FRAMES, TRANSCRIPT, StoreError


@dataclass
class Utterance:
    id: str
    transcript: str
    labels: np.ndarray
    """int32 [n_labels]"""
    features: np.ndarray
    """[n_frames, n_mel] log mel filterbank, float32 or float16 as stored"""


class ShardReader:
    """One Parquet shard, read by row group (the unit a streaming loader fetches).

    Example::

        reader = ShardReader("s3://bucket/store/shard-000000-000.parquet", n_mel=40)
        for u in reader.utterances(): ...
    """

    COLUMNS = (ID, TRANSCRIPT, LABELS, N_FRAMES, FEATURES)

    def __init__(self, url: str, n_mel: int):
        self.url, self.n_mel = url, n_mel

    def _file(self) -> pq.ParquetFile:
        try:
            f = fsspec.open(self.url, "rb").open()
            return pq.ParquetFile(f)
        except FileNotFoundError:
            raise StoreError(f"{self.url}: shard missing; check the store with dstrain shards info") from None
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(
                f"{self.url}: unreadable shard ({e}); it is truncated or corrupt: check the store with dstrain shards "
                "info and re-run dstrain preprocess to rebuild it"
            ) from None

    def read_table(self) -> pa.Table:
        try:
            return self._file().read(columns=list(self.COLUMNS))
        except StoreError:
            raise
        except (pa.ArrowInvalid, OSError) as e:
            raise StoreError(f"{self.url}: unreadable shard ({e}); check the store with dstrain shards info") from None

    def utterances(self) -> Iterator[Utterance]:
        yield from utterances_of(self.read_table(), self.n_mel)


def utterances_of(table: pa.Table, n_mel: int) -> Iterator[Utterance]:
    """Rows of a shard table as utterances; the feature values are views of the table's buffers, not copies."""
    ids = table.column(ID).to_pylist()
    transcripts = table.column(TRANSCRIPT).to_pylist()
    labels = table.column(LABELS).combine_chunks()
    feats = table.column(FEATURES).combine_chunks()
    label_values = labels.values.to_numpy(zero_copy_only=False)
    label_offsets = labels.offsets.to_numpy()
    feat_values = feats.values.to_numpy(zero_copy_only=False)
    feat_offsets = feats.offsets.to_numpy()
    for i, uid in enumerate(ids):
        yield Utterance(
            id=uid,
            transcript=transcripts[i],
            labels=label_values[label_offsets[i] : label_offsets[i + 1]].astype(np.int32, copy=False),
            features=feat_values[feat_offsets[i] : feat_offsets[i + 1]].reshape(-1, n_mel),
        )
