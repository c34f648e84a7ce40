"""Distributed training with Horovod: one process per GPU (or CPU slot), synchronous data parallelism.

Collectives go through :class:`dstrain.distributed.World` and are marked ``# Horovod:``; model, data and decoder
code know nothing of ranks beyond the numbers they are handed.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from dstrain.alphabet import Alphabet
from dstrain.config import option, parse_list, to_dict
from dstrain.decoder.config import DecoderConfig
from dstrain.distributed import World, start_horovod
from dstrain.evaluate import EvalSet, EvaluationSetConfig, global_loss, open_stores, report_test_set
from dstrain.export import export_model
from dstrain.features import FeatureConfig
from dstrain.loader.pipeline import ShardRef, epoch_plan, make_dataset, shard_refs
from dstrain.model import DeepSpeech, ModelConfig, ctc_loss
from dstrain.preemption import EXIT_PREEMPTED, StopRequest
from dstrain.store import FeatureStore, StoreError
from dstrain.train.checkpoint import Checkpoints, Progress
from dstrain.train.rundir import RunDir

log = logging.getLogger("dstrain.train")


@dataclass(frozen=True)
class TrainConfig:
    """dstrain train: train on feature stores (launch with horovodrun/mpirun/srun for several processes)"""

    train_files: tuple[str, ...] = option(parse=parse_list)
    """Feature store(s) to train on, comma-separated."""
    alphabet_config_path: str = option()
    """alphabet.txt the stores were preprocessed with."""
    dev_files: tuple[str, ...] = option((), parse=parse_list)
    """Dev feature store(s), comma-separated: dev loss each epoch, best checkpoint."""
    epochs: int = 75
    """Total epochs; a resumed run continues until this many are done."""
    learning_rate: float = 0.001
    """Adam learning rate for one worker; multiplied by the number of workers unless --noscale_lr."""
    scale_lr: bool = True
    """Multiply the learning rate by the number of workers."""
    train_batch_size: int = 1
    """Utterances per step on each worker."""
    dev_batch_size: int = 8
    """Utterances per dev evaluation step on each worker."""
    checkpoint_dir: str = ""
    """Run directory: rank 0 saves checkpoints and the resolved config here, and every rank resumes from it; empty
    disables checkpoints."""
    max_to_keep: int = 5
    """Latest checkpoints kept."""
    export_dir: str = ""
    """Export the trained model here at the end (rank 0 writes)."""
    summary_dir: str = ""
    """TensorBoard summaries; empty: CHECKPOINT_DIR/summaries."""
    automatic_mixed_precision: bool = False
    """float16 compute with dynamic loss scaling (GPUs)."""
    random_seed: int = 4568
    """Seed of weight initialisation, dropout and sample order."""
    shuffle: bool = True
    """Shuffle training samples each epoch."""
    inter_op_parallelism_threads: int = 0
    """TensorFlow inter-op threads; 0 means TensorFlow's choice."""
    intra_op_parallelism_threads: int = 0
    """TensorFlow intra-op threads; 0 means TensorFlow's choice."""
    test: EvaluationSetConfig = field(default_factory=EvaluationSetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ValueError("train_files: give at least one feature store (--train_files)")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("train_batch_size", "dev_batch_size", "max_to_keep"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class Preempted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint."""

    exit_code = EXIT_PREEMPTED


@dataclass
class _DataSet:
    name: str
    stores: list[FeatureStore]
    refs: list[ShardRef]


def _load_stores(urls: tuple[str, ...], alphabet: Alphabet, name: str) -> tuple[_DataSet, FeatureConfig | None]:
    stores = open_stores(urls, alphabet)
    features = None
    for store in stores:
        if features is not None and store.features != features:
            raise StoreError(f"{store.url}: feature parameters differ from the other {name} stores; preprocess them alike")
        features = store.features
    return _DataSet(name, stores, shard_refs(stores)), features


def weights_digest(model: tf.keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def setup_logging(rank: int, run: RunDir | None) -> None:
    root = logging.getLogger("dstrain")
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False  # TensorFlow's absl handler on the root logger would print every line twice
    fmt = logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    root.addHandler(console)
    if rank == 0 and run is not None:
        os.makedirs(run.path, exist_ok=True)
        fh = logging.FileHandler(run.log_path)
        fh.setFormatter(fmt)
        root.addHandler(fh)


def configure_tensorflow(cfg: TrainConfig) -> int:
    """Thread pools and GPU memory, before TensorFlow starts its runtime; returns the visible GPUs."""
    gpus = tf.config.list_physical_devices("GPU")
    for g in tf.config.get_visible_devices("GPU"):
        tf.config.experimental.set_memory_growth(g, True)
    if cfg.inter_op_parallelism_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_parallelism_threads)
    if cfg.intra_op_parallelism_threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.intra_op_parallelism_threads)
    return len(gpus)


class Trainer:
    """One rank's view of a training run: data, model, optimizer, checkpoints, and the steps over them."""

    def __init__(self, cfg: TrainConfig, world: World, n_gpus: int):
        self.cfg, self.world = cfg, world
        log.info("Horovod: %d process(es), %s controller, %s", world.size, world.controller(),
                 f"{n_gpus} GPU(s) visible" if n_gpus else "CPU only")  # fmt: skip
        if cfg.automatic_mixed_precision:
            tf.keras.mixed_precision.set_global_policy("mixed_float16")
        tf.random.set_seed(cfg.random_seed + world.rank)  # dropout differs per rank; weights come from rank 0

        self.alphabet = Alphabet.from_file(cfg.alphabet_config_path)
        self.train_set, features = _load_stores(cfg.train_files, self.alphabet, "train")
        self.dev_set, dev_features = _load_stores(cfg.dev_files, self.alphabet, "dev")
        self.test_set, test_features = _load_stores(cfg.test.test_files, self.alphabet, "test")
        for name, fc in (("dev", dev_features), ("test", test_features)):
            if fc is not None and fc != features:
                raise StoreError(f"--{name}_files were preprocessed with other feature parameters than --train_files")
        assert features is not None
        self.features = features

        self.model = DeepSpeech(cfg.model, features.n_mfcc, len(self.alphabet) + 1).build_for()
        lr = cfg.learning_rate * (world.size if cfg.scale_lr else 1)  # Horovod: scale the step with the global batch
        self.optimizer = tf.keras.optimizers.Adam(learning_rate=lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
        if cfg.automatic_mixed_precision:
            self.optimizer = tf.keras.mixed_precision.LossScaleOptimizer(self.optimizer)
        self.optimizer.build(self.model.trainable_variables)
        self.progress = Progress.new()
        self.run = RunDir(cfg.checkpoint_dir) if cfg.checkpoint_dir else None
        self.checkpoints = None
        if world.is_root and self.run is not None:
            self.checkpoints = Checkpoints(self.run, self.model, self.optimizer, self.progress, cfg.max_to_keep)
        self.summaries = None
        summary_dir = cfg.summary_dir or (self.run.summaries_dir if self.run else "")
        if world.is_root and summary_dir:
            self.summaries = tf.summary.create_file_writer(summary_dir)
        self.stop_request = StopRequest()

        spec = (
            tf.TensorSpec([None, None, features.n_mfcc], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None], tf.int32),
        )
        self.train_step = tf.function(self._train_step, input_signature=spec + (tf.TensorSpec([], tf.float32),))
        self.logits = tf.function(lambda x, n: self.model((x, n), training=False), input_signature=spec[:2])
        self.dev_data = EvalSet(self.dev_set.stores, features, cfg.dev_batch_size, world) if self.dev_set.refs else None

    # --- state
    def restore_and_broadcast(self) -> None:
        if self.checkpoints is not None and self.run is not None:
            resumed = self.checkpoints.restore_latest()
            p = self.progress
            if resumed:
                log.info("Resuming from checkpoint %s (epoch %d done, step %d)", resumed, int(p.epoch), int(p.step))
            else:
                log.info("No checkpoint in %s: starting from random weights", self.run.path)
            self.run.write_config(to_dict(self.cfg), self.features, self.alphabet, self.world.size)
        # Horovod: every rank starts from rank 0's weights, optimizer state and counters.
        self.world.broadcast_variables(self.model.variables + self.optimizer.variables + self.progress.variables())

    # --- steps (traced once by tf.function)
    def _train_step(self, x, x_len, y, y_len, stop):
        model, optimizer, amp = self.model, self.optimizer, self.cfg.automatic_mixed_precision
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ctc_loss(model((x, x_len), training=True), x_len, y, y_len))
            scaled = optimizer.get_scaled_loss(loss) if amp else loss
        tape = self.world.gradient_tape(tape)  # Horovod: average gradients across ranks
        grads = tape.gradient(scaled, model.trainable_variables)
        if amp:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        # Horovod: one allreduce carries the loss for the log and whether any rank was asked to stop.
        summed = self.world.allreduce_tensor(tf.stack([tf.cast(loss, tf.float32), stop]))
        return summed[0] / self.world.size, summed[1] > 0

    # --- training
    def run_epoch(self, epoch: int) -> None:
        cfg, progress, world = self.cfg, self.progress, self.world
        t0 = time.time()
        plan = epoch_plan([r.rows for r in self.train_set.refs], world.rank, world.size, epoch, cfg.random_seed, cfg.shuffle, pad=True)
        if plan.repeats:
            log.info("epoch %d: rank %d repeats %d sample(s) to stay in step with the other ranks", epoch, world.rank, plan.repeats)
        data = make_dataset(self.train_set.refs, plan, self.features, cfg.train_batch_size, world.size)
        skip = int(progress.epoch_step)
        if skip:  # resuming a preempted epoch: the plan is the same, so skip what was done
            log.info("epoch %d: resuming after step %d of the epoch", epoch + 1, skip)
            data = data.skip(skip)
        losses = []
        for batch in data:
            loss, stop = self.train_step(*batch, tf.constant(1.0 if self.stop_request.requested else 0.0))
            losses.append(float(loss))
            progress.step.assign_add(1)
            progress.epoch_step.assign_add(1)
            if bool(stop):
                self._save_and_stop(epoch)
        progress.epoch.assign(epoch + 1)
        progress.epoch_step.assign(0)
        train_loss = float(np.mean(losses)) if losses else math.nan
        message = f"epoch {epoch + 1}/{cfg.epochs} train loss {train_loss:.4f} ({len(losses)} steps, {time.time() - t0:.1f} s)"
        if skip:
            message += f" after resuming at step {skip}"
        dev_loss, is_best = None, False
        if self.dev_data is not None:
            dev_loss, _ = global_loss(self.dev_data.posteriors(self.logits, self.alphabet), world)
            is_best = dev_loss < float(progress.best_dev_loss)
            if is_best:
                progress.best_dev_loss.assign(dev_loss)
            message += f", dev loss {dev_loss:.4f}" + (" (best)" if is_best else "")
        log.info(message)
        if self.summaries is not None:
            with self.summaries.as_default(step=int(progress.step)):
                tf.summary.scalar("loss/train", train_loss)
                if dev_loss is not None:
                    tf.summary.scalar("loss/dev", dev_loss)
        if self.checkpoints is not None:
            self.checkpoints.save(int(progress.step), best=is_best or self.dev_data is None)

    def _save_and_stop(self, epoch: int) -> None:
        if self.checkpoints is not None:
            path = self.checkpoints.save(int(self.progress.step), best=False)
            log.warning(
                "Stop requested (%s): saved %s at epoch %d, step %d of the epoch; exiting with %d to be resumed",
                self.stop_request.signal_name or "on another rank", path, epoch + 1, int(self.progress.epoch_step), EXIT_PREEMPTED,
            )  # fmt: skip
        raise Preempted()

    def fit(self) -> None:
        start = int(self.progress.epoch)
        if start >= self.cfg.epochs:
            log.info("Training already complete: %d of %d epochs done", start, self.cfg.epochs)
        try:
            for epoch in range(start, self.cfg.epochs):
                self.run_epoch(epoch)
        finally:
            self.stop_request.restore()

    # --- after training
    def test(self) -> dict | None:
        if not self.test_set.refs:
            return None
        test_data = EvalSet(self.test_set.stores, self.features, self.cfg.test.test_batch_size, self.world)
        post = test_data.posteriors(self.logits, self.alphabet)
        summary = report_test_set(post, self.alphabet, self.cfg.test, self.cfg.decoder, self.world)
        return None if summary is None else {k: summary[k] for k in ("wer", "cer", "loss", "samples")}

    def export(self) -> None:
        if not self.world.is_root or not self.cfg.export_dir:
            return
        source = "final weights"
        if self.checkpoints is not None and self.dev_set.refs and self.checkpoints.best.latest_checkpoint:
            source = self.checkpoints.restore_best() or source
        info = {"epochs": int(self.progress.epoch), "weights_from": source}
        export_model(self.cfg.export_dir, self.model, self.alphabet, self.features, info)
        log.info("Exported %s to %s", source, self.cfg.export_dir)


def train(cfg: TrainConfig) -> dict:
    """Train on every rank; returns this rank's summary. Raises :class:`Preempted` after a stop request."""
    world = start_horovod()  # Horovod: one process per device, pinned to its GPU
    n_gpus = configure_tensorflow(cfg)
    setup_logging(world.rank, RunDir(cfg.checkpoint_dir) if cfg.checkpoint_dir else None)
    trainer = Trainer(cfg, world, n_gpus)
    trainer.restore_and_broadcast()
    trainer.fit()
    digest = weights_digest(trainer.model)
    print(f"rank {world.rank}/{world.size}: final weights sha256 {digest}", flush=True)
    results = {"epochs_done": int(trainer.progress.epoch), "weights_sha256": digest, "test": trainer.test()}
    trainer.export()
    world.join()  # Horovod: nobody leaves while rank 0 still exports
    return results


def run(cfg: TrainConfig) -> int:
    """``dstrain train``: exit status 75 after a stop request (checkpoint saved, resumable)."""
    try:
        train(cfg)
    except Preempted as e:
        return e.exit_code
    return 0
