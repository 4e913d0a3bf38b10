"""Plot training runs: loss, the task's own metrics and throughput from runs' metrics.jsonl files, as PNGs.

    python training/plot.py checkpoints/RUN                                  # writes into checkpoints/RUN/plots/
    python training/plot.py checkpoints/RUN_A checkpoints/RUN_B --output plots/    # runs overlaid

Writes loss.png (per optimizer step, with validation at each epoch's end, and per epoch: training and
validation), the task's metrics per epoch (single-label: accuracy.png and macro_f1.png; multi-label:
f1.png, micro- and macro-F1 with subset accuracy, and threshold.png where a threshold was tuned;
regression: correlation.png, Pearson and Spearman, and mae.png) and throughput.png (training samples/s
and time per epoch). Several runs are drawn over each other, one colour per run, named by their
directory. A RUN may also be a metrics.jsonl file.
"""
from __future__ import annotations

import sys
from pathlib import Path


import argparse
import json
from dataclasses import dataclass, field

# The object-oriented API with the Agg canvas: no pyplot, no global backend state, no display needed.
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from encoderfit.utils import UserError, run_tool

METRICS_FILE = "metrics.jsonl"
DPI = 120
TRAIN_STYLE = {"linestyle": "-", "linewidth": 1.8}
VAL_STYLE = {"linestyle": "--", "linewidth": 1.8, "marker": "s", "markersize": 6}


@dataclass
class Run:
    name: str
    path: Path
    steps: list = field(default_factory=list)  # "step" records
    epochs: list = field(default_factory=list)  # "epoch" records


# ---------------------------------------------------------------- reading runs

def _metrics_path(arg: str) -> Path:
    p = Path(arg)
    if not p.exists():
        raise UserError(f"run directory not found: {arg}")
    if p.is_file():
        return p
    if (p / METRICS_FILE).is_file():
        return p / METRICS_FILE
    inside = sorted(d.name for d in p.iterdir() if (d / METRICS_FILE).is_file()) if p.is_dir() else []
    hint = f" (its subdirectories {', '.join(inside[:5])}{' ...' if len(inside) > 5 else ''} have one: " \
           f"pass those)" if inside else ""
    raise UserError(f"no {METRICS_FILE} in {arg}{hint}")


def load_run(arg: str) -> Run:
    path = _metrics_path(arg)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    run = Run(name=(path.parent if path.name == METRICS_FILE else path).name, path=path)
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines):  # a last line still being written by a live run
                continue
            raise UserError(f"{path}, line {number}: not a JSON object") from None
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {number}: not a JSON object")
        if record.get("event") == "step" and "step" in record:
            run.steps.append(record)
        elif record.get("event") == "epoch" and "epoch" in record:
            run.epochs.append(record)
    if not run.steps and not run.epochs:
        raise UserError(f"no step or epoch records in {path}")
    run.steps.sort(key=lambda r: r["step"])
    run.epochs.sort(key=lambda r: r["epoch"])
    return run


def _unique_names(runs: list) -> None:
    """Name runs by directory; where two share a name, add parent directories until they differ."""
    for depth in range(1, 8):
        names = [r.name for r in runs]
        clashes = {n for n in names if names.count(n) > 1}
        if not clashes:
            return
        for r in runs:
            if r.name in clashes:
                parts = r.path.resolve().parent.parts if r.path.name == METRICS_FILE else r.path.resolve().parts
                r.name = "/".join(parts[-(depth + 1):])


# ---------------------------------------------------------------- drawing

def _values(records: list, x: str, y: str) -> tuple:
    pairs = [(r[x], r[y]) for r in records if isinstance(r.get(y), (int, float)) and r.get(x) is not None]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _new_figure(ncols: int, title: str) -> Figure:
    fig = Figure(figsize=(6.2 * ncols, 4.6), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=14, fontweight="bold")
    return fig


