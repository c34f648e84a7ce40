"""Waveform augmentation at preprocessing (dstrain.augment.waveform): each op on generated signals, then stores with
augmented copies: 3x the rows for --augment_copies 2, byte-identical across reruns, workers, MPI ranks and a stop,
rejects of copies counted, and the loader weighting or leaving the copies out, through `dstrain train` too."""

import csv
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile
from conftest import DATA, records, tool
from test_preprocess_scale import interrupt_after_chunks, store_digest

from dstrain.augment.filterbank import parse_augmentations
from dstrain.augment.waveform import AugmentConfig, WaveAugmenter, parse_ops
from dstrain.prep.pipeline import PreprocessConfig, preprocess
from dstrain.store import FeatureStore, ShardReader

SR = 16000
TRANSCRIPT = "she had your dark suit in greasy wash water all year"


def speechlike(seconds: float = 2.0, seed: int = 0) -> np.ndarray:
    """A voiced-speech stand-in: 150 Hz harmonics up to 7 kHz with a 1/k spectrum, syllable-rate amplitude
    modulation, a little noise; peak 0.2."""
    t = np.arange(int(seconds * SR)) / SR
    x = sum(np.sin(2 * np.pi * 150 * k * t + k) / k for k in range(1, 47)) * (0.55 + 0.45 * np.sin(2 * np.pi * 3 * t))
    x = 0.2 * x / np.max(np.abs(x)) + 0.001 * np.random.default_rng(seed).standard_normal(t.size)
    return x.astype(np.float32)


def augment(spec: str, x: np.ndarray, *, row: int = 0, copy: int = 1, copies: int = 1) -> tuple[np.ndarray, list[str]]:
    aug = WaveAugmenter(parse_ops([spec], SR, open_noise=True), copies=copies, seed=1, sample_rate=SR)
    return aug.copy(x, row, copy)


def power_db(x: np.ndarray) -> float:
    return float(10 * np.log10(np.mean(np.square(x, dtype=np.float64))))


def band_power(x: np.ndarray, lo: float, hi: float) -> float:
    """Power between ``lo`` and ``hi`` Hz, Hann-windowed (a rectangular window would leak the strong low harmonics
    into every band)."""
    spectrum = np.abs(np.fft.rfft(x.astype(np.float64) * np.hanning(x.size))) ** 2
    f = np.fft.rfftfreq(x.size, 1 / SR)
    return float(spectrum[(f >= lo) & (f < hi)].sum())


# ------------------------------------------------------------------------------------------------------- the ops


@pytest.mark.parametrize("fmt", ["opus", "mp3"])
def test_codec_round_trip_changes_the_audio_but_keeps_length_level_and_timing(fmt):
    x = speechlike()
    low, applied = augment(f"codec[format={fmt},bitrate=8000]", x)
    high, _ = augment(f"codec[format={fmt},bitrate=64000]", x)
    assert applied == ["codec"]
    for y in (low, high):
        assert y.size == x.size and y.dtype == np.float32
        assert abs(power_db(y) - power_db(x)) < 1.0  # the level is kept
        # Aligned: the decoded signal matches the input best without a shift (MP3's encoder delay is removed).
        lags = range(-40, 41)
        match = [float(np.dot(np.roll(y, -lag)[100:-100], x[100:-100])) for lag in lags]
        assert lags[int(np.argmax(match))] == 0
    error_low, error_high = power_db(low - x), power_db(high - x)
    assert error_low > power_db(x) - 30  # lossy: it really changed the audio
    assert error_low > error_high + 3  # and the bitrate matters


def test_resample_to_8khz_removes_what_lies_above_4khz_and_keeps_the_rest():
    x = speechlike()
    y, _ = augment("resample[rate=8000]", x)
    assert y.size == x.size
    assert band_power(x, 4100, 8000) > 1e-3 * band_power(x, 0, 8000)  # there was something to remove
    assert band_power(y, 4100, 8000) < 1e-5 * band_power(x, 4100, 8000)
    assert abs(10 * np.log10(band_power(y, 100, 3500) / band_power(x, 100, 3500))) < 0.1


