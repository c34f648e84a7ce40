"""Export: SavedModel (samples and log mel signatures), TFLite (whole utterance, streaming, quantised) and the run
directory agree on LDC93S1; streaming equals the whole-utterance model; metadata round trips; dstrain export
--export_zip.

The model is a tiny DeepSpeech trained here in ~15 s to LDC93S1's exact transcript, once per session
(:func:`ldc93s1_model`, shared with test_transcribe.py)."""

from __future__ import annotations

import glob
import json
import os
import zipfile
from dataclasses import dataclass

import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, SHARED

from dstrain.alphabet import Alphabet, greedy_decode
from dstrain.audio import read_audio
from dstrain.export import (
    META_NAME,
    STREAMING_TFLITE_NAME,
    TFLITE_NAME,
    ExportConfig,
    ExportOptions,
    _restore,
    export_model,
    read_tflite_metadata,
    tflite_model,
)
from dstrain.features import FeatureConfig, log_mel, power_spectrogram
from dstrain.inference import iter_chunks, load_model
from dstrain.model import DeepSpeech, ModelConfig, ctc_loss

TEXT = "she had your dark suit in greasy wash water all year"
N_STEPS = 10  # not a divisor of LDC93S1's 145 frames: the stream ends on a partial chunk
VAD_FRAME = 480  # WebRTC VAD's 30 ms frames at 16 kHz: where dstrain.vad cuts
OPTIONS = ExportOptions(
    export_tflite=True,
    n_steps=N_STEPS,
    export_author_id="dstrain-tests",
    export_model_name="ldc93s1",
    export_model_version="1.2.3",
    export_contact_info="tests@example.org",
    export_license="MPL-2.0",
    export_language="en-Latn-US",
    export_min_ds_version="0.1.0",
    export_description="LDC93S1, overfitted",
)


@dataclass
class Ldc93s1Model:
    model: DeepSpeech
    alphabet: Alphabet
    features: FeatureConfig
    samples: np.ndarray
    log_mel: np.ndarray
    reference: np.ndarray
    """The Keras model's log-probabilities for LDC93S1, [145, 29]."""
    run_dir: str
    export_dir: str
    quantized_tflite: str


_BUILT: dict[str, Ldc93s1Model] = {}


def ldc93s1_model(tmp_path_factory) -> Ldc93s1Model:
    """Trained, written as a run directory, exported (SavedModel + both TFLite files) and quantised: once."""
    if "model" not in _BUILT:
        _BUILT["model"] = _build(str(tmp_path_factory.mktemp("ldc93s1_model")))
    return _BUILT["model"]


def _training_variants(samples: np.ndarray, features: FeatureConfig) -> list[np.ndarray]:
    """LDC93S1 itself, and with its start cut by 0..8 VAD frames and up to 0.3 s of silence after it: the segments
    split_on_silence makes of a recording of repeats (test_transcribe.py), which an utterance learnt by heart alone
    would not transcribe (a 50 ms shift is enough to break it)."""
    rng = np.random.default_rng(0)
    clips = [samples] + [
        np.concatenate([samples[k * VAD_FRAME :], np.zeros(int(rng.uniform(0, 0.3) ** 2 / 0.3 * 16000), np.float32)])
        for k in range(9)
        for _ in range(4)
    ]
    return [log_mel(power_spectrogram(c, features), features) for c in clips]


