"""Distributed training with Horovod: one process per GPU (or CPU slot), synchronous data parallelism.

Collectives go through :class:`dstrain.distributed.World` and are marked ``# Horovod:``; model, data and decoder
code know nothing of ranks beyond the numbers they are handed. Every decision (skip a step, stop, reduce the learning
rate, stop early) is taken from figures all ranks share, so all ranks take it together.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field

import numpy as np
import tensorflow as tf

from dstrain import preemption
from dstrain.alphabet import Alphabet, UTF8Alphabet
from dstrain.config import option, parse_list, to_dict
from dstrain.decoder.config import DecoderConfig
from dstrain.distributed import World, cpu_threads, start_horovod
from dstrain.evaluate import EvalSet, EvaluationSetConfig, global_loss, greedy_error_counts, open_stores, report_test_set
from dstrain.export import ExportOptions, export_model
from dstrain.features import FeatureConfig
from dstrain.loader.augment import DEFAULT_AUGMENT, Augmenter, sample_rng
from dstrain.loader.config import LoaderConfig
from dstrain.loader.reader import Catalog, PlanReader
from dstrain.loader.sampler import EpochPlan, LoaderPosition, describe, plan_epoch, resume_plan
from dstrain.model import DeepSpeech, ModelConfig, ctc_loss
from dstrain.prep.stats import FeatureStats
from dstrain.preemption import EXIT_PREEMPTED, Preempted
from dstrain.store import FeatureStore, StoreError
from dstrain.train.checkpoint import CheckpointConfig, Checkpoints, Progress, check_geometry, load_weights_from, read_json
from dstrain.train.rundir import RunDir
from dstrain.train.schedule import DevHistory, OptimConfig, learning_rate

log = logging.getLogger("dstrain.train")

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
    epochs: int = 75
    """Total epochs; a resumed run continues until this many are done."""
    train_batch_size: int = 1
    """Utterances per step on each worker."""
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
    inter_op_parallelism_threads: int = 0
    """TensorFlow inter-op threads; 0 means TensorFlow's choice."""
    intra_op_parallelism_threads: int = 0
    """TensorFlow intra-op threads; 0 means TensorFlow's choice."""
    use_allow_growth: bool = False
    """Let TensorFlow take GPU memory as it needs it instead of all at once."""
    horovod_timeline: str = ""
    """Write Horovod's timeline (chrome://tracing JSON) of the collectives to this file."""
    log_level: str = option("info", choices=("debug", "info", "warning", "error"))
    """Rank 0's log level (other ranks log warnings and errors)."""
    show_progressbar: bool = True
    """A progress bar with the epoch's ETA on rank 0 (only when its output is a terminal)."""
    summary_steps: int = 20
    """Write step-level TensorBoard scalars every this many steps."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    test: EvaluationSetConfig = field(default_factory=EvaluationSetConfig)
    export: ExportOptions = field(default_factory=ExportOptions)
    model: ModelConfig = field(default_factory=ModelConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)

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

    @property
    def compute_precision(self) -> str:
        return "fp16" if self.automatic_mixed_precision else self.precision


def weights_digest(model: tf.keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


def setup_logging(rank: int, run: RunDir | None, level: str = "info") -> None:
    root = logging.getLogger("dstrain")
    root.handlers.clear()
    root.setLevel(getattr(logging, level.upper()) if rank == 0 else logging.WARNING)
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


def configure_tensorflow(cfg: TrainConfig, world: World) -> int:
    """Thread pools, GPU memory and precision, before TensorFlow starts its runtime; returns the visible GPUs."""
    gpus = tf.config.get_visible_devices("GPU")
    if cfg.use_allow_growth:
        for g in gpus:
            tf.config.experimental.set_memory_growth(g, True)
    intra, inter = cfg.intra_op_parallelism_threads, cfg.inter_op_parallelism_threads
    if not gpus and world.local_size > 1:
        # Several CPU ranks on one node: TensorFlow's choice (all cores for every rank) oversubscribes them.
        share = cpu_threads(len(os.sched_getaffinity(0)), world.local_size)
        if not intra and "TF_NUM_INTRAOP_THREADS" not in os.environ:
            intra = share[0]
        if not inter and "TF_NUM_INTEROP_THREADS" not in os.environ:
            inter = share[1]
        log.info("%d CPU ranks on this node: %s intra-op and %s inter-op thread(s) each", world.local_size,
                 intra or os.environ.get("TF_NUM_INTRAOP_THREADS"), inter or os.environ.get("TF_NUM_INTEROP_THREADS"))  # fmt: skip
    if inter:
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    if intra:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
    policy = {"fp32": "float32", "fp16": "mixed_float16", "bf16": "mixed_bfloat16"}[cfg.compute_precision]
    tf.keras.mixed_precision.set_global_policy(policy)
    if cfg.checkpoint.train_cudnn or cfg.checkpoint.load_cudnn:
        log.info("--train_cudnn/--load_cudnn are not needed: Keras uses cuDNN's LSTM on GPUs and checkpoints are portable")
    return len(gpus)


def feature_statistics(stores: list[FeatureStore], catalog: Catalog, world: World) -> FeatureStats:
    """The training stores' per-channel statistics: from their manifests, or (stores made before they were
    recorded) measured by rank 0 on up to 2000 utterances and broadcast."""
    if all(s.manifest.feature_stats for s in stores):
        return FeatureStats.merge_all(FeatureStats.from_dict(s.manifest.feature_stats) for s in stores)
    stats = None
    if world.is_root:
        from dstrain.loader.reader import read_row_group

        log.warning("the training stores hold no feature statistics (made by an older dstrain): measuring them on "
                    "a sample; re-run dstrain preprocess to record them")  # fmt: skip
        stats, n = FeatureStats.empty(catalog.n_mel), 0
        for ref in catalog.refs:
            for x in read_row_group(ref, catalog.n_mel).features:
                stats, n = stats.merge(FeatureStats.from_features(x)), n + 1
            if n >= 2000:
                break
    return world.broadcast_object(stats)


class Trainer:
    """One rank's view of a training run: data, model, optimizer, checkpoints, and the steps over them."""

    def __init__(self, cfg: TrainConfig, world: World, n_gpus: int, stop: preemption.StopRequest):
        self.cfg, self.world, self.stop, self.n_gpus = cfg, world, stop, n_gpus
        self._ahead: PlanReader | None = None  # the next epoch's reader, started early
        log.info("Horovod: %d process(es), %s controller, %s, %s precision", world.size, world.controller(),
                 f"{n_gpus} GPU(s) visible" if n_gpus else "CPU only", cfg.compute_precision)  # fmt: skip
        # Python's, NumPy's and TensorFlow's generators: unseeded Keras initialisers draw from Python's.
        tf.keras.utils.set_random_seed(cfg.random_seed)

        self.alphabet = UTF8Alphabet() if cfg.bytes_output_mode else Alphabet.from_file(cfg.alphabet_config_path)
        self.train_stores = open_stores(cfg.train_files, self.alphabet)
        self.features = self._common_features()
        self.catalog = Catalog.build(self.train_stores, world, cfg.loader.skip_bad_shards)
        for s in self.catalog.skipped:
            log.warning("--skip_bad_shards: left out %s", s)
        if cfg.loader.train_weights and len(cfg.loader.train_weights) != len(cfg.train_files):
            raise ValueError(f"--train_weights has {len(cfg.loader.train_weights)} weights for {len(cfg.train_files)} stores")
        self.dev = self._eval_set(cfg.dev_files, cfg.dev_batch_size, cfg.loader.limit_dev)
        self.n_classes = len(self.alphabet) + 1

        self.model = DeepSpeech.for_features(cfg.model, self.features, self.n_classes)
        if cfg.model.feature_normalization:
            stats = feature_statistics(self.train_stores, self.catalog, world)
            self.model.front_end.set_statistics(stats.mean, stats.std())
        optimizer = tf.keras.optimizers.Adam(learning_rate=learning_rate(cfg.optim, world.size, 0), beta_1=0.9, beta_2=0.999, epsilon=1e-8)
        self.amp = cfg.compute_precision == "fp16"
        self.optimizer = tf.keras.mixed_precision.LossScaleOptimizer(optimizer) if self.amp else optimizer
        self.optimizer.build(self.model.trainable_variables)
        self.progress = Progress.new()
        self.history = DevHistory()
        self.save_run = RunDir(cfg.checkpoint.save_dir) if cfg.checkpoint.save_dir else None
        self.checkpoints = None
        if world.is_root and self.save_run is not None:
            self.checkpoints = Checkpoints(self.save_run, self.model, self.optimizer, self.progress, cfg.checkpoint.max_to_keep)
        self.summaries = None
        summary_dir = cfg.summary_dir or (self.save_run.summaries_dir if self.save_run else "")
        if world.is_root and summary_dir:
            self.summaries = tf.summary.create_file_writer(summary_dir)

        dtype = tf.float16 if self.catalog.itemsize == 2 else tf.float32
        spec = (tf.TensorSpec([None, None, self.features.n_mel], dtype), tf.TensorSpec([None], tf.int32),
                tf.TensorSpec([None, None], tf.int32), tf.TensorSpec([None], tf.int32))  # fmt: skip
        self.train_step = tf.function(self._train_step, input_signature=spec + (tf.TensorSpec([3], tf.float32),))
        # Dev and test stores may keep another dtype than the training ones: one trace per dtype and rank.
        self.logits = tf.function(lambda x, n: self.model((x, n), training=False), reduce_retracing=True)
        self.augmenter = None
        if cfg.loader.augment:
            specs = [s for a in cfg.loader.augment for s in (DEFAULT_AUGMENT if a == "default" else (a,))]
            self.augmenter = Augmenter.from_specs(specs, features=self.features, noise_source=self._noise_sources(specs))

    def _common_features(self) -> FeatureConfig:
        features = self.train_stores[0].features
        for store in self.train_stores:
            if store.features != features:
                raise StoreError(f"{store.url}: feature parameters differ from the other train stores; preprocess them alike")
            if store.manifest.bytes_output_mode != self.cfg.bytes_output_mode:
                raise StoreError(f"{store.url}: preprocessed {'with' if store.manifest.bytes_output_mode else 'without'} "
                                 "--bytes_output_mode; train the same way")  # fmt: skip
        return features

    def _eval_set(self, urls: tuple[str, ...], batch_size: int, limit: int) -> EvalSet | None:
        if not urls:
            return None
        stores = open_stores(urls, self.alphabet)
        for s in stores:
            if s.features != self.features:
                raise StoreError(f"{s.url} was preprocessed with other feature parameters than --train_files")
        return EvalSet(stores, batch_size, self.world, limit, self.cfg.loader)

    def _noise_sources(self, specs: list[str]) -> dict:
        """overlay[source=STORE]: random utterances of a second feature store as noise."""
        import re

        sources = {}
        for spec in specs:
            m = re.search(r"source=([^,\]]+)", spec)
            if spec.startswith("overlay") and m:
                url = m.group(1)
                noise = Catalog.build([FeatureStore.open(url)], World(), skip_bad_shards=False)
                sources[url] = _NoiseStore(noise)
        return sources

    # --- state
    def restore_and_broadcast(self) -> None:
        """Rank 0 decides what to start from (--load_train) and loads it; every rank then takes rank 0's state."""
        if self.world.is_root:
            log.info(self._load())
            if self.save_run is not None:
                self.save_run.write_config(to_dict(self.cfg), self.features, self.alphabet, self.world.size)
        # Horovod: every rank starts from rank 0's weights, optimizer state and counters.
        self.world.broadcast_variables(self.model.variables + self.optimizer.variables + self.progress.numeric())
        self.progress.set_strings(self.world.broadcast_object(self.progress.strings()))
        self.history = DevHistory.from_dict(read_json(self.progress.history))

    def _load(self) -> str:
        cfg = self.cfg.checkpoint
        if cfg.load_train == "init":
            return "Starting from fresh weights (--load_train init)"
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
                return f"Resuming from checkpoint {path} (epoch {int(p.epoch)} done, step {int(p.step)})"
            if cfg.load_train in ("auto", "last") and self.checkpoints.latest.latest_checkpoint:
                # A run being continued: its own last checkpoint wins over the run it was started from.
                path = self.checkpoints.latest.latest_checkpoint
                self.checkpoints.restore(path)
                return f"Resuming from checkpoint {path} (this run's own; --load_checkpoint_dir only seeds a new run)"
        if load and load != save:
            source = load_weights_from(load, self.model, self.n_classes, cfg.drop_source_layers, cfg.load_train)
            return f"Starting from the weights of {source} (fine-tuning: new optimizer, counters at 0)"
        if load and cfg.load_train in ("last", "best"):
            raise FileNotFoundError(f"{load}: no checkpoint to load (--load_train {cfg.load_train})")
        return f"No checkpoint in {save or '(no --checkpoint_dir)'}: starting from fresh weights"

    # --- one step (traced once by tf.function)
    def _train_step(self, x, x_len, y, y_len, flags):
        """flags = (stop requested here, loader wait seconds, learning rate). Returns [mean loss, skipped, stop,
        utterances, frames, mean wait] over all ranks."""
        model, optimizer, world = self.model, self.optimizer, self.world
        # The optimizer keeps its own copy of the rate (a variable it made from ours): set that one.
        optimizer.learning_rate.assign(flags[2])
        with tf.GradientTape() as tape:
            logits = model((x, x_len), training=True)
            losses = ctc_loss(logits, x_len, y, y_len)
            count = tf.cast(tf.shape(losses)[0], tf.float32)
            loss = tf.reduce_sum(losses) / tf.maximum(count, 1.0)
            scaled = optimizer.get_scaled_loss(loss) if self.amp else loss
        variables = model.trainable_variables
        grads = tape.gradient(scaled, variables)
        if self.amp:
            grads = optimizer.get_unscaled_gradients(grads)
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in grads] + [tf.math.is_finite(loss)])
        bad_here = 1.0 - tf.cast(finite, tf.float32)
        # Horovod: one allreduce carries the loss sum, the count, whether any rank is non-finite or was asked to
        # stop, and the loader wait (for the log).
        frames = tf.cast(tf.reduce_sum(x_len), tf.float32)
        summed = world.allreduce_tensor(tf.stack([tf.where(finite, loss * count, 0.0), count, bad_here, flags[0], flags[1], frames]))
        any_bad = summed[2] > 0
        # Horovod: average the gradients (a rank's non-finite ones are zeroed first; the step is skipped anyway).
        grads = world.average_gradients([tf.where(finite, g, tf.zeros_like(g)) for g in grads])
        if self.cfg.optim.max_grad_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, self.cfg.optim.max_grad_norm)
        if self.amp:
            # The loss scale optimizer skips a non-finite step and lowers its scale: make it see one on every rank.
            grads = [tf.where(any_bad, tf.fill(tf.shape(g), np.float32(np.inf)), g) for g in grads]
            optimizer.apply_gradients(zip(grads, variables))
        else:
            tf.cond(any_bad, lambda: tf.no_op(), lambda: optimizer.apply_gradients(zip(grads, variables)).op)
        # One tensor, so the loop reads everything with one copy from the device.
        return tf.stack([summed[0] / tf.maximum(summed[1], 1.0), tf.cast(any_bad, tf.float32), tf.cast(summed[3] > 0, tf.float32),
                         summed[1], summed[5], summed[4] / world.size])  # fmt: skip

    # --- the loop
    def plan(self, epoch: int, position: LoaderPosition | None) -> EpochPlan:
        cfg, lc, world = self.cfg, self.cfg.loader, self.world
        kwargs = dict(batch_size=cfg.train_batch_size, shuffle=cfg.shuffle, sortagrad=lc.sortagrad, reverse=lc.reverse_train,
                      limit=lc.limit_train, buckets=lc.length_buckets, window_row_groups=self._window_row_groups(),
                      remainder=lc.remainder, weights=lc.train_weights or None)  # fmt: skip
        if position is not None and position.epoch == epoch and position.step:
            plan = resume_plan(position, self.catalog.table, rank=world.rank, world=world.size, **kwargs)
            log.info("epoch %d: resuming after step %d of the epoch", epoch + 1, position.step)
            if not plan.exact:
                log.warning("epoch %d: %s", epoch + 1, plan.note)
            return plan
        return plan_epoch(self.catalog.table, rank=world.rank, world=world.size, epoch=epoch, seed=cfg.random_seed, **kwargs)

    def _window_row_groups(self) -> int:
        """Half the memory budget holds the shuffle window, the other half the prefetched next one."""
        sizes = [self.catalog.nbytes(k) for k in range(len(self.catalog.refs))]
        mean = max(1.0, float(np.mean(sizes))) if sizes else 1.0
        return max(1, int(self.cfg.loader.loader_memory_mb * 2**20 / 2 / mean))

    def _transform(self, epoch: int):
        if self.augmenter is None:
            return None
        clock = epoch / max(1, self.cfg.epochs - 1)
        aug, seed = self.augmenter, self.cfg.random_seed
        return lambda x, sid: aug.apply(x, sample_rng(seed, epoch, sid), clock=clock)

    def _reader(self, epoch: int, position: LoaderPosition | None) -> PlanReader:
        """This epoch's reader (its plan is ``reader.plan``): the one started ahead during the last epoch, or a new one."""
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead.plan.epoch == epoch and position is None:
            return ahead
        if ahead is not None:
            ahead.close()
        lc = self.cfg.loader
        return PlanReader(self.catalog, self.plan(epoch, position), threads=lc.loader_threads, memory_mb=lc.loader_memory_mb,
                          prefetch=lc.loader_prefetch, transform=self._transform(epoch), skip_bad=lc.skip_bad_shards)  # fmt: skip

    def _read_ahead(self, epoch: int, reader: PlanReader) -> None:
        """Once this epoch's reader holds no row group, the next epoch's starts filling its first window, so that an
        epoch does not begin by waiting for it (and the window fills during dev evaluation and checkpointing)."""
        if self._ahead is None and epoch + 1 < self.cfg.epochs and reader.produced:
            self._ahead = self._reader(epoch + 1, None).start()

    def _to_device(self, batch):
        """A batch copied to the GPU while the step before it is still running (the step would copy it anyway)."""
        if batch is None or not self.n_gpus:
            return batch
        with tf.device("/GPU:0"):
            return tuple(tf.identity(a) for a in batch)

    def run_epoch(self, epoch: int, position: LoaderPosition | None) -> bool:
        """Returns False when training should stop (early stop)."""
        cfg, progress, world = self.cfg, self.progress, self.world
        reader = self._reader(epoch, position)
        plan = reader.plan
        log.debug("epoch %d plan: %s", epoch + 1, json.dumps(describe(plan)))
        t0, loss_sum, steps, utterances, frames = time.time(), 0.0, 0, 0.0, 0
        wait_total = 0.0
        bar = self._progress_bar(plan.start_step + plan.steps, plan.start_step, epoch)
        batches = iter(reader)
        try:
            batch, k, step = self._to_device(next(batches, None)), 0, int(progress.step)
            wait_now = reader.wait_s
            while batch is not None:
                rate = learning_rate(cfg.optim, world.size, step, self.history.plateau_factor)
                flags = tf.constant([1.0 if self.stop.requested else 0.0, wait_now, rate], tf.float32)
                out = self.train_step(*batch, flags)
                # The next batch is fetched and sent to the device while this step runs; then one read of its results.
                wait_before = reader.wait_s
                batch = self._to_device(next(batches, None))
                wait_now = reader.wait_s - wait_before
                self._read_ahead(epoch, reader)
                loss, skipped, stop, count, n_frames, wait = out.numpy().tolist()
                progress.step.assign_add(1)
                step, steps = step + 1, steps + 1
                utterances += count
                frames += int(n_frames)
                wait_total += wait
                if skipped:
                    self._nonfinite(plan, k, loss)
                else:
                    progress.nonfinite.assign(0)
                    loss_sum += loss
                progress.position.assign(json.dumps(plan.position_after(k + 1).to_dict()))
                k += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}")
                if self.summaries is not None and (step - 1) % cfg.summary_steps == 0:
                    self._step_summaries(step - 1, loss, wait)
                if stop:
                    self._save_and_stop(epoch, "Stop requested")
                if self.checkpoints is not None and self.checkpoints.due(cfg.checkpoint, step):
                    log.info("saved %s at step %d (epoch %d, step %d of it)", self.checkpoints.save(), step, epoch + 1,
                             plan.start_step + k)  # fmt: skip
        finally:
            batches.close()
        if bar is not None:
            bar.close()
        progress.epoch.assign(epoch + 1)
        progress.position.assign("")
        return self._end_epoch(epoch, plan, steps, loss_sum, utterances, frames, wait_total, time.time() - t0, reader.wait_s)

    def _nonfinite(self, plan: EpochPlan, k: int, loss: float) -> None:
        self.progress.nonfinite.assign_add(1)
        log.warning("step %d skipped on all ranks: non-finite loss or gradient (loss %s); this rank's samples %s",
                    int(self.progress.step), loss, plan.batch_ids(k).tolist())  # fmt: skip
        limit = self.cfg.max_nonfinite_steps
        if limit and int(self.progress.nonfinite) >= limit:
            self._save_and_stop(int(self.progress.epoch), f"{limit} non-finite steps in a row (--max_nonfinite_steps)",
                                exit_code=1)  # fmt: skip

    def _end_epoch(self, epoch: int, plan: EpochPlan, steps: int, loss_sum: float, utterances: float, frames: int,
                   wait: float, seconds: float, wait_here: float) -> bool:  # fmt: skip
        cfg, progress, world = self.cfg, self.progress, self.world
        # Horovod: the slowest rank's loader wait, for the log.
        wait_max = float(world.allreduce([wait_here], op="max")[0])
        train_loss = loss_sum / steps if steps else math.nan
        msg = (f"epoch {epoch + 1}/{cfg.epochs} train loss {train_loss:.4f} ({steps} steps, {seconds:.1f} s, "
               f"{utterances / max(seconds, 1e-9):.1f} utt/s, {frames / max(seconds, 1e-9):.0f} frames/s, "
               f"padding {plan.padding_fraction:.1%}, loader wait max {wait_max:.1f} s)")  # fmt: skip
        if plan.start_step:
            msg += f" after resuming at step {plan.start_step}"
        dev, is_best, keep_going = None, False, True
        if self.dev is not None:
            dev = self.evaluate_dev()
            self.history.add(dev["loss"])
            is_best = dev["loss"] < float(progress.best_dev_loss)
            if is_best:
                progress.best_dev_loss.assign(dev["loss"])
            msg += f", dev loss {dev['loss']:.4f} WER {dev['wer']:.3f} CER {dev['cer']:.3f}" + (" (best)" if is_best else "")
            if self.history.update_plateau(cfg.optim):
                msg += f", learning rate x{cfg.optim.plateau_reduction} (plateau)"
            if self.history.should_stop(cfg.optim):
                msg += f", early stop: no dev improvement of {cfg.optim.es_min_delta} in {cfg.optim.es_epochs} epochs"
                keep_going = False
            progress.history.assign(json.dumps(self.history.to_dict()))
        log.info(msg)
        if self.summaries is not None:
            with self.summaries.as_default(step=int(progress.step)):
                tf.summary.scalar("loss/train", train_loss)
                tf.summary.scalar("throughput/frames_per_s", frames / max(seconds, 1e-9))
                tf.summary.scalar("throughput/utterances_per_s", utterances / max(seconds, 1e-9))
                tf.summary.scalar("loader/padding_fraction", plan.padding_fraction)
                tf.summary.scalar("loader/wait_max_s", wait_max)
                if dev is not None:
                    tf.summary.scalar("loss/dev", dev["loss"])
                    tf.summary.scalar("wer/dev", dev["wer"])
                    tf.summary.scalar("cer/dev", dev["cer"])
            self.summaries.flush()
        if self.checkpoints is not None:
            self.checkpoints.save(best=is_best or self.dev is None)
        self._agree_on_stop(epoch)
        return keep_going

    def evaluate_dev(self) -> dict:
        post = self.dev.posteriors(self.logits, self.alphabet)
        loss, n = global_loss(post, self.world)
        # Horovod: corpus WER/CER from every rank's edit counts.
        we, w, ce, c = self.world.allreduce(greedy_error_counts(post, self.alphabet))
        return {"loss": loss, "samples": n, "wer": we / max(w, 1.0), "cer": ce / max(c, 1.0)}

    def _step_summaries(self, step: int, loss: float, wait: float) -> None:
        with self.summaries.as_default(step=step):
            tf.summary.scalar("loss/train_step", loss)
            tf.summary.scalar("learning_rate", float(self.optimizer.learning_rate.numpy()))
            tf.summary.scalar("loader/wait_s", wait)
            if self.amp:
                tf.summary.scalar("loss_scale", float(self.optimizer.loss_scale))

    def _progress_bar(self, total: int, done: int, epoch: int):
        import sys

        if not (self.world.is_root and self.cfg.show_progressbar and sys.stderr.isatty()):
            return None
        from tqdm import tqdm

        return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{self.cfg.epochs}", unit="step", leave=False)

    def _agree_on_stop(self, epoch: int) -> None:
        """At phase boundaries (after dev evaluation, before test and export): a stop request on any rank stops all."""
        # Horovod: any rank's request counts.
        if self.world.allreduce([1.0 if self.stop.requested else 0.0])[0] > 0:
            self._save_and_stop(epoch, "Stop requested")

    def _save_and_stop(self, epoch: int, why: str, exit_code: int = EXIT_PREEMPTED) -> None:
        path = None
        if self.checkpoints is not None:
            path = self.checkpoints.save()
        # Horovod: nobody exits before rank 0's checkpoint is complete (launchers kill the others on the first exit).
        self.world.barrier()
        saved = (f"checkpoint {path}" if path else "no checkpoint (no --checkpoint_dir)") if self.world.is_root else "rank 0's checkpoint"
        log.warning("%s (%s): %s saved at epoch %d, step %d; exiting with %d%s at %.3f", why,
                    self.stop.signal_name or "on another rank", saved, epoch + 1,
                    int(self.progress.step), exit_code, " to be resumed" if exit_code == EXIT_PREEMPTED else "", time.time())  # fmt: skip
        e = Preempted()
        e.exit_code = exit_code
        raise e

    def fit(self) -> None:
        start = int(self.progress.epoch)
        if start >= self.cfg.epochs:
            log.info("Training already complete: %d of %d epochs done", start, self.cfg.epochs)
        text = self.progress.strings()["position"]
        position = LoaderPosition.from_dict(json.loads(text)) if text else None
        try:
            for epoch in range(start, self.cfg.epochs):
                if not self.run_epoch(epoch, position):
                    break
                position = None
        finally:
            if self._ahead is not None:
                self._ahead.close()
                self._ahead = None

    # --- after training
    def test(self) -> dict | None:
        es = self._eval_set(self.cfg.test.test_files, self.cfg.test.test_batch_size, self.cfg.loader.limit_test)
        if es is None:
            return None
        post = es.posteriors(self.logits, self.alphabet)
        summary = report_test_set(post, self.alphabet, self.cfg.test, self.cfg.decoder, self.world)
        self._agree_on_stop(int(self.progress.epoch) - 1)
        return None if summary is None else {k: summary[k] for k in ("wer", "cer", "loss", "samples")}

    def export(self) -> None:
        if not self.world.is_root or not self.cfg.export_dir:
            return
        source = "final weights"
        if self.checkpoints is not None and self.dev is not None and self.checkpoints.best.latest_checkpoint:
            path = self.checkpoints.best.latest_checkpoint
            self.checkpoints.restore(path)
            source = path
        info = {"epochs": int(self.progress.epoch), "weights_from": source}
        export_model(self.cfg.export_dir, self.model, self.alphabet, self.features, info, options=self.cfg.export,
                     scorer_path=self.cfg.decoder.scorer_path, config=to_dict(self.cfg))  # fmt: skip
        log.info("Exported %s to %s", source, self.cfg.export_dir)


