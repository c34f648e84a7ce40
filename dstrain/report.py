"""A static HTML report of a training run, from its TensorBoard event files and its run record.

``render_report(RUN_DIR)`` finds every TensorBoard event file under ``RUN_DIR``
(recursively; each folder holding event files is one TensorBoard "run"), reads the
scalar summaries (TF2 ``tf.summary.scalar`` stores them as tensors; TF1
``simple_value`` scalars are read too), and writes to ``RUN_DIR/report/``:

* one PNG per panel (losses, dev WER/CER, learning rate, loss scale,
  throughput/loader, and one panel per prefix of any other tags), each
  ``PANEL_SIZE_PX`` pixels;
* ``overview.png``: every panel on one page;
* ``index.html``: a page with no outside references (inline CSS, no scripts) that
  shows the PNGs by relative name (``<img src="losses.png">``; ``embed=True`` inlines them as
  data URIs instead), a table of each tag's last and best values and, when the run has a record
  (``RUN/metrics.jsonl``, :mod:`dstrain.record`), a table of its epochs and its resumes, stops and end.

Only reads event files and writes PNG/HTML, so TensorBoard keeps working on the same
folder. Run as ``dstrain report RUN_DIR [--output DIR]``.
"""

from __future__ import annotations

import base64
import html
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from dstrain.config import option

DPI = 100
PANEL_SIZE_IN = (8.0, 4.5)
PANEL_SIZE_PX = (int(PANEL_SIZE_IN[0] * DPI), int(PANEL_SIZE_IN[1] * DPI))  # (width, height)
OVERVIEW_COLUMNS = 2
OVERVIEW_CELL_IN = (6.0, 3.5)


def overview_size_px(n_panels: int) -> tuple[int, int]:
    """(width, height) of overview.png for ``n_panels`` panels."""
    rows = max(1, math.ceil(n_panels / OVERVIEW_COLUMNS))
    return int(OVERVIEW_CELL_IN[0] * OVERVIEW_COLUMNS * DPI), int(OVERVIEW_CELL_IN[1] * rows * DPI)


@dataclass
class Series:
    """One scalar tag of one run, sorted by step (a step written twice keeps its last value)."""

    run: str
    """Folder of the event files, relative to the run directory ("" for the run directory itself)."""
    tag: str
    steps: np.ndarray
    values: np.ndarray
    label: str = ""

    @property
    def last_step(self) -> int:
        return int(self.steps[-1])

    @property
    def last(self) -> float:
        return float(self.values[-1])

    @property
    def goal(self) -> str | None:
        """ "min", "max", or None when neither is better."""
        return goal_of(self.tag)

    def best(self) -> tuple[int, float] | None:
        """(step, value) of the best finite value, or None (no goal, or no finite value)."""
        goal = self.goal
        finite = np.isfinite(self.values)
        if goal is None or not finite.any():
            return None
        masked = np.where(finite, self.values, np.inf if goal == "min" else -np.inf)
        i = int(np.argmin(masked) if goal == "min" else np.argmax(masked))
        return int(self.steps[i]), float(self.values[i])


@dataclass
class Panel:
    name: str
    """File stem: NAME.png."""
    title: str
    groups: list[list[Series]]
    """One axes per group; a group's series share the axes."""
    log_y: bool = False


@dataclass
class ReportResult:
    output_dir: str
    index_html: str
    overview_png: str
    panel_pngs: dict[str, str]
    """Panel name -> PNG path."""
    series: dict[str, Series]
    """Label (tag, or run/tag when several runs) -> series."""
    event_files: list[str] = field(default_factory=list)


# ------------------------------------------------------------------ reading


class NoEventFilesError(FileNotFoundError, ValueError):
    """The run directory holds no TensorBoard event files (catch as either base)."""


_EVENT_FILE = re.compile(r"(^|\.)tfevents\.")


