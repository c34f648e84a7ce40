import os
import re

import numpy as np
import pytest
from conftest import assert_says

pytest.importorskip("matplotlib")
tf = pytest.importorskip("tensorflow")

from dstrain.report import NoEventFilesError, find_event_files, render_report  # noqa: E402

STEPS = 50


def f32(x: float) -> float:
    """What a float32 summary hands back."""
    return float(np.float32(x))


def train_loss(step: int) -> float:
    return 10.0 - 0.125 * step  # decreasing, exact in float32


def dev_wer(step: int) -> float:
    return [0.5, 0.375, 0.25, 0.3125, 0.28125][step // 10 - 1]  # best (0.25) is not the last


def write_run(summary_dir: str) -> None:
    writer = tf.summary.create_file_writer(summary_dir)
    with writer.as_default():
        for step in range(1, STEPS + 1):
            tf.summary.scalar("loss/train", train_loss(step), step=step)
            tf.summary.scalar("learning_rate", 1e-3 * 0.5 ** (step // 10), step=step)
            tf.summary.scalar("throughput/frames_per_s", 1000.0 + 10 * (step % 7), step=step)
            tf.summary.scalar("loader/wait_s", 0.01 * (step % 5), step=step)
            tf.summary.histogram("weights", np.linspace(0, 1, 10) * step, step=step)  # not a scalar: ignored
            if step % 10 == 0:
                tf.summary.scalar("loss/dev", 12.0 - 0.2 * step, step=step)
                tf.summary.scalar("wer/dev", dev_wer(step), step=step)
                tf.summary.scalar("cer/dev", dev_wer(step) / 2, step=step)
    writer.close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("run")
    write_run(str(root / "summaries"))  # like CHECKPOINT_DIR/summaries
    return str(root)


@pytest.fixture(scope="module")
def report(run_dir):
    return render_report(run_dir)


def read_png(path: str) -> np.ndarray:
    import matplotlib.image

    return matplotlib.image.imread(path)


def row(page: str, tag: str) -> str:
    m = re.search(rf'<tr data-tag="{re.escape(tag)}">(.*?)</tr>', page)
    assert m, f"no table row for {tag}"
    return m.group(1)


def cell(row_html: str, cls: str) -> tuple[float, str]:
    m = re.search(rf'<td class="{cls}" data-value="([^"]+)"[^>]*>([^<(]+)', row_html)
    assert m, f"no {cls} cell in {row_html}"
    return float(m.group(1)), m.group(2).strip()


def test_writes_panels_overview_and_index(run_dir, report):
    assert report.output_dir == os.path.join(run_dir, "report")
    assert set(report.panel_pngs) == {"losses", "error_rates", "learning_rate", "throughput"}
    for path in [report.overview_png, *report.panel_pngs.values(), report.index_html]:
        assert os.path.isfile(path) and os.path.getsize(path) > 0
    assert set(report.series) == {
        "loss/train",
        "loss/dev",
        "wer/dev",
        "cer/dev",
        "learning_rate",
        "throughput/frames_per_s",
        "loader/wait_s",
    }
    assert list(report.series["loss/train"].steps) == list(range(1, STEPS + 1))


def test_pngs_have_the_fixed_size_and_are_not_blank(report):
    sizes = {name: read_png(path).shape for name, path in report.panel_pngs.items()}
    for name, shape in sizes.items():
        assert shape[:2] == (450, 800), name  # 8 x 4.5 in at 100 dpi
    overview = read_png(report.overview_png)
    assert overview.shape[:2] == (700, 1200)  # 4 panels: 2 x 2 cells of 6 x 3.5 in
    for path in [report.overview_png, *report.panel_pngs.values()]:
        rgb = read_png(path)[..., :3]
        assert rgb.std() > 0.02, path
        colours = np.unique((rgb.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0)
        assert len(colours) > 10, path  # lines, text and grid on the white background
        # Something is drawn besides white in every quarter of the image's width.
        dark = (rgb.mean(axis=2) < 0.9).mean(axis=0)
        for quarter in np.array_split(dark, 4):
            assert quarter.sum() > 0, path


def test_html_references_every_png_and_works_offline(report):
    page = open(report.index_html, encoding="utf-8").read()
    names = ["overview.png"] + [os.path.basename(p) for p in report.panel_pngs.values()]
    for name in names:
        assert f'<img src="{name}"' in page
        assert os.path.exists(os.path.join(report.output_dir, name))
    # Nothing fetched from elsewhere: no scripts, stylesheets or absolute URLs.
    assert "<script" not in page and "<link" not in page
    assert not re.search(r'(src|href)="(https?:)?//', page)


def test_table_has_last_and_best_values(report):
    page = open(report.index_html, encoding="utf-8").read()
    loss = row(page, "loss/train")
    assert cell(loss, "last") == (f32(train_loss(STEPS)), "3.75")
    assert cell(loss, "best") == (f32(train_loss(STEPS)), "3.75")  # decreasing: best is last
    assert cell(loss, "max") == (f32(train_loss(1)), "9.875")
    wer = row(page, "wer/dev")
    assert cell(wer, "last") == (f32(dev_wer(50)), "0.28125")
    assert cell(wer, "best") == (f32(0.25), "0.25")
    assert 'data-step="30"' in wer
    assert cell(row(page, "loss/dev"), "last")[0] == f32(12.0 - 0.2 * 50)
    assert cell(row(page, "throughput/frames_per_s"), "best")[0] == f32(1060.0)  # higher is better
    lr = row(page, "learning_rate")
    assert cell(lr, "last")[0] == f32(1e-3 * 0.5**5)
    assert 'class="best">&mdash;' in lr  # a setting, not a score
    for series in report.series.values():
        assert cell(row(page, series.label), "last")[0] == series.last


def test_report_leaves_tensorboard_data_alone(run_dir, report):
    from tensorboard.backend.event_processing import event_accumulator as ea

    assert not [f for f in os.listdir(report.output_dir) if "tfevents" in f]
    assert find_event_files(run_dir) == report.event_files
    assert len(report.event_files) == 1
    # Rendering again (the report folder now inside the run) gives the same result.
    again = render_report(run_dir)
    assert set(again.series) == set(report.series)
    acc = ea.EventAccumulator(os.path.dirname(report.event_files[0]))
    acc.Reload()
    assert "loss/train" in acc.Tags()[ea.TENSORS]


def test_other_tags_runs_and_embedding(tmp_path):
    for run, offset in (("train", 0.0), ("eval", 1.0)):
        writer = tf.summary.create_file_writer(str(tmp_path / "logs" / run))
        with writer.as_default():
            for step in range(5):
                tf.summary.scalar("loss", 4.0 - step + offset, step=step)
                tf.summary.scalar("custom/gpu_mem_gb", float("nan") if step == 2 else step * 1.5, step=step)
        writer.close()
    out = tmp_path / "out"
    result = render_report(str(tmp_path), str(out), embed=True)
    assert set(result.series) == {
        "logs/train/loss",
        "logs/eval/loss",
        "logs/train/custom/gpu_mem_gb",
        "logs/eval/custom/gpu_mem_gb",
    }
    assert set(result.panel_pngs) == {"losses", "other_custom"}
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 3
    for name in ["overview.png", "losses.png", "other_custom.png"]:
        assert f'href="{name}"' in page
    assert cell(row(page, "logs/eval/loss"), "last") == (1.0, "1")
    assert cell(row(page, "logs/eval/loss"), "best") == (1.0, "1")
    assert cell(row(page, "logs/train/custom/gpu_mem_gb"), "max")[0] == 6.0  # the NaN is skipped
    assert not (tmp_path / "report").exists()


def test_empty_directory_gives_a_clear_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "checkpoint").write_text("not an event file")
    with pytest.raises(NoEventFilesError, match="no TensorBoard event files under .*--checkpoint_dir or --summary_dir"):
        render_report(str(tmp_path))
    assert issubclass(NoEventFilesError, FileNotFoundError)  # the CLI prints it as one line
    assert not (tmp_path / "report").exists()
    with pytest.raises(FileNotFoundError, match="not found"):
        render_report(str(tmp_path / "missing"))


def test_cli(run_dir, tmp_path, capsys):
    from dstrain.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", run_dir, "--output", str(tmp_path / "r")])
    assert e.value.code == 0 and (tmp_path / "r" / "index.html").is_file()
    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path / "r")])
    assert e.value.code == 2
    assert_says(capsys.readouterr().err, "no TensorBoard event files")