def _train(
    model: DeepSpeech, variants: list[np.ndarray], alphabet: Alphabet, max_steps: int = 600, batch: int = 8
) -> None:
    """Adam on random batches of the variants (the original in each) until every variant decodes exactly."""
    lengths = np.array([len(v) for v in variants], np.int32)
    # Padded with the frame whose MFCC is zero (the normalisation mean), as the context window pads the edges: a
    # padded utterance then has the right context it has alone (zeros would be a loud frame once normalised).
    x = np.tile(model.front_end.mean.numpy(), (len(variants), lengths.max(), 1))
    for i, v in enumerate(variants):
        x[i, : len(v)] = v
    labels = tf.constant([alphabet.encode(TEXT)] * batch)
    label_lengths = tf.constant([len(TEXT)] * batch)
    optimizer = tf.keras.optimizers.Adam(0.005, clipnorm=5.0)

    @tf.function
    def step(features, feature_lengths):
        with tf.GradientTape() as tape:
            logits = model((features, feature_lengths), training=True)
            loss = tf.reduce_mean(ctc_loss(logits, feature_lengths, labels, label_lengths))
        optimizer.apply_gradients(zip(tape.gradient(loss, model.trainable_variables), model.trainable_variables))

    @tf.function
    def best_paths(features, feature_lengths):
        return tf.argmax(model((features, feature_lengths)), axis=-1)

    def learnt() -> bool:
        paths = best_paths(tf.constant(x), tf.constant(lengths)).numpy()
        return all(greedy_decode(p[:n], alphabet) == TEXT for p, n in zip(paths, lengths))

    rng = np.random.default_rng(1)
    for i in range(1, max_steps + 1):
        pick = rng.choice(len(variants), batch, replace=False)
        pick[0] = 0
        step(tf.constant(x[pick]), tf.constant(lengths[pick]))
        if i % 50 == 0 and learnt():
            return
    raise AssertionError(f"the test model did not learn LDC93S1 in {max_steps} steps")


def _build(root: str) -> Ldc93s1Model:
    from dstrain.rundir import RunDir

    features = FeatureConfig()
    alphabet = Alphabet.from_file(str(DATA / "alphabet.txt"))
    samples = read_audio(str(DATA / "LDC93S1.wav"))
    variants = _training_variants(samples, features)
    tf.random.set_seed(0)
    cfg = ModelConfig(n_hidden=64, dropout_rate=0.0)
    model = DeepSpeech.for_features(cfg, features, len(alphabet) + 1)
    model.front_end.set_statistics(variants[0].mean(axis=0), variants[0].std(axis=0))
    _train(model, variants, alphabet)
    x = variants[0]
    reference = tf.nn.log_softmax(model((x[None], tf.constant([len(x)])))).numpy()[0]

    run = RunDir(os.path.join(root, "run"))
    run.write_config({"model": cfg.to_dict()}, features, alphabet, world_size=1)
    tf.train.CheckpointManager(tf.train.Checkpoint(model=model), run.latest_dir, max_to_keep=1).save()
    export_dir = os.path.join(root, "export")
    meta = export_model(export_dir, model, alphabet, features, {"epochs": 1}, options=OPTIONS, config={"test": True})
    quantized = os.path.join(root, "quantized.tflite")
    with open(quantized, "wb") as f:
        f.write(tflite_model(model, meta, quantize=True))
    return Ldc93s1Model(model, alphabet, features, samples, x, reference, run.path, export_dir, quantized)


@pytest.fixture(scope="session")
def ldc(tmp_path_factory) -> Ldc93s1Model:
    return ldc93s1_model(tmp_path_factory)


def _transcript(log_probs: np.ndarray, alphabet: Alphabet) -> str:
    return greedy_decode(np.argmax(log_probs, axis=1), alphabet)


def test_saved_model_tflite_and_run_directory_agree(ldc):
    forms = {
        "saved_model": ldc.export_dir,
        "tflite": os.path.join(ldc.export_dir, TFLITE_NAME),
        "streaming tflite": os.path.join(ldc.export_dir, STREAMING_TFLITE_NAME),
        "checkpoint": ldc.run_dir,
    }
    for name, path in forms.items():
        loaded = load_model(path)
        assert loaded.alphabet == ldc.alphabet and loaded.features == ldc.features, name
        out = loaded.log_probs([ldc.log_mel])[0]
        np.testing.assert_allclose(out, ldc.reference, atol=1e-4, err_msg=name)
        assert _transcript(out, loaded.alphabet) == TEXT, name


