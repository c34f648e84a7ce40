"""DeepSpeech 0.9.3's flags that dstrain train once lacked: each one changes what it should (parsed from the real
command line, then the optimizer, model, loader, export or decoder it reaches), bad values are one-line errors naming
the flag, and DeepSpeech 0.6's augmentation flags become --augment specs."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from conftest import DATA, assert_says, synthetic_store

from dstrain.alphabet import Alphabet
from dstrain.cli import build_parser
from dstrain.config import from_args
from dstrain.distributed import World
from dstrain.features import ExpectedFeatures, FeatureConfig
from dstrain.model import DeepSpeech, ModelConfig

ALPHABET = str(DATA / "alphabet.txt")
TRAIN = ["train", "--train_files", "s", "--alphabet_config_path", ALPHABET]


def parse(*argv: str):
    """The config ``dstrain ARGV`` runs with."""
    from dstrain.cli import COMMANDS, resolve

    args = build_parser().parse_args(list(argv))
    return from_args(resolve(COMMANDS[args._command].config), args)


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dstrain.cli", *argv], capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess, phrase: str) -> None:
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert_says(proc.stderr, lacks=("Traceback",), one_error_line=phrase)


# --- optimizer


def test_adam_takes_beta1_beta2_epsilon():
    from dstrain.train.schedule import adam

    default = adam(parse(*TRAIN).optim, 0.01)
    assert (default.beta_1, default.beta_2, default.epsilon) == (0.9, 0.999, 1e-8)  # DeepSpeech's defaults
    cfg = parse(*TRAIN, "--beta1", "0.8", "--beta2", "0.95", "--epsilon", "1e-5").optim
    opt = adam(cfg, 0.01)
    assert (opt.beta_1, opt.beta_2, opt.epsilon) == (0.8, 0.95, 1e-5)
    # They change the update: one step from the same gradient moves the weight differently.
    moves = []
    for o in (default, opt):
        w = tf.Variable([1.0, -2.0])
        o.apply_gradients([(tf.constant([0.5, 1e-4]), w)])
        moves.append(w.numpy() - [1.0, -2.0])
    assert not np.allclose(moves[0], moves[1])
    with pytest.raises(ValueError, match="beta1 must be in"):
        parse(*TRAIN, "--beta1", "1.5")
    with pytest.raises(ValueError, match="epsilon must be > 0"):
        parse(*TRAIN, "--epsilon", "0")


# --- model


def test_per_layer_dropout_follows_deepspeech():
    # DeepSpeech: -1 means --dropout_rate for layers 2, 3 and "6" (its create_model drops layer 5's output with it);
    # rate 4 was never applied there (here: the LSTM's output, default 0); rate 5 had no effect at all.
    cfg = parse(*TRAIN, "--dropout_rate", "0.1").model
    assert cfg.layer_dropout() == {1: 0.1, 2: 0.1, 3: 0.1, 4: 0.0, 5: 0.1}
    cfg = parse(
        *TRAIN,
        "--dropout_rate",
        "0.1",
        "--dropout_rate2",
        "0.2",
        "--dropout_rate3",
        "0",
        "--dropout_rate4",
        "-1",
        "--dropout_rate6",
        "0.3",
    ).model
    assert cfg.layer_dropout() == {1: 0.1, 2: 0.2, 3: 0.0, 4: 0.1, 5: 0.3}
    model = DeepSpeech(cfg, n_input=3, n_classes=4)
    assert [d.rate for d in model.dropouts] == [0.1, 0.2, 0.0, 0.1, 0.3]
    # The rates act where they say: layer 3's output is never dropped, layer 5's is (at 0.5 here, visibly).
    model = DeepSpeech(ModelConfig(n_hidden=64, dropout_rate=0.0, dropout_rate6=0.5), n_input=3, n_classes=4)
    x = tf.ones([2, 5, 19 * 3])
    model((tf.ones([2, 5, 3]), tf.constant([5, 5])))
    for n, dropped in ((1, False), (2, False), (3, False), (5, True)):
        inp = x if n == 1 else tf.ones([2, 5, 64])
        kept = model.dense_layer(n, inp, training=True).numpy()
        reference = model.dense_layer(n, inp, training=False).numpy()
        assert (np.sum((kept == 0) & (reference != 0)) > 0) == dropped, n
    with pytest.raises(ValueError, match="dropout_rate5 0.1: DeepSpeech 0.9.3 never applied it.*--dropout_rate6"):
        parse(*TRAIN, "--dropout_rate5", "0.1")
    with pytest.raises(ValueError, match="dropout_rate2 must be in"):
        parse(*TRAIN, "--dropout_rate2", "1.2")


def test_layer_norm_builds_deepspeechs_normalised_model():
    cfg = parse(*TRAIN, "--layer_norm", "--n_hidden", "16", "--dropout_rate", "0").model
    tf.random.set_seed(0)
    model = DeepSpeech.for_features(cfg, FeatureConfig(), 5)
    assert [n.name for n in model.norms] == ["layer_1_norm", "layer_2_norm", "layer_3_norm", "layer_5_norm"]
    assert all(n.epsilon == 1e-12 for n in model.norms)
    # After the clipped ReLU: every frame's units have mean 0 and deviation 1 (gain 1, bias 0 at the start).
    y = model.dense_layer(2, tf.random.normal([2, 7, 16]) * 3, training=False).numpy()
    np.testing.assert_allclose(y.mean(-1), 0, atol=1e-5)
    np.testing.assert_allclose(y.std(-1), 1, atol=1e-3)
    assert not DeepSpeech.for_features(parse(*TRAIN, "--n_hidden", "16").model, FeatureConfig(), 5).norms
    # Exports carry it: the streaming graph gives what the whole-utterance model gives.
    from dstrain.export import ExportOptions, export_metadata
    from dstrain.inference import CheckpointModel

    alphabet = Alphabet.from_file(ALPHABET)
    model = DeepSpeech.for_features(cfg, FeatureConfig(), len(alphabet) + 1)
    model.norms[3].beta.assign(tf.fill([16], 0.5))
    loaded = CheckpointModel(
        model, alphabet, FeatureConfig(), export_metadata(model, alphabet, FeatureConfig(), {}, ExportOptions())
    )
    x = np.random.default_rng(2).standard_normal((23, 40)).astype(np.float32)
    np.testing.assert_allclose(loaded.streamer(n_steps=7).run(x), loaded.log_probs([x])[0], atol=1e-4)
    # Its checkpoints say so: a model without --layer_norm cannot take them.
    from dstrain.rundir import RunInfo
    from dstrain.train.checkpoint import check_geometry

    saved = RunInfo({}, FeatureConfig(), Alphabet.from_file(ALPHABET), 1, cfg)
    plain = DeepSpeech.for_features(ModelConfig(n_hidden=16), FeatureConfig(), 5)
    with pytest.raises(ValueError, match="layer_norm True in the checkpoint, --layer_norm False now"):
        check_geometry(saved, plain, 5, 0, "run")


# --- data


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    return synthetic_store(tmp_path_factory.mktemp("flags") / "s", 12, row_group_rows=4, frames=(20, 80), seed=4)


def _eval_lengths(store: str, reverse: bool) -> list[int]:
    from dstrain.loader.builder import EvalInput
    from dstrain.loader.config import LoaderConfig

    data = EvalInput.build(
        (store,), Alphabet.from_file(ALPHABET), LoaderConfig(), World(), batch_size=3, reverse=reverse
    )
    return [int(n) for _, (x, lengths, y, yl) in data.batches() for n in lengths]


def test_reverse_dev_and_reverse_test_put_the_longest_batches_first(store):
    assert parse(*TRAIN, "--reverse_dev").loader.reverse_dev and not parse(*TRAIN).loader.reverse_dev
    assert parse(*TRAIN, "--reverse_test").test.reverse_test
    assert parse("evaluate", "--test_files", "t", "--model", "m", "--reverse_test").test.reverse_test
    forward, backward = _eval_lengths(store, False), _eval_lengths(store, True)
    assert forward == sorted(forward) and backward == sorted(forward, reverse=True) and len(set(forward)) > 3


def test_metrics_files_and_load_evaluate_parse():
    cfg = parse(*TRAIN, "--metrics_files", "a,b", "--load_evaluate", "last")
    assert cfg.metrics_files == ("a", "b") and cfg.evaluate.load_evaluate == "last"
    assert parse(*TRAIN).evaluate.load_evaluate == "auto"
    with pytest.raises(ValueError, match="--load_evaluate best needs --checkpoint_dir"):
        parse(*TRAIN, "--load_evaluate", "best")
    assert (
        parse("export", "--export_dir", "e", "--checkpoint_dir", "r", "--load_evaluate", "best").evaluate.load_evaluate
        == "best"
    )
    assert (
        parse(
            "evaluate", "--test_files", "t", "--checkpoint_dir", "r", "--load_evaluate", "last"
        ).evaluate.load_evaluate
        == "last"
    )


def test_load_evaluate_picks_the_checkpoint_of_a_run(tmp_path):
    from dstrain.export import read_export_metadata, run_export
    from dstrain.inference import load_model
    from dstrain.rundir import RunDir

    alphabet = Alphabet.from_file(ALPHABET)
    cfg = ModelConfig(n_hidden=8)
    run = RunDir(str(tmp_path / "run"))
    run.write_config({"model": cfg.to_dict()}, FeatureConfig(), alphabet, world_size=1)
    model = DeepSpeech.for_features(cfg, FeatureConfig(), len(alphabet) + 1)
    ckpt = tf.train.Checkpoint(model=model)
    model.out.bias.assign(tf.fill(model.out.bias.shape, 1.0))
    best = tf.train.CheckpointManager(ckpt, run.best_dir, max_to_keep=1).save()
    model.out.bias.assign(tf.fill(model.out.bias.shape, 2.0))
    last = tf.train.CheckpointManager(ckpt, run.latest_dir, max_to_keep=1).save()
    bias = {
        which: float(load_model(run.path, which=which).model.out.bias.numpy()[0]) for which in ("auto", "best", "last")
    }
    assert bias == {"auto": 1.0, "best": 1.0, "last": 2.0}
    for which, source in (("auto", best), ("last", last)):
        out = tmp_path / f"export-{which}"
        run_export(parse("export", "--export_dir", str(out), "--checkpoint_dir", run.path, "--load_evaluate", which))
        assert read_export_metadata(str(out))["weights_from"] == source
    empty = RunDir(str(tmp_path / "no-best"))
    empty.write_config({"model": cfg.to_dict()}, FeatureConfig(), alphabet, world_size=1)
    tf.train.CheckpointManager(ckpt, empty.latest_dir, max_to_keep=1).save()
    with pytest.raises(FileNotFoundError, match=r"no checkpoint in best_dev/ \(--load_evaluate best\)"):
        load_model(empty.path, which="best")


# --- export


@pytest.fixture(scope="module")
def tiny():
    tf.random.set_seed(3)
    alphabet = Alphabet.from_file(ALPHABET)
    model = DeepSpeech.for_features(ModelConfig(n_hidden=8, n_context=2), FeatureConfig(), len(alphabet) + 1)
    return model, alphabet


def test_export_file_name_batch_size_beam_width_and_max_version(tiny, tmp_path):
    from dstrain.export import export_model
    from dstrain.inference import load_model

    model, alphabet = tiny
    options = parse(
        "export",
        "--export_dir",
        "e",
        "--checkpoint_dir",
        "r",
        "--export_tflite",
        "--export_file_name",
        "graph",
        "--export_batch_size",
        "3",
        "--export_beam_width",
        "77",
        "--export_max_ds_version",
        "9.9.9",
    ).options
    out = str(tmp_path / "export")
    meta = export_model(out, model, alphabet, FeatureConfig(), {}, options=options)
    assert sorted(f for f in os.listdir(out) if f.endswith(".tflite")) == ["graph.tflite", "graph_streaming.tflite"]
    assert meta["tflite_files"] == ["graph.tflite", "graph_streaming.tflite"]
    assert (meta["beam_width"], meta["max_ds_version"]) == (77, "9.9.9")
    assert json.load(open(os.path.join(out, "dstrain_export.json")))["beam_width"] == 77

    # DeepSpeech's exported graph had a fixed batch: the TFLite model takes 3 utterances (and their lengths).
    interpreter = tf.lite.Interpreter(model_path=os.path.join(out, "graph.tflite"))
    shapes = {name: list(d["shape"]) for name, d in interpreter.get_signature_runner().get_input_details().items()}
    assert shapes == {"log_mel": [3, 1, 40], "lengths": [3]}
    rng = np.random.default_rng(0)
    utterances = [rng.standard_normal((n, 40)).astype(np.float32) for n in (30, 11, 25, 17)]  # two calls, one padded
    want = load_model(out).log_probs(utterances)
    got = load_model(os.path.join(out, "graph.tflite")).log_probs(utterances)
    for w, g in zip(want, got):
        np.testing.assert_allclose(g, w, atol=1e-4)

    # A new export into the same folder removes the old one's TFLite files, whatever they were called.
    default = parse("export", "--export_dir", "e", "--checkpoint_dir", "r").options
    export_model(out, model, alphabet, FeatureConfig(), {}, options=default)
    assert not [f for f in os.listdir(out) if f.endswith(".tflite")]
    with pytest.raises(ValueError, match="export_file_name must be a file name"):
        parse("export", "--export_dir", "e", "--checkpoint_dir", "r", "--export_file_name", "a/b")
    with pytest.raises(ValueError, match="export_batch_size must be >= 1 .TFLite's LSTM needs a fixed batch size"):
        parse("export", "--export_dir", "e", "--checkpoint_dir", "r", "--export_batch_size", "0")


def test_remove_export_deletes_only_an_earlier_export(tiny, tmp_path):
    from dstrain.export import export_model

    model, alphabet = tiny
    out = tmp_path / "export"
    keep = parse("export", "--export_dir", "e", "--checkpoint_dir", "r").options
    remove = parse("export", "--export_dir", "e", "--checkpoint_dir", "r", "--remove_export").options
    export_model(str(out), model, alphabet, FeatureConfig(), {}, options=keep)
    (out / "notes.txt").write_text("mine")
    export_model(str(out), model, alphabet, FeatureConfig(), {}, options=keep)
    assert (out / "notes.txt").exists()  # without --remove_export other files stay
    export_model(str(out), model, alphabet, FeatureConfig(), {}, options=remove)
    assert not (out / "notes.txt").exists() and (out / "dstrain_export.json").exists()
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match="--remove_export: .* holds files but no earlier export"):
        export_model(str(other), model, alphabet, FeatureConfig(), {}, options=remove)
    assert (other / "thesis.tex").exists()


def test_a_failed_export_leaves_the_earlier_one_whole_and_metadata_names_stay_inside(tiny, tmp_path, monkeypatch):
    import json

    import dstrain.export as export
    from dstrain.export import export_model, read_export_metadata

    model, alphabet = tiny
    out = tmp_path / "export"
    options = parse("export", "--export_dir", "e", "--checkpoint_dir", "r", "--export_tflite").options
    export_model(str(out), model, alphabet, FeatureConfig(), {"run": "first"}, options=options)
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    # The TFLite conversion fails after the new SavedModel is written: the earlier export is as it was, all of it.
    def broken(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(export, "tflite_model", broken)
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_model(str(out), model, alphabet, FeatureConfig(), {"run": "second"}, options=options)
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no half-made folder beside it
    # A name in the metadata is a file inside the export, never a path the next export would remove or open.
    meta = json.loads((out / "dstrain_export.json").read_text())
    meta["tflite_files"] = ["../precious.txt"]
    (out / "dstrain_export.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="tflite_files holds '../precious.txt', not a file name inside the export"):
        read_export_metadata(str(out))


# --- decoding


def test_scorer_is_an_alias_of_scorer_path():
    assert parse(*TRAIN, "--scorer", "lm.scorer").decoder.scorer_path == "lm.scorer"
    assert (
        parse("evaluate", "--test_files", "t", "--model", "m", "--scorer", "lm.scorer").decoder.scorer_path
        == "lm.scorer"
    )
    assert parse("transcribe", "--model", "m", "--audio", "a.wav", "--scorer", "x").decoder.scorer_path == "x"
    assert parse("export", "--export_dir", "e", "--checkpoint_dir", "r", "--scorer", __file__).scorer_path == __file__


def test_transcribe_takes_the_exports_beam_width_unless_given(monkeypatch):
    import dstrain.transcribe as transcribe

    seen = []

    def fake_batch(probs, lengths, alphabet, beam_width, *rest):
        seen.append(beam_width)
        return [[(0.0, "")] for _ in lengths]

    monkeypatch.setattr(transcribe, "ctc_beam_search_decoder_batch", fake_batch)

    class Model:
        alphabet = Alphabet.from_file(ALPHABET)
        features = FeatureConfig()
        metadata = {"beam_width": 77}

    for argv, want in (((), 77), (("--beam_width", "12"), 12)):
        cfg = parse("transcribe", "--model", "m", "--audio", "a.wav", *argv)
        transcribe.Transcriber(Model(), cfg, scorer=None)._decode([np.zeros((4, 30), np.float32)])
        assert seen[-1] == want
    Model.metadata = {}  # an export made before --export_beam_width: DeepSpeech's --beam_width default
    transcribe.Transcriber(Model(), parse("transcribe", "--model", "m", "--audio", "a.wav"), scorer=None)._decode(
        [np.zeros((4, 30), np.float32)]
    )
    assert seen[-1] == 1024 and parse(*TRAIN).decoder.width() == 1024


# --- process


LOG_PLACEMENT = textwrap.dedent("""
    import sys, tensorflow as tf
    from dstrain.distributed import World
    from dstrain.runtime import ProcessConfig, configure_tensorflow
    configure_tensorflow(ProcessConfig(log_placement=sys.argv[1] == "on"), World())
    tf.linalg.matmul(tf.ones([2, 2]), tf.ones([2, 2]))
