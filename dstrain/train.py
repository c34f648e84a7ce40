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

from dstrain.alphabet import Alphabet, greedy_decode
from dstrain.checkpoint import Checkpoints, Progress
from dstrain.data import ShardRef, epoch_plan, make_dataset, shard_refs
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


def train(cfg: TrainConfig) -> dict:
    import horovod.tensorflow as hvd

    hvd.init()  # Horovod: one process per device
    rank, world = hvd.rank(), hvd.size()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:  # Horovod: pin one GPU per process, by local rank
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
        tf.config.set_visible_devices(gpus[hvd.local_rank() % len(gpus)], "GPU")
    if cfg.inter_op_parallelism_threads:
        tf.config.threading.set_inter_op_parallelism_threads(cfg.inter_op_parallelism_threads)
    if cfg.intra_op_parallelism_threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.intra_op_parallelism_threads)
    setup_logging(rank, cfg.checkpoint_dir)
    log.info(
        "Horovod: %d process(es), %s controller, %s",
        world,
        "gloo" if hvd.gloo_enabled() else "mpi",
        f"{len(gpus)} GPU(s) visible" if gpus else "CPU only",
    )
    if cfg.automatic_mixed_precision:
        tf.keras.mixed_precision.set_global_policy("mixed_float16")
    tf.random.set_seed(cfg.random_seed + rank)  # dropout differs per rank; weights come from rank 0

    alphabet = Alphabet.from_file(cfg.alphabet_config_path)
    train_set, features = _load_stores(cfg.train_files, alphabet, "train")
    dev_set, dev_features = _load_stores(cfg.dev_files, alphabet, "dev")
    test_set, test_features = _load_stores(cfg.test_files, alphabet, "test")
    for name, fc in (("dev", dev_features), ("test", test_features)):
        if fc is not None and fc != features:
            raise StoreError(f"--{name}_files were preprocessed with other feature parameters than --train_files")
    assert features is not None

    model = DeepSpeech(cfg.model, features.n_mfcc, len(alphabet) + 1)
    model((tf.zeros([1, 1, features.n_mfcc]), tf.ones([1], tf.int32)))
    lr = cfg.learning_rate * (world if cfg.scale_lr else 1)  # Horovod: scale the step with the global batch
    optimizer = tf.keras.optimizers.Adam(learning_rate=lr, beta_1=0.9, beta_2=0.999, epsilon=1e-8)
    if cfg.automatic_mixed_precision:
        optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer)
    optimizer.build(model.trainable_variables)
    progress = Progress.new()

    checkpoints = None
    if rank == 0 and cfg.checkpoint_dir:
        checkpoints = Checkpoints(cfg.checkpoint_dir, model, optimizer, progress, cfg.max_to_keep)
        resumed = checkpoints.restore_latest()
        if resumed:
            log.info("Resuming from checkpoint %s (epoch %d done, step %d)", resumed, int(progress.epoch), int(progress.step))
        else:
            log.info("No checkpoint in %s: starting from random weights", cfg.checkpoint_dir)
        checkpoints.write_config({"train": cfg.to_dict(), "features": features.to_dict(), "world_size": world})
    # Horovod: every rank starts from rank 0's weights, optimizer state and counters.
    hvd.broadcast_variables(model.variables + optimizer.variables + progress.variables(), root_rank=0)

    summaries = None
    if rank == 0 and (cfg.summary_dir or cfg.checkpoint_dir):
        summaries = tf.summary.create_file_writer(cfg.summary_dir or os.path.join(cfg.checkpoint_dir, "summaries"))

    spec = (
        tf.TensorSpec([None, None, features.n_mfcc], tf.float32),
        tf.TensorSpec([None], tf.int32),
        tf.TensorSpec([None, None], tf.int32),
        tf.TensorSpec([None], tf.int32),
    )

    @tf.function(input_signature=spec + (tf.TensorSpec([], tf.float32),))
    def train_step(x, x_len, y, y_len, stop):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(ctc_loss(model((x, x_len), training=True), x_len, y, y_len))
            scaled = optimizer.get_scaled_loss(loss) if cfg.automatic_mixed_precision else loss
        tape = hvd.DistributedGradientTape(tape)  # Horovod: average gradients across ranks
        grads = tape.gradient(scaled, model.trainable_variables)
        if cfg.automatic_mixed_precision:
            grads = optimizer.get_unscaled_gradients(grads)
        optimizer.apply_gradients(zip(grads, model.trainable_variables))
        # Horovod: one allreduce carries the loss for the log and whether any rank was asked to stop.
        summed = hvd.allreduce(tf.stack([tf.cast(loss, tf.float32), stop]), op=hvd.Sum)
        return summed[0] / world, summed[1] > 0

    @tf.function(input_signature=spec)
    def eval_step(x, x_len, y, y_len):
        logits = model((x, x_len), training=False)
        return ctc_loss(logits, x_len, y, y_len), tf.argmax(logits, axis=-1, output_type=tf.int32)

    def eval_dataset(ds_: _DataSet, batch_size: int) -> tf.data.Dataset:
        # Same plan every epoch (no shuffling), so build the pipeline once.
        plan = epoch_plan([r.rows for r in ds_.refs], rank, world, 0, cfg.random_seed, shuffle=False, pad=False)
        return make_dataset(ds_.refs, plan, features, batch_size, world)

    def evaluate(dataset: tf.data.Dataset, decode: bool) -> dict:
        total, count, pairs = 0.0, 0, []
        for x, x_len, y, y_len in dataset:
            losses, best = eval_step(x, x_len, y, y_len)
            total += float(tf.reduce_sum(losses))
            count += int(losses.shape[0])
            if decode:
                for b in range(best.shape[0]):
                    ref = alphabet.decode(y[b, : y_len[b]].numpy())
                    pairs.append((ref, greedy_decode(best[b, : x_len[b]].numpy(), alphabet)))
        # Horovod: ranks hold different numbers of samples here; sum, then divide.
        sums = hvd.allreduce(tf.constant([total, float(count)], tf.float64), op=hvd.Sum).numpy()
        result = {"loss": sums[0] / max(sums[1], 1.0), "samples": int(sums[1])}
        if decode:
            gathered = hvd.allgather_object(pairs)  # Horovod: every rank's transcripts, for corpus-level WER
            all_pairs = [p for part in gathered for p in part]
            result["wer"], result["cer"] = error_rates(all_pairs)
            result["pairs"] = all_pairs
        return result

    dev_data = eval_dataset(dev_set, cfg.dev_batch_size) if dev_set.refs else None

    def _train_epoch(epoch: int) -> None:
        t0 = time.time()
        plan = epoch_plan([r.rows for r in train_set.refs], rank, world, epoch, cfg.random_seed, cfg.shuffle, pad=True)
        if plan.repeats:
            log.info("epoch %d: rank %d repeats %d sample(s) to stay in step with the other ranks", epoch, rank, plan.repeats)
        data = make_dataset(train_set.refs, plan, features, cfg.train_batch_size, world)
        skip = int(progress.epoch_step)
        if skip:  # resuming a preempted epoch: the plan is the same, so skip what was done
            log.info("epoch %d: resuming after step %d of the epoch", epoch + 1, skip)
            data = data.skip(skip)
        losses = []
        for batch in data:
            loss, stop = train_step(*batch, tf.constant(1.0 if stop_request.requested else 0.0))
            losses.append(float(loss))
            progress.step.assign_add(1)
            progress.epoch_step.assign_add(1)
            if bool(stop):
                if checkpoints is not None:
                    path = checkpoints.save(int(progress.step), best=False)
                    log.warning(
                        "Stop requested (%s): saved %s at epoch %d, step %d of the epoch; exiting with %d to be resumed",
                        stop_request.signal_name or "on another rank", path, epoch + 1, int(progress.epoch_step), EXIT_PREEMPTED,
                    )
                raise Preempted()
        progress.epoch.assign(epoch + 1)
        progress.epoch_step.assign(0)
        train_loss = float(np.mean(losses)) if losses else math.nan
        message = f"epoch {epoch + 1}/{cfg.epochs} train loss {train_loss:.4f} ({len(losses)} steps, {time.time() - t0:.1f} s)"
        if skip:
            message += f" after resuming at step {skip}"
        is_best = False
        dev_loss = None
        if dev_data is not None:
            dev_loss = evaluate(dev_data, decode=False)["loss"]
            is_best = dev_loss < float(progress.best_dev_loss)
            if is_best:
                progress.best_dev_loss.assign(dev_loss)
            message += f", dev loss {dev_loss:.4f}" + (" (best)" if is_best else "")
        log.info(message)
        if summaries is not None:
            with summaries.as_default(step=int(progress.step)):
                tf.summary.scalar("loss/train", train_loss)
                if dev_loss is not None:
                    tf.summary.scalar("loss/dev", dev_loss)
        if checkpoints is not None:
            checkpoints.save(int(progress.step), best=is_best or dev_data is None)
    start_epoch = int(progress.epoch)
    if start_epoch >= cfg.epochs:
        log.info("Training already complete: %d of %d epochs done", start_epoch, cfg.epochs)
    stop_request = StopRequest()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            _train_epoch(epoch)
    finally:
        stop_request.restore()
    digest = weights_digest(model)
    print(f"rank {rank}/{world}: final weights sha256 {digest}", flush=True)

    results: dict = {"epochs_done": int(progress.epoch), "weights_sha256": digest}
    if test_set.refs:
        test = evaluate(eval_dataset(test_set, cfg.test_batch_size), decode=True)
        log.info("Test: WER %.4f, CER %.4f, loss %.4f (%d samples)", test["wer"], test["cer"], test["loss"], test["samples"])
        for ref, hyp in test["pairs"][: cfg.report_count]:
            log.info("  ref: %s\n  hyp: %s", ref, hyp)
        results["test"] = {k: v for k, v in test.items() if k != "pairs"}

    if rank == 0 and cfg.export_dir:
        source = "final weights"
        if checkpoints is not None and dev_set.refs and checkpoints.best.latest_checkpoint:
            source = checkpoints.restore_best() or source
        export_model(cfg.export_dir, model, alphabet, features, {"epochs": int(progress.epoch), "weights_from": source})
        log.info("Exported %s to %s", source, cfg.export_dir)
    hvd.join()  # Horovod: nobody leaves while rank 0 still exports
    return results
