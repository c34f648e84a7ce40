"""DeepSpeech 0.6's augmentation flags, translated to ``--augment`` specs (:mod:`dstrain.augment.filterbank`'s ops).

DeepSpeech 0.7 replaced these flags by ``--augment`` and 0.9.3 refused them; old training commands still carry them.
Each flag set away from its default becomes the spec that does the same thing, and training logs one line per flag
saying what it became. DeepSpeech 0.6 applied them to the power spectrogram (257 FFT bins) and to MFCCs; the store
holds the log mel filterbank, so ``frequency_mask`` counts mel channels and ``add``/``multiply`` act on log mel, as
the ``--augment`` ops they become do (that module's docstring lists those differences).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LegacyAugmentConfig:
    """DeepSpeech 0.6 augmentation flags (each translated to an --augment spec; training logs what it became)"""

    data_aug_features_additive: float = 0.0
    """Standard deviation of Gaussian noise added to the features; 0 means none. Becomes
    --augment add[stddev=X,domain=features]."""
    data_aug_features_multiplicative: float = 0.0
    """Standard deviation around 1 of Gaussian noise the features are multiplied by; 0 means none. Becomes
    --augment multiply[stddev=X,domain=features]."""
    augmentation_spec_dropout_keeprate: float = 1.0
    """Fraction of spectrogram values kept by dropout; 1 means no dropout. Becomes
    --augment dropout[rate=1-X,domain=spectrogram]."""
    augmentation_sparse_warp: bool = False
    """Time warp of the spectrogram. Becomes --augment warp[nt=N,nf=1,wt=0.1,wf=0] with N
    --augmentation_sparse_warp_num_control_points: a smooth grid warp replaces the sparse image warp."""
    augmentation_sparse_warp_num_control_points: int = 1
    """Control points of --augmentation_sparse_warp: the warp's time grid points (nt)."""
    augmentation_sparse_warp_time_warping_para: int = 20
    """Accepted; the grid warp has no absolute shift in frames (its shifts are relative to the utterance: wt=0.1)."""
    augmentation_sparse_warp_interpolation_order: int = 2
    """Accepted; the grid warp always interpolates bicubically."""
    augmentation_sparse_warp_regularization_weight: float = 0.0
    """Accepted; the grid warp has no regularisation."""
    augmentation_sparse_warp_num_boundary_points: int = 1
    """Accepted; the grid warp always pins the edges."""
    augmentation_freq_and_time_masking: bool = False
    """SpecAugment masks. Becomes --augment frequency_mask[...] and --augment time_mask[...] from the four flags
    below."""
    augmentation_freq_and_time_masking_freq_mask_range: int = 5
    """Frequency masks are 0 to this many minus one channels wide (mel channels here, FFT bins in DeepSpeech 0.6)."""
    augmentation_freq_and_time_masking_number_freq_masks: int = 3
    """Frequency masks per utterance."""
    augmentation_freq_and_time_masking_time_mask_range: int = 2
    """Time masks are 0 to this many minus one frames long."""
    augmentation_freq_and_time_masking_number_time_masks: int = 3
    """Time masks per utterance."""
    augmentation_speed_up_std: float = 0.0
    """Speed-up by 1+|N(0, X)|; 0 means none. Becomes --augment tempo[factor=1+X~X]: uniform in 1..1+2X, which holds
    95 % of DeepSpeech's draws."""
    augmentation_pitch_and_tempo_scaling: bool = False
    """Pitch scaled uniformly in [min_pitch, max_pitch] and tempo in [1, max_tempo]. Becomes --augment pitch[...] and
    --augment tempo[...] with those uniform ranges."""
    augmentation_pitch_and_tempo_scaling_min_pitch: float = 0.95
    """Lowest pitch factor of --augmentation_pitch_and_tempo_scaling."""
    augmentation_pitch_and_tempo_scaling_max_pitch: float = 1.2
    """Highest pitch factor of --augmentation_pitch_and_tempo_scaling."""
    augmentation_pitch_and_tempo_scaling_max_tempo: float = 1.2
    """Highest tempo factor of --augmentation_pitch_and_tempo_scaling."""

    def __post_init__(self) -> None:
        for name in ("data_aug_features_additive", "data_aug_features_multiplicative", "augmentation_speed_up_std"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 means none), got {getattr(self, name)}")
        if not 0 < self.augmentation_spec_dropout_keeprate <= 1:
            raise ValueError(
                f"augmentation_spec_dropout_keeprate must be in (0, 1], got {self.augmentation_spec_dropout_keeprate}"
            )
        for name in (
            "augmentation_sparse_warp_num_control_points",
            "augmentation_freq_and_time_masking_freq_mask_range",
            "augmentation_freq_and_time_masking_time_mask_range",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "augmentation_freq_and_time_masking_number_freq_masks",
            "augmentation_freq_and_time_masking_number_time_masks",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        low, high = (
            self.augmentation_pitch_and_tempo_scaling_min_pitch,
            self.augmentation_pitch_and_tempo_scaling_max_pitch,
        )
        if not 0 < low <= high:
            raise ValueError(
                f"augmentation_pitch_and_tempo_scaling_min_pitch {low} and _max_pitch {high}: need 0 < min <= max"
            )
        if self.augmentation_pitch_and_tempo_scaling_max_tempo <= 0:
            raise ValueError(
                f"augmentation_pitch_and_tempo_scaling_max_tempo must be > 0, got "
                f"{self.augmentation_pitch_and_tempo_scaling_max_tempo}"
            )

    def translate(self, step_ms: float) -> list[tuple[str, str]]:
        """(``--augment`` spec, the one-line note training logs) for every flag in use, in DeepSpeech 0.6's order of
        application; ``step_ms`` converts frame counts to the milliseconds ``time_mask`` takes."""
        out: list[tuple[str, str]] = []

        def add(flags: str, spec: str, how: str) -> None:
            out.append((spec, f"DeepSpeech 0.6's {flags} -> --augment {spec} ({how})"))

        keep = self.augmentation_spec_dropout_keeprate
        if keep < 1:
            add(
                f"--augmentation_spec_dropout_keeprate {keep:g}",
                f"dropout[rate={1 - keep:g},domain=spectrogram]",
                "the fraction dropped",
            )
        if self.augmentation_sparse_warp:
            points = self.augmentation_sparse_warp_num_control_points
            add(
                f"--augmentation_sparse_warp (num_control_points {points})",
                f"warp[nt={points},nf=1,wt=0.1,wf=0.0]",
                "a smooth grid warp in time; time_warping_para, interpolation_order, regularization_weight and "
                "num_boundary_points have no equivalent there and are not used",
            )
        if self.augmentation_freq_and_time_masking:
            f_range = self.augmentation_freq_and_time_masking_freq_mask_range
            f_n = self.augmentation_freq_and_time_masking_number_freq_masks
            # Integer sizes are rounded from a uniform draw: about 0..range-1 wide, at least 1.
            add(
                f"--augmentation_freq_and_time_masking freq_mask_range {f_range}, number_freq_masks {f_n}",
                f"frequency_mask[n={f_n},size={(f_range - 1) // 2}~{f_range // 2}]",
                "mel channels, not FFT bins",
            )
            t_range = self.augmentation_freq_and_time_masking_time_mask_range
            t_n = self.augmentation_freq_and_time_masking_number_time_masks
            half_ms = t_range * step_ms / 2  # a uniform [0, range) frames draw, truncated to whole frames as there
            add(
                f"--augmentation_freq_and_time_masking time_mask_range {t_range}, number_time_masks {t_n}",
                f"time_mask[n={t_n},size={half_ms:g}~{half_ms:g}]",
                f"0..{t_range - 1} frames of {step_ms:g} ms",
            )
        if self.augmentation_pitch_and_tempo_scaling:
            low, high = (
                self.augmentation_pitch_and_tempo_scaling_min_pitch,
                self.augmentation_pitch_and_tempo_scaling_max_pitch,
            )
            tempo = self.augmentation_pitch_and_tempo_scaling_max_tempo
            add(
                f"--augmentation_pitch_and_tempo_scaling min_pitch {low:g}, max_pitch {high:g}",
                f"pitch[pitch={(low + high) / 2:g}~{(high - low) / 2:g}]",
                "uniform in the same range",
            )
            add(
                f"--augmentation_pitch_and_tempo_scaling max_tempo {tempo:g}",
                f"tempo[factor={(1 + tempo) / 2:g}~{abs(tempo - 1) / 2:g}]",
                f"uniform between 1 and {tempo:g}",
            )
        std = self.augmentation_speed_up_std
        if std > 0:
            add(
                f"--augmentation_speed_up_std {std:g}",
                f"tempo[factor={1 + std:g}~{std:g}]",
                f"uniform in 1..{1 + 2 * std:g}, where DeepSpeech drew 1+|N(0, {std:g})|",
            )
        if self.data_aug_features_multiplicative > 0:
            std = self.data_aug_features_multiplicative
            add(
                f"--data_aug_features_multiplicative {std:g}",
                f"multiply[stddev={std:g},domain=features]",
                "on log mel, not MFCCs",
            )
        if self.data_aug_features_additive > 0:
            std = self.data_aug_features_additive
            add(
                f"--data_aug_features_additive {std:g}", f"add[stddev={std:g},domain=features]", "on log mel, not MFCCs"
            )
        return out