def test_samples_signature_computes_the_preprocessing_features(ldc):
    module = tf.saved_model.load(ldc.export_dir)
    assert {"serving_default", "log_probs", "log_mel", "stream_step", "metadata"} <= set(module.signatures)
    in_graph = module.signatures["log_mel"](samples=tf.constant(ldc.samples))["log_mel"].numpy()
    np.testing.assert_allclose(in_graph, ldc.log_mel, atol=1e-4)  # AudioSpectrogram + mel matrix + log floor
    out = module.signatures["serving_default"](samples=tf.constant(ldc.samples))["log_probs"].numpy()
    np.testing.assert_allclose(out, ldc.reference, atol=1e-4)


def test_padded_batches_give_each_utterance_its_own_result(ldc):
    loaded = load_model(ldc.export_dir)
    short = ldc.log_mel[:60]
    alone = loaded.log_probs([short])[0]
    batched = loaded.log_probs([ldc.log_mel, short, ldc.log_mel[:3]])
    np.testing.assert_allclose(batched[0], ldc.reference, atol=1e-5)
    np.testing.assert_allclose(batched[1], alone, atol=1e-5)  # the padding is never its right context


def test_streaming_equals_whole_utterance(ldc):
    saved = load_model(ldc.export_dir)
    for push in (1, 7, N_STEPS, 33, 0):
        out = saved.streamer().run(ldc.log_mel, push)
        np.testing.assert_allclose(out, ldc.reference, atol=1e-4, err_msg=f"pushed {push} frames at a time")
    # Outputs wait for n_context frames of look-ahead.
    streamer = saved.streamer()
    assert len(streamer.push(ldc.log_mel[:N_STEPS])) == N_STEPS - 9
    # Features computed chunk by chunk from the samples (constant memory) through the streaming TFLite model.
    streamer = load_model(os.path.join(ldc.export_dir, STREAMING_TFLITE_NAME)).streamer()
    parts = [streamer.push(chunk) for chunk in iter_chunks(ldc.samples, ldc.features, 16)] + [streamer.finish()]
    out = np.concatenate(parts)
    np.testing.assert_allclose(out, ldc.reference, atol=1e-4)
    assert _transcript(out, ldc.alphabet) == TEXT
    # Another chunk length, traced from the checkpoint.
    out = load_model(ldc.run_dir).streamer(n_steps=16).run(ldc.log_mel, 5)
    np.testing.assert_allclose(out, ldc.reference, atol=1e-4)


def test_quantized_tflite_still_transcribes_exactly(ldc):
    assert os.path.getsize(ldc.quantized_tflite) < 0.5 * os.path.getsize(os.path.join(ldc.export_dir, TFLITE_NAME))
    loaded = load_model(ldc.quantized_tflite)
    assert loaded.metadata["tflite"] == {"streaming": False, "n_steps": 0, "quantized": True, "batch_size": 1}
    assert _transcript(loaded.log_probs([ldc.log_mel])[0], loaded.alphabet) == TEXT


def test_metadata_round_trip(ldc):
    with open(os.path.join(ldc.export_dir, META_NAME), encoding="utf-8") as f:
        meta = json.load(f)
    expected = {
        "author_id": "dstrain-tests",
        "model_name": "ldc93s1",
        "model_version": "1.2.3",
        "contact_info": "tests@example.org",
        "license": "MPL-2.0",
        "language": "en-Latn-US",
        "min_ds_version": "0.1.0",
        "description": "LDC93S1, overfitted",
        "sample_rate": 16000,
        "n_steps": N_STEPS,
        "n_classes": 29,
        "epochs": 1,
        "alphabet": list(ldc.alphabet.labels),
    }
    assert {k: meta[k] for k in expected} == expected
    assert FeatureConfig(**meta["features"]) == ldc.features and ModelConfig(**meta["model"]) == ldc.model.cfg
    in_graph = tf.saved_model.load(ldc.export_dir).signatures["metadata"]()["json"].numpy().decode("utf-8")
    assert json.loads(in_graph) == meta
    for name in (TFLITE_NAME, STREAMING_TFLITE_NAME):
        embedded = read_tflite_metadata(os.path.join(ldc.export_dir, name))
        assert embedded.pop("tflite")["streaming"] == (name == STREAMING_TFLITE_NAME)
        assert embedded == meta
    with open(os.path.join(ldc.export_dir, "flags.json"), encoding="utf-8") as f:
        assert json.load(f) == {"test": True}