class _NoiseStore:
    """Random utterances of a feature store, for overlay augmentation; reads one row group at a time."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._cache: dict[int, list[np.ndarray]] = {}

    def __call__(self, rng: np.random.Generator, n_frames: int) -> np.ndarray:
        from dstrain.loader.reader import read_row_group

        key = int(rng.integers(len(self.catalog.refs)))
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.pop(next(iter(self._cache)))
            self._cache[key] = read_row_group(self.catalog.refs[key], self.catalog.n_mel).features
        rows = self._cache[key]
        return rows[int(rng.integers(len(rows)))]


def train(cfg: TrainConfig) -> dict:
    """Train on every rank; returns this rank's summary. Raises :class:`Preempted` after a stop request."""
    stop = preemption.install()
    if cfg.horovod_timeline:
        os.environ.setdefault("HOROVOD_TIMELINE", cfg.horovod_timeline)
    world = start_horovod()  # Horovod: one process per device, pinned to its GPU
    n_gpus = configure_tensorflow(cfg, world)
    save = cfg.checkpoint.save_dir
    setup_logging(world.rank, RunDir(save) if save else None, cfg.log_level)
    trainer = Trainer(cfg, world, n_gpus, stop)
    trainer.restore_and_broadcast()
    try:
        trainer.fit()
    except tf.errors.ResourceExhaustedError as e:
        raise MemoryError(f"out of memory at --train_batch_size {cfg.train_batch_size} (n_hidden {cfg.model.n_hidden}): "
                          f"try a smaller batch, --precision fp16/bf16, or fewer --length_buckets' long samples "
                          f"(--max_duration at preprocessing). {str(e).splitlines()[0]}") from None  # fmt: skip
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
        # Every rank is past the barrier (the checkpoint is complete): leave at once. Launchers kill the other ranks
        # when the first one exits, and TensorFlow's and Horovod's teardown takes long enough to lose that race.
        import sys

        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(e.exit_code)
    return 0
