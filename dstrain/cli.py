"""``dstrain <subcommand>``: one entry point, DeepSpeech's flag names where DeepSpeech had the flag."""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def _files(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.split(",") if v)


def _flag(p: argparse.ArgumentParser, name: str, default: bool, help: str) -> None:
    """absl-style boolean: --name, --noname, --name=false."""
    p.add_argument(f"--{name}", type=_bool, nargs="?", const=True, default=default, help=help)
    p.add_argument(f"--no{name}", dest=name, action="store_false", help=argparse.SUPPRESS)


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="turn a corpus into DeepSpeech CSVs")
    which = p.add_subparsers(dest="corpus", required=True)
    ldc = which.add_parser("ldc93s1", help="the bundled LDC93S1 sample")
    ldc.add_argument("target_dir")
    cv = which.add_parser("cv2", help="a Common Voice release: train/dev/test.tsv + clips/*.mp3 -> clips/*.csv")
    cv.add_argument("language_dir", help="the extracted language folder (holds clips/ and the .tsv files)")
    cv.add_argument("--filter_alphabet", help="refuse sentences with characters outside this alphabet")
    cv.add_argument("--wav", action="store_true", help="also convert clips to 16 kHz WAV and reference those")
    cv.add_argument("--normalize", action="store_true", help="NFKD-normalise sentences and keep ASCII only")
    libri = which.add_parser("librispeech", help="LibriSpeech subsets (FLAC + *.trans.txt) -> SUBSET.csv")
    libri.add_argument("root", help="folder holding the subsets (or one subset folder)")
    libri.add_argument("--output_dir", help="where the CSVs go (default: ROOT)")
    dcsv = which.add_parser("csv", help="existing DeepSpeech CSVs: absolute paths, sizes filled in, optional filtering")
    dcsv.add_argument("csv_files", type=_files, help="CSV file(s), comma-separated")
    dcsv.add_argument("--output_dir", required=True)
    dcsv.add_argument("--filter_alphabet", help="refuse transcripts with characters outside this alphabet")
    dcsv.add_argument("--normalize", action="store_true", help="apply the English label normalisation")


def _add_preprocess(sub) -> None:
    p = sub.add_parser("preprocess", help="CSVs -> sharded Parquet feature store")
    p.add_argument("--csv", required=True, type=_files, help="DeepSpeech CSV file(s), comma-separated")
    p.add_argument("--alphabet", "--alphabet_config_path", dest="alphabet", required=True, help="alphabet.txt")
    p.add_argument("--output", required=True, help="store location: path or fsspec URL (memory://, s3://, ...)")
    p.add_argument("--shard_size_mb", type=float, default=256.0, help="target shard size in MiB (default 256)")
    p.add_argument("--feature_dtype", choices=("float32", "float16"), default="float32", help="stored feature precision")
    p.add_argument("--max_duration", type=float, default=0.0, help="reject longer samples, in seconds; 0 means no limit")
    p.add_argument("--workers", type=int, default=1, help="processes on this node (default 1); across nodes use mpirun")
    p.add_argument("--chunk_rows", type=int, default=2000, help="input rows per unit of work (default 2000)")
    p.add_argument("--overwrite", action="store_true", help="rebuild a store that is already complete")