def find_event_files(run_dir: str, exclude: str | None = None) -> list[str]:
    """Event files under ``run_dir`` (recursively), sorted; ``exclude`` (a folder) is skipped."""
    exclude = os.path.realpath(exclude) if exclude else None
    found = []
    for root, dirs, files in os.walk(run_dir, followlinks=True):
        if exclude:
            dirs[:] = [d for d in dirs if os.path.realpath(os.path.join(root, d)) != exclude]
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if _EVENT_FILE.search(f)]
    return found


def _to_float(array: np.ndarray) -> float | None:
    if array.size != 1 or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        return None
    return float(array.reshape(()).item())


def read_scalars(run_dir: str, exclude: str | None = None) -> list[Series]:
    """Every scalar series under ``run_dir``; raises FileNotFoundError without event files."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"run directory not found: {run_dir}")
    files = find_event_files(run_dir, exclude)
    if not files:
        raise NoEventFilesError(
            f"no TensorBoard event files under {run_dir}; train with --checkpoint_dir or --summary_dir"
        )
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    by_dir: dict[str, list[str]] = {}
    for f in files:
        by_dir.setdefault(os.path.dirname(f), []).append(f)
    series = []
    for folder in sorted(by_dir):
        # One accumulator per folder, as TensorBoard does: it reads the folder's files in order
        # and drops events orphaned by a restart from an earlier step.
        acc = ea.EventAccumulator(folder, size_guidance={ea.SCALARS: 0, ea.TENSORS: 0})
        acc.Reload()
        tags = acc.Tags()
        points: dict[str, dict[int, tuple[float, float]]] = {}

        def add(tag: str, wall_time: float, step: int, value: float | None) -> None:
            if value is None:
                return
            per_step = points.setdefault(tag, {})
            if step not in per_step or per_step[step][0] <= wall_time:
                per_step[step] = (wall_time, value)

        for tag in tags.get(ea.SCALARS, []):
            for e in acc.Scalars(tag):
                add(tag, e.wall_time, e.step, float(e.value))
        for tag in tags.get(ea.TENSORS, []):
            plugin = acc.SummaryMetadata(tag).plugin_data.plugin_name
            if plugin not in ("scalars", ""):
                continue  # histograms, images, text, hparams...
            for e in acc.Tensors(tag):
                add(tag, e.wall_time, e.step, _to_float(tensor_util.make_ndarray(e.tensor_proto)))
        run = os.path.relpath(folder, run_dir)
        run = "" if run == "." else run.replace(os.sep, "/")
        for tag, per_step in sorted(points.items()):
            steps = np.array(sorted(per_step), dtype=np.int64)
            values = np.array([per_step[s][1] for s in steps], dtype=np.float64)
            series.append(Series(run=run, tag=tag, steps=steps, values=values))
    if not series:
        raise ValueError(f"TensorBoard event files under {run_dir} hold no scalar summaries: {files}")
    several_runs = len({s.run for s in series}) > 1
    for s in series:
        s.label = f"{s.run}/{s.tag}" if several_runs and s.run else s.tag
    return series


# ------------------------------------------------------------------ panels

KNOWN_PANELS = (
    ("losses", "Loss"),
    ("error_rates", "Dev WER / CER"),
    ("learning_rate", "Learning rate"),
    ("loss_scale", "Loss scale (mixed precision)"),
    ("throughput", "Throughput / input pipeline"),
)


def goal_of(tag: str) -> str | None:
    """Whether lower ("min") or higher ("max") values of ``tag`` are better; None for settings."""
    t = tag.lower()
    if "loss_scale" in t or "learning_rate" in t or t == "lr":
        return None
    if "wait" in t or re.search(r"(^|/|_)(loss|wer|cer|error|err)($|/|_)", t):
        return "min"
    if re.search(r"throughput|per_s|accuracy|(^|/|_)acc($|/|_)", t):
        return "max"
    return None


def panel_of(tag: str) -> str:
    t = tag.lower()
    if "loss_scale" in t:
        return "loss_scale"
    if t.startswith("loss/") or t == "loss" or t.endswith("/loss"):
        return "losses"
    if re.match(r"(wer|cer)($|/)", t) or re.search(r"/(wer|cer)$", t):
        return "error_rates"
    if t in ("learning_rate", "lr") or t.startswith("learning_rate/"):
        return "learning_rate"
    if t.startswith(("throughput/", "loader/")) or t in ("throughput",):
        return "throughput"
    prefix = t.split("/", 1)[0] if "/" in t else "other"
    return "other_" + (re.sub(r"[^a-z0-9]+", "_", prefix).strip("_") or "other")


def build_panels(series: list[Series]) -> list[Panel]:
    by_panel: dict[str, list[Series]] = {}
    for s in series:
        by_panel.setdefault(panel_of(s.tag), []).append(s)
    panels = []
    for name, title in KNOWN_PANELS:
        members = by_panel.pop(name, [])
        if not members:
            continue
        if name in ("losses", "error_rates"):
            groups = [members]
        else:
            groups = [[s] for s in members]  # different units: one axes each
        positive = all(np.all(s.values[np.isfinite(s.values)] > 0) for s in members)
        spread = _spread(members)
        log_y = positive and (name == "loss_scale" or (name == "learning_rate" and spread > 20))
        panels.append(Panel(name, title, groups, log_y=log_y))
    for name in sorted(by_panel):
        members = by_panel[name]
        title = name[len("other_") :] if name != "other_other" else "Other scalars"
        panels.append(Panel(name, title, [[s] for s in members]))
    return panels


def _spread(members: list[Series]) -> float:
    values = np.concatenate([s.values for s in members])
    values = values[np.isfinite(values) & (values > 0)]
    return float(values.max() / values.min()) if values.size else 1.0


# ------------------------------------------------------------------ drawing


def _smooth(values: np.ndarray, weight: float = 0.9) -> np.ndarray:
    """TensorBoard's debiased exponential moving average."""
    out = np.empty_like(values)
    last, n = 0.0, 0
    for i, v in enumerate(values):
        if not np.isfinite(v):
            out[i] = v
            continue
        n += 1
        last = last * weight + (1 - weight) * v
        out[i] = last / (1 - weight**n)
    return out