def _style_axes(ax, title: str, xlabel: str, ylabel: str, integer_x: bool = False) -> None:
    ax.set_title(title, fontsize=12)
    ax.set_xlabel(xlabel, fontsize=11)
    ax.set_ylabel(ylabel, fontsize=11)
    ax.grid(True, alpha=0.3)
    ax.tick_params(labelsize=10)
    if integer_x and ax.lines:
        xs = [x for line in ax.lines for x in line.get_xdata()]
        lo, hi = int(min(xs)), int(max(xs))
        if hi - lo <= 20:  # every epoch its own tick, one epoch included
            ax.set_xticks(range(lo, hi + 1))
            ax.set_xlim(lo - 0.5 if hi == lo else lo - 0.25, hi + 0.5 if hi == lo else hi + 0.25)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if not ax.lines:
        ax.text(0.5, 0.5, "no records", ha="center", va="center", transform=ax.transAxes, fontsize=12,
                color="gray")


def _style_key(ax, entries: list) -> None:
    """A legend of what the line styles mean (black lines: the colours are the runs)."""
    handles = [Line2D([], [], color="black", **style, label=label) for label, style in entries]
    ax.legend(handles=handles, fontsize=9, framealpha=0.85)


def _run_key(fig: Figure, runs: list) -> None:
    """One legend for the figure: the colour of each run."""
    handles = [Line2D([], [], color=_color(i), linewidth=3, label=run.name) for i, run in enumerate(runs)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(runs), 4), fontsize=10,
               title="run", title_fontsize=10, frameon=False)


def _color(i: int) -> str:
    return f"C{i % 10}"


def _metric_figure(runs: list, metric: str, title: str, ylabel: str, path: Path) -> Path:
    """Two panels: per optimizer step (train; validation at each epoch's last step) and per epoch."""
    several = len(runs) > 1
    fig = _new_figure(2, title)
    per_step, per_epoch = fig.subplots(1, 2)
    train_key, val_key = f"train_{metric}", f"val_{metric}"
    step_train, epoch_train = dict(TRAIN_STYLE), dict(TRAIN_STYLE, marker="o", markersize=6)
    panels = ((per_step, "steps", "step", metric, step_train, "train (mean over each log interval)"),
              (per_step, "epochs", "step", val_key, VAL_STYLE, "validation (end of each epoch)"),
              (per_epoch, "epochs", "epoch", train_key, epoch_train, "train (mean over the epoch)"),
              (per_epoch, "epochs", "epoch", val_key, VAL_STYLE, "validation"))
    drawn = {id(per_step): [], id(per_epoch): []}
    for ax, records, x, y, style, label in panels:
        any_drawn = False
        for i, run in enumerate(runs):
            xs, ys = _values(getattr(run, records), x, y)
            if xs:
                ax.plot(xs, ys, color=_color(i), **style)
                any_drawn = True
        if any_drawn:
            drawn[id(ax)].append((label, style))
    _style_axes(per_step, f"{title} per step", "optimizer step", ylabel)
    _style_axes(per_epoch, f"{title} per epoch", "epoch", ylabel, integer_x=True)
    if per_step.lines:
        per_step.set_xlim(left=0, right=max(max(line.get_xdata()) for line in per_step.lines) * 1.04 + 0.5)
        if not any(run.steps for run in runs):
            per_step.text(0.5, 0.04, "no per-step records (--log_every is more than the run's steps)",
                          ha="center", va="bottom", transform=per_step.transAxes, fontsize=10, color="gray")
    for ax in (per_step, per_epoch):
        if drawn[id(ax)]:
            _style_key(ax, drawn[id(ax)])
    if several:
        _run_key(fig, runs)
    fig.savefig(path)
    return path


def _fmt_number(y: float) -> str:
    return f"{y:.1f}" if abs(y) < 100 else f"{y:,.0f}"


def _fmt_seconds(y: float) -> str:
    return f"{y:.2f}s" if y < 10 else f"{y:,.0f}s"


def _scale_y(ax, values: list) -> None:
    """From zero, or logarithmic when runs differ by more than 30x (else the slow ones sit on the axis)."""
    positive = [v for v in values if v > 0]
    if len(positive) > 1 and max(positive) / min(positive) > 30:
        ax.set_yscale("log")
        ax.set_ylim(min(positive) / 2, max(positive) * 2)
    else:
        ax.set_ylim(bottom=0, top=max(ax.get_ylim()[1] * 1.12, 1e-9))


