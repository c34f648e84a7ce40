"""Input pipeline options (training; dev and test sets use the reader settings, never augmentation)."""

from __future__ import annotations

from dataclasses import dataclass, field

from dstrain.augment.legacy import LegacyAugmentConfig
from dstrain.config import option


@dataclass(frozen=True)
class LoaderConfig:
    """Input pipeline"""

    loader_threads: int = 4
    """Background threads per rank reading row groups and assembling (augmenting) batches."""
    loader_memory_mb: float = 1024.0
    """Decoded row groups a rank keeps in memory (current shuffle window plus prefetch), in MiB; the corpus size does
    not matter. It also sets the shuffle window: samples are mixed across about half this many MiB of row groups."""
    loader_prefetch: int = 4
    """Batches assembled ahead of the training step."""
    length_buckets: int = 30
    """Length buckets (frame-count quantiles of the training set); at each step all ranks draw from the same one.
    1 disables bucketing."""
    batch_frames: int = 0
    """Batches by duration: each rank's batch holds as many utterances as fit in this many frames of padded batch
    (utterances x longest utterance), instead of --train_batch_size utterances; at 20 ms frames 50 frames are one
    second, so 30000 is 10 minutes of padded audio. 0 means fixed --train_batch_size."""
    remainder: str = option("pad", choices=("pad", "drop"))
    """Samples that do not fill the last batch of a rank: pad repeats at most one batch of that rank's own samples,
    drop leaves out at most one batch per rank (with --batch_frames: at most one utterance). Either way every rank
    runs the same number of steps."""
    sortagrad: bool = False
    """First epoch in order of length, shortest first (DeepSpeech 2's SortaGrad)."""
    reverse_train: bool = False
    """First epoch in order of length, longest first (DeepSpeech's --reverse_train: finds out-of-memory early)."""
    reverse_dev: bool = False
    """Dev (and --metrics_files) batches longest first instead of shortest first (DeepSpeech's --reverse_dev), within
    each window of row groups the loader holds (the whole set when it fits in --loader_memory_mb)."""
    limit_train: int = 0
    """Use at most this many training samples; 0 means all."""
    limit_dev: int = 0
    """Use at most this many dev samples; 0 means all."""
    limit_test: int = 0
    """Use at most this many test samples; 0 means all."""
    train_weights: tuple[float, ...] = option((), parse=lambda v: tuple(float(x) for x in v.split(",") if x))
    """Mixing weights of the --train_files stores, comma-separated; empty: in proportion to their sizes."""
    augmented_weight: float = 1.0
    """How often an augmented copy stored by dstrain preprocess --augment_copies is drawn, against an original
    utterance of the same store: 1 treats copies as any utterance, 0 leaves them out, 0.5 draws each copy half as often
    as an original (the epoch keeps its size). Dev and test sets never use copies."""
    skip_bad_shards: bool = False
    """Leave out missing, truncated or corrupt shards (counted and logged, agreed by all ranks) instead of stopping."""
    augment: tuple[str, ...] = option((), append=True)
    """Training augmentation, DeepSpeech 0.9's syntax, repeatable: --augment frequency_mask[p=0.8,n=2,size=4]
    --augment tempo[factor=1~0.1]; --augment default takes the recommended set. Off by default, never on dev/test."""
    deepspeech06: LegacyAugmentConfig = field(default_factory=LegacyAugmentConfig)

    def __post_init__(self) -> None:
        for name in ("loader_threads", "loader_prefetch", "length_buckets"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_frames < 0:
            raise ValueError(f"batch_frames must be >= 0, got {self.batch_frames}")
        if self.loader_memory_mb <= 0:
            raise ValueError(f"loader_memory_mb must be > 0, got {self.loader_memory_mb}")
        if not self.augmented_weight >= 0 or self.augmented_weight == float("inf"):
            raise ValueError(f"augmented_weight must be a finite number >= 0, got {self.augmented_weight}")
        if any(w < 0 for w in self.train_weights) or (self.train_weights and sum(self.train_weights) == 0):
            raise ValueError(f"train_weights must be >= 0 and not all 0, got {self.train_weights}")