def _add_shards(sub) -> None:
    p = sub.add_parser("shards", help="inspect feature stores")
    which = p.add_subparsers(dest="shards_command", required=True)
    info = which.add_parser("info", help="totals per store; verifies every shard's sha256")
    info.add_argument("stores", nargs="+", help="store path(s) or URL(s)")
    info.add_argument("--no_verify", action="store_true", help="skip reading the shards to check their checksums")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train (launch with horovodrun/mpirun for several processes)")
    p.add_argument("--train_files", type=_files, required=True, help="feature store(s), comma-separated")
    p.add_argument("--dev_files", type=_files, default=(), help="dev feature store(s): dev loss each epoch, best checkpoint")
    p.add_argument("--test_files", type=_files, default=(), help="test feature store(s): WER/CER after training")
    p.add_argument("--alphabet_config_path", required=True, help="alphabet.txt the stores were preprocessed with")
    p.add_argument("--epochs", type=int, default=75, help="total epochs; a resumed run continues to this count")
    p.add_argument("--learning_rate", type=float, default=0.001, help="Adam learning rate per worker")
    _flag(p, "scale_lr", True, "multiply the learning rate by the number of workers (default true)")
    p.add_argument("--train_batch_size", type=int, default=1, help="utterances per step per worker")
    p.add_argument("--dev_batch_size", type=int, default=1)
    p.add_argument("--test_batch_size", type=int, default=1)
    p.add_argument("--n_hidden", type=int, default=2048, help="layer width")
    p.add_argument("--n_context", type=int, default=9, help="context frames each side")
    p.add_argument("--relu_clip", type=float, default=20.0)
    p.add_argument("--dropout_rate", type=float, default=0.05)
    p.add_argument("--checkpoint_dir", default="", help="save and resume here (rank 0 writes)")
    p.add_argument("--max_to_keep", type=int, default=5, help="epoch checkpoints kept")
    p.add_argument("--export_dir", default="", help="export the trained model here (rank 0 writes)")
    p.add_argument("--summary_dir", default="", help="TensorBoard summaries (default CHECKPOINT_DIR/summaries)")
    _flag(p, "automatic_mixed_precision", False, "float16 compute with loss scaling (GPUs)")
    _flag(p, "shuffle", True, "shuffle training samples each epoch")
    p.add_argument("--random_seed", type=int, default=4568)
    p.add_argument("--report_count", type=int, default=5, help="test transcripts to print")
    _decoder_flags(p)
    p.add_argument("--inter_op_parallelism_threads", type=int, default=0, help="0 means TensorFlow's choice")
    p.add_argument("--intra_op_parallelism_threads", type=int, default=0, help="0 means TensorFlow's choice")


def _add_launch(sub) -> None:
    p = sub.add_parser("launch", help="run a command on N ranks through horovodrun or mpirun (hosts from SLURM or a hostfile)")
    p.add_argument("--launcher", choices=("horovodrun", "mpirun"), default="horovodrun")
    p.add_argument("--np", type=int, default=0, help="processes in all; 0 means one per host slot")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--hosts", help="h1:4,h2:4 (default: the SLURM allocation, else localhost:NP)")
    where.add_argument("--hostfile", help="MPI (host slots=N) or Horovod (host:N) hostfile")
    p.add_argument("--controller", choices=("gloo", "mpi"), default="gloo", help="horovodrun's controller")
    p.add_argument("--log_dir", default="", help="per-rank stdout/stderr files here")
    p.add_argument("--threads_per_rank", type=int, default=0, help="0: cores per node / ranks per node")
    p.add_argument("--dry_run", action="store_true", help="print the command, do not run it")
    p.add_argument("rank_command", nargs=argparse.REMAINDER, help="-- then the per-rank command")


def _add_k8s(sub) -> None:
    p = sub.add_parser("k8s", help="Kubernetes manifests: MPIJob training, preprocessing Job, shared volume")
    which = p.add_subparsers(dest="k8s_command", required=True)
    r = which.add_parser("render", help="print the manifests as YAML (kubectl apply -f -)")
    r.add_argument("--name", default="dstrain")
    r.add_argument("--workers", type=int, default=2, help="worker pods (nodes)")
    r.add_argument("--gpus", type=int, default=8, help="GPUs per worker (= ranks per worker)")
    r.add_argument("--image", default="dstrain:latest", help="image built from k8s/Dockerfile")
    r.add_argument("--data", default="/data", help="mount path of the shared ReadWriteMany volume")
    r.add_argument("--volume_size", default="1Ti")
    r.add_argument("--storage_class", default="", help="ReadWriteMany storage class; empty: cluster default")
    r.add_argument("--cpus", type=int, default=64, help="CPUs per worker")
    r.add_argument("--memory", default="480Gi", help="memory per worker")
    r.add_argument("--shm_size", default="16Gi", help="/dev/shm per worker (NCCL)")
    r.add_argument("--preprocess_csv", default="", help="also render a preprocessing Job for these CSV(s)")
    r.add_argument("--train_args", default="", help="extra dstrain train flags, one string")