def _throughput_figure(runs: list, path: Path) -> Path:
    several = len(runs) > 1
    fig = _new_figure(2, "Throughput")
    speed, seconds = fig.subplots(1, 2)
    for ax, key, fmt in ((speed, "samples_per_s", _fmt_number), (seconds, "epoch_time_s", _fmt_seconds)):
        values = []
        for i, run in enumerate(runs):
            xs, ys = _values(run.epochs, "epoch", key)
            values += ys
            if not xs:
                continue
            ax.plot(xs, ys, color=_color(i), marker="o", markersize=7, **TRAIN_STYLE)
            if not several and len(xs) <= 30:  # the numbers themselves, where they cannot collide
                for x, y in zip(xs, ys):
                    ax.annotate(fmt(y), (x, y), textcoords="offset points", xytext=(0, 9), ha="center",
                                fontsize=9, color=_color(i))
        ax.margins(x=0.1)
        _scale_y(ax, values)
    _style_axes(speed, "Training throughput per epoch", "epoch", "training samples / s", integer_x=True)
    _style_axes(seconds, "Training time per epoch", "epoch", "seconds (training only, no evaluation)",
                integer_x=True)
    if several:
        _run_key(fig, runs)
    fig.savefig(path)
    return path


def run_task(run: Run) -> str:
    """The run's task shape, from the metrics its epochs record."""
    keys = {k for r in run.epochs + run.steps for k in r}
    if keys & {"val_micro_f1", "subset_accuracy", "train_subset_accuracy"}:
        return "multi_label"
    if keys & {"val_pearson", "val_mae", "mae", "train_mae"}:
        return "regression"
    return "single_label"


LOSS_NAME = {"single_label": "cross-entropy loss", "multi_label": "binary cross-entropy loss",
             "regression": "MSE loss"}


def _epoch_figure(runs: list, title: str, keys: list, ylabel: str, path: Path) -> Path:
    """One panel per epoch: the validation metrics ``keys`` ((key, label) pairs), one line style each."""
    styles = [VAL_STYLE, dict(VAL_STYLE, linestyle=":", marker="^"), dict(TRAIN_STYLE, marker="o", markersize=6)]
    fig = _new_figure(1.3, title)
    ax = fig.subplots()
    drawn = []
    for (key, label), style in zip(keys, styles):
        for i, run in enumerate(runs):
            xs, ys = _values(run.epochs, "epoch", key)
            if xs:
                ax.plot(xs, ys, color=_color(i), **style)
                if (label, style) not in drawn:
                    drawn.append((label, style))
    _style_axes(ax, f"{title} per epoch (validation)", "epoch", ylabel, integer_x=True)
    if len(keys) > 1 and drawn:
        _style_key(ax, drawn)
    if len(runs) > 1:
        _run_key(fig, runs)
    fig.savefig(path)
    return path


def plot_runs(run_args: list, output: Path) -> list:
    """Read the runs and write loss.png, the task's metric figures and throughput.png into ``output``."""
    runs = [load_run(a) for a in run_args]
    _unique_names(runs)
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise UserError(f"--output is a file, not a directory: {output}")
    shapes = sorted({run_task(run) for run in runs})
    if len(shapes) > 1:
        raise UserError(f"these runs are of different task shapes ({', '.join(shapes)}): plot each shape's runs "
                        f"together")
    task = shapes[0]
    try:
        output.mkdir(parents=True, exist_ok=True)
        written = [_metric_figure(runs, "loss", "Loss", LOSS_NAME[task], output / "loss.png")]
        if task == "single_label":
            written += [_metric_figure(runs, "accuracy", "Accuracy", "accuracy", output / "accuracy.png"),
                        _epoch_figure(runs, "Macro-F1", [("val_macro_f1", "macro-F1")], "macro-F1",
                                      output / "macro_f1.png")]
        elif task == "multi_label":
            written.append(_epoch_figure(runs, "F1", [("val_micro_f1", "micro-F1"), ("val_macro_f1", "macro-F1"),
                                                      ("val_subset_accuracy", "subset accuracy")],
                                         "F1 / subset accuracy", output / "f1.png"))
            if any("val_threshold" in r for run in runs for r in run.epochs):
                written.append(_epoch_figure(runs, "Threshold", [("val_threshold", "threshold")],
                                             "threshold chosen on validation", output / "threshold.png"))
        else:
            written += [_epoch_figure(runs, "Correlation", [("val_pearson", "Pearson"), ("val_spearman", "Spearman")],
                                      "correlation with the targets", output / "correlation.png"),
                        _metric_figure(runs, "mae", "Mean absolute error", "MAE", output / "mae.png")]
        return written + [_throughput_figure(runs, output / "throughput.png")]
    except OSError as exc:
        raise UserError(f"cannot write to {output}: {exc.strerror or exc}") from None


