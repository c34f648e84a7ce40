"""Distributed training with Horovod: one process per GPU (or CPU slot), synchronous data parallelism.

Collectives go through :class:`dstrain.distributed.World` and are marked ``# Horovod:``; model, data and decoder
code know nothing of ranks beyond the numbers they are handed. Every decision (skip a step, stop, reduce the learning
rate, stop early) is taken from figures all ranks share, so all ranks take it together.

What the trainer is built from: the process (:mod:`dstrain.runtime`: Horovod, threads, devices, logging), the input
(:mod:`dstrain.loader.builder`: stores, catalog, plans, readers, the loader's position), the model and optimizer,
the checkpoints of a :class:`~dstrain.rundir.RunDir`, and the run record (:mod:`dstrain.record`) that rank 0 appends
every epoch, evaluation, checkpoint and stop to; the log line and TensorBoard's scalars are written from the same
records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

import dstrain
from dstrain import runtime
from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.config import option, parse_list, to_dict
from dstrain.decoder.config import DecoderConfig
from dstrain.evaluate import EvaluationSetConfig, global_loss, greedy_error_counts, posteriors, report_test_set
from dstrain.export import ExportOptions, export_model
from dstrain.features import ExpectedFeatures
from dstrain.loader.builder import EvalInput, TrainInput
from dstrain.loader.config import LoaderConfig
from dstrain.loader.sampler import describe
from dstrain.model import DeepSpeech, ModelConfig, ctc_loss
from dstrain.preemption import EXIT_PREEMPTED, Preempted
from dstrain.record import RunRecord, format_epoch
from dstrain.rundir import LoadEvaluateConfig, RunDir, evaluation_weights, restore_evaluation_weights
from dstrain.runtime import ProcessConfig
from dstrain.train.checkpoint import (
    CheckpointConfig,
    Checkpoints,
    Progress,
    check_geometry,
    check_not_averaged,
    check_release_fine_tuning,
    load_weights_from,
)
from dstrain.train.elastic import ElasticConfig
from dstrain.train.ema import WeightAverage
from dstrain.train.fault import fault_tolerance
from dstrain.train.schedule import DevHistory, OptimConfig, adam, learning_rate
from dstrain.train.state import TrainState

log = logging.getLogger("dstrain.train")


class Figures:
    """Named float32 scalars carried as one vector inside the step: one allreduce and one copy from the device for
    all of them, and names instead of positions on both sides."""

    def __init__(self, *names: str):
        self.names = names

    def pack(self, **values) -> tf.Tensor:
        return tf.stack([tf.cast(values[n], tf.float32) for n in self.names])

    def unpack(self, vector: tf.Tensor) -> dict:
        return dict(zip(self.names, tf.unstack(vector, len(self.names))))

    def read(self, vector: tf.Tensor) -> dict[str, float]:
        """Outside the step: the figures as Python floats."""
        return dict(zip(self.names, vector.numpy().tolist()))


# A rank's micro-batch: loss x utterances, utterances, 1 if its gradients were not finite, frames after augmentation.
MICRO_BATCH = Figures("loss_sum", "utterances", "nonfinite", "frames", "micro_batches")
# What the step sums over ranks: the above, plus whether the rank was asked to stop and its loader wait.
RANK_STEP = Figures(*MICRO_BATCH.names, "stop", "wait")
# What the loop hands the step: whether this rank was asked to stop, its loader wait (seconds), the learning rate.
STEP_INPUT = Figures("stop", "wait", "learning_rate")
# What the step returns, the same on every rank.
STEP = Figures("loss", "skipped", "stop", "utterances", "frames", "wait")

PRECISIONS = ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class TrainConfig:
    """dstrain train: train on feature stores (launch with horovodrun/mpirun/srun for several processes)"""

    train_files: tuple[str, ...] = option(parse=parse_list)
    """Feature store(s) to train on, comma-separated."""
    alphabet_config_path: str = ""
    """alphabet.txt the stores were preprocessed with (not needed with --bytes_output_mode)."""
    dev_files: tuple[str, ...] = option((), parse=parse_list)
    """Dev feature store(s), comma-separated: dev loss and greedy WER/CER each epoch, best checkpoint, early stop."""
    metrics_files: tuple[str, ...] = option((), parse=parse_list)
    """Feature store(s), comma-separated, whose loss and greedy WER/CER are tracked each epoch after the dev set, each
    reported apart (run record, log, TensorBoard) and never choosing the best checkpoint or a stop (DeepSpeech's)."""
    epochs: int = 75
    """Total epochs; a resumed run continues until this many are done."""
    train_batch_size: int = 1
    """Utterances per step on each worker (not used with --batch_frames)."""
    dev_batch_size: int = 8
    """Utterances per dev evaluation step on each worker."""
    export_dir: str = ""
    """Export the trained model here at the end (rank 0 writes)."""
    summary_dir: str = ""
    """TensorBoard summaries; empty: SAVE_CHECKPOINT_DIR/summaries."""
    automatic_mixed_precision: bool = False
    """float16 compute with dynamic loss scaling (same as --precision fp16)."""
    precision: str = option("fp32", choices=PRECISIONS)
    """Compute precision: fp32, fp16 (dynamic loss scaling; an overflow skips the step on all ranks) or bf16. CTC
    and softmax stay in float32."""
    bytes_output_mode: bool = False
    """Predict UTF-8 bytes instead of alphabet labels (DeepSpeech's mode for languages with large alphabets); the
    stores must be preprocessed with --bytes_output_mode."""
    max_nonfinite_steps: int = 25
    """Stop (with a checkpoint) after this many consecutive steps skipped for a non-finite loss or gradient on some
    rank; 0 means never."""
    random_seed: int = 4568
    """Seed of weight initialisation, dropout, sample order and augmentation."""
    shuffle: bool = True
    """Shuffle training samples each epoch (an order shared by all ranks, seeded by --random_seed and the epoch)."""
    summary_steps: int = 20
    """Write step-level TensorBoard scalars every this many steps."""
    process: ProcessConfig = field(default_factory=ProcessConfig)
    elastic: ElasticConfig = field(default_factory=ElasticConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    test: EvaluationSetConfig = field(default_factory=EvaluationSetConfig)
    export: ExportOptions = field(default_factory=ExportOptions)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    evaluate: LoadEvaluateConfig = field(default_factory=LoadEvaluateConfig)
    feature_check: ExpectedFeatures = field(default_factory=ExpectedFeatures)

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ValueError("train_files: give at least one feature store (--train_files)")
        if not self.alphabet_config_path and not self.bytes_output_mode:
            raise ValueError("give --alphabet_config_path (or --bytes_output_mode)")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        for name in ("train_batch_size", "dev_batch_size", "summary_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.automatic_mixed_precision and self.precision == "bf16":
            raise ValueError("--automatic_mixed_precision is float16: give it or --precision bf16, not both")
        if self.evaluate.load_evaluate == "best" and not self.checkpoint.save_dir:
            raise ValueError("--load_evaluate best needs --checkpoint_dir (where the best-dev checkpoint is saved)")

    @property
    def compute_precision(self) -> str:
        return "fp16" if self.automatic_mixed_precision else self.precision


def weights_digest(model: tf.keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


# TensorBoard tags of the epoch record's fields.
EPOCH_SCALARS = {
    "loss": "loss/train",
    "frames_per_s": "throughput/frames_per_s",
    "utterances_per_s": "throughput/utterances_per_s",
    "padding": "loader/padding_fraction",
    "loader_wait_max_s": "loader/wait_max_s",
    "dev_loss": "loss/dev",
    "dev_wer": "wer/dev",
    "dev_cer": "cer/dev",
}


class Trainer:
    """One rank's view of a training run: data, model, optimizer, checkpoints, and the steps over them."""

    def __init__(self, cfg: TrainConfig, proc: runtime.Process):
        self.cfg, self.proc, self.world, self.stop = cfg, proc, proc.world, proc.stop
        self.init_from: str | None = None  # fine-tuning: the weights the run started from (the start record's)
        world = self.world
        log.info(
            "Horovod: %d process(es), %s controller, %s, %s precision",
            world.size,
            world.controller(),
            f"{proc.n_gpus} GPU(s) visible" if proc.n_gpus else "CPU only",
            cfg.compute_precision,
        )
        policy = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}[cfg.compute_precision]
        tf.keras.mixed_precision.set_global_policy(policy)
        if cfg.checkpoint.train_cudnn or cfg.checkpoint.load_cudnn:
            log.info(
                "--train_cudnn/--load_cudnn are not needed: Keras uses cuDNN's LSTM on GPUs and checkpoints are "
                "portable"
            )
        # Python's, NumPy's and TensorFlow's generators: unseeded Keras initialisers draw from Python's.
        tf.keras.utils.set_random_seed(cfg.random_seed)

        check_release_fine_tuning(cfg.checkpoint, cfg.model)
        self.fault = fault_tolerance(cfg.elastic, world, self.write)
        self.samples = self.fault.samples
        self.scan_world = self.fault.scan_world(world)
        self.alphabet = UTF8Alphabet() if cfg.bytes_output_mode else Alphabet.from_file(cfg.alphabet_config_path)
        self.data = TrainInput.build(
            cfg.train_files,
            self.alphabet,
            cfg.loader,
            world,
            batch_size=cfg.train_batch_size,
            seed=cfg.random_seed,
            epochs=cfg.epochs,
            shuffle=cfg.shuffle,
            scan_world=self.scan_world,
        )
        self.features = self.data.features
        cfg.feature_check.check(self.features, cfg.train_files[0])
        self.dev = self._eval_input(cfg.dev_files, cfg.dev_batch_size, cfg.loader.limit_dev, cfg.loader.reverse_dev)
        self.metrics = {
            url: self._eval_input((url,), cfg.dev_batch_size, cfg.loader.limit_dev, cfg.loader.reverse_dev)
            for url in cfg.metrics_files
        }
        self.weights_from = "final weights"
        self.n_classes = len(self.alphabet) + 1

        self.model = DeepSpeech.for_features(cfg.model, self.features, self.n_classes)
        if cfg.model.feature_normalization:
            stats = self.data.feature_statistics()
            self.model.front_end.set_statistics(stats.mean, stats.std())
        optimizer = adam(cfg.optim, learning_rate(cfg.optim, world.size, 0))
        self.amp = cfg.compute_precision == "fp16"
        self.optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer) if self.amp else optimizer
        self.optimizer.build(self.model.trainable_variables)
        self.ema = None
        if cfg.optim.ema_decay:
            self.ema = WeightAverage(
                self.model,
                cfg.optim.ema_decay,
                lambda: DeepSpeech.for_features(cfg.model, self.features, self.n_classes),
            )
        # The weights dev evaluation uses, and (after use_evaluation_weights) test and export: "ema" or "raw".
        self.evaluated_weights = "ema" if self.ema else "raw"
        self.state = TrainState(self.model, self.optimizer, self.ema, self.data)
        self.save_run = RunDir(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir else None
        self.checkpoints: Checkpoints | None = None
        self.summaries = None
        self.record = RunRecord(None)
        self.take_roles()
        self.accumulated: list[tf.Variable] = []
        # --augment: the ops that run on the device, in the step (the batch's keys seed them), or None.
        self.augment = self.data.device_augmenter()
        self.layout()
        # Dev and test stores may keep another dtype than the training ones: one trace per dtype and rank.
        self.logits = tf.function(
            lambda x, n: self.model((x, n), training=False), reduce_retracing=True, autograph=False
        )

    @property
    def progress(self) -> Progress:
        return self.state.progress

    @property
    def history(self) -> DevHistory:
        return self.state.history

    def take_roles(self) -> None:
        """What only rank 0 does (checkpoints, summaries, the run record), given to whichever rank is rank 0 now.
        Where every rank loads checkpoints itself (the fault tolerance says), each has a checkpoint manager, and a
        new rank 0 takes one afresh, so that it counts the checkpoints an earlier rank 0 saved."""
        cfg, world = self.cfg, self.world
        if self.save_run is not None and (world.is_root or self.fault.loads_everywhere):
            self.checkpoints = Checkpoints(
                self.save_run, self.model, self.optimizer, self.progress, cfg.checkpoint.max_to_keep, ema=self.ema
            )
        self.record = RunRecord(self.save_run.metrics_path if world.is_root and self.save_run else None)
        summary_dir = cfg.summary_dir or (self.save_run.summaries_dir if self.save_run else "")
        if world.is_root and summary_dir and self.summaries is None:
            self.summaries = tf.summary.create_file_writer(summary_dir)
        elif not world.is_root and self.summaries is not None:
            self.summaries.close()
            self.summaries = None

    @property
    def saver(self) -> Checkpoints | None:
        """The checkpoints this rank saves: rank 0's, nobody else's."""
        return self.checkpoints if self.world.is_root else None

    def layout(self) -> None:
        """Micro-batches per optimizer step, the world size the learning rate is scaled by, and the step functions,
        for the world as it is now (traced again when the world changes: the collectives depend on its size)."""
        self.group, self.lr_world = self.fault.micro_batches(self.cfg.optim.accumulation_steps, self.world.size)
        dtype = tf.as_dtype(self.data.feature_dtype)
        spec = (
            tf.TensorSpec([None, None, self.features.n_mel], dtype),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, 2], tf.int64),
        )
        # Without AutoGraph: the step has no Python control flow on tensors (tf.cond where it branches), and
        # converting it and the model's layers took a third of each rank's start-up.
        self.train_step = tf.function(
            self._train_step,
            input_signature=spec + (tf.TensorSpec([len(STEP_INPUT.names)], tf.float32),),
            autograph=False,
        )
        if self.group > 1:
            # Gradient sums of the micro-batches before the last of each group (float32 even under mixed precision:
            # the gradients are unscaled first).
            if not self.accumulated:
                self.accumulated = [
                    tf.Variable(tf.zeros(v.shape, tf.float32), trainable=False) for v in self.model.trainable_variables
                ]
                self.acc_stats = tf.Variable(tf.zeros([len(MICRO_BATCH.names)]), trainable=False)
            self.accumulate_step = tf.function(self._accumulate, input_signature=spec, autograph=False)

    def _eval_input(self, urls: tuple[str, ...], batch_size: int, limit: int, reverse: bool) -> EvalInput | None:
        if not urls:
            return None
        return EvalInput.build(
            urls,
            self.alphabet,
            self.cfg.loader,
            self.world,
            batch_size=batch_size,
            limit=limit,
            features=self.features,
            reference=f"the training stores ({self.cfg.train_files[0]})",
            reverse=reverse,
            scan_world=self.scan_world,
        )

    def write(self, event: str, **fields) -> dict:
        return self.record.write(event, step=int(self.progress.step), epoch=int(self.progress.epoch), **fields)

    def write_start(self, loaded: str | None) -> None:
        hosts = self.world.allgather_object(socket.gethostname())  # Horovod: who is where, for the record
        fine_tuned = {"init_from": self.init_from} if self.init_from else {}
        self.write(
            "start",
            world_size=self.world.size,
            hosts=hosts,
            controller=self.world.controller(),
            gpus=self.proc.n_gpus,
            precision=self.cfg.compute_precision,
            dstrain_version=dstrain.__version__,
            **fine_tuned,
        )
        if loaded:
            position = self.data.state_dict()["position"]
            self.write("resume", checkpoint=loaded, epoch_step=position["step"] if position else 0)

    # --- state
    def restore_and_broadcast(self) -> str | None:
        """Rank 0 decides what to start from (--load_train) and loads it; every rank then takes rank 0's state (or,
        where the fault tolerance loads everywhere, every rank loads it and its first synchronisation is the
        broadcast). Returns the checkpoint resumed from, if any."""
        loaded = None
        if self.world.is_root or self.fault.loads_everywhere:
            message, loaded = self._load()
            if self.world.is_root:
                log.info(message)
            if self.ema is not None and not (loaded and evaluation_weights(loaded) == "ema"):
                self.ema.reset()
                if self.world.is_root:
                    log.info(
                        "Moving average of the weights (--ema_decay %g) starts at the weights loaded",
                        self.cfg.optim.ema_decay,
                    )
        if self.world.is_root and self.save_run is not None:
            self.save_run.write_config(to_dict(self.cfg), self.features, self.alphabet, self.world.size)
        if not self.fault.loads_everywhere:
            # Horovod: every rank starts from rank 0's weights, optimizer state, weights' average and counters.
            self.world.broadcast_variables(self.state.variables())
            self.progress.set_strings(self.world.broadcast_object(self.progress.strings()))
        self.state.after_restore()
        return loaded

    def _load(self) -> tuple[str, str | None]:
        """(what was loaded, in words; the checkpoint this run resumes from, if any)."""
        cfg = self.cfg.checkpoint
        if cfg.load_train == "init":
            return "Starting from fresh weights (--load_train init)", None
        save, load = cfg.save_dir, cfg.load_dir
        if save and self.checkpoints is not None:
            path = None
            if cfg.load_train in ("auto", "last") and load == save:
                path = self.checkpoints.latest.latest_checkpoint
            elif cfg.load_train == "best" and load == save:
                path = self.checkpoints.best.latest_checkpoint
            if path:
                check_geometry(self.save_run.read(), self.model, self.n_classes, 0, save)
                self.checkpoints.restore(path)
                p = self.progress
                return f"Resuming from checkpoint {path} (epoch {int(p.epoch)} done, step {int(p.step)})", path
            if cfg.load_train in ("auto", "last") and self.checkpoints.latest.latest_checkpoint:
                # A run being continued: its own last checkpoint wins over the run it was started from.
                path = self.checkpoints.latest.latest_checkpoint
                self.checkpoints.restore(path)
                return (
                    f"Resuming from checkpoint {path} (this run's own; --load_checkpoint_dir only seeds a new run)",
                    path,
                )
        if load and load != save:
            source = load_weights_from(load, self.model, self.n_classes, cfg.drop_source_layers, cfg.load_train)
            self.init_from = source
            return f"Starting from the weights of {source} (fine-tuning: new optimizer, counters at 0)", None
        if load and cfg.load_train in ("last", "best"):
            raise FileNotFoundError(f"{load}: no checkpoint to load (--load_train {cfg.load_train})")
        return f"No checkpoint in {save or '(no --checkpoint_dir)'}: starting from fresh weights", None

    def save(self, reason: str, best: bool = False) -> str | None:
        """Rank 0 saves model, optimizer, counters and the loader's position; returns the path (None elsewhere)."""
        if self.saver is None:
            return None
        position = self.state.before_save()["position"]
        path = self.saver.save(best=best)
        self.write("checkpoint", path=path, best=best, reason=reason, epoch_step=position["step"] if position else 0)
        return path

    # --- one step (traced once by tf.function)
    def _gradients(self, x, x_len, y, y_len, keys):
        """This rank's mean loss over the batch, its gradients (unscaled, zeroed if not finite), whether they were
        finite, the utterances and the frames (after augmentation)."""
        model, optimizer = self.model, self.optimizer
        if self.augment is not None:
            x, x_len = self.augment(x, x_len, y, y_len, keys)
        with tf.GradientTape() as tape:
            logits = model((x, x_len), training=True)
            losses = ctc_loss(logits, x_len, y, y_len)
            count = tf.cast(tf.shape(losses)[0], tf.float32)
            loss = tf.reduce_sum(losses) / tf.maximum(count, 1.0)
            scaled = optimizer.get_scaled_loss(loss) if self.amp else loss
        grads = tape.gradient(scaled, model.trainable_variables)
        if self.amp:
            grads = optimizer.get_unscaled_gradients(grads)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads] + [tf.math.is_finite(loss)])
        grads = [tf.where(finite, g, tf.zeros_like(g)) for g in grads]
        return tf.where(finite, loss, 0.0), grads, finite, count, tf.cast(tf.reduce_sum(x_len), tf.float32)

    @staticmethod
    def _micro_batch_figures(loss, finite, count, frames) -> tf.Tensor:
        nonfinite = 1.0 - tf.cast(finite, tf.float32)
        return MICRO_BATCH.pack(
            loss_sum=loss * count, utterances=count, nonfinite=nonfinite, frames=frames, micro_batches=1
        )

    def _accumulate(self, x, x_len, y, y_len, keys):
        """A micro-batch that is not the last of its group: its gradients and figures are added up here, locally;
        no collective runs."""
        loss, grads, finite, count, frames = self._gradients(x, x_len, y, y_len, keys)
        for acc, g in zip(self.accumulated, grads):
            acc.assign_add(g * count)  # utterance-weighted: duration batches hold unequal counts
        self.acc_stats.assign_add(self._micro_batch_figures(loss, finite, count, frames))
        return loss

    def _train_step(self, x, x_len, y, y_len, keys, flags):
        """The (last) micro-batch of an optimizer step, with the :data:`STEP_INPUT` figures. Returns the :data:`STEP`
        figures, over all ranks and micro-batches."""
        optimizer, world, variables = self.optimizer, self.world, self.model.trainable_variables
        # The optimizer keeps its own copy of the rate (a variable it made from ours): set that one.
        flags = STEP_INPUT.unpack(flags)
        optimizer.learning_rate.assign(flags["learning_rate"])
        loss, grads, finite, count, frames = self._gradients(x, x_len, y, y_len, keys)
        figures = self._micro_batch_figures(loss, finite, count, frames)
        accumulating = self.group > 1  # at trace time: every rank of a world traces the same graph
        if accumulating:
            figures += self.acc_stats
            grads = [acc + g * count for acc, g in zip(self.accumulated, grads)]  # sum over utterances of the group
            for acc in self.accumulated:
                acc.assign(tf.zeros_like(acc))
            self.acc_stats.assign(tf.zeros_like(self.acc_stats))
        # Horovod: one allreduce carries the loss sum, the count, whether any rank is non-finite or was asked to
        # stop, the frames and the loader wait (for the log).
        mine = MICRO_BATCH.unpack(figures)
        summed = RANK_STEP.unpack(
            world.allreduce_tensor(RANK_STEP.pack(**mine, stop=flags["stop"], wait=flags["wait"]))
        )
        any_bad = summed["nonfinite"] > 0
        utterances = tf.maximum(summed["utterances"], 1.0)
        # The step's loss is the mean over all its utterances on all ranks and micro-batches, so each rank's gradient
        # counts by its share of them (the average below divides by the world size). Without accumulation, grads is
        # the rank's mean gradient and the factor is exactly 1 with equal counts (fixed batches); with it, grads is
        # the utterance-weighted sum of the group's mean gradients.
        share = (1.0 if accumulating else count) * world.size / utterances
        # Horovod: average the gradients over ranks (a rank's non-finite ones are zeros; the step is skipped anyway).
        grads = world.average_gradients([g * share for g in grads], compression=self.cfg.optim.gradient_compression)
        if self.cfg.optim.max_grad_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, self.cfg.optim.max_grad_norm)
        skipped = any_bad
        if self.amp:
            # The loss scale optimizer skips a non-finite step and lowers its scale: make it see one on every rank.
            grads = [tf.where(any_bad, tf.fill(tf.shape(g), np.float32(np.inf)), g) for g in grads]
            optimizer.apply_gradients(zip(grads, variables))
            if self.ema is not None:  # it also skips an overflow of the reduced gradients (fp16 compression)
                skipped = tf.logical_not(tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads]))
        else:
            tf.cond(any_bad, lambda: tf.no_op(), lambda: optimizer.apply_gradients(zip(grads, variables)).op)
        if self.ema is not None:
            # Once per optimizer step (accumulated micro-batches never get here), after it, and not when it skipped.
            tf.cond(skipped, lambda: tf.no_op(), self.ema.update)
        # One tensor, so the loop reads everything with one copy from the device.
        return STEP.pack(
            loss=summed["loss_sum"] / utterances,
            skipped=any_bad,
            stop=summed["stop"] > 0,
            utterances=summed["utterances"],
            frames=summed["frames"],
            wait=summed["wait"] / world.size,
        )

    # --- the loop
    def _to_device(self, batch):
        """A batch copied to the GPU while the step before it is still running (the step would copy it anyway)."""
        if batch is None or not self.proc.n_gpus:
            return batch
        with tf.device("/GPU:0"):
            return tuple(tf.identity(a) for a in batch)

    def run_epoch(self, epoch: int) -> bool:
        """Returns False when training should stop (early stop)."""
        cfg, progress, world, data = self.cfg, self.progress, self.world, self.data
        reader = data.reader(epoch)
        plan = reader.plan
        if plan.start_step:
            log.info("epoch %d: resuming after step %d of the epoch", epoch + 1, plan.start_step)
            if not plan.exact:
                log.warning("epoch %d: %s", epoch + 1, plan.note)
        log.debug("epoch %d plan: %s", epoch + 1, json.dumps(describe(plan)))
        t0, loss_sum, steps, utterances, frames, skipped_steps = time.time(), 0.0, 0, 0.0, 0, 0
        wait_total, rate = 0.0, 0.0
        bar = self.proc.progress_bar(plan.start_step + plan.steps, plan.start_step, f"epoch {epoch + 1}/{cfg.epochs}")
        group = self.group
        batches = iter(reader)
        try:
            batch, step = self._to_device(next(batches, None)), int(progress.step)
            wait_now = reader.wait_s
            while batch is not None:
                # The last micro-batch of a group of --accumulation_steps (groups count from the epoch's start, and the
                # epoch's last micro-batch closes a short group) makes the optimizer step; the others only add up.
                closes_group = (data.epoch_step + 1) % group == 0 or data.last_step
                if closes_group:
                    rate = learning_rate(cfg.optim, self.lr_world, step, self.history.plateau_factor)
                    flags = STEP_INPUT.pack(stop=self.stop.requested, wait=wait_now, learning_rate=rate)
                    out = self.train_step(*batch, flags)
                    wait_now = 0.0
                else:
                    self.accumulate_step(*batch)
                # The next batch is fetched and sent to the device while this step runs; then one read of its results.
                wait_before = reader.wait_s
                batch = self._to_device(next(batches, None))
                wait_now += reader.wait_s - wait_before
                if self.samples.enabled:  # (not on the hot path otherwise)
                    self.samples.add(epoch, data.step_samples())
                data.step_done()
                if bar is not None:
                    bar.update(1)
                if not closes_group:
                    continue
                figures = STEP.read(out)
                loss, wait = figures["loss"], figures["wait"]
                progress.step.assign_add(1)
                step, steps = step + 1, steps + 1
                utterances += figures["utterances"]
                frames += int(figures["frames"])
                wait_total += wait
                if figures["skipped"]:
                    skipped_steps += 1
                    self._nonfinite(data.step_samples(back=1), loss)
                else:
                    progress.nonfinite.assign(0)
                    loss_sum += loss
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.3f}")
                if self.summaries is not None and (step - 1) % cfg.summary_steps == 0:
                    self._step_summaries(step - 1, loss, wait)
                if figures["stop"]:
                    self._save_and_stop(epoch, "Stop requested")
                if self.saver is not None and self.saver.due(cfg.checkpoint, step):
                    path = self.save("periodic")
                    log.info("saved %s at step %d (epoch %d, step %d of it)", path, step, epoch + 1, data.epoch_step)
                self.fault.step_end(step)
        finally:
            batches.close()
        if bar is not None:
            bar.close()
        seconds = time.time() - t0
        # Horovod: the slowest rank's loader wait, for the log.
        wait_max = float(world.allreduce([reader.wait_s], op="max")[0])
        progress.epoch.assign(epoch + 1)
        data.end_epoch()
        figures = {
            "number": epoch + 1,
            "epochs": cfg.epochs,
            "loss": loss_sum / (steps - skipped_steps) if steps > skipped_steps else math.nan,
            "steps": steps,
            "micro_batches": plan.steps,
            "resumed_at_step": plan.start_step,
            "exact": plan.exact,
            "seconds": round(seconds, 3),
            "utterances_per_s": utterances / max(seconds, 1e-9),
            "frames_per_s": frames / max(seconds, 1e-9),
            "padding": plan.padding_fraction,
            "loader_wait_max_s": wait_max,
            "learning_rate": rate,
            "nonfinite_steps": skipped_steps,
        }
        return self._end_epoch(figures)

    def _nonfinite(self, samples: list[int], loss: float) -> None:
        self.progress.nonfinite.assign_add(1)
        log.warning(
            "step %d skipped on all ranks: non-finite loss or gradient (loss %s); this rank's samples %s",
            int(self.progress.step),
            loss,
            samples,
        )
        # Horovod: every rank skips this step (the skip is agreed by the step's allreduce), so every rank gathers here:
        # the record names each rank's samples, not only rank 0's.
        rank_samples = self.world.allgather_object(list(samples))
        self.write(
            "nonfinite",
            loss=loss,
            consecutive=int(self.progress.nonfinite),
            samples=samples,
            rank_samples=rank_samples,
        )
        limit = self.cfg.max_nonfinite_steps
        if limit and int(self.progress.nonfinite) >= limit:
            self._save_and_stop(
                int(self.progress.epoch), f"{limit} non-finite steps in a row (--max_nonfinite_steps)", exit_code=1
            )

    def _end_epoch(self, figures: dict) -> bool:
        cfg, progress = self.cfg, self.progress
        is_best, keep_going = False, True
        if self.dev is not None:
            with self._averaged():
                dev = self.evaluate_dev()
            self.history.add(dev["loss"])
            is_best = dev["loss"] < float(progress.best_dev_loss)
            if is_best:
                progress.best_dev_loss.assign(dev["loss"])
            figures.update(dev_loss=dev["loss"], dev_wer=dev["wer"], dev_cer=dev["cer"], best=is_best)
            if self.history.update_plateau(cfg.optim):
                figures["plateau"] = cfg.optim.plateau_reduction
            if self.history.should_stop(cfg.optim):
                figures["early_stop"] = (
                    f"no dev improvement of {cfg.optim.es_min_delta} in {cfg.optim.es_epochs} epochs"
                )
                keep_going = False
            progress.history.assign(json.dumps(self.history.to_dict()))
        if self.metrics:
            with self._averaged():
                figures["metrics_loss"] = self.evaluate_metrics()
        record = self.write("epoch", **figures)
        log.info(format_epoch(record))
        if self.summaries is not None:
            with self.summaries.as_default(step=int(progress.step)):
                for key, tag in EPOCH_SCALARS.items():
                    if key in record:
                        tf.summary.scalar(tag, record[key])
            self.summaries.flush()
        self.save("epoch", best=is_best or self.dev is None)
        self._agree_on_stop(int(progress.epoch) - 1)
        return keep_going

    def _averaged(self) -> contextlib.AbstractContextManager:
        """Dev and --metrics_files evaluation see the weights' average when there is one."""
        return self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()

    def evaluate_dev(self) -> dict:
        post = posteriors(self.dev, self.logits, self.alphabet)
        loss, n = global_loss(post, self.world)
        # Horovod: corpus WER/CER from every rank's edit counts.
        we, w, ce, c = self.world.allreduce(greedy_error_counts(post, self.alphabet))
        figures = {"loss": loss, "samples": n, "wer": we / max(w, 1.0), "cer": ce / max(c, 1.0)}
        self.write("eval", split="dev", decoder="greedy", weights=self.evaluated_weights, **figures)
        return figures

    def evaluate_metrics(self) -> dict[str, float]:
        """--metrics_files: each store's loss (and greedy WER/CER in its eval record), apart from the dev set's."""
        losses = {}
        for i, (url, data) in enumerate(self.metrics.items()):
            post = posteriors(data, self.logits, self.alphabet)
            loss, n = global_loss(post, self.world)
            we, w, ce, c = self.world.allreduce(greedy_error_counts(post, self.alphabet))  # Horovod: corpus figures
            self.write(
                "eval",
                split="metrics",
                store=url,
                decoder="greedy",
                loss=loss,
                samples=n,
                wer=we / max(w, 1.0),
                cer=ce / max(c, 1.0),
                weights=self.evaluated_weights,
            )
            if self.summaries is not None:
                with self.summaries.as_default(step=int(self.progress.step)):
                    tf.summary.scalar(f"loss/metrics_{i}", loss)
            losses[url] = loss
        return losses

    def _step_summaries(self, step: int, loss: float, wait: float) -> None:
        with self.summaries.as_default(step=step):
            tf.summary.scalar("loss/train_step", loss)
            tf.summary.scalar("learning_rate", float(self.optimizer.learning_rate.numpy()))
            tf.summary.scalar("loader/wait_s", wait)
            if self.amp:
                tf.summary.scalar("loss_scale", float(self.optimizer.loss_scale))

    def _agree_on_stop(self, epoch: int) -> None:
        """At phase boundaries (after dev evaluation, before test and export): a stop request on any rank stops all."""
        # Horovod: any rank's request counts.
        if self.world.allreduce([1.0 if self.stop.requested else 0.0])[0] > 0:
            self._save_and_stop(epoch, "Stop requested")

    def _save_and_stop(self, epoch: int, why: str, exit_code: int = EXIT_PREEMPTED) -> None:
        self.samples.flush()  # the checkpoint holds these steps: they are done
        path = self.save("stop")
        # Horovod: nobody exits before rank 0's checkpoint is complete (launchers kill the others on the first exit);
        # the gather is that barrier, and tells rank 0's record which ranks were asked to stop, by which signal, and
        # every rank's weights (the same everywhere, as at the end of a run).
        gathered = self.world.allgather_object((self.stop.signal_name, weights_digest(self.model)))
        signals = [s for s, _ in gathered]
        saved = (
            (f"checkpoint {path}" if path else "no checkpoint (no --checkpoint_dir)")
            if self.world.is_root
            else "rank 0's checkpoint"
        )
        self.write(
            "stop",
            reason=why,
            signal=next((s for s in signals if s), ""),
            exit_code=exit_code,
            checkpoint=path,
            requested_by=[r for r, s in enumerate(signals) if s],
            weights_sha256=[d for _, d in gathered],
        )
        log.warning(
            "%s (%s): %s saved at epoch %d, step %d; exiting with %d%s at %.3f",
            why,
            self.stop.signal_name or "on another rank",
            saved,
            epoch + 1,
            int(self.progress.step),
            exit_code,
            " to be resumed" if exit_code == EXIT_PREEMPTED else "",
            time.time(),
        )
        e = Preempted()
        e.exit_code = exit_code
        raise e

    def fit(self) -> None:
        start = int(self.progress.epoch)
        if start >= self.cfg.epochs:
            log.info("Training already complete: %d of %d epochs done", start, self.cfg.epochs)
        try:
            for epoch in range(start, self.cfg.epochs):
                keep_going = self.run_epoch(epoch)
                self.fault.epoch_end()
                if not keep_going:
                    break
        finally:
            self.data.close()

    def reset_accumulation(self) -> None:
        """Drops what the micro-batches of an unfinished optimizer step added up (their step is rolled back)."""
        for acc in self.accumulated:
            acc.assign(tf.zeros_like(acc))
        if self.accumulated:
            self.acc_stats.assign(tf.zeros_like(self.acc_stats))

    # --- after training
    def use_evaluation_weights(self) -> None:
        """Collective, after training: the weights testing and exporting use (--load_evaluate): the best-dev
        checkpoint (best; auto when there is one), else the final weights (last: what the latest checkpoint holds);
        of either, the moving average when there is one."""
        if not (self.cfg.test.test_files or self.cfg.export_dir):
            return
        which, path, error, weights = self.cfg.evaluate.load_evaluate, "", "", self.evaluated_weights
        if self.world.is_root and self.checkpoints is not None and which != "last":
            path = self.checkpoints.best.latest_checkpoint or ""
            if path:
                weights = restore_evaluation_weights(self.model, path)  # the counters stay as they are
            elif which == "best":
                error = (
                    f"{self.cfg.checkpoint.save_dir}: no best-dev checkpoint to test and export (--load_evaluate best)"
                )
        # Horovod: every rank evaluates rank 0's choice.
        path, error, weights = self.world.broadcast_object((path, error, weights))
        if error:
            raise FileNotFoundError(error)
        if path:
            self.world.broadcast_variables(self.model.variables)
            self.weights_from = path
        elif self.ema is not None:
            self.ema.copy_to_model()  # the raw weights are done training
        self.evaluated_weights = weights

    def test(self) -> dict | None:
        data = self._eval_input(
            self.cfg.test.test_files,
            self.cfg.test.test_batch_size,
            self.cfg.loader.limit_test,
            self.cfg.test.reverse_test,
        )
        if data is None:
            return None
        post = posteriors(data, self.logits, self.alphabet)
        summary = report_test_set(post, self.alphabet, self.cfg.test, self.cfg.decoder, self.world)
        self._agree_on_stop(int(self.progress.epoch) - 1)
        if summary is None:
            return None
        figures = {k: summary[k] for k in ("wer", "cer", "loss", "samples")}
        if "oov" in summary:  # the reference words the scorer cannot output, apart from the acoustic model's errors
            figures.update(oov_rate=summary["oov"]["oov_rate"], distinct_oov_rate=summary["oov"]["distinct_oov_rate"])
        self.write("eval", split="test", decoder="beam", weights=self.evaluated_weights, **figures)
        return figures

    def export(self) -> None:
        if not self.world.is_root or not self.cfg.export_dir:
            return
        source = self.weights_from
        info = {"epochs": int(self.progress.epoch), "weights_from": source, "weights": self.evaluated_weights}
        export_model(
            self.cfg.export_dir,
            self.model,
            self.alphabet,
            self.features,
            info,
            options=self.cfg.export,
            scorer_path=self.cfg.decoder.scorer_path,
            config=to_dict(self.cfg),
        )
        log.info("Exported %s to %s", source, self.cfg.export_dir)