def _add_scorer(sub) -> None:
    p = sub.add_parser("scorer", help="language models and DeepSpeech .scorer packages")
    which = p.add_subparsers(dest="scorer_command", required=True)
    b = which.add_parser("build", help="KenLM binary + vocabulary -> .scorer (DeepSpeech's generate_scorer_package)")
    b.add_argument("--alphabet", help="alphabet.txt (not needed with --force_bytes_output_mode)")
    b.add_argument("--lm", required=True, help="KenLM binary model (dstrain scorer lm writes one)")
    b.add_argument("--vocab", required=True, help="words separated by whitespace")
    b.add_argument("--package", required=True, help="the .scorer to write")
    b.add_argument("--default_alpha", type=float, required=True)
    b.add_argument("--default_beta", type=float, required=True)
    b.add_argument("--force_bytes_output_mode", action="store_true", help="UTF-8 bytes trie instead of the alphabet")
    lm = which.add_parser("lm", help="text corpus -> KenLM binary model and vocabulary (DeepSpeech's generate_lm.py)")
    lm.add_argument("--text", required=True, help="one normalised sentence per line")
    lm.add_argument("--output_dir", required=True)
    lm.add_argument("--order", type=int, default=5)
    lm.add_argument("--top_k", type=int, default=500000, help="vocabulary size")
    lm.add_argument("--prune", type=int, nargs="*", default=[0, 0, 1], help="lmplz pruning thresholds per order")


def _decoder_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scorer_path", default="", help="DeepSpeech .scorer package; empty decodes without one")
    p.add_argument("--lm_alpha", type=float, default=None, help="language model weight (default: the package's)")
    p.add_argument("--lm_beta", type=float, default=None, help="word insertion bonus (default: the package's)")
    p.add_argument("--beam_width", type=int, default=1024)
    p.add_argument("--cutoff_prob", type=float, default=1.0, help="1.0 means no cumulative-probability pruning")
    p.add_argument("--cutoff_top_n", type=int, default=300)


def _decoder_config(args: argparse.Namespace):
    """The DecoderConfig of the flags _decoder_flags adds (train, evaluate, lm-optimize)."""
    from dstrain.evaluate import DecoderConfig

    return DecoderConfig(args.beam_width, args.scorer_path, args.lm_alpha, args.lm_beta, args.cutoff_prob, args.cutoff_top_n)


def _add_evaluate(sub) -> None:
    for name, help_ in (("evaluate", "WER/CER of a checkpoint or export on test stores"),
                        ("lm-optimize", "search lm_alpha/lm_beta on a dev set with optuna")):  # fmt: skip
        p = sub.add_parser(name, help=help_)
        p.add_argument("--test_files", type=_files, required=True, help="feature store(s), comma-separated")
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint_dir", help="a training run's checkpoints (best dev, else latest)")
        src.add_argument("--model", help="an export directory")
        p.add_argument("--test_batch_size", type=int, default=8)
        _decoder_flags(p)
        if name == "evaluate":
            p.add_argument("--report_count", type=int, default=5, help="best/median/worst samples to print")
            p.add_argument("--test_output_file", default="", help="per-sample results as JSON")
        else:
            p.add_argument("--n_trials", type=int, default=2400)
            p.add_argument("--lm_alpha_max", type=float, default=5.0)
            p.add_argument("--lm_beta_max", type=float, default=5.0)


def _add_transcribe(sub) -> None:
    p = sub.add_parser("transcribe", help="print the transcript of audio files")
    p.add_argument("--model", required=True, help="export directory (dstrain train --export_dir)")
    p.add_argument("--audio", required=True, nargs="+", help="audio file(s): WAV, FLAC, MP3; any rate")


def _import(args: argparse.Namespace) -> int:
    if args.corpus == "ldc93s1":
        from preprocess.importers.ldc93s1 import import_ldc93s1

        print(import_ldc93s1(args.target_dir))
        return 0
    if args.corpus == "cv2":
        from preprocess.importers.cv2 import import_cv2

        report = import_cv2(args.language_dir, args.filter_alphabet, wav=args.wav, ascii_only=args.normalize)
    elif args.corpus == "librispeech":
        from preprocess.importers.librispeech import import_librispeech

        report = import_librispeech(args.root, args.output_dir)
    else:
        from preprocess.importers.csv_import import import_csv

        report = import_csv(args.csv_files, args.output_dir, args.filter_alphabet, normalise=args.normalize)
    print(report.summary())
    return 0


