"""The feature store: Parquet shards plus a JSON manifest, on any fsspec URL.

Layout::

    STORE/
      manifest.json          written last: a store without it is incomplete
      shard-000000.parquet   one row per utterance
      shard-000001.parquet
      rejects.csv            samples that did not make it, with a reason

Shard columns: ``id`` (string), ``source`` (string, the audio path), ``transcript`` (string),
``labels`` (list<int32>, alphabet indices), ``n_frames`` (int32), ``duration`` (float32, seconds),
``features`` (list<float32 | float16>: the log mel filterbank, ``n_frames x n_mel`` row-major).
Paths in the manifest are relative to the store, so a store can be copied or moved as a whole.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Iterator

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dstrain.alphabet import Alphabet
from dstrain.features import FeatureConfig

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FEATURE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}


class StoreError(ValueError):
    """A store that is missing, incomplete or does not match what is asked of it."""


def shard_schema(feature_dtype: str = "float32") -> pa.Schema:
    return pa.schema(
        [
            ("id", pa.string()),
            ("source", pa.string()),
            ("transcript", pa.string()),
            ("labels", pa.list_(pa.int32())),
            ("n_frames", pa.int32()),
            ("duration", pa.float32()),
            ("features", pa.list_(FEATURE_DTYPES[feature_dtype])),
        ]
    )


@dataclass
class ShardInfo:
    path: str
    rows: int
    bytes: int
    sha256: str
    frames: int
    seconds: float


@dataclass
class Manifest:
    features: dict
    feature_dtype: str
    alphabet: list[str]
    alphabet_sha256: str
    shards: list[ShardInfo]
    rejects: dict = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION
    stored: str = "log_mel"

    @property
    def utterances(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def hours(self) -> float:
        return sum(s.seconds for s in self.shards) / 3600.0

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(**self.features)

    def get_alphabet(self) -> Alphabet:
        return Alphabet(tuple(self.alphabet))

    def to_json(self) -> str:
        d = asdict(self)
        d["totals"] = {
            "utterances": self.utterances,
            "hours": self.hours,
            "frames": sum(s.frames for s in self.shards),
            "bytes": sum(s.bytes for s in self.shards),
        }
        return json.dumps(d, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str = "manifest") -> "Manifest":
        d = json.loads(text)
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise StoreError(f"{where}: schema_version {version}, this dstrain reads {SCHEMA_VERSION}; re-run dstrain preprocess")
        d.pop("totals", None)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)


def join(url: str, name: str) -> str:
    """``name`` inside the store ``url`` (a local path or any fsspec URL)."""
    return posixpath.join(url.rstrip("/"), name) if "://" in url else os.path.join(url, name)


def read_manifest(store: str) -> Manifest:
    url = join(store, MANIFEST_NAME)
    try:
        with fsspec.open(url, "rt", encoding="utf-8") as f:
            return Manifest.from_json(f.read(), where=url)
    except FileNotFoundError:
        raise StoreError(
            f"{store}: no {MANIFEST_NAME}; not a dstrain feature store, or its preprocessing did not finish "
            "(run dstrain preprocess --output to this location)"
        ) from None


def write_manifest(store: str, manifest: Manifest) -> None:
    with fsspec.open(join(store, MANIFEST_NAME), "wt", encoding="utf-8") as f:
        f.write(manifest.to_json())


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(url: str) -> str:
    h = hashlib.sha256()
    with fsspec.open(url, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class Utterance:
    id: str
    transcript: str
    labels: np.ndarray  # int32 [n_labels]
    features: np.ndarray  # float32 [n_frames, n_mel] log mel filterbank


def read_shard(url: str, n_mel: int) -> Iterator[Utterance]:
    """Utterances of one shard, in stored order."""
    with fsspec.open(url, "rb") as f:
        table = pq.read_table(io.BytesIO(f.read()), columns=["id", "transcript", "labels", "n_frames", "features"])
    ids = table.column("id").to_pylist()
    transcripts = table.column("transcript").to_pylist()
    labels = table.column("labels").combine_chunks()
    feats = table.column("features").combine_chunks()
    label_values = labels.values.to_numpy(zero_copy_only=False)
    label_offsets = labels.offsets.to_numpy()
    feat_values = feats.values.to_numpy(zero_copy_only=False)
    feat_offsets = feats.offsets.to_numpy()
    for i, uid in enumerate(ids):
        f = feat_values[feat_offsets[i] : feat_offsets[i + 1]].astype(np.float32, copy=False)
        yield Utterance(
            id=uid,
            transcript=transcripts[i],
            labels=label_values[label_offsets[i] : label_offsets[i + 1]].astype(np.int32, copy=False),
            features=f.reshape(-1, n_mel),
        )


def verify(store: str, manifest: Manifest) -> list[str]:
    """Problems with the shard files (missing, wrong size or checksum); empty when the store is intact."""
    problems = []
    for shard in manifest.shards:
        url = join(store, shard.path)
        try:
            digest = file_sha256(url)
        except FileNotFoundError:
            problems.append(f"{shard.path}: missing")
            continue
        if digest != shard.sha256:
            problems.append(f"{shard.path}: sha256 {digest[:12]}… differs from the manifest's {shard.sha256[:12]}…")
    return problems


def check_compatible(manifest: Manifest, alphabet: Alphabet, where: str) -> None:
    if manifest.alphabet_sha256 != alphabet.sha256():
        raise StoreError(
            f"{where} was preprocessed with a different alphabet (sha256 {manifest.alphabet_sha256[:12]}…, "
            f"--alphabet_config_path gives {alphabet.sha256()[:12]}…); re-run dstrain preprocess with this alphabet"
        )