def train(cfg: TrainConfig) -> dict:
    """Train on every rank; returns this rank's summary. Raises :class:`Preempted` after a stop request."""
    save = cfg.checkpoint.save_dir
    check_not_averaged(cfg.checkpoint)
    proc = runtime.start(cfg.process, RunDir(save) if save else None)
    trainer = Trainer(cfg, proc)
    loaded = trainer.restore_and_broadcast()
    try:
        trainer.fault.run(trainer, loaded)
    except tf.errors.ResourceExhaustedError as e:
        batch = (
            f"--batch_frames {cfg.loader.batch_frames}"
            if cfg.loader.batch_frames
            else f"--train_batch_size {cfg.train_batch_size}"
        )
        raise MemoryError(
            f"out of memory at {batch} (n_hidden {cfg.model.n_hidden}): "
            f"try a smaller batch, --precision fp16/bf16, or fewer --length_buckets' long samples "
            f"(--max_duration at preprocessing). {str(e).splitlines()[0]}"
        ) from None
    digest = weights_digest(trainer.model)
    print(f"rank {proc.world.rank}/{proc.world.size}: final weights sha256 {digest}", flush=True)
    averaged = {}
    if trainer.ema is not None:
        # Horovod: every rank's digest of the average too (computed alike everywhere, so the same everywhere).
        averaged["ema_weights_sha256"] = proc.world.allgather_object(weights_digest(trainer.ema.average))
    trainer.use_evaluation_weights()
    results = {"epochs_done": int(trainer.progress.epoch), "weights_sha256": digest, "test": trainer.test()}
    # Horovod: every rank's digest, in the record (they must all be the same).
    digests = proc.world.allgather_object(digest)
    trainer.write(
        "final",
        epochs_done=results["epochs_done"],
        weights_sha256=digests,
        test=results["test"],
        evaluated=trainer.weights_from,
        weights=trainer.evaluated_weights,
        **averaged,
    )
    trainer.export()
    proc.world.join()  # Horovod: nobody leaves while rank 0 still exports
    return results


def run(cfg: TrainConfig) -> int:
    """``dstrain train``: exit status 75 after a stop request (checkpoint saved, resumable)."""
    try:
        train(cfg)
    except Preempted as e:
        # Every rank is past the barrier (the checkpoint is complete): leave at once. Launchers kill the other ranks
        # when the first one exits, and TensorFlow's and Horovod's teardown takes long enough to lose that race.
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.exit_code)
    return 0
