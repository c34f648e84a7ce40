"""A finished feature store opened for reading: its manifest, its shards' URLs, checks."""

from __future__ import annotations

from dstrain.alphabet import Alphabet
from dstrain.features import FeatureConfig
from dstrain.store.layout import StoreLayout
from dstrain.store.manifest import Manifest, StoreError
from dstrain.store.reader import ShardReader


class FeatureStore:
    """Example::

    store = FeatureStore.open("/shared/stores/cv-train")
    store.manifest.utterances, store.shard_urls()
    for u in store.reader(0).utterances(): ...
    """

    def __init__(self, layout: StoreLayout, manifest: Manifest):
        self.layout, self.manifest = layout, manifest

    @classmethod
    def open(cls, url: str) -> "FeatureStore":
        layout = StoreLayout(url)
        name = layout.manifest_name
        try:
            with layout.open(name, "rt", encoding="utf-8") as f:
                manifest = Manifest.from_json(f.read(), where=layout.url(name))
        except FileNotFoundError:
            raise StoreError(
                f"{url}: no {name}; not a dstrain feature store, or its preprocessing did not finish "
                "(run dstrain preprocess --output to this location)"
            ) from None
        return cls(layout, manifest)

    @property
    def url(self) -> str:
        return self.layout.store_url

    @property
    def features(self) -> FeatureConfig:
        return self.manifest.feature_config()

    def shard_urls(self) -> list[str]:
        return [self.layout.url(s.path) for s in self.manifest.shards]

    def reader(self, shard: int) -> ShardReader:
        return ShardReader(self.layout.url(self.manifest.shards[shard].path), self.features.n_mel)

    def verify(self, checksums: bool = True) -> list[str]:
        """Problems with the shard files (missing, wrong size, wrong checksum); empty when the store is intact.
        Sizes cost a listing; ``checksums`` reads every byte."""
        problems = []
        for shard in self.manifest.shards:
            try:
                size = self.layout.size(shard.path)
            except FileNotFoundError:
                problems.append(f"{shard.path}: missing")
                continue
            if size != shard.bytes:
                problems.append(f"{shard.path}: {size} bytes, the manifest says {shard.bytes} (truncated or rewritten)")
                continue
            if checksums:
                digest = self.layout.sha256(shard.path)
                if digest != shard.sha256:
                    problems.append(
                        f"{shard.path}: sha256 {digest[:12]}… differs from the manifest's {shard.sha256[:12]}…"
                    )
        return problems

    def check_alphabet(self, alphabet: Alphabet) -> None:
        if self.manifest.alphabet_sha256 != alphabet.sha256():
            raise StoreError(
                f"{self.url} was preprocessed with a different alphabet (sha256 {self.manifest.alphabet_sha256[:12]}…, "
                f"--alphabet_config_path gives {alphabet.sha256()[:12]}…); re-run dstrain preprocess with this alphabet"
            )