def _scorer(args: argparse.Namespace) -> int:
    if args.scorer_command == "lm":
        from dstrain.decoder.lm_build import LmConfig, build_lm

        binary, vocab = build_lm(LmConfig(args.text, args.output_dir, args.order, args.top_k, tuple(args.prune)))
        print(f"{binary}\n{vocab}")
        return 0
    from dstrain.alphabet import Alphabet
    from dstrain.decoder.scorer_build import build_package

    alphabet = Alphabet.from_file(args.alphabet) if args.alphabet else None
    report = build_package(args.lm, args.vocab, args.package, alphabet, args.default_alpha, args.default_beta, args.force_bytes_output_mode)
    print(f"{args.package}: {report.words} words, trie of {report.states} states and {report.arcs} arcs")
    if report.skipped:
        print(f"{len(report.skipped)} word(s) skipped, characters outside the alphabet: {' '.join(report.skipped[:20])}"
              + (" ..." if len(report.skipped) > 20 else ""))
    return 0


def _shards_info(stores: list[str], verify_checksums: bool) -> int:
    from dstrain.store import read_manifest, verify

    bad = 0
    for store in stores:
        m = read_manifest(store)
        fc = m.feature_config()
        print(f"{store}")
        print(f"  utterances {m.utterances}, hours {m.hours:.3f}, shards {len(m.shards)}, "
              f"bytes {sum(s.bytes for s in m.shards)}, frames {sum(s.frames for s in m.shards)}")
        print(f"  features: {m.stored} {m.feature_dtype}, {fc.n_mel} mel -> {fc.n_mfcc} MFCC, "
              f"{fc.sample_rate} Hz, window {fc.window_ms} ms, step {fc.step_ms} ms")
        print(f"  alphabet: {len(m.alphabet)} labels, sha256 {m.alphabet_sha256[:16]}…")
        rejects = m.rejects.get("by_reason", {})
        print(f"  rejected at preprocessing: {m.rejects.get('count', 0)}" + "".join(f", {n} {r}" for r, n in rejects.items()))
        if verify_checksums:
            problems = verify(store, m)
            bad += len(problems)
            print("  checksums: " + ("all shards OK" if not problems else f"{len(problems)} problem(s)"))
            for p in problems:
                print(f"    {p}")
    return 1 if bad else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dstrain", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_import(sub)
    _add_preprocess(sub)
    _add_shards(sub)
    _add_train(sub)
    _add_launch(sub)
    _add_k8s(sub)
    _add_scorer(sub)
    _add_evaluate(sub)
    _add_transcribe(sub)
    return parser


