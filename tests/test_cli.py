"""The command line is generated from the config dataclasses: defaults, names and the package boundary."""

import dataclasses
import os
import re
import subprocess
import sys
import typing

import pytest
from conftest import assert_says

from dstrain.cli import COMMANDS, build_parser, resolve
from dstrain.config import _default, cli_fields, field_docs, from_args

# DeepSpeech's flag names each subcommand must keep.
DEEPSPEECH_FLAGS = {
    ("train",): [
        "--train_files",
        "--dev_files",
        "--test_files",
        "--alphabet_config_path",
        "--epochs",
        "--learning_rate",
        "--train_batch_size",
        "--dev_batch_size",
        "--test_batch_size",
        "--n_hidden",
        "--dropout_rate",
        "--relu_clip",
        "--checkpoint_dir",
        "--export_dir",
        "--summary_dir",
        "--max_to_keep",
        "--automatic_mixed_precision",
        "--random_seed",
        "--beam_width",
        "--scorer_path",
        "--lm_alpha",
        "--lm_beta",
        "--cutoff_prob",
        "--cutoff_top_n",
        "--report_count",
        "--test_output_file",
        "--inter_op_parallelism_threads",
        "--intra_op_parallelism_threads",
        # issue 21: the rest of DeepSpeech 0.9.3's training flags, and 0.6's augmentation flags
        "--beta1",
        "--beta2",
        "--epsilon",
        "--dropout_rate2",
        "--dropout_rate3",
        "--dropout_rate4",
        "--dropout_rate5",
        "--dropout_rate6",
        "--layer_norm",
        "--reverse_dev",
        "--reverse_test",
        "--load_evaluate",
        "--metrics_files",
        "--export_batch_size",
        "--remove_export",
        "--export_file_name",
        "--export_beam_width",
        "--export_max_ds_version",
        "--log_placement",
        "--scorer",
        "--feature_win_len",
        "--feature_win_step",
        "--audio_sample_rate",
        "--data_aug_features_additive",
        "--data_aug_features_multiplicative",
        "--augmentation_spec_dropout_keeprate",
        "--augmentation_freq_and_time_masking",
        "--augmentation_pitch_and_tempo_scaling",
        "--augmentation_speed_up_std",
        "--augmentation_sparse_warp",
    ],
    ("evaluate",): [
        "--test_files",
        "--checkpoint_dir",
        "--test_batch_size",
        "--scorer_path",
        "--beam_width",
        "--lm_alpha",
        "--lm_beta",
        "--report_count",
        "--test_output_file",
        "--load_evaluate",
        "--reverse_test",
        "--scorer",
    ],
    ("lm-optimize",): [
        "--test_files",
        "--checkpoint_dir",
        "--scorer_path",
        "--n_trials",
        "--lm_alpha_max",
        "--lm_beta_max",
    ],
    ("preprocess",): ["--alphabet_config_path", "--audio_sample_rate", "--feature_win_len", "--feature_win_step"],
    ("export",): [
        "--export_batch_size",
        "--remove_export",
        "--export_file_name",
        "--export_beam_width",
        "--export_max_ds_version",
        "--load_evaluate",
        "--scorer",
    ],
    ("scorer", "build"): [
        "--alphabet",
        "--lm",
        "--vocab",
        "--package",
        "--default_alpha",
        "--default_beta",
        "--force_bytes_output_mode",
    ],
}


def type_of(cls, f):
    """The (possibly nested) config class that declares field ``f``."""
    for klass in [cls] + [t for t in typing.get_type_hints(cls).values() if dataclasses.is_dataclass(t)]:
        if any(g is f for g in dataclasses.fields(klass)):
            return klass
        nested = type_of(klass, f) if klass is not cls else None
        if nested:
            return nested
    return None