""")


def test_log_placement_logs_each_ops_device():
    assert parse(*TRAIN, "--log_placement").process.log_placement
    on = subprocess.run(
        [sys.executable, "-c", LOG_PLACEMENT, "on"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0"),
    )
    off = subprocess.run(
        [sys.executable, "-c", LOG_PLACEMENT, "off"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="0"),
    )
    assert on.returncode == off.returncode == 0, on.stderr[-2000:]
    # oneDNN builds name it _MklMatMul
    # TensorFlow's own log of each op's placement is what --log_placement turns on (the flag's product).
    placed = r"Executing op \w*MatMul in device /job:localhost/replica:0/task:0/device:CPU:0"
    assert_says(on.stderr + on.stdout, patterns=(placed,))
    assert_says(off.stderr + off.stdout, lacks=("MatMul in device",))


# --- features


def test_feature_flags_are_preprocessing_parameters():
    cfg = parse(
        "preprocess",
        "--csv",
        "a.csv",
        "--alphabet",
        ALPHABET,
        "--output",
        "o",
        "--audio_sample_rate",
        "8000",
        "--feature_win_len",
        "25",
        "--feature_win_step",
        "10",
    )
    assert cfg.features == FeatureConfig(sample_rate=8000, window_ms=25, step_ms=10)
    assert (cfg.features.window_samples, cfg.features.step_samples, cfg.features.upper_hz) == (200, 80, 4000.0)
    assert parse("preprocess", "--csv", "a.csv", "--alphabet", ALPHABET, "--output", "o").features == FeatureConfig()
    with pytest.raises(
        ValueError,
        match=r"--feature_win_len \(window_ms\) 32.1 ms is not a positive whole number of "
        r"samples at --audio_sample_rate 8000",
    ):
        parse(
            "preprocess",
            "--csv",
            "a.csv",
            "--alphabet",
            ALPHABET,
            "--output",
            "o",
            "--audio_sample_rate",
            "8000",
            "--feature_win_len",
            "32.1",
        )
    # A manifest (or export, run config) written before upper_hz followed the rate still reads as today's features.
    old = {
        "sample_rate": 16000,
        "window_ms": 32.0,
        "step_ms": 20.0,
        "n_mel": 40,
        "lower_hz": 20.0,
        "upper_hz": 8000.0,
        "n_mfcc": 26,
    }
    assert FeatureConfig(**old) == FeatureConfig() and FeatureConfig().to_dict() == old


def test_training_checks_the_stores_feature_parameters():
    cfg = parse(*TRAIN, "--audio_sample_rate", "8000", "--feature_win_len", "32")
    assert cfg.feature_check == ExpectedFeatures(audio_sample_rate=8000, feature_win_len=32)
    cfg.feature_check.check(FeatureConfig(sample_rate=8000), "s")  # matches
    ExpectedFeatures().check(FeatureConfig(sample_rate=8000), "s")  # unset: the store's own
    with pytest.raises(
        ValueError,
        match=r"^--audio_sample_rate 8000: s was preprocessed with --audio_sample_rate 16000; "
        r"preprocess it again with dstrain preprocess --audio_sample_rate 8000",
    ):
        cfg.feature_check.check(FeatureConfig(), "s")
    with pytest.raises(ValueError, match="--feature_win_step 10: s was preprocessed with --feature_win_step 20"):
        ExpectedFeatures(feature_win_step=10).check(FeatureConfig(), "s")
    # A checkpoint of another feature geometry cannot be fine-tuned on these stores.
    from dstrain.rundir import RunInfo
    from dstrain.train.checkpoint import check_geometry

    saved = RunInfo({}, FeatureConfig(), Alphabet.from_file(ALPHABET), 1, ModelConfig(n_hidden=8))
    model = DeepSpeech.for_features(ModelConfig(n_hidden=8), FeatureConfig(sample_rate=8000), 29)
    with pytest.raises(ValueError, match="audio_sample_rate 16000 in the checkpoint, 8000 in the training stores"):
        check_geometry(saved, model, 29, 0, "run")


# --- DeepSpeech 0.6's augmentation flags


def test_deepspeech_06_augmentation_flags_become_augment_specs(store):
    from dstrain.augment.filterbank import parse_augmentations
    from dstrain.loader.builder import TrainInput

    assert parse(*TRAIN).loader.deepspeech06.translate(20.0) == []
    cfg = parse(
        *TRAIN,
        "--augmentation_spec_dropout_keeprate",
        "0.9",
        "--augmentation_sparse_warp",
        "--augmentation_sparse_warp_num_control_points",
        "2",
        "--augmentation_freq_and_time_masking",
        "--augmentation_freq_and_time_masking_freq_mask_range",
        "5",
        "--augmentation_freq_and_time_masking_number_freq_masks",
        "2",
        "--augmentation_freq_and_time_masking_time_mask_range",
        "4",
        "--augmentation_freq_and_time_masking_number_time_masks",
        "1",
        "--augmentation_pitch_and_tempo_scaling",
        "--augmentation_pitch_and_tempo_scaling_min_pitch",
        "0.9",
        "--augmentation_pitch_and_tempo_scaling_max_pitch",
        "1.1",
        "--augmentation_pitch_and_tempo_scaling_max_tempo",
        "1.4",
        "--augmentation_speed_up_std",
        "0.05",
        "--data_aug_features_multiplicative",
        "0.2",
        "--data_aug_features_additive",
        "0.5",
    ).loader
    translated = cfg.deepspeech06.translate(20.0)
    assert [spec for spec, _ in translated] == [
        "dropout[rate=0.1,domain=spectrogram]",
        "warp[nt=2,nf=1,wt=0.1,wf=0.0]",
        "frequency_mask[n=2,size=2~2]",
        "time_mask[n=1,size=40~40]",
        "pitch[pitch=1~0.1]",
        "tempo[factor=1.2~0.2]",
        "tempo[factor=1.05~0.05]",
        "multiply[stddev=0.2,domain=features]",
        "add[stddev=0.5,domain=features]",
    ]
    notes = [note for _, note in translated]
    assert all("\n" not in n and n.startswith("DeepSpeech 0.6's --") and " -> --augment " in n for n in notes)
    assert "--augmentation_speed_up_std 0.05 -> --augment tempo[factor=1.05~0.05] (uniform in 1..1.1" in notes[6]
    assert len(parse_augmentations([spec for spec, _ in translated])) == 9
    # A time mask range in frames follows the stores' frame step.
    assert cfg.deepspeech06.translate(10.0)[3][0] == "time_mask[n=1,size=20~20]"

    data = TrainInput.build((store,), Alphabet.from_file(ALPHABET), cfg, World(), batch_size=2, seed=1, epochs=1)
    names = ["dropout", "warp", "frequency_mask", "time_mask", "pitch", "tempo", "tempo", "multiply", "add"]
    assert [a.name for a in data.augmentations] == names
    # All of them run on the device, in the training step; the loader applies none.
    augment = data.device_augmenter()
    assert [a.name for a in augment.augmentations] == names and data.augmenter is None
    x = np.random.default_rng(0).standard_normal((1, 50, 40)).astype(np.float32)
    y, n = augment(
        x, np.array([50], np.int32), np.array([[1, 2]], np.int32), np.array([2], np.int32), np.array([[0, 0]], np.int64)
    )
    assert y.shape[1] != 50 or not np.array_equal(y.numpy(), x)
    data.close()
    with pytest.raises(ValueError, match="augmentation_spec_dropout_keeprate must be in"):
        parse(*TRAIN, "--augmentation_spec_dropout_keeprate", "0")


# --- fine-tuning a DeepSpeech release


def test_release_fine_tuning_with_normalisation_on_is_an_error(tmp_path):
    from test_deepspeech_import import _save_tf1, _weights

    from dstrain.train.checkpoint import check_release_fine_tuning

    release = tmp_path / "deepspeech-0.9.3-checkpoint"
    release.mkdir()
    _save_tf1(str(release / "best_dev"), _weights())
    cfg = parse(*TRAIN, "--load_checkpoint_dir", str(release), "--save_checkpoint_dir", str(tmp_path / "run"))
    with pytest.raises(
        ValueError, match="is a DeepSpeech release checkpoint, trained on raw MFCCs: pass --nofeature_normalization"
    ):
        check_release_fine_tuning(cfg.checkpoint, cfg.model)
    raw = parse(
        *TRAIN,
        "--load_checkpoint_dir",
        str(release),
        "--save_checkpoint_dir",
        str(tmp_path / "run"),
        "--nofeature_normalization",
    )
    check_release_fine_tuning(raw.checkpoint, raw.model)
    fresh = parse(
        *TRAIN,
        "--load_checkpoint_dir",
        str(release),
        "--save_checkpoint_dir",
        str(tmp_path / "run"),
        "--load_train",
        "init",
    )
    check_release_fine_tuning(fresh.checkpoint, fresh.model)  # nothing is loaded from it
    # Through the command line: one line, before any data is read (the store does not even exist).
    _one_error_line(
        _cli(
            "train",
            "--train_files",
            str(tmp_path / "nostore"),
            "--alphabet_config_path",
            ALPHABET,
            "--load_checkpoint_dir",
            str(release),
            "--save_checkpoint_dir",
            str(tmp_path / "run"),
        ),
        "pass --nofeature_normalization to fine-tune it",
    )


# --- one 2-rank run: what the flags change in training itself


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_track_metrics_files_and_test_and_export_the_best_checkpoint(tmp_path):
    from conftest import final_digests, records
    from test_training import horovodrun, run, train_cmd

    from dstrain.export import read_export_metadata
    from dstrain.rundir import RunDir

    train = synthetic_store(tmp_path / "train", 12, row_group_rows=4, frames=(30, 60), seed=5)
    m1 = synthetic_store(tmp_path / "m1", 5, frames=(30, 60), seed=6)
    m2 = synthetic_store(tmp_path / "m2", 3, frames=(30, 60), seed=7)
    work, export = tmp_path / "run", tmp_path / "export"
    out = run(
        horovodrun()
        + train_cmd(
            train,
            work,
            "--dev_files",
            train,
            "--metrics_files",
            f"{m1},{m2}",
            "--test_files",
            train,
            "--load_evaluate",
            "best",
            "--export_dir",
            str(export),
            "--export_beam_width",
            "33",
            "--beam_width",
            "8",
            "--reverse_dev",
            "--beta1",
            "0.8",
            "--dropout_rate2",
            "0.1",
            epochs=3,
            batch=3,
        )
    )
    assert out.returncode == 0, out.stdout[-4000:]
    digests = final_digests(work)
    assert len(digests) == 2 and digests[0] == digests[1]
    epochs = records(work, "epoch")
    assert [sorted(r["metrics_loss"]) for r in epochs] == [sorted([m1, m2])] * 3
    evals = records(work, "eval")
    metrics = [r for r in evals if r["split"] == "metrics"]
    assert [(r["store"], r["samples"]) for r in metrics] == [(m1, 5), (m2, 3)] * 3
    assert all(r["metrics_loss"][m1] == m["loss"] for r, m in zip(epochs, metrics[::2]))
    # Only the dev loss chooses the best checkpoint.
    dev = [r["dev_loss"] for r in epochs]
    assert [r["best"] for r in epochs] == [d == min(dev[: i + 1]) for i, d in enumerate(dev)]
    assert [r["split"] for r in evals if r["split"] != "metrics"] == ["dev"] * 3 + ["test"]
    # --load_evaluate best: the test set and the export use the best-dev checkpoint, not the final weights.
    best = RunDir(str(work)).best_checkpoint()
    (final,) = records(work, "final")
    assert final["evaluated"] == best and final["test"]["samples"] == 12
    meta = read_export_metadata(str(export))
    assert meta["weights_from"] == best and meta["beam_width"] == 33
    saved = json.load(open(work / "config.json"))["train"]
    assert saved["optim"]["beta1"] == 0.8 and saved["model"]["dropout_rate2"] == 0.1 and saved["loader"]["reverse_dev"]