def test_speed_perturbation_shortens_and_raises_frequencies_by_the_factor():
    t = np.arange(2 * SR) / SR
    tone = (0.3 * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    y, _ = augment("speed[factor=1.1]", tone)
    assert abs(1 - y.size / tone.size - (1 - 1 / 1.1)) < 1e-3  # ~9.1 % shorter
    core = y[1000:-1000]
    spectrum = np.abs(np.fft.rfft(core * np.hanning(core.size), n=16 * core.size))
    assert abs(np.argmax(spectrum) * SR / (16 * core.size) - 1100) < 1.0
    assert abs(power_db(core) - power_db(tone)) < 0.1
    slow, _ = augment("speed[factor=0.9]", tone)
    assert abs(slow.size - tone.size / 0.9) < 2


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory):
    """Two noise files of other rates and lengths: white noise at 16 kHz, low-passed noise at 8 kHz (FLAC)."""
    d = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(7)
    soundfile.write(str(d / "white.wav"), (0.1 * rng.standard_normal(3 * SR)).astype(np.float32), SR)
    brown = np.cumsum(rng.standard_normal(8000)) * 0.01
    (d / "sub").mkdir()
    soundfile.write(str(d / "sub" / "brown.flac"), (brown - brown.mean()) / 4, 8000)
    (d / "notes.txt").write_text("not audio")
    return d


@pytest.mark.parametrize("snr", [0.0, 10.0, 20.0])
@pytest.mark.parametrize("layers", [1, 2])
def test_overlay_adds_noise_at_the_measured_snr(noise_dir, snr, layers):
    x = speechlike(seconds=4.0)
    y, applied = augment(f"overlay[source={noise_dir},snr={snr},layers={layers}]", x)
    assert applied == ["overlay"] and y.size == x.size
    assert abs(power_db(x) - power_db(y - x) - snr) < 1.0


def test_overlay_noise_from_a_csv_and_errors_naming_the_source(noise_dir, tmp_path):
    listing = tmp_path / "noise.csv"
    listing.write_text(f"wav_filename,wav_filesize,transcript\n{noise_dir / 'white.wav'},0,\n")
    x = speechlike()
    y, _ = augment(f"overlay[source={listing},snr=5]", x)
    assert abs(power_db(x) - power_db(y - x) - 5) < 1.0
    for source, words in [
        (tmp_path / "none", "not a folder"),
        (tmp_path, "no audio files"),
        (tmp_path / "x.csv", "no such CSV"),
    ]:
        with pytest.raises(ValueError, match=words) as e:
            parse_ops([f"overlay[source={source}]"], SR, open_noise=True)
        assert str(source) in str(e.value)