def _scorer(tmp_path) -> str:
    found = sorted(glob.glob(str(SHARED / "data" / "scorer" / "*.scorer")))
    if found:
        return found[0]
    stand_in = tmp_path / "stand_in.scorer"  # packaging copies the file; it is not read here
    stand_in.write_bytes(b"not a real scorer")
    return str(stand_in)


def test_export_command_packages_model_and_scorer(ldc, tmp_path):
    from dstrain.cli import build_parser, run

    scorer, out = _scorer(tmp_path), tmp_path / "en"
    args = build_parser().parse_args(
        [
            "export",
            "--checkpoint_dir",
            ldc.run_dir,
            "--export_dir",
            str(out),
            "--export_zip",
            "--scorer_path",
            scorer,
            "--export_author_id",
            "me",
            "--n_steps",
            "8",
        ]
    )
    assert run(args) == 0
    with zipfile.ZipFile(str(out) + ".zip") as z:
        names = set(z.namelist())
    assert {"saved_model.pb", META_NAME, "alphabet.txt", "flags.json", os.path.basename(scorer)} <= names
    assert any(n.startswith("variables/") for n in names) and TFLITE_NAME not in names
    flags = json.loads((out / "flags.json").read_text())
    assert flags["export"]["options"]["export_author_id"] == "me" and flags["export"]["scorer_path"] == scorer
    assert flags["train"] == {"model": ldc.model.cfg.to_dict()}  # the run's resolved configuration, too
    meta = json.loads((out / META_NAME).read_text())
    assert meta["author_id"] == "me" and meta["n_steps"] == 8 and meta["weights_from"].endswith("train/ckpt-1")
    assert _transcript(load_model(str(out)).log_probs([ldc.log_mel])[0], ldc.alphabet) == TEXT


def test_checkpoint_path_finds_its_run(ldc):
    checkpoint = os.path.join(ldc.run_dir, "train", "ckpt-1")
    _, info, source = _restore(ExportConfig(export_dir="unused", checkpoint_path=checkpoint))
    assert source == checkpoint and info.alphabet == ldc.alphabet


def test_configuration_errors_name_the_flag(tmp_path):
    with pytest.raises(ValueError, match="--checkpoint_dir"):
        ExportConfig(export_dir=str(tmp_path))
    with pytest.raises(ValueError, match="n_steps"):
        ExportOptions(n_steps=0)
    with pytest.raises(ValueError, match="export_model_name"):
        ExportOptions(export_model_name="a/b")
    with pytest.raises(ValueError, match="scorer_path"):
        ExportConfig(export_dir=str(tmp_path), checkpoint_dir=str(tmp_path), scorer_path=str(tmp_path / "none.scorer"))
    with pytest.raises(FileNotFoundError, match="run directory"):
        load_model(str(tmp_path))


def test_mixed_precision_model_is_exported_in_float32(ldc, tmp_path):
    policy = tf.keras.mixed_precision.global_policy()
    tf.keras.mixed_precision.set_global_policy("mixed_float16")  # as dstrain train --precision fp16 leaves it
    try:
        model = DeepSpeech.for_features(ModelConfig(n_hidden=16), ldc.features, 29)
        trained = tf.nn.log_softmax(tf.cast(model((ldc.log_mel[None], tf.constant([len(ldc.log_mel)]))), tf.float32))
        export_model(str(tmp_path), model, ldc.alphabet, ldc.features, {})
    finally:
        tf.keras.mixed_precision.set_global_policy(policy)
    loaded = load_model(str(tmp_path))
    assert loaded.module.signatures["log_probs"].structured_outputs["log_probs"].dtype == tf.float32
    np.testing.assert_allclose(loaded.log_probs([ldc.log_mel])[0], trained.numpy()[0], atol=2e-2)  # fp16 rounding
