"""Writes utterances into size-bounded Parquet shards through fsspec."""

from __future__ import annotations

import hashlib
import io
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dstrain.store.layout import StoreLayout
from dstrain.store.manifest import ShardInfo, shard_schema

ROW_GROUP_ROWS = 256


class ShardWriter:
    """Buffers rows and writes a shard whenever the buffer reaches ``shard_size_mb``.

    Example::

        with ShardWriter(StoreLayout("s3://bucket/store"), lambda i: f"shard-{i:06d}.parquet", shard_size_mb=256) as w:
            w.add(id=..., source=..., transcript=..., labels=..., duration=..., log_mel=...)
        w.shards  # [ShardInfo(path="shard-000000.parquet", rows=..., sha256=...), ...]

    A shard is complete once its file exists: it is written in one piece from memory.
    """

    def __init__(
        self,
        layout: StoreLayout,
        name: Callable[[int], str],
        shard_size_mb: float = 256.0,
        feature_dtype: str = "float32",
        row_group_rows: int = ROW_GROUP_ROWS,
        augmented: bool = False,
    ):
        if shard_size_mb <= 0:
            raise ValueError(f"shard_size_mb must be > 0, got {shard_size_mb}")
        self.layout, self.name, self.row_group_rows, self.augmented = layout, name, row_group_rows, augmented
        self.target_bytes = int(shard_size_mb * 1024 * 1024)
        self.feature_dtype = feature_dtype
        self.schema = shard_schema(feature_dtype)
        self.next_index = 0
        self.shards: list[ShardInfo] = []
        self._rows: list[dict] = []
        self._bytes = 0

    def add(
        self, *, id: str, source: str, transcript: str, labels: list[int], duration: float, log_mel: np.ndarray
    ) -> None:
        features = np.ascontiguousarray(log_mel, dtype=self.feature_dtype)
        self._rows.append(
            {
                "id": id,
                "source": source,
                "transcript": transcript,
                "labels": list(labels),
                "n_frames": int(features.shape[0]),
                "duration": float(duration),
                "features": features.reshape(-1),
            }
        )
        self._bytes += features.nbytes + 4 * len(labels) + len(transcript) + len(source)
        if self._bytes >= self.target_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._rows:
            return
        columns = {name: [r[name] for r in self._rows] for name in self.schema.names}
        feature_type = self.schema.field("features").type
        offsets = np.cumsum([0] + [len(f) for f in columns["features"]]).astype(np.int32)
        values = pa.array(np.concatenate(columns["features"]), type=feature_type.value_type)
        arrays = [pa.array(columns[n], type=self.schema.field(n).type) for n in self.schema.names if n != "features"]
        arrays.append(pa.ListArray.from_arrays(pa.array(offsets), values, type=feature_type))
        table = pa.Table.from_arrays(arrays, schema=self.schema)
        buf = io.BytesIO()
        # Page checksums: a flipped bit in a shard is an error at read time, not silently wrong features.
        # Only text is dictionary-encoded: a dictionary of float features grows the shard by half and slows reading.
        # Byte-stream-split float32 compresses best under zstd (float16 has no such encoding in Parquet here).
        encodings = {"features": "BYTE_STREAM_SPLIT"} if self.feature_dtype == "float32" else None
        pq.write_table(
            table,
            buf,
            compression="zstd",
            row_group_size=self.row_group_rows,
            write_page_checksum=True,
            use_dictionary=["id", "source", "transcript"],
            column_encoding=encodings,
        )
        data = buf.getvalue()
        name = self.name(self.next_index)
        with self.layout.open(name, "wb") as f:
            f.write(data)
        self.shards.append(
            ShardInfo(
                path=name,
                rows=len(self._rows),
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                frames=int(sum(columns["n_frames"])),
                seconds=float(sum(columns["duration"])),
                augmented=self.augmented,
            )
        )
        self.next_index += 1
        self._rows, self._bytes = [], 0

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