def test_reverb_adds_reflections_at_the_delay_and_a_decaying_tail():
    impulse = np.zeros(SR // 2, np.float32)
    impulse[0] = 0.5
    y, _ = augment("reverb[delay=20,decay=10]", impulse)
    first = int(20 * SR / 1000)  # the shortest comb's delay: 320 samples
    assert np.all(y[1:first] == 0) and y[first] > 0
    assert abs(np.max(np.abs(y)) - 0.5) < 1e-6  # levelled back to the input's peak
    burst = np.zeros(SR // 2, np.float32)
    burst[:1600] = speechlike(0.1)
    wet, _ = augment("reverb[delay=20,decay=10]", burst)
    assert wet.size > burst.size  # the tail is kept, not cut
    energy = lambda a: float(np.sum(np.square(a, dtype=np.float64)))  # noqa: E731
    assert energy(wet[1600:]) > 2e-3 * energy(wet[:1600])  # the silence after the burst became reverberation
    assert power_db(wet[-160:]) < power_db(wet[:1600]) - 50  # and it has decayed at the end


def test_volume_levels_the_peak_as_deepspeech():
    x = speechlike()
    y, _ = augment("volume[dbfs=-6]", x)
    assert abs(20 * np.log10(np.max(np.abs(y))) + 3.0103 - (-6)) < 1e-4


def test_copies_depend_only_on_seed_row_and_copy(noise_dir):
    specs = ["speed[factor=1~0.1]", f"overlay[source={noise_dir},snr=10~5]", "codec[bitrate=6000~2000]", "reverb"]
    aug = WaveAugmenter(parse_ops(specs, SR, open_noise=True), copies=2, seed=3, sample_rate=SR)
    x = speechlike()
    a, applied = aug.copy(x, 5, 1)
    assert applied == ["speed", "overlay", "codec", "reverb"]
    assert np.array_equal(a, aug.copy(x.copy(), 5, 1)[0])
    for other in (
        aug.copy(x, 5, 2)[0],
        aug.copy(x, 6, 1)[0],
        WaveAugmenter(aug.ops, copies=2, seed=4, sample_rate=SR).copy(x, 5, 1)[0],
    ):
        assert a.size != other.size or not np.array_equal(a, other)


def test_ranges_go_from_the_first_copy_to_the_last_and_p_decides_per_copy():
    x = speechlike(1.0)
    sizes = [augment("speed[factor=0.9:1.1]", x, copy=k, copies=3)[0].size for k in (1, 2, 3)]
    assert abs(sizes[0] - x.size / 0.9) < 2 and sizes[1] == x.size and abs(sizes[2] - x.size / 1.1) < 2
    y, applied = augment("reverb[p=0]", x)
    assert applied == [] and np.array_equal(y, x)
    aug = WaveAugmenter(parse_ops(["reverb[p=0.5]"], SR), copies=40, seed=1, sample_rate=SR)
    hits = sum(bool(aug.copy(x[:1000], 0, k)[1]) for k in range(1, 41))
    assert 10 < hits < 30


@pytest.mark.parametrize(
    "spec, words",
    [
        ("frequency_mask[n=2]", ["frequency_mask", "dstrain train --augment"]),
        ("blur", ["unknown augmentation 'blur'", "codec"]),
        ("codec[format=aac]", ["format", "'aac'", "opus or mp3"]),
        ("reverb[decay=0~1]", ["decay", "> 0"]),
        ("speed[factor=0]", ["factor", "> 0"]),
        ("overlay[snr=3]", ["source=FOLDER"]),
        ("resample[rate=x]", ["rate", "'x'", "integer"]),
        ("volume[gain=3]", ["unknown parameter 'gain'", "dbfs"]),
    ],
)
def test_preprocessing_spec_errors_name_the_spec_and_the_fix(spec, words):
    with pytest.raises(ValueError) as e:
        parse_ops([spec], SR)
    assert repr(spec) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


def test_flags_go_together_and_codecs_check_the_rate():
    with pytest.raises(ValueError, match="--augment_copies K"):
        AugmentConfig(augment=("reverb",))
    with pytest.raises(ValueError, match="needs at least one --augment"):
        AugmentConfig(augment_copies=2)
    with pytest.raises(ValueError, match="opus cannot encode 44100 Hz"):
        parse_ops(["codec"], 44100)
    parse_ops(["codec[format=mp3]"], 44100)


@pytest.mark.parametrize(
    "spec",
    [
        "reverb[delay=10]",
        "codec",
        "resample[rate=8000]",
        "speed[factor=1.1]",
        "volume[dbfs=-3]",
        "time_mask[domain=signal]",
    ],
)
def test_training_refuses_waveform_ops_and_says_where_they_go(spec):
    with pytest.raises(ValueError) as e:
        parse_augmentations([spec])
    assert "dstrain preprocess --augment" in str(e.value) and "--augment_copies K" in str(e.value), str(e.value)


# -------------------------------------------------------------------------------------------- stores with copies


def rows_csv(path, n: int, bad: tuple[int, ...] = ()) -> str:
    """``n`` rows of LDC93S1 (each row its own copies: the seed takes the row's position); rows in ``bad`` have a
    character outside the alphabet."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(["wav_filename", "wav_filesize", "transcript"])
        for i in range(n):
            w.writerow([str(DATA / "LDC93S1.wav"), 0, TRANSCRIPT + ("!" if i in bad else "")])
    return str(path)


def augmented_cfg(csv_path: str, out, noise, **kw) -> PreprocessConfig:
    specs = (
        "speed[factor=0.9:1.1]",
        f"overlay[p=0.5,source={noise},snr=10~5]",
        "codec[p=0.5,bitrate=6000:32000]",
        "reverb[p=0.3]",
        "resample[p=0.3,rate=8000~2000]",
    )
    return PreprocessConfig(
        csv_files=(csv_path,),
        alphabet_path=str(DATA / "alphabet.txt"),
        output=str(out),
        chunk_rows=2,
        augmentation=AugmentConfig(augment=specs, augment_copies=2),
        **kw,
    )


@pytest.fixture(scope="module")
def augmented_store(tmp_path_factory, noise_dir):
    tmp = tmp_path_factory.mktemp("aug")
    src = rows_csv(tmp / "rows.csv", 5, bad=(3,))
    preprocess(augmented_cfg(src, tmp / "a", noise_dir), progress=False)
    return tmp, src


def test_augment_copies_2_gives_3x_the_rows_and_the_same_store_again(augmented_store, noise_dir, alphabet_path):
    tmp, src = augmented_store
    m = FeatureStore.open(str(tmp / "a")).manifest
    assert m.utterances == 3 * 4 and m.augmented_utterances == 2 * 4  # 5 rows, 1 rejected, each kept one twice copied
    assert m.rejects == {"count": 1, "by_reason": {"alphabet": 1}}
    a = m.augmentation
    assert a["copies_per_utterance"] == 2 and a["utterances"] == 8 and a["rejects"] == {"count": 0, "by_reason": {}}
    assert (
        a["applied"]["speed"] == 8 and sum(a["applied"].values()) >= 8 and a["noise"] == {str(noise_dir): {"files": 2}}
    )
    # Copies are labelled twice over: shards of their own flagged in the manifest, ids ID-augK.
    store, ids = FeatureStore.open(str(tmp / "a")), {False: [], True: []}
    for i, shard in enumerate(m.shards):
        ids[shard.augmented] += [u.id for u in store.reader(i).utterances()]
    assert sorted(ids[False]) == ["000000000", "000000001", "000000002", "000000004"]
    assert sorted(ids[True]) == sorted(f"{i}-aug{k}" for i in ids[False] for k in (1, 2))
    assert all(("-aug-" in s.path) == s.augmented for s in m.shards)
    copy = next(iter(ShardReader(str(tmp / "a" / next(s.path for s in m.shards if s.augmented)), 40).utterances()))
    assert copy.transcript == TRANSCRIPT and m.get_alphabet().decode(copy.labels) == TRANSCRIPT
    # The features' statistics are the originals': the same as a store made without augmentation.
    plain = preprocess(
        PreprocessConfig(csv_files=(src,), alphabet_path=alphabet_path, output=str(tmp / "plain"), chunk_rows=2),
        progress=False,
    )
    assert m.feature_stats == plain.feature_stats
    # Deterministic: the same command again, and with 2 workers, gives a byte-identical store.
    preprocess(augmented_cfg(src, tmp / "again", noise_dir), progress=False)
    preprocess(augmented_cfg(src, tmp / "workers", noise_dir, workers=2), progress=False)
    assert store_digest(tmp / "a") == store_digest(tmp / "again") == store_digest(tmp / "workers")


def test_copies_that_cannot_be_stored_are_rejected_and_counted(tmp_path, alphabet_path):
    """Speed x3 leaves too few frames for the transcript; x0.5 makes it longer than --max_duration."""
    cfg = PreprocessConfig(
        csv_files=(rows_csv(tmp_path / "r.csv", 1),),
        alphabet_path=alphabet_path,
        output=str(tmp_path / "s"),
        max_duration=3.0,
        augmentation=AugmentConfig(augment=("speed[factor=3:0.5]",), augment_copies=3),
    )
    m = preprocess(cfg, progress=False)
    assert m.utterances == 2 and m.augmented_utterances == 1  # the original and copy 2 (factor 1.75)
    by_reason = {"augmented_too_long": 1, "augmented_too_short": 1}
    assert m.rejects == {"count": 2, "by_reason": by_reason} and m.augmentation["rejects"] == {
        "count": 2,
        "by_reason": by_reason,
    }
    with open(tmp_path / "s" / "_rejects.csv") as f:
        rejected = {r["reason"]: r["detail"] for r in csv.DictReader(f)}
    assert (
        rejected["augmented_too_short"].startswith("copy 1 (speed): ")
        and "needed by CTC" in rejected["augmented_too_short"]
    )
    assert (
        rejected["augmented_too_long"].startswith("copy 3 (speed): ")
        and "--max_duration 3.0" in rejected["augmented_too_long"]
    )


def preprocess_cmd(src: str, noise) -> list[str]:
    return [
        tool("dstrain"),
        "preprocess",
        "--csv",
        src,
        "--alphabet",
        str(DATA / "alphabet.txt"),
        "--chunk_rows",
        "3",
        "--augment",
        "speed[factor=0.9:1.1]",
        "--augment",
        f"overlay[p=0.5,source={noise},snr=10~5]",
        "--augment",
        "codec[p=0.5,format=mp3,bitrate=16000]",
        "--augment",
        "reverb[p=0.3]",
        "--augment_copies",
        "2",
    ]


@pytest.mark.slow
def test_augmented_store_identical_over_mpi_ranks_and_after_a_stop(tmp_path, noise_dir):
    src = rows_csv(tmp_path / "rows.csv", 24, bad=(5,))
    cmd = preprocess_cmd(src, noise_dir)
    reference = subprocess.run(cmd + ["--output", str(tmp_path / "ref")], capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert "of which 46 augmented copies" in reference.stdout
    env = dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    mpi = ["mpirun", "-np", "2", "--oversubscribe", "--bind-to", "none", "-x", "PATH"] + (
        ["--allow-run-as-root"] if os.geteuid() == 0 else []
    )
    ranks = subprocess.run(
        mpi + cmd + ["--output", str(tmp_path / "mpi")], env=env, capture_output=True, text=True, timeout=600
    )
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    status, rest = interrupt_after_chunks(
        cmd + ["--output", str(tmp_path / "stopped"), "--workers", "2"], 2, signal.SIGTERM
    )
    assert status == 75, rest[-3000:]
    again = subprocess.run(
        cmd + ["--output", str(tmp_path / "stopped"), "--workers", "2"], capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0 and "already complete, resuming" in again.stderr, again.stderr[-3000:]
    assert store_digest(tmp_path / "ref") == store_digest(tmp_path / "mpi") == store_digest(tmp_path / "stopped")
    # Other augmentation settings on the unfinished store are refused, as any other change of settings.
    status, _ = interrupt_after_chunks(cmd + ["--output", str(tmp_path / "other")], 1, signal.SIGTERM)
    assert status == 75
    other = subprocess.run(
        cmd[:-1] + ["3", "--output", str(tmp_path / "other")], capture_output=True, text=True, timeout=120
    )
    assert other.returncode != 0 and "other inputs or settings" in other.stderr


# -------------------------------------------------------------------------------------------------- the loader


def _train_input(urls, **loader):
    from dstrain.alphabet import Alphabet
    from dstrain.distributed import World
    from dstrain.loader.builder import TrainInput
    from dstrain.loader.config import LoaderConfig

    return TrainInput.build(
        urls,
        Alphabet.from_file(str(DATA / "alphabet.txt")),
        LoaderConfig(**loader),
        World(),
        batch_size=4,
        seed=3,
        epochs=2,
    )


def _draws(data) -> tuple[int, int]:
    """(draws of originals, draws of copies) in epoch 0's plan, padding left out."""
    plan = data.plan_for(0)
    keys, _ = data.catalog.table.locate(plan.sample_ids[~plan.is_pad])
    copies = sum(data.catalog.refs[k].augmented for k in keys.tolist())
    return len(keys) - copies, copies


def test_augmented_weight_keeps_weighs_or_leaves_out_the_copies(augmented_store, ldc93s1_store):
    from dstrain.distributed import World
    from dstrain.loader.builder import EvalInput
    from dstrain.loader.config import LoaderConfig

    url = str(augmented_store[0] / "a")  # 4 originals, 8 copies
    assert _draws(_train_input([url])) == (4, 8)
    assert _draws(_train_input([url], augmented_weight=0)) == (4, 0)
    # Half as often per copy, the epoch's size kept: 12 draws, 4 x 1.5 originals and 8 x 0.75 copies.
    assert _draws(_train_input([url], augmented_weight=0.5)) == (6, 6)
    # With --train_weights the store's share is split the same way: 13 draws, half to each store.
    mixed = _train_input([url, ldc93s1_store], augmented_weight=0.5, train_weights=(1, 1))
    assert _draws(mixed) == (3 + 7, 3)  # store 1: 3 originals + 3 copies; store 2 (LDC93S1): 7 draws of its one row
    with pytest.raises(ValueError, match="augmented_weight must be"):
        LoaderConfig(augmented_weight=-1)
    dev = EvalInput.build([url], FeatureStore.open(url).manifest.get_alphabet(), LoaderConfig(), World(), batch_size=4)
    assert dev.plan.sample_ids.size == 4 and not any("-aug-" in i for i in dev.ids)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_train_weighs_the_copies_and_evaluates_originals_only(augmented_store, tmp_path):
    url = str(augmented_store[0] / "a")  # 4 originals, 8 copies
    cmd = [
        tool("dstrain"),
        "train",
        "--train_files",
        url,
        "--dev_files",
        url,
        "--alphabet_config_path",
        str(DATA / "alphabet.txt"),
        "--n_hidden",
        "16",
        "--epochs",
        "1",
        "--train_batch_size",
        "1",
        "--dev_batch_size",
        "2",
        "--checkpoint_dir",
        str(tmp_path / "w"),
        "--augmented_weight",
        "0.5",
        "--inter_op_parallelism_threads",
        "1",
        "--intra_op_parallelism_threads",
        "1",
        "--loader_threads",
        "2",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=540)  # one step took 250 s on a busy 2-core CI
    assert out.returncode == 0, out.stderr[-3000:]
    (epoch,) = records(tmp_path / "w", "epoch")
    assert epoch["steps"] == 12  # copies in the epoch (6 draws of them, see above), its size kept
    assert [r["samples"] for r in records(tmp_path / "w", "eval") if r["split"] == "dev"] == [4]
