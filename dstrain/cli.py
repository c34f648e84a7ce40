"""``dstrain <subcommand>``: one entry point, DeepSpeech's flag names where DeepSpeech had the flag.

Each subcommand is a (config class, function) pair in :data:`COMMANDS`; its flags, defaults and help come from the
config dataclass (:mod:`dstrain.config`), so nothing here repeats a default.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    config: str
    """``module:Class`` of the config dataclass."""
    run: str
    """``module:function`` taking that config and returning the exit status."""
    help: str
    cooperates: bool = False
    """On SIGTERM/SIGUSR1 the command reaches a safe point itself and exits 75 (train, preprocess); any other is
    interrupted at once (:mod:`dstrain.preemption`)."""


# Modules are named, not imported, so `dstrain --help` and preprocessing do not pay for TensorFlow.
COMMANDS: dict[tuple[str, ...], Command] = {
    ("import", "ldc93s1"): Command(
        "dstrain.prep.importers.ldc93s1:Ldc93s1ImportConfig",
        "dstrain.prep.importers.ldc93s1:run_ldc93s1",
        "the bundled LDC93S1 sample",
    ),
    ("import", "cv2"): Command(
        "dstrain.prep.importers.cv2:Cv2ImportConfig",
        "dstrain.prep.importers.cv2:run_cv2",
        "a Common Voice release: train/dev/test.tsv + clips/*.mp3 -> clips/*.csv",
    ),
    ("import", "librispeech"): Command(
        "dstrain.prep.importers.librispeech:LibriSpeechImportConfig",
        "dstrain.prep.importers.librispeech:run_librispeech",
        "LibriSpeech subsets (FLAC + *.trans.txt) -> SUBSET.csv",
    ),
    ("import", "csv"): Command(
        "dstrain.prep.importers.csv_import:CsvImportConfig",
        "dstrain.prep.importers.csv_import:run_csv",
        "existing DeepSpeech CSVs: absolute paths, sizes filled in, optional filtering",
    ),
    ("preprocess",): Command(
        "dstrain.prep.pipeline:PreprocessConfig",
        "dstrain.prep.pipeline:run",
        "CSVs -> sharded Parquet feature store",
        cooperates=True,
    ),
    ("shards", "info"): Command(
        "dstrain.store.info:ShardsInfoConfig",
        "dstrain.store.info:run_info",
        "totals per store; verifies every shard's sha256",
    ),
    ("train",): Command(
        "dstrain.train.trainer:TrainConfig",
        "dstrain.train.trainer:run",
        "train (launch with horovodrun/mpirun/srun for several processes)",
        cooperates=True,
    ),
    ("evaluate",): Command(
        "dstrain.evaluate:EvalConfig",
        "dstrain.evaluate:run_evaluate",
        "WER/CER of a checkpoint or export on test stores",
    ),
    ("lm-optimize",): Command(
        "dstrain.evaluate:LmOptimizeConfig",
        "dstrain.evaluate:run_lm_optimize",
        "search lm_alpha/lm_beta on a dev set with optuna",
    ),
    ("average",): Command(
        "dstrain.average:AverageConfig",
        "dstrain.average:run_average",
        "mean of a run's last or best-dev checkpoints -> a checkpoint to evaluate, export, fine-tune",
    ),
    ("export",): Command(
        "dstrain.export:ExportConfig",
        "dstrain.export:run_export",
        "export a run's checkpoint: SavedModel, TFLite, streaming, zip with a scorer",
    ),
    ("report",): Command(
        "dstrain.report:ReportConfig",
        "dstrain.report:run_report",
        "render a run's TensorBoard curves to PNG and one HTML page",
    ),
    ("transcribe",): Command(
        "dstrain.transcribe:TranscribeConfig", "dstrain.transcribe:run", "print the transcript of audio files"
    ),
    ("launch",): Command(
        "dstrain.launch.launcher:LaunchConfig",
        "dstrain.launch.launcher:launch",
        "run a command on N ranks through horovodrun or mpirun (hosts from SLURM or a hostfile)",
    ),
    ("k8s", "render"): Command(
        "dstrain.launch.k8s:K8sConfig",
        "dstrain.launch.k8s:run_render",
        "Kubernetes manifests (MPIJob training, preprocessing Job, shared volume) as YAML",
    ),
    ("scorer", "build"): Command(
        "dstrain.decoder.scorer_build:ScorerBuildConfig",
        "dstrain.decoder.scorer_build:run_build",
        "KenLM binary + vocabulary -> .scorer (DeepSpeech's generate_scorer_package)",
    ),
    ("scorer", "lm"): Command(
        "dstrain.decoder.lm_build:LmConfig",
        "dstrain.decoder.lm_build:run_lm",
        "text corpus -> KenLM binary model and vocabulary (DeepSpeech's generate_lm.py)",
    ),
}

GROUPS = {
    "import": "turn a corpus into DeepSpeech CSVs",
    "shards": "inspect feature stores",
    "k8s": "Kubernetes manifests for training and preprocessing",
    "scorer": "language models and DeepSpeech .scorer packages",
}


def resolve(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser(only: tuple[str, ...] | None = None) -> argparse.ArgumentParser:
    """The whole command line, or with ``only``, just that subcommand's flags (the others are listed but their
    modules are not imported: `dstrain preprocess` never loads TensorFlow)."""
    from dstrain.config import add_arguments

    parser = argparse.ArgumentParser(
        prog="dstrain", description="Distributed DeepSpeech-style speech recognition training."
    )
    sub = parser.add_subparsers(dest="_subcommand", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for path, cmd in COMMANDS.items():
        if len(path) == 1:
            p = sub.add_parser(path[0], help=cmd.help, description=cmd.help)
        else:
            if path[0] not in groups:
                g = sub.add_parser(path[0], help=GROUPS[path[0]])
                groups[path[0]] = g.add_subparsers(dest=f"{path[0]}_command", required=True)
            p = groups[path[0]].add_parser(path[1], help=cmd.help, description=cmd.help)
        p.set_defaults(_command=path)
        p.add_argument(
            "--config", metavar="FILE.yaml", help="read flags from a YAML file; flags on the command line win"
        )
        p.add_argument("--debug", action="store_true", help="show the traceback of an error")
        if only is None or only == path:
            add_arguments(p, resolve(cmd.config))
    return parser


def run(args: argparse.Namespace) -> int:
    from dstrain.config import from_args

    cmd = COMMANDS[args._command]
    return resolve(cmd.run)(from_args(resolve(cmd.config), args))


def _console_logging() -> None:
    logger = logging.getLogger("dstrain")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    from dstrain import preemption

    stop = preemption.install()  # before TensorFlow loads: a preemption signal during start-up is recorded, not fatal
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = sys.argv[1:] if argv is None else argv
    words = [a for a in argv[:2] if not a.startswith("-")]
    chosen = next((p for p in COMMANDS if tuple(words[: len(p)]) == p), None)
    debug = "--debug" in argv
    try:
        if chosen is not None and any(a == "--config" or a.startswith("--config=") for a in argv):
            argv = _with_config_file(argv, chosen)
        args = build_parser(chosen).parse_args(argv)
        _console_logging()
        if not COMMANDS[args._command].cooperates:
            stop.interrupt(f"dstrain {' '.join(args._command)}")
        sys.exit(run(args))
    except preemption.Interrupted as e:
        print(f"dstrain {' '.join(chosen or ())}: {e}", file=sys.stderr)
        sys.exit(e.status)
    except (ValueError, FileNotFoundError, MemoryError, UnicodeDecodeError) as e:
        # User mistakes (files, flags, combinations, data): one line naming the culprit; --debug shows where.
        if debug:
            raise
        print(f"dstrain {' '.join(chosen or ())}: error: {e}".replace(" :", ":"), file=sys.stderr)
        sys.exit(2)


def _with_config_file(argv: list[str], path: tuple[str, ...]) -> list[str]:
    from dstrain.config import config_file_argv

    i = next(i for i, a in enumerate(argv) if a == "--config" or a.startswith("--config="))
    file = argv[i].split("=", 1)[1] if "=" in argv[i] else argv[i + 1]
    rest = argv[:i] + argv[i + (1 if "=" in argv[i] else 2) :]
    n = len(path)
    return rest[:n] + config_file_argv(file, resolve(COMMANDS[path].config), rest[n:]) + rest[n:]


if __name__ == "__main__":
    main()