def test_tf1_simple_value_scalars(tmp_path):
    from tensorboard.compat.proto import event_pb2, summary_pb2

    path = str(tmp_path / "events.out.tfevents.1700000000.host")
    with tf.io.TFRecordWriter(path) as w:
        w.write(event_pb2.Event(wall_time=1.0, file_version="brain.Event:2").SerializeToString())
        for step in range(1, 11):
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag="loss", simple_value=10.0 / step)])
            w.write(event_pb2.Event(wall_time=1.0 + step, step=step, summary=summary).SerializeToString())
    result = render_report(str(tmp_path))
    loss = result.series["loss"]
    assert list(loss.steps) == list(range(1, 11)) and loss.last == f32(1.0) and loss.best() == (10, f32(1.0))
    assert set(result.panel_pngs) == {"losses"}


def test_the_run_record_is_tabled(tmp_path):
    from dstrain.record import RunRecord

    write_run(str(tmp_path / "summaries"))
    record = RunRecord(str(tmp_path / "metrics.jsonl"))
    epoch = {
        "epochs": 2,
        "steps": 10,
        "micro_batches": 10,
        "resumed_at_step": 0,
        "exact": True,
        "seconds": 1.0,
        "utterances_per_s": 1.0,
        "frames_per_s": 1500.0,
        "padding": 0.1,
        "loader_wait_max_s": 0.0,
        "learning_rate": 0.001,
        "nonfinite_steps": 0,
    }
    record.write(
        "epoch", step=10, epoch=1, number=1, loss=3.5, dev_loss=3.0, dev_wer=0.9, dev_cer=0.5, best=True, **epoch
    )
    record.write(
        "stop",
        step=13,
        epoch=1,
        reason="Stop requested",
        signal="SIGUSR1",
        requested_by=[0],
        exit_code=75,
        checkpoint="c",
        weights_sha256=["a", "a"],
    )
    record.write("resume", step=13, epoch=1, checkpoint="c", epoch_step=3)
    record.write("epoch", step=20, epoch=2, number=2, loss=2.5, **dict(epoch, resumed_at_step=3))
    record.write("final", step=20, epoch=2, epochs_done=2, weights_sha256=["a", "a"], test=None)
    page = open(render_report(str(tmp_path)).index_html).read()
    assert re.search(
        r'<tr data-epoch="1"><td data-key="number">1</td><td data-key="loss">3\.5</td><td data-key="dev_loss">3</td>',
        page,
    )
    assert '<tr data-epoch="2">' in page and "resumed from c (step 13, epoch step 3)" in page
    assert "stopped at step 13: Stop requested (SIGUSR1), exit 75" in page and "identical on every rank" in page