def run(args: argparse.Namespace) -> int:
    if args.command == "import":
        return _import(args)
    if args.command == "preprocess":
        from preprocess.pipeline import PreprocessConfig, preprocess

        cfg = PreprocessConfig(
            csv_files=args.csv,
            alphabet_path=args.alphabet,
            output=args.output,
            shard_size_mb=args.shard_size_mb,
            feature_dtype=args.feature_dtype,
            max_duration=args.max_duration,
            workers=args.workers,
            chunk_rows=args.chunk_rows,
            overwrite=args.overwrite,
        )
        m = preprocess(cfg, progress=sys.stderr.isatty())
        if m is None:  # an MPI rank other than 0: rank 0 reports
            return 0
        print(f"{m.utterances} utterances ({m.hours * 3600:.1f} s) in {len(m.shards)} shard(s) at {args.output}")
        rejected = m.rejects.get("count", 0)
        print(f"{rejected} rejected" + "".join(f", {n} {r}" for r, n in m.rejects.get("by_reason", {}).items())
              + (f" (see {os.path.join(args.output, 'rejects.csv')})" if rejected else ""))
        return 0
    if args.command == "launch":
        from launch.launcher import LaunchConfig, hosts_from_hostfile, hosts_from_slurm, launch, parse_hosts

        if args.hosts:
            hosts = parse_hosts(args.hosts)
        elif args.hostfile:
            hosts = hosts_from_hostfile(args.hostfile)
        elif "SLURM_JOB_NODELIST" in os.environ and not args.np:
            hosts = hosts_from_slurm(dict(os.environ))
        else:
            hosts = ()
        command = args.rank_command[1:] if args.rank_command[:1] == ["--"] else args.rank_command
        cfg = LaunchConfig(
            command=tuple(command), launcher=args.launcher, np=args.np, hosts=hosts, controller=args.controller,
            log_dir=args.log_dir, threads_per_rank=args.threads_per_rank,
        )  # fmt: skip
        return launch(cfg, dry_run=args.dry_run)
    if args.command == "k8s":
        import shlex

        from launch.k8s import K8sConfig, render, to_yaml

        fields = {k: getattr(args, k) for k in ("name", "workers", "gpus", "image", "data", "volume_size", "storage_class", "cpus", "memory", "shm_size", "preprocess_csv")}
        if args.train_args:
            fields["train_args"] = tuple(shlex.split(args.train_args))
        print(to_yaml(render(K8sConfig(**fields))), end="")
        return 0
    if args.command in ("evaluate", "lm-optimize"):
        from dstrain.evaluate import EvalConfig, evaluate, optimize_lm

        dec = _decoder_config(args)
        cfg = EvalConfig(
            test_files=args.test_files, checkpoint_dir=args.checkpoint_dir or "", model=args.model or "",
            test_batch_size=args.test_batch_size, decoder=dec,
            report_count=getattr(args, "report_count", 5), test_output_file=getattr(args, "test_output_file", ""),
        )  # fmt: skip
        if args.command == "evaluate":
            evaluate(cfg)
        else:
            alpha, beta, wer = optimize_lm(cfg, args.n_trials, args.lm_alpha_max, args.lm_beta_max)
            print(f"Best params: lm_alpha={alpha:.6f} and lm_beta={beta:.6f} with WER={wer:.6f}")
        return 0
    if args.command == "scorer":
        return _scorer(args)
    if args.command == "shards":
        return _shards_info(args.stores, verify_checksums=not args.no_verify)
    if args.command == "train":
        from dstrain.model import ModelConfig
        from dstrain.train import Preempted, TrainConfig, train

        cfg = TrainConfig(
            train_files=args.train_files,
            dev_files=args.dev_files,
            test_files=args.test_files,
            alphabet_config_path=args.alphabet_config_path,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            scale_lr=args.scale_lr,
            train_batch_size=args.train_batch_size,
            dev_batch_size=args.dev_batch_size,
            test_batch_size=args.test_batch_size,
            checkpoint_dir=args.checkpoint_dir,
            max_to_keep=args.max_to_keep,
            export_dir=args.export_dir,
            summary_dir=args.summary_dir,
            automatic_mixed_precision=args.automatic_mixed_precision,
            random_seed=args.random_seed,
            shuffle=args.shuffle,
            report_count=args.report_count,
            inter_op_parallelism_threads=args.inter_op_parallelism_threads,
            intra_op_parallelism_threads=args.intra_op_parallelism_threads,
            model=ModelConfig(
                n_hidden=args.n_hidden, n_context=args.n_context, relu_clip=args.relu_clip, dropout_rate=args.dropout_rate
            ),
            decoder=_decoder_config(args),
        )
        try:
            train(cfg)
        except Preempted as e:
            return e.exit_code
        return 0
    if args.command == "transcribe":
        from dstrain.export import load_model
        from dstrain.transcribe import transcribe

        model = load_model(args.model)
        for path in args.audio:
            text = transcribe(model, path)
            print(text if len(args.audio) == 1 else f"{path}: {text}")
        return 0
    raise AssertionError(args.command)


def _console_logging() -> None:
    logger = logging.getLogger("dstrain")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    args = build_parser().parse_args(argv)
    _console_logging()
    try:
        sys.exit(run(args))
    except (ValueError, FileNotFoundError) as e:
        # Configuration errors: one clear line, no traceback (bad samples never get here).
        print(f"dstrain {args.command}: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
