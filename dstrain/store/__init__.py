"""The feature store: Parquet shards plus a JSON manifest, on any fsspec URL.

Layout::

    STORE/
      _manifest.json               written last: a store without it is incomplete
      shard-000000-000.parquet     one row per utterance; named chunk-part (see dstrain.prep.pipeline)
      shard-000000-001.parquet
      shard-000000-aug-000.parquet augmented copies of chunk 0's utterances (preprocessing's --augment_copies)
      _rejects.csv                 samples that did not make it, with a reason
      _progress/                   only while preprocessing runs: chunk markers for resuming

Metadata names start with ``_``, so ``pandas.read_parquet(STORE)`` and ``pyarrow.dataset.dataset(STORE)`` read the
folder as one dataset. Shard columns (:mod:`dstrain.store.manifest`): ``id``, ``source``, ``transcript``,
``labels`` (list<int32>, alphabet indices), ``n_frames``, ``duration`` (seconds), ``features`` (list<float32 |
float16>: the log mel filterbank, ``n_frames x n_mel`` row-major).

One class per file: :class:`StoreLayout` (names and URL joining), :class:`Manifest`, :class:`ShardWriter`,
:class:`ShardReader` (row groups, footers, list-column decoding: the one reader, the loader's too),
:class:`FeatureStore` (a finished store opened for reading); :class:`~dstrain.store.stats.FeatureStats` (the
per-channel statistics the manifest records).
"""

from dstrain.store.layout import StoreLayout, join
from dstrain.store.manifest import Manifest, ShardInfo, StoreError, shard_schema
from dstrain.store.reader import Rows, ShardError, ShardReader, Utterance
from dstrain.store.store import FeatureStore
from dstrain.store.writer import ShardWriter

__all__ = [
    "FeatureStore",
    "Manifest",
    "Rows",
    "ShardError",
    "ShardInfo",
    "ShardReader",
    "ShardWriter",
    "StoreError",
    "StoreLayout",
    "Utterance",
    "join",
    "shard_schema",
]
