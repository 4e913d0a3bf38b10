"""plot.py: PNGs from runs' metrics.jsonl, the plotted numbers, overlaid runs, bad input."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import conftest  # noqa: E402
from conftest import run_script

from encoderfit.cli import plot

FIGURES = ("loss.png", "accuracy.png", "macro_f1.png", "throughput.png")
BLUE, ORANGE = (31, 119, 180), (255, 127, 14)  # matplotlib's C0 and C1: the first and second run


def write_run(run_dir: Path, epochs: int = 4, steps_per_epoch: int = 10, log_every: int = 2) -> Path:
    """A hand-made run: loss falling, accuracy rising, throughput around 100 samples/s."""
    run_dir.mkdir(parents=True)
    lines = []
    for e in range(1, epochs + 1):
        for s in range((e - 1) * steps_per_epoch + 1, e * steps_per_epoch + 1):
            if s % log_every == 0:
                lines.append({"event": "step", "step": s, "epoch": e, "loss": 1.0 / s ** 0.5,
                              "accuracy": 1 - 0.5 / s ** 0.5, "lr": 1e-3, "elapsed_s": s * 0.1})
        lines.append({"event": "epoch", "epoch": e, "train_loss": 0.9 / e, "train_accuracy": 0.5 + 0.1 * e,
                      "val_loss": 0.8 / e + 0.05, "val_accuracy": 0.55 + 0.08 * e, "val_macro_f1": 0.5 + 0.07 * e,
                      "epoch_time_s": 3.0 + e,
                      "samples_per_s": 100.0 + 5 * e, "step": e * steps_per_epoch, "elapsed_s": e * 4.0})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir


def color_pixels(path: Path, rgb: tuple, tol: int = 12) -> int:
    with Image.open(path) as im:
        pixels = np.asarray(im.convert("RGB")).astype(int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) <= tol).sum())


def assert_real_png(path: Path) -> None:
    conftest.assert_real_png(path, width=(800, 3000), height=(400, 2000))


@pytest.fixture
def captured_figures(monkeypatch) -> dict:
    """The figures plot.py saves, by file name, to read the plotted data back."""
    figures = {}
    original = plot.Figure.savefig

    def savefig(fig, path, *args, **kwargs):
        figures[Path(path).name] = fig
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(plot.Figure, "savefig", savefig)
    return figures


def test_cli_overlays_several_runs(tmp_path, trained):
    other = write_run(tmp_path / "other")
    out = tmp_path / "figs"
    proc = run_script("plot.py", trained, other, "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"wrote {out / name}" for name in FIGURES]
    for name in FIGURES:
        assert_real_png(out / name)
        # one colour per run: both runs are drawn in every figure
        assert color_pixels(out / name, BLUE) > 200 and color_pixels(out / name, ORANGE) > 200, name


def test_plotted_numbers_are_the_records(trained, tmp_path, captured_figures):
    records = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    epochs = [r for r in records if r["event"] == "epoch"]
    assert len(steps) >= 5 and [r["epoch"] for r in epochs] == [1, 2, 3, 4]  # the fixture's 4 epochs

    assert plot.main([str(trained), "--output", str(tmp_path / "p")]) == 0
    for name, metric in (("loss.png", "loss"), ("accuracy.png", "accuracy")):
        fig = captured_figures[name]
        per_step, per_epoch = fig.axes[:2]
        curves = {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in per_step.lines}
        assert (tuple(r["step"] for r in steps), tuple(r[metric] for r in steps)) in curves
        assert (tuple(r["step"] for r in epochs), tuple(r[f"val_{metric}"] for r in epochs)) in curves
        curves = {(tuple(line.get_xdata()), tuple(line.get_ydata())) for line in per_epoch.lines}
        for key in (f"train_{metric}", f"val_{metric}"):
            assert ((1, 2, 3, 4), tuple(r[key] for r in epochs)) in curves
        assert per_step.get_xlabel() == "optimizer step" and per_epoch.get_xlabel() == "epoch"
        assert per_step.get_title() and per_step.get_legend() is not None
    speed = captured_figures["throughput.png"].axes[0]
    assert list(speed.lines[0].get_ydata()) == [r["samples_per_s"] for r in epochs]
    assert speed.get_ylabel() == "training samples / s"


def _task_run(run_dir: Path, task: str, epochs: int = 3) -> tuple:
    """A hand-made multi-label or regression run: step losses and the task's epoch metrics."""
    run_dir.mkdir(parents=True)
    lines = [{"event": "step", "step": s, "epoch": 1 + (s - 1) // 4, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 13)]
    for e in range(1, epochs + 1):
        record = {"event": "epoch", "epoch": e, "step": 4 * e, "train_loss": 0.9 / e, "val_loss": 0.8 / e,
                  "epoch_time_s": 2.0, "samples_per_s": 50.0}
        if task == "multi_label":
            record.update(val_micro_f1=0.4 + 0.1 * e, val_macro_f1=0.3 + 0.1 * e, val_subset_accuracy=0.1 * e,
                          val_threshold=0.3 + 0.05 * e, val_never_predicted=3 - e, train_subset_accuracy=0.1 * e)
        else:
            record.update(val_pearson=0.5 + 0.1 * e, val_spearman=0.45 + 0.1 * e, val_mse=0.8 / e, val_mae=0.6 / e,
                          train_mae=0.7 / e)
        lines.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run_dir, [r for r in lines if r["event"] == "epoch"]


@pytest.mark.parametrize("task, figures, curves", [
    ("multi_label", ("loss.png", "f1.png", "threshold.png", "throughput.png"),
     {"f1.png": ("val_micro_f1", "val_macro_f1", "val_subset_accuracy"), "threshold.png": ("val_threshold",)}),
    ("regression", ("loss.png", "correlation.png", "mae.png", "throughput.png"),
     {"correlation.png": ("val_pearson", "val_spearman")}),
])
def test_each_task_gets_its_own_metrics_and_no_empty_panel(task, figures, curves, tmp_path, captured_figures):
    run, epochs = _task_run(tmp_path / task, task)
    assert plot.main([str(run)]) == 0
    assert sorted(p.name for p in (run / "plots").iterdir()) == sorted(figures)
    for name in figures:
        assert_real_png(run / "plots" / name)
        texts = [t.get_text() for ax in captured_figures[name].axes for t in ax.texts]
        assert "no records" not in texts, name
    for name, keys in curves.items():
        drawn = {tuple(line.get_ydata()) for ax in captured_figures[name].axes for line in ax.lines}
        for key in keys:
            assert tuple(r[key] for r in epochs) in drawn, (name, key)
    mixed = write_run(tmp_path / "single")
    assert plot.main([str(run), str(mixed), "--output", str(tmp_path / "both")]) == 2


def test_one_run_goes_to_its_plots_directory_in_one_colour(tmp_path):
    run = write_run(tmp_path / "solo")
    assert plot.main([str(run / "metrics.jsonl")]) == 0  # the metrics file itself is accepted too
    for name in FIGURES:
        assert_real_png(run / "plots" / name)
        assert color_pixels(run / "plots" / name, BLUE) > 200
        assert color_pixels(run / "plots" / name, ORANGE) == 0


def test_runs_with_the_same_name_get_told_apart(tmp_path, captured_figures):
    a, b = write_run(tmp_path / "a" / "run"), write_run(tmp_path / "b" / "run", epochs=2)
    assert plot.main([str(a), str(b), "--output", str(tmp_path / "p")]) == 0
    legend = captured_figures["loss.png"].legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["a/run", "b/run"]


def test_a_last_line_still_being_written_is_skipped(tmp_path):
    run = write_run(tmp_path / "live", epochs=2)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"event": "step", "step": 2')
    loaded = plot.load_run(str(run))
    assert len(loaded.epochs) == 2 and len(loaded.steps) == 10


def test_a_run_without_step_records_still_plots(tmp_path):
    run = write_run(tmp_path / "short", epochs=1, log_every=1000)
    assert plot.main([str(run), "--output", str(tmp_path / "p")]) == 0
    for name in FIGURES:
        assert_real_png(tmp_path / "p" / name)


def _bad_inputs(tmp: Path) -> dict:
    good = write_run(tmp / "good")
    (tmp / "nothing").mkdir()
    (tmp / "empty_run").mkdir()
    (tmp / "empty_run" / "metrics.jsonl").write_text("")
    (tmp / "parent" / "run-1").mkdir(parents=True)
    shutil.copy(good / "metrics.jsonl", tmp / "parent" / "run-1" / "metrics.jsonl")
    (tmp / "broken").mkdir()
    (tmp / "broken" / "metrics.jsonl").write_text('{"event": "epoch", "epoch": 1, "val_loss": 1}\nnot json\n{}\n')
    (tmp / "a_file").write_text("")
    return {
        "missing run dir": ([str(tmp / "nope"), "--output", str(tmp / "o")], "run directory not found"),
        "no metrics file": ([str(tmp / "nothing"), "--output", str(tmp / "o")],
                            f"no metrics.jsonl in {tmp / 'nothing'}"),
        "checkpoint dir of runs": ([str(tmp / "parent"), "--output", str(tmp / "o")],
                                   "its subdirectories run-1 have one"),
        "no records": ([str(tmp / "empty_run"), "--output", str(tmp / "o")], "no step or epoch records"),
        "invalid line": ([str(tmp / "broken"), "--output", str(tmp / "o")], "line 2: not a JSON object"),
        "several runs, no output": ([str(good), str(good)], "--output DIR is needed"),
        "output is a file": ([str(good), "--output", str(tmp / "a_file")], "is a file, not a directory"),
        "no run given": ([], "the following arguments are required: RUN_DIR"),
    }


@pytest.mark.parametrize("case", ["missing run dir", "no metrics file", "checkpoint dir of runs", "no records",
                                  "invalid line", "several runs, no output", "output is a file", "no run given"])
def test_bad_input_is_one_error_line_and_exit_code_2(tmp_path, capsys, case):
    args, expected = _bad_inputs(tmp_path)[case]
    assert plot.main(args) == 2
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert expected in lines[0]
    assert not (tmp_path / "o").exists()


def test_bad_input_through_the_script_has_no_traceback(tmp_path):
    proc = run_script("plot.py", tmp_path / "missing")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: run directory not found: {tmp_path / 'missing'}"


def test_a_sweep_is_plotted_against_its_learning_rate_or_another_swept_flag(tmp_path):
    from conftest import assert_real_png
    from encoderfit.cli.sweep import plot_axis

    assert plot_axis(["learning_rate", "epochs"]) == "learning_rate"
    assert plot_axis(["epochs", "weight_decay", "seed"]) == "weight_decay"
    assert plot_axis(["epochs"]) == "epochs"
    trials = [{"value": v, "epochs": e, "weight_decay": w, "learning_rate": 2e-5}
              for v, e, w in ((0.8, 3, 0.0), (0.82, 3, 0.01), (0.81, 5, 0.1))]
    for x in ("weight_decay", "epochs"):
        assert_real_png(plot.plot_sweep(trials, "accuracy", tmp_path / f"{x}.png", x=x))
    # the two drawings differ: the x axis is the flag asked for
    a, b = (np.asarray(Image.open(tmp_path / f"{x}.png")) for x in ("weight_decay", "epochs"))
    assert a.shape != b.shape or (a != b).any()


def test_a_sweeps_pruned_trials_are_drawn_apart_and_its_log_axis_names_the_rates(tmp_path, captured_figures):
    trials = [{"value": v, "epochs": e, "learning_rate": lr, "status": st}
              for v, e, lr, st in ((0.80, 3, 1e-5, "done"), (0.85, 3, 3e-5, "done"), (0.47, 3, 1e-4, "pruned"),
                                   (0.83, 10, 1e-5, "done"), (0.90, 10, 1e-4, "done"))]
    plot.plot_sweep(trials, "accuracy", tmp_path / "sweep.png")
    ax = captured_figures["sweep.png"].axes[0]
    lines = {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()), line.get_linestyle())
             for line in ax.lines}
    assert lines["3 epoch(s)"][:2] == ([1e-5, 3e-5], [0.80, 0.85])  # the pruned trial is not on the line
    assert lines["3 epoch(s): pruned (value when stopped)"] == ([1e-4], [0.47], "None")
    assert lines["10 epoch(s)"][:2] == ([1e-5, 1e-4], [0.83, 0.90])
    assert ax.get_xscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1e-05", "3e-05", "1e-04"]
    assert not [t.get_text() for t in ax.get_xticklabels(minor=True) if t.get_text()]
