"""The manifest: what a store holds (feature parameters, alphabet, shards with checksums, rejects), kept apart from
the heavy shards as Lhotse keeps its manifests apart from the audio, and the shard schema it describes."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import pyarrow as pa

from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.features import FeatureConfig
from dstrain.store.stats import FeatureStats

SCHEMA_VERSION = 1
FEATURE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}

# Shard columns; the loader reads only some of them.
ID, SOURCE, TRANSCRIPT, LABELS, N_FRAMES, DURATION, FEATURES = (
    "id",
    "source",
    "transcript",
    "labels",
    "n_frames",
    "duration",
    "features",
)


class StoreError(ValueError):
    """A store that is missing, incomplete or does not match what is asked of it."""


def shard_schema(feature_dtype: str = "float32") -> pa.Schema:
    """``features`` is the log mel filterbank, ``n_frames x n_mel`` row-major, in the store's dtype."""
    return pa.schema(
        [
            (ID, pa.string()),
            (SOURCE, pa.string()),
            (TRANSCRIPT, pa.string()),
            (LABELS, pa.list_(pa.int32())),
            (N_FRAMES, pa.int32()),
            (DURATION, pa.float32()),
            (FEATURES, pa.list_(FEATURE_DTYPES[feature_dtype])),
        ]
    )


@dataclass
class ShardInfo:
    path: str
    """Relative to the store, so a store can be copied or moved as a whole."""
    rows: int
    bytes: int
    sha256: str
    frames: int
    seconds: float
    augmented: bool = False
    """Holds augmented copies made at preprocessing (:mod:`dstrain.augment.waveform`), not original utterances."""


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
    feature_stats: dict | None = None
    """Per-channel count/mean/m2 of the stored features (:meth:`stats`), merged over all shards; None in stores made
    before it was recorded."""
    bytes_output_mode: bool = False
    """Labels are UTF-8 bytes (DeepSpeech's --bytes_output_mode), not alphabet indices."""
    augmentation: dict | None = None
    """How preprocessing made augmented copies and what came of them (specs, copies per utterance, seed, ops
    applied, rejects: :func:`dstrain.augment.waveform.manifest_section`); None: the store has none."""

    @property
    def utterances(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def hours(self) -> float:
        return sum(s.seconds for s in self.shards) / 3600.0

    @property
    def augmented_utterances(self) -> int:
        """Augmented copies among :attr:`utterances`."""
        return sum(s.rows for s in self.shards if s.augmented)

    def feature_config(self) -> FeatureConfig:
        return FeatureConfig(**self.features)

    def stats(self) -> FeatureStats | None:
        """The stored features' per-channel statistics, or None (stores made before they were recorded)."""
        return FeatureStats.from_dict(self.feature_stats) if self.feature_stats else None

    def get_alphabet(self) -> Alphabet | UTF8Alphabet:
        return UTF8Alphabet() if self.bytes_output_mode else Alphabet(tuple(self.alphabet))

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
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            # Manifests are replaced atomically: a damaged one was written by something else, or the disk lost it.
            raise StoreError(
                f"{where}: damaged manifest (not JSON: {e.msg} at line {e.lineno}); rebuild the store with "
                "dstrain preprocess --overwrite, or restore it from a copy"
            ) from None
        version = d.get("schema_version") if isinstance(d, dict) else None
        if version != SCHEMA_VERSION:
            raise StoreError(
                f"{where}: schema_version {version}, this dstrain reads {SCHEMA_VERSION}; re-run dstrain preprocess"
            )
        d.pop("totals", None)
        d["shards"] = [ShardInfo(**s) for s in d["shards"]]
        return cls(**d)
