"""The optimizer, the learning rate and stopping decisions; the last two as pure functions of the global (all-rank)
figures, so every rank that computes them takes the same decision."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from dstrain.config import option


@dataclass(frozen=True)
class OptimConfig:
    """Optimisation and schedule"""

    learning_rate: float = 0.001
    """Adam learning rate for one worker; multiplied by the number of workers unless --noscale_lr."""
    scale_lr: bool = True
    """Multiply the learning rate by the number of workers (the global batch grows with them)."""
    warmup_steps: int = 0
    """Steps over which the learning rate rises linearly from 1/warmup_steps of its value (large world sizes need
    it: the scaled rate is too large for the first steps); 0 means none."""
    beta1: float = 0.9
    """Adam's beta 1: decay of the running mean of gradients."""
    beta2: float = 0.999
    """Adam's beta 2: decay of the running mean of squared gradients."""
    epsilon: float = 1e-8
    """Adam's epsilon, added to the root of the squared-gradient average."""
    max_grad_norm: float = 0.0
    """Clip the global norm of the (averaged) gradients to this; 0 means no clipping."""
    accumulation_steps: int = 1
    """Micro-batches whose gradients each rank sums before one allreduce and one optimizer step: the global batch is
    --train_batch_size x ranks x this, at 1/this of the collectives. Steps (warm-up, --checkpoint_steps) count
    optimizer steps."""
    gradient_compression: str = option("none", choices=("none", "fp16"))
    """Send the gradients of the allreduce as float16 (Horovod's fp16 compression: half the bytes between ranks;
    reduced in float16, applied in float32)."""
    ema_decay: float = 0.0
    """Keep an exponential moving average of the weights with this decay (e.g. 0.999; 0 means off), updated after
    every optimizer step that is not skipped, with the decay of update n (0-based) warmed up as min(D, (1+n)/(10+n));
    saved in checkpoints, and what dev evaluation, test, export and dstrain evaluate use."""
    early_stop: bool = False
    """Stop when the dev loss has not improved by --es_min_delta in --es_epochs epochs."""
    es_epochs: int = 25
    """Epochs without improvement before an early stop."""
    es_min_delta: float = 0.05
    """Smallest dev loss improvement that counts."""
    reduce_lr_on_plateau: bool = False
    """Multiply the learning rate by --plateau_reduction when the dev loss has not improved in --plateau_epochs."""
    plateau_epochs: int = 10
    """Epochs without improvement before the learning rate is reduced."""
    plateau_reduction: float = 0.1
    """Factor applied to the learning rate on a plateau."""

    def __post_init__(self) -> None:
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.epsilon <= 0:
            raise ValueError(f"epsilon must be > 0, got {self.epsilon}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 means off), got {self.ema_decay}")
        if self.warmup_steps < 0 or self.max_grad_norm < 0:
            raise ValueError("warmup_steps and max_grad_norm must be >= 0")
        if self.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {self.accumulation_steps}")
        if self.es_epochs < 1 or self.plateau_epochs < 1:
            raise ValueError("es_epochs and plateau_epochs must be >= 1")
        if not 0 < self.plateau_reduction <= 1:
            raise ValueError(f"plateau_reduction must be in (0, 1], got {self.plateau_reduction}")


def adam(cfg: OptimConfig, rate: float):
    """DeepSpeech's optimizer: Adam with --beta1, --beta2 and --epsilon (the rate is set again at every step)."""
    import tensorflow as tf

    return tf.keras.optimizers.Adam(learning_rate=rate, beta_1=cfg.beta1, beta_2=cfg.beta2, epsilon=cfg.epsilon)


def learning_rate(cfg: OptimConfig, world_size: int, step: int, plateau_factor: float = 1.0) -> float:
    """The rate for training step ``step`` (0-based): base × world size (unless --noscale_lr) × warm-up ramp ×
    the reductions plateaus have made so far."""
    lr = cfg.learning_rate * (world_size if cfg.scale_lr else 1) * plateau_factor
    if cfg.warmup_steps and step < cfg.warmup_steps:
        lr *= (step + 1) / cfg.warmup_steps
    return lr


@dataclass
class DevHistory:
    """Dev losses per epoch (global figures) and the decisions drawn from them; saved in checkpoints."""

    losses: list[float] = field(default_factory=list)
    plateau_factor: float = 1.0
    last_reduction: int = -1
    """Epoch index of the last learning rate reduction (plateaus are counted after it)."""

    def add(self, loss: float) -> None:
        self.losses.append(float(loss))

    def _stalled(self, epochs: int, min_delta: float, since: int = -1) -> bool:
        """No epoch among the last ``epochs`` (after ``since``) improved on the best before them by ``min_delta``."""
        recent_start = len(self.losses) - epochs
        if recent_start < 1 or recent_start <= since:
            return False
        best_before = min(self.losses[:recent_start])
        best_recent = min(self.losses[recent_start:])
        return not (best_recent < best_before - min_delta) or math.isnan(best_recent)

    def should_stop(self, cfg: OptimConfig) -> bool:
        return cfg.early_stop and self._stalled(cfg.es_epochs, cfg.es_min_delta)

    def update_plateau(self, cfg: OptimConfig) -> bool:
        """True (and the factor reduced) when this epoch ends a plateau."""
        if not cfg.reduce_lr_on_plateau or not self._stalled(cfg.plateau_epochs, cfg.es_min_delta, self.last_reduction):
            return False
        self.plateau_factor *= cfg.plateau_reduction
        self.last_reduction = len(self.losses) - 1
        return True

    def to_dict(self) -> dict:
        return {"losses": self.losses, "plateau_factor": self.plateau_factor, "last_reduction": self.last_reduction}

    @classmethod
    def from_dict(cls, d: dict) -> "DevHistory":
        return cls(list(d.get("losses", [])), float(d.get("plateau_factor", 1.0)), int(d.get("last_reduction", -1)))