def _draw_group(ax, group: list[Series], log_y: bool) -> None:
    for s in group:
        many = len(s.steps) > 200
        marker = "o" if len(s.steps) <= 30 else None
        if many:
            line = ax.plot(s.steps, s.values, alpha=0.25, linewidth=0.8)[0]
            ax.plot(s.steps, _smooth(s.values), color=line.get_color(), linewidth=1.6, label=s.label)
        else:
            ax.plot(s.steps, s.values, marker=marker, markersize=3, linewidth=1.4, label=s.label)
        best = s.best()
        if best is not None and len(s.steps) > 1:
            ax.plot([best[0]], [best[1]], marker="*", markersize=10, color="black", linestyle="none")
    if log_y:
        ax.set_yscale("log", base=2 if all("loss_scale" in s.tag for s in group) else 10)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    if len(group) > 1:
        ax.legend(fontsize="small")
    else:
        ax.set_title(group[0].label, fontsize="medium")


def _draw_panel(fig, panel: Panel) -> None:
    """Draw ``panel`` on a Figure or SubFigure: one axes per group, up to 3 a row."""
    n = len(panel.groups)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    grid = fig.add_gridspec(rows, cols)
    for i, group in enumerate(panel.groups):
        ax = fig.add_subplot(grid[i // cols, i % cols])
        _draw_group(ax, group, panel.log_y)


def _figure(size_in: tuple[float, float]):
    # A bare Figure (no pyplot): no global backend or figure registry, safe beside other plotting;
    # savefig renders PNG with Agg whatever the configured backend.
    from matplotlib.figure import Figure

    return Figure(figsize=size_in, dpi=DPI, layout="constrained", facecolor="white")


def _save(fig, path: str) -> None:
    tmp = path + ".tmp"
    fig.savefig(tmp, dpi=DPI, format="png", facecolor="white")  # no bbox_inches: keep the exact size
    os.replace(tmp, path)


def render_panel(panel: Panel, path: str) -> None:
    fig = _figure(PANEL_SIZE_IN)
    fig.suptitle(panel.title)
    _draw_panel(fig, panel)
    _save(fig, path)


def render_overview(panels: list[Panel], path: str, title: str) -> None:
    width, height = overview_size_px(len(panels))
    fig = _figure((width / DPI, height / DPI))
    fig.suptitle(title)
    rows = max(1, math.ceil(len(panels) / OVERVIEW_COLUMNS))
    outer = fig.add_gridspec(rows, OVERVIEW_COLUMNS)
    for i, panel in enumerate(panels):
        cell = outer[i // OVERVIEW_COLUMNS, i % OVERVIEW_COLUMNS]
        sub = fig.add_subfigure(cell)
        sub.suptitle(panel.title, fontsize="medium")
        _draw_panel(sub, panel)
    _save(fig, path)


# ------------------------------------------------------------------ HTML


def format_value(v: float) -> str:
    """How the report prints a value: 6 significant digits."""
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return f"{v:.6g}"


_CSS = """
body { font-family: sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.5em; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.tag { text-align: left; font-family: monospace; }
img { max-width: 100%; height: auto; border: 1px solid #eee; }
.meta { color: #666; font-size: 0.9em; }
"""


def _img(name: str, path: str, alt: str, embed: bool) -> str:
    name, alt = html.escape(name), html.escape(alt)
    if not embed:
        return f'<a href="{name}"><img src="{name}" alt="{alt}"></a>'
    with open(path, "rb") as f:
        src = "data:image/png;base64," + base64.b64encode(f.read()).decode("ascii")
    return f'<a href="{name}"><img src="{src}" alt="{alt}" data-file="{name}"></a>'


def _table(series: list[Series]) -> str:
    rows = []
    for s in series:
        best = s.best()
        finite = s.values[np.isfinite(s.values)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (math.nan, math.nan)
        cells = [
            f'<td class="tag">{html.escape(s.label)}</td>',
            f"<td>{len(s.steps)}</td>",
            f"<td>{s.last_step}</td>",
            f'<td class="last" data-value="{s.last!r}">{format_value(s.last)}</td>',
            (
                f'<td class="best" data-value="{best[1]!r}" data-step="{best[0]}">{format_value(best[1])} '
                f"(step {best[0]}, {s.goal})</td>"
                if best
                else '<td class="best">&mdash;</td>'
            ),
            f'<td class="min" data-value="{lo!r}">{format_value(lo)}</td>',
            f'<td class="max" data-value="{hi!r}">{format_value(hi)}</td>',
        ]
        rows.append(f'<tr data-tag="{html.escape(s.label)}">' + "".join(cells) + "</tr>")
    head = "<tr><th>tag</th><th>points</th><th>last step</th><th>last</th><th>best</th><th>min</th><th>max</th></tr>"
    return "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"


EPOCH_COLUMNS = (
    ("number", "epoch"),
    ("loss", "train loss"),
    ("dev_loss", "dev loss"),
    ("dev_wer", "dev WER"),
    ("dev_cer", "dev CER"),
    ("frames_per_s", "frames/s"),
    ("steps", "steps"),
    ("learning_rate", "learning rate"),
)


def _run_record_html(run_dir: str) -> list[str]:
    """The run record's epochs and events (``RUN/metrics.jsonl``, when the run has one) as HTML."""
    from dstrain.record import events, read_record
    from dstrain.rundir import RunDir

    path = RunDir(run_dir).metrics_path
    if not os.path.exists(path):
        return []
    records = read_record(path)
    rows = []
    for r in events(records, "epoch"):
        cells = "".join(
            f'<td data-key="{k}">'
            f'{html.escape(format_value(r[k]) if isinstance(r.get(k), float) else str(r.get(k, "")))}</td>'
            for k, _ in EPOCH_COLUMNS
        )
        rows.append(f'<tr data-epoch="{r["number"]}">{cells}</tr>')
    head = "<tr>" + "".join(f"<th>{title}</th>" for _, title in EPOCH_COLUMNS) + "</tr>"
    notes = []
    for r in records:
        if r["event"] == "resume":
            notes.append(f"resumed from {r['checkpoint']} (step {r['step']}, epoch step {r['epoch_step']})")
        elif r["event"] == "stop":
            notes.append(
                f"stopped at step {r['step']}: {r['reason']} ({r['signal'] or 'another rank'}), exit {r['exit_code']}"
            )
        elif r["event"] == "final":
            agree = len(set(r["weights_sha256"])) == 1
            notes.append(
                f"finished after {r['epochs_done']} epochs on {len(r['weights_sha256'])} rank(s): final weights "
                + ("identical on every rank" if agree else "DIFFER between ranks")
            )
    out = ["<h2>Run record</h2>", "<table>\n" + head + "\n" + "\n".join(rows) + "\n</table>"]
    if notes:
        out.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    return out


def render_report(run_dir: str, output_dir: str | None = None, embed: bool = False) -> ReportResult:
    """Write PNG plots and ``index.html`` for the event files under ``run_dir``.

    ``output_dir`` defaults to ``RUN_DIR/report``. Raises :class:`NoEventFilesError`
    (a FileNotFoundError and a ValueError) when ``run_dir`` holds no event files,
    FileNotFoundError when it does not exist, ValueError when the files hold no scalars.
    """
    output_dir = output_dir or os.path.join(run_dir, "report")
    series = read_scalars(run_dir, exclude=output_dir)
    os.makedirs(output_dir, exist_ok=True)
    panels = build_panels(series)
    panel_pngs = {}
    for panel in panels:
        path = os.path.join(output_dir, panel.name + ".png")
        render_panel(panel, path)
        panel_pngs[panel.name] = path
    overview = os.path.join(output_dir, "overview.png")
    title = os.path.basename(os.path.abspath(run_dir))
    render_overview(panels, overview, title)

    files = find_event_files(run_dir, exclude=output_dir)
    max_step = max(s.last_step for s in series)
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>Training report: {html.escape(title)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>Training report: {html.escape(title)}</h1>",
        f'<p class="meta">{html.escape(os.path.abspath(run_dir))} &middot; {len(files)} event file(s) &middot; '
        f"{len(series)} scalar tag(s) &middot; last step {max_step}</p>",
        *_run_record_html(run_dir),
        "<h2>Summary</h2>",
        _table([s for panel in panels for group in panel.groups for s in group]),
        "<h2>Overview</h2>",
        _img("overview.png", overview, "overview", embed),
    ]
    for panel in panels:
        name = panel.name + ".png"
        parts += [
            f'<h2 id="{html.escape(panel.name)}">{html.escape(panel.title)}</h2>',
            _img(name, panel_pngs[panel.name], panel.title, embed),
        ]
    parts.append("</body></html>\n")
    index = os.path.join(output_dir, "index.html")
    with open(index + ".tmp", "w", encoding="utf-8") as f:
        f.write("\n".join(parts))
    os.replace(index + ".tmp", index)
    return ReportResult(
        output_dir=output_dir,
        index_html=index,
        overview_png=overview,
        panel_pngs=panel_pngs,
        series={s.label: s for s in series},
        event_files=files,
    )


@dataclass(frozen=True)
class ReportConfig:
    """dstrain report: render a run's TensorBoard curves to PNG and one HTML page"""

    run_dir: str = option(positional=True)
    """Run (checkpoint or summary) directory, searched recursively for event files."""
    output: str = ""
    """Output folder; empty: RUN_DIR/report."""
    embed: bool = False
    """Inline the PNGs into index.html as data URIs."""


def run_report(cfg: ReportConfig) -> int:
    print(render_report(cfg.run_dir, cfg.output or None, embed=cfg.embed).index_html)
    return 0