def _dummy(f: dataclasses.Field, tp) -> list[str]:
    """Command-line words giving a required field some value of its type."""
    meta = f.metadata.get("dstrain.cli", {})
    value = "1" if tp in (int, float) else "x"
    if meta.get("positional"):
        return ["--", "x"] if meta.get("nargs") == "..." else [value]
    name = (meta.get("names") or (f"--{f.name}",))[0]
    return [name, value] if meta.get("nargs") != "+" else [name, value]


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p))
def test_every_cli_default_is_the_dataclass_default(path):
    cls = resolve(COMMANDS[path].config)
    required: list[str] = []
    positional: list[str] = []
    for f, tp in cli_fields(cls):
        if _default(f) is dataclasses.MISSING:
            words = _dummy(f, tp)
            (positional if f.metadata.get("dstrain.cli", {}).get("positional") else required).extend(words)
    # Optional on their own, required unless --bytes_output_mode: give one so the config validates.
    extra = {
        ("preprocess",): ["--alphabet_config_path", "a.txt"],
        ("train",): ["--alphabet_config_path", "a.txt"],
        ("export",): ["--checkpoint_dir", "run"],
    }.get(path, [])
    args = build_parser().parse_args(list(path) + required + extra + positional)
    checked = 0
    for f, _ in cli_fields(cls):
        default = _default(f)
        if default is dataclasses.MISSING:
            continue
        value = getattr(args, f.name)
        if value is None and f.metadata.get("dstrain.cli", {}).get("append"):
            value = default  # a repeatable flag not given: from_args keeps the default (test_booleans... checks it)
        if f.name in ("alphabet_path", "alphabet_config_path", "checkpoint_dir") and extra:
            continue  # given above
        assert value == default, f"{' '.join(path)} --{f.name}: CLI default {value!r}, dataclass default {default!r}"
        checked += 1
    assert checked or path in {("import", "ldc93s1"), ("transcribe",)}
    # evaluate and lm-optimize need --checkpoint_dir or --model, average --last or --best
    if path not in {("evaluate",), ("lm-optimize",), ("average",)}:
        from_args(cls, args)  # and the parsed namespace builds the config


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p))
def test_help_lists_the_flags(path, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(list(path) + ["--help"])
    text = capsys.readouterr().out
    assert_says(text, *DEEPSPEECH_FLAGS.get(path, []))
    cls = resolve(COMMANDS[path].config)
    for f, _ in cli_fields(cls):  # every field is listed, with its docstring as help
        meta = f.metadata.get("dstrain.cli", {})
        doc = field_docs(type_of(cls, f)).get(f.name, "")
        assert doc, f"{f.name} has no docstring"
        assert_says(text, (meta.get("names") or (f.name,))[0].lstrip("-"))
        assert_says(" ".join(text.split()), " ".join(doc.split()[:3]))


def test_booleans_take_absl_forms():
    p = build_parser()
    base = ["train", "--train_files", "s", "--alphabet_config_path", "a"]
    assert p.parse_args(base).shuffle is True
    assert p.parse_args(base + ["--noshuffle"]).shuffle is False
    assert p.parse_args(base + ["--shuffle=false"]).shuffle is False
    assert p.parse_args(base + ["--automatic_mixed_precision"]).automatic_mixed_precision is True
    assert p.parse_args(base + ["--train_files", "a,b"]).train_files == ("a", "b")
    assert p.parse_args(base + ["--lm_alpha", "0.5"]).lm_alpha == 0.5
    from dstrain.train.trainer import TrainConfig

    assert from_args(TrainConfig, p.parse_args(base)).loader.augment == ()
    specs = ["frequency_mask[p=0.8,n=2,size=4]", "tempo[factor=1~0.1]"]
    cfg = from_args(TrainConfig, p.parse_args(base + ["--augment", specs[0], "--augment", specs[1]]))
    assert cfg.loader.augment == tuple(specs)


def test_only_distributed_touches_horovod_and_mpi():
    root = os.path.join(os.path.dirname(__file__), "..", "dstrain")
    pattern = re.compile(r"import horovod|from horovod|mpi4py")
    users = [
        os.path.relpath(os.path.join(d, f), root)
        for d, _, files in os.walk(root)
        for f in files
        if f.endswith(".py") and pattern.search(open(os.path.join(d, f), encoding="utf-8").read())
    ]
    assert users and all(u.startswith("distributed/") for u in users), users


@pytest.mark.parametrize("name", ["launch", "preprocess"])
def test_script_folders_are_not_python_packages(name, tmp_path):
    # From another folder, so only what is installed in the venv is importable.
    proc = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert_says(proc.stderr, "No module named")
    ok = subprocess.run(
        [sys.executable, "-c", f"import dstrain.{'launch' if name == 'launch' else 'prep'}"], cwd=tmp_path
    )
    assert ok.returncode == 0


def test_config_file_sets_flags_and_the_command_line_wins(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("workers: 4\ngpus: 2\nname: speech\ntrain_args: --epochs 3\n")
    out = subprocess.run(
        [sys.executable, "-m", "dstrain.cli", "k8s", "render", "--config", str(cfg), "--gpus", "1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    import yaml

    job = list(yaml.safe_load_all(out))[-1]
    assert job["metadata"]["name"] == "speech-train" and job["spec"]["slotsPerWorker"] == 1
    assert job["spec"]["mpiReplicaSpecs"]["Worker"]["replicas"] == 4
    bad = tmp_path / "bad.yaml"
    bad.write_text("workers: 4\nwrokers: 2\n")
    proc = subprocess.run(
        [sys.executable, "-m", "dstrain.cli", "k8s", "render", "--config", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert_says(proc.stderr, "bad.yaml: unknown flag 'wrokers'", lacks=("Traceback",))


def _dstrain(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dstrain.cli", *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def test_common_mistakes_give_one_line_errors(tmp_path, alphabet_path):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("wav_filename,wav_filesize,transcript\na.wav,0,ok\nb.wav,0,caf\xe9\n".encode("latin-1"))
    cases = [
        (
            [
                "preprocess",
                "--csv",
                str(tmp_path / "missing.csv"),
                "--alphabet",
                alphabet_path,
                "--output",
                str(tmp_path / "s"),
            ],
            "missing.csv",
        ),
        (
            ["preprocess", "--csv", str(latin1), "--alphabet", alphabet_path, "--output", str(tmp_path / "s2")],
            "latin1.csv line 3: not UTF-8 (byte 0xe9",
        ),
        (["launch", "--hosts", "a:1", "--hostfile", "h", "--", "true"], "--hosts or --hostfile, not both"),
        (["train", "--train_files", str(tmp_path / "nostore"), "--alphabet_config_path", alphabet_path], "nostore"),
        (["shards", "info", str(tmp_path / "nostore")], "not a dstrain feature store"),
    ]
    for argv, expected in cases:
        proc = _dstrain(*argv)
        assert proc.returncode == 2, (argv, proc.stderr[-2000:])
        assert_says(proc.stderr, lacks=("Traceback",), one_error_line=expected)  # (not the INFO log)
    unknown = _dstrain("train", "--train_files", "s", "--n_hiden", "3")
    assert unknown.returncode == 2
    assert_says(unknown.stderr, "unrecognized arguments: --n_hiden")
    debug = _dstrain("shards", "info", str(tmp_path / "nostore"), "--debug")
    assert debug.returncode != 0
    assert_says(debug.stderr, "Traceback")


def test_a_stop_request_that_lands_inside_a_log_line_still_interrupts(monkeypatch):
    """SIGTERM while a log handler writes (dstrain evaluate logs as it decodes): the command is interrupted there;
    logging's ``except Exception`` must not turn it into a "Logging error" traceback and carry on."""
    import io
    import logging
    import signal

    from dstrain import preemption

    monkeypatch.setattr(preemption, "_leave", lambda message, status: None)  # the watchdog must not end pytest
    stop = preemption.StopRequest()
    try:
        stop.interrupt("dstrain evaluate")

        class SignalledStream(io.StringIO):
            def write(self, text: str) -> int:
                os.kill(os.getpid(), signal.SIGTERM)  # os.kill runs the Python handler before it returns
                return super().write(text)

        logger = logging.getLogger("test_stop_inside_a_log_line")
        logger.propagate = False
        handler = logging.StreamHandler(SignalledStream())
        logger.addHandler(handler)
        try:
            with pytest.raises(preemption.Interrupted) as stopped:
                logger.warning("decoding 64 samples")
        finally:
            logger.removeHandler(handler)
        assert stopped.value.status == 128 + signal.SIGTERM
    finally:
        stop.restore()


def test_config_file_values_are_typed_as_on_the_command_line(tmp_path):
    from dstrain.config import config_file_argv
    from dstrain.train.trainer import TrainConfig

    cfg = tmp_path / "job.yaml"
    cfg.write_text("shuffle: false\nepochs: 3\n")
    assert config_file_argv(str(cfg), TrainConfig, []) == ["--shuffle=false", "--epochs", "3"]
    # A quoted "false" would be truthy, an empty value the string "None" (a run in ./None): both refused, by key.
    for text, message in (
        ('shuffle: "false"\n', "shuffle must be true or false (a YAML bool), not 'false'"),
        ("checkpoint_dir:\n", "checkpoint_dir has no value (null)"),
    ):
        cfg.write_text(text)
        with pytest.raises(ValueError, match=re.escape(message)):
            config_file_argv(str(cfg), TrainConfig, [])