def plot_sweep(trials: list, metric: str, path: Path, x: str = "learning_rate") -> Path:
    """A sweep's trials: the validation metric against one swept flag ``x`` (the learning rate where it is
    swept), one colour per epochs value. Finished trials are joined by lines; pruned ones (``status``
    "pruned": their value is their best before they were stopped) are hollow markers on their own, so a
    stopped trial's early value does not read as what its learning rate gives.

    ``trials``: dicts with ``value``, ``epochs``, ``x``'s value and ``status``."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    fig = _new_figure(1.3, "sweep")
    ax = fig.subplots()
    models = sorted({str(t.get("model")) for t in trials})  # a searched model: a line per model too
    key = (lambda t: (str(t.get("model")), t["epochs"])) if x != "epochs" else (lambda t: (str(t.get("model")), None))
    groups = sorted({key(t) for t in trials}, key=str)
    for i, group in enumerate(groups):
        model, epochs = group
        mine = [t for t in trials if key(t) == group]
        done = sorted((t[x], t["value"]) for t in mine if t.get("status", "done") != "pruned")
        pruned = [(t[x], t["value"]) for t in mine if t.get("status") == "pruned"]
        label = f"{epochs} epoch(s)" if epochs is not None else "finished"
        if len(models) > 1:
            label = f"{Path(model).name}, {label}"
        if done:
            ax.plot([p[0] for p in done], [p[1] for p in done], color=_color(i), marker="o", markersize=7,
                    linewidth=1.5, label=label)
        if pruned:
            ax.plot([p[0] for p in pruned], [p[1] for p in pruned], linestyle="none", marker="o", markersize=8,
                    markerfacecolor="none", markeredgewidth=1.5, color=_color(i),
                    label=(f"{label}: pruned" if epochs is not None else "pruned") + " (value when stopped)")
    values = sorted({t[x] for t in trials})
    if min(values) > 0 and max(values) >= 10 * min(values):
        ax.set_xscale("log")
        # readable ticks: the trials' own values where they are few, else a few powers of ten; no crowded
        # minor labels
        ax.xaxis.set_minor_formatter(NullFormatter())
        if len(values) <= 8:
            ax.xaxis.set_major_locator(FixedLocator(values))
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xticks(values, [f"{v:.0e}" if v < 1e-2 else f"{v:g}" for v in values], rotation=30)
    _style_axes(ax, f"best validation {metric} of each trial", x.replace("_", " "), f"val {metric}")
    if ax.lines:
        ax.legend(fontsize=9, framealpha=0.85)
    fig.savefig(path)
    return path


def plot_confusion_matrix(cm, label_names, path, title: str = "") -> Path:
    """A confusion-matrix PNG: counts in the cells, colour = share of the true class (row)."""
    import numpy as np

    cm = np.asarray(cm)
    k = len(label_names)
    shares = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    side = min(max(4.8, 0.55 * k + 2.8), 24)
    fig = Figure(figsize=(side + 1.2, side), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04).set_label("share of the true label's examples")
    font = max(5, min(12, 160 // max(k, 1)))
    if k <= 40:
        for i in range(k):
            for j in range(k):
                ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=font,
                        color="white" if shares[i, j] > 0.55 else "black")
    names = [n if len(n) <= 18 else n[:17] + "~" for n in map(str, label_names)]
    ax.set_xticks(range(k), names, rotation=45 if k > 4 or max(map(len, names)) > 8 else 0,
                  ha="right" if k > 4 or max(map(len, names)) > 8 else "center", fontsize=max(6, min(11, font)))
    ax.set_yticks(range(k), names, fontsize=max(6, min(11, font)))
    ax.set_xlabel("predicted", fontsize=12)
    ax.set_ylabel("true", fontsize=12)
    ax.set_title(title or "Confusion matrix", fontsize=11)
    if title:
        fig.suptitle("Confusion matrix", fontsize=14, fontweight="bold")
    fig.savefig(path)
    return Path(path)


def plot_evaluation(record: dict, drawn, path, name: str) -> Path:
    """evaluate --plot: the task's picture of a report (``drawn``: the confusion matrix, or a regression's
    true and predicted scores)."""
    n = record["examples"]
    if record["task"] == "multi_label":
        title = f"{name}: micro-F1 {record['micro_f1']:.3f}, macro-F1 {record['macro_f1']:.3f} (n={n})"
        return plot_per_label_f1(record["per_label"], path, title)
    if record["task"] == "regression":
        title = f"{name}: Pearson {record['pearson']:.3f}, MSE {record['mse']:.3f} (n={n})"
        return plot_predicted_vs_true(*drawn, path, title)
    title = f"{name}: accuracy {record['accuracy']:.3f}, macro-F1 {record['macro_f1']:.3f} (n={n})"
    return plot_confusion_matrix(drawn, record["label_names"], path, title=title)


def plot_per_label_f1(per_label: dict, path, title: str) -> Path:
    """Each label's F1 as a bar, its support and predicted count beside it; a label never predicted in red."""
    names = list(per_label)
    k = len(names)
    fig = Figure(figsize=(8.5, min(max(3.6, 0.32 * k + 1.8), 30)), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle("F1 per label", fontsize=14, fontweight="bold")
    ax = fig.subplots()
    f1 = [per_label[n]["f1"] for n in names]
    never = [per_label[n]["predicted"] == 0 for n in names]
    ax.barh(range(k), f1, color=["C3" if x else "C0" for x in never])
    for i, n in enumerate(names):
        r = per_label[n]
        ax.text(min(f1[i], 0.82) + 0.01, i, f"support {r['support']}, predicted {r['predicted']}", va="center",
                fontsize=max(6, min(9, 240 // max(k, 1))))
    ax.set_yticks(range(k), [n if len(n) <= 20 else n[:19] + "~" for n in names], fontsize=max(6, min(10, 300 // k)))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("F1", fontsize=11)
    ax.set_title(title + (f"; {sum(never)} label(s) never predicted (red)" if any(never) else ""), fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.savefig(path)
    return Path(path)


def plot_predicted_vs_true(true: list, predicted: list, path, title: str) -> Path:
    """A regression's predictions against the targets, with the diagonal where they would be equal."""
    fig = Figure(figsize=(6.6, 6.2), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle("Predicted against true", fontsize=14, fontweight="bold")
    ax = fig.subplots()
    ax.scatter(true, predicted, s=12 if len(true) < 2000 else 4, alpha=0.5, color="C0", edgecolors="none")
    lo, hi = min(min(true), min(predicted)), max(max(true), max(predicted))
    pad = 0.03 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="C3", linewidth=1.2, linestyle="--",
            label="predicted = true")
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_aspect("equal")
    ax.set_xlabel("true score", fontsize=11)
    ax.set_ylabel("predicted score", fontsize=11)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9, loc="upper left")
    fig.savefig(path)
    return Path(path)


# ---------------------------------------------------------------- command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # usage errors are one "error: ..." line too
        raise UserError(f"{message} (see --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Run directories (or their metrics.jsonl).")
    parser.add_argument("--output", metavar="DIR",
                        help="Directory for the PNGs (default: RUN_DIR/plots for one run; needed for several).")
    return parser


def run(args) -> int:
    if args.output is None:
        if len(args.runs) > 1:
            raise UserError("--output DIR is needed when plotting several runs")
        first = Path(args.runs[0])
        args.output = str((first.parent if first.is_file() else first) / "plots")
    for path in plot_runs(args.runs, Path(args.output)):
        print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    return run_tool(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
