"""Distributed training with Horovod: one process per GPU (or CPU slot), synchronous data parallelism.

Each Horovod call is marked ``# Horovod:``; model, data and decoder code import no Horovod.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import tensorflow as tf

from dstrain.alphabet import Alphabet
from dstrain.checkpoint import Checkpoints, Progress
from dstrain.data import ShardRef, epoch_plan, make_dataset, shard_refs
from dstrain.decoder.ctc import ctc_beam_search_decoder
from dstrain.evaluate import DecoderConfig
from dstrain.export import export_model
from dstrain.features import FeatureConfig
from dstrain.metrics import error_rates
from dstrain.model import DeepSpeech, ModelConfig, ctc_loss
from dstrain.preemption import EXIT_PREEMPTED, StopRequest
from dstrain.store import StoreError, check_compatible, read_manifest

log = logging.getLogger("dstrain.train")


@dataclass(frozen=True)
class TrainConfig:
    train_files: tuple[str, ...]
    """Feature stores to train on (--train_files, comma-separated)."""
    alphabet_config_path: str
    dev_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    epochs: int = 75
    """Total epochs; a resumed run continues until this many are done (--epochs)."""
    learning_rate: float = 0.001
    """Adam learning rate for one worker; multiplied by the number of workers unless --noscale_lr."""
    scale_lr: bool = True
    train_batch_size: int = 1
    """Utterances per step on each worker (--train_batch_size)."""
    dev_batch_size: int = 1
    test_batch_size: int = 1
    checkpoint_dir: str = ""
    """Where rank 0 saves and everyone resumes from (--checkpoint_dir); empty disables checkpoints."""
    max_to_keep: int = 5
    export_dir: str = ""
    summary_dir: str = ""
    """TensorBoard summaries (--summary_dir); defaults to CHECKPOINT_DIR/summaries."""
    automatic_mixed_precision: bool = False
    random_seed: int = 4568
    shuffle: bool = True
    report_count: int = 5
    inter_op_parallelism_threads: int = 0
    intra_op_parallelism_threads: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    """Beam search (and scorer) for the test set after training."""

    def __post_init__(self) -> None:
        if not self.train_files:
            raise ValueError("train_files: give at least one feature store (--train_files)")
        if self.epochs < 0:
            raise ValueError(f"epochs must be >= 0, got {self.epochs}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("train_batch_size", "dev_batch_size", "test_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return asdict(self)


class Preempted(Exception):
    """Training stopped on a signal after saving a resumable checkpoint."""

    exit_code = EXIT_PREEMPTED


@dataclass
class _DataSet:
    name: str
    refs: list[ShardRef]


def _load_stores(urls: tuple[str, ...], alphabet: Alphabet, name: str) -> tuple[_DataSet, FeatureConfig | None]:
    stores = []
    features = None
    for url in urls:
        m = read_manifest(url)
        check_compatible(m, alphabet, url)
        fc = m.feature_config()
        if features is not None and fc != features:
            raise StoreError(f"{url}: feature parameters differ from the other {name} stores; preprocess them alike")
        features = fc
        stores.append((url, m))
    return _DataSet(name, shard_refs(stores)), features


def weights_digest(model: tf.keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def setup_logging(rank: int, checkpoint_dir: str) -> None:
    root = logging.getLogger("dstrain")
    root.handlers.clear()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    root.propagate = False  # TensorFlow's absl handler on the root logger would print every line twice
    fmt = logging.Formatter(f"%(asctime)s rank {rank} %(levelname)s %(message)s", "%H:%M:%S")
    console = logging.StreamHandler()
    console.setFormatter(fmt)
    root.addHandler(console)
    if rank == 0 and checkpoint_dir:
        os.makedirs(checkpoint_dir, exist_ok=True)
        fh = logging.FileHandler(os.path.join(checkpoint_dir, "train.log"))
        fh.setFormatter(fmt)
        root.addHandler(fh)


def _init_horovod(cfg: TrainConfig):
    """Horovod and the devices it runs on; everything else in this module gets ``hvd`` from here."""
    import horovod.tensorflow as hvd

    hvd.init()  # Horovod: one process per device
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # Horovod: pin one GPU per process, by local rank
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    if cfg.inter_op_parallelism_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_parallelism_threads)
    if cfg.intra_op_parallelism_threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.intra_op_parallelism_threads)
    return hvd, len(gpus)


class Trainer:
    """One rank's view of a training run: data, model, optimizer, checkpoints, and the steps over them."""

    def __init__(self, cfg: TrainConfig, hvd, n_gpus: int):
        self.cfg, self.hvd = cfg, hvd
        self.rank, self.world = hvd.rank(), hvd.size()
        log.info("Horovod: %d process(es), %s controller, %s", self.world, "gloo" if hvd.gloo_enabled() else "mpi",
                 f"{n_gpus} GPU(s) visible" if n_gpus else "CPU only")  # fmt: skip
        if cfg.automatic_mixed_precision:
            tf.keras.mixed_precision.set_global_policy("mixed_float16")
        tf.random.set_seed(cfg.random_seed + self.rank)  # dropout differs per rank; weights come from rank 0

        self.alphabet = Alphabet.from_file(cfg.alphabet_config_path)
        self.train_set, features = _load_stores(cfg.train_files, self.alphabet, "train")
        self.dev_set, dev_features = _load_stores(cfg.dev_files, self.alphabet, "dev")
        self.test_set, test_features = _load_stores(cfg.test_files, self.alphabet, "test")
        for name, fc in (("dev", dev_features), ("test", test_features)):
            if fc is not None and fc != features:
                raise StoreError(f"--{name}_files were preprocessed with other feature parameters than --train_files")
        assert features is not None
        self.features = features

        self.model = DeepSpeech(cfg.model, features.n_mfcc, len(self.alphabet) + 1)
        self.model((tf.zeros([1, 1, features.n_mfcc]), tf.ones([1], tf.int32)))
        lr = cfg.learning_rate * (self.world if cfg.scale_lr else 1)  # Horovod: scale the step with the global batch
        self.optimizer = tf.keras.optimizers.Adam(learning_rate=lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
        if cfg.automatic_mixed_precision:
            self.optimizer = tf.keras.mixed_precision.LossScaleOptimizer(self.optimizer)
        self.optimizer.build(self.model.trainable_variables)
        self.progress = Progress.new()
        self.checkpoints = None
        if self.rank == 0 and cfg.checkpoint_dir:
            self.checkpoints = Checkpoints(cfg.checkpoint_dir, self.model, self.optimizer, self.progress, cfg.max_to_keep)
        self.summaries = None
        if self.rank == 0 and (cfg.summary_dir or cfg.checkpoint_dir):
            self.summaries = tf.summary.create_file_writer(cfg.summary_dir or os.path.join(cfg.checkpoint_dir, "summaries"))
        self.stop_request = StopRequest()

        spec = (
            tf.TensorSpec([None, None, features.n_mfcc], tf.float32),
            tf.TensorSpec([None], tf.int32),
            tf.TensorSpec([None, None], tf.int32),
            tf.TensorSpec([None], tf.int32),
        )
        self.train_step = tf.function(self._train_step, input_signature=spec + (tf.TensorSpec([], tf.float32),))
        self.eval_step = tf.function(self._eval_step, input_signature=spec)
        self.dev_data = self._eval_dataset(self.dev_set, cfg.dev_batch_size) if self.dev_set.refs else None

    # --- state
    def restore_and_broadcast(self) -> None:
        if self.checkpoints is not None:
            resumed = self.checkpoints.restore_latest()
            p = self.progress
            if resumed:
                log.info("Resuming from checkpoint %s (epoch %d done, step %d)", resumed, int(p.epoch), int(p.step))
            else:
                log.info("No checkpoint in %s: starting from random weights", self.cfg.checkpoint_dir)
            self.checkpoints.write_config({"train": self.cfg.to_dict(), "features": self.features.to_dict(), "world_size": self.world})
        # Horovod: every rank starts from rank 0's weights, optimizer state and counters.
        variables = self.model.variables + self.optimizer.variables + self.progress.variables()
        self.hvd.broadcast_variables(variables, root_rank=0)

    # --- steps (traced once by tf.function)
    def _train_step(self, x, x_len, y, y_len, stop):
        model, optimizer, amp = self.model, self.optimizer, self.cfg.automatic_mixed_precision
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ctc_loss(model((x, x_len), training=True), x_len, y, y_len))
            scaled = optimizer.get_scaled_loss(loss) if amp else loss
        tape = self.hvd.DistributedGradientTape(tape)  # Horovod: average gradients across ranks
        grads = tape.gradient(scaled, model.trainable_variables)
        if amp:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        # Horovod: one allreduce carries the loss for the log and whether any rank was asked to stop.
        summed = self.hvd.allreduce(tf.stack([tf.cast(loss, tf.float32), stop]), op=self.hvd.Sum)
        return summed[0] / self.world, summed[1] > 0

    def _eval_step(self, x, x_len, y, y_len):
        logits = self.model((x, x_len), training=False)
        return ctc_loss(logits, x_len, y, y_len), tf.nn.softmax(logits)

    # --- evaluation
    def _eval_dataset(self, data: _DataSet, batch_size: int) -> tf.data.Dataset:
        # Same plan every epoch (no shuffling), so the pipeline is built once.
        plan = epoch_plan([r.rows for r in data.refs], self.rank, self.world, 0, self.cfg.random_seed, shuffle=False, pad=False)
        return make_dataset(data.refs, plan, self.features, batch_size, self.world)

    def evaluate(self, dataset: tf.data.Dataset, decode: bool) -> dict:
        total, count, pairs = 0.0, 0, []
        dec = self.cfg.decoder
        scorer = dec.scorer(self.alphabet) if decode else None
        for x, x_len, y, y_len in dataset:
            losses, probs = self.eval_step(x, x_len, y, y_len)
            total += float(tf.reduce_sum(losses))
            count += int(losses.shape[0])
            if decode:
                for b in range(probs.shape[0]):
                    ref = self.alphabet.decode(y[b, : y_len[b]].numpy())
                    p = probs[b, : x_len[b]].numpy().astype(np.float64)
                    hyp = ctc_beam_search_decoder(p, self.alphabet, dec.beam_width, dec.cutoff_prob, dec.cutoff_top_n, scorer)[0][1]
                    pairs.append((ref, hyp))
        # Horovod: ranks hold different numbers of samples here; sum, then divide.
        sums = self.hvd.allreduce(tf.constant([total, float(count)], tf.float64), op=self.hvd.Sum).numpy()
        result = {"loss": sums[0] / max(sums[1], 1.0), "samples": int(sums[1])}
        if decode:
            gathered = self.hvd.allgather_object(pairs)  # Horovod: every rank's transcripts, for corpus-level WER
            result["pairs"] = [p for part in gathered for p in part]
            result["wer"], result["cer"] = error_rates(result["pairs"])
        return result

    # --- training
    def run_epoch(self, epoch: int) -> None:
        cfg, progress = self.cfg, self.progress
        t0 = time.time()
        plan = epoch_plan([r.rows for r in self.train_set.refs], self.rank, self.world, epoch, cfg.random_seed, cfg.shuffle, pad=True)
        if plan.repeats:
            log.info("epoch %d: rank %d repeats %d sample(s) to stay in step with the other ranks", epoch, self.rank, plan.repeats)
        data = make_dataset(self.train_set.refs, plan, self.features, cfg.train_batch_size, self.world)
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
            dev_loss = self.evaluate(self.dev_data, decode=False)["loss"]
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
        result = self.evaluate(self._eval_dataset(self.test_set, self.cfg.test_batch_size), decode=True)
        log.info("Test: WER %.4f, CER %.4f, loss %.4f (%d samples)", result["wer"], result["cer"], result["loss"], result["samples"])
        for ref, hyp in result["pairs"][: self.cfg.report_count]:
            log.info("  ref: %s\n  hyp: %s", ref, hyp)
        return {k: v for k, v in result.items() if k != "pairs"}

    def export(self) -> None:
        if self.rank != 0 or not self.cfg.export_dir:
            return
        source = "final weights"
        if self.checkpoints is not None and self.dev_set.refs and self.checkpoints.best.latest_checkpoint:
            source = self.checkpoints.restore_best() or source
        info = {"epochs": int(self.progress.epoch), "weights_from": source}
        export_model(self.cfg.export_dir, self.model, self.alphabet, self.features, info)
        log.info("Exported %s to %s", source, self.cfg.export_dir)


def train(cfg: TrainConfig) -> dict:
    """Train on every rank; returns this rank's summary. Raises :class:`Preempted` after a stop request."""
    hvd, n_gpus = _init_horovod(cfg)
    setup_logging(hvd.rank(), cfg.checkpoint_dir)
    trainer = Trainer(cfg, hvd, n_gpus)
    trainer.restore_and_broadcast()
    trainer.fit()
    digest = weights_digest(trainer.model)
    print(f"rank {trainer.rank}/{trainer.world}: final weights sha256 {digest}", flush=True)
    results = {"epochs_done": int(trainer.progress.epoch), "weights_sha256": digest, "test": trainer.test()}
    trainer.export()
    hvd.join()  # Horovod: nobody leaves while rank 0 still exports
    return results
