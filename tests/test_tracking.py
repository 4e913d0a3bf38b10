"""--report_to: TensorBoard, MLflow (a local store, offline) and Weights & Biases (offline mode) get the same step
and epoch metrics as metrics.jsonl, the config as parameters, the final metrics and the model card."""
from __future__ import annotations

import glob
import json
import struct

import pytest

from conftest import synthetic_rows, write_rows
from encoderfit import UserError, fit

pytest.importorskip("mlflow")
pytest.importorskip("wandb")


def _wandb_records(path: str) -> list:
    """The records of a W&B run file (LevelDB's log format: 32 KiB blocks of CRC, length and type headers, after a
    7-byte W&B header), each a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, out, part = open(path, "rb").read(), 7, 32768, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = pb.Record()
            record.ParseFromString(part)
            out.append(record)
    return out


def test_report_to_sends_the_same_metrics_config_and_card_to_each_tracker(tmp_path, tiny_model_dir, monkeypatch):
    import mlflow
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.chdir(tmp_path)  # MLflow's artifacts go to ./mlruns beside a SQLite store: here, not in the checkout
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    train = write_rows(tmp_path / "train.csv", synthetic_rows(64, seed=5))
    result = fit(train, model=str(tiny_model_dir), max_length=32, batch_size=16, epochs=2, learning_rate=1e-3,
                 device="cpu", log_every=1, no_progress=True, checkpoint_dir=tmp_path / "ck", run_name="trk",
                 report_to="tensorboard,mlflow,wandb")
    run_dir = tmp_path / "ck" / "trk"
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r["loss"] for r in rows if r["event"] == "step"}
    epochs = [r for r in rows if r["event"] == "epoch"]
    assert len(steps) == 8 and len(epochs) == 2
    summary, card = result.summary, (run_dir / "final" / "README.md").read_text()

    # MLflow, read back with its own client from the local store
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("encoderfit").experiment_id])
    assert [r.info.run_name for r in runs] == ["trk"] and runs[0].info.status == "FINISHED"
    run = runs[0]
    assert run.data.params["learning_rate"] == "0.001" and run.data.params["epochs"] == "2"
    assert run.data.params["task"] == "single_label" and run.data.params["report_to"] == "tensorboard,mlflow,wandb"
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "step/loss")}
    assert history == pytest.approx(steps, abs=1e-9)
    val = [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "epoch/val_accuracy")]
    assert val == [(e["step"], pytest.approx(e["val_accuracy"], abs=1e-9)) for e in epochs]
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(summary["final_val_accuracy"], abs=1e-9)
    assert run.data.metrics["best_val_loss"] == pytest.approx(summary["best_val_loss"], abs=1e-9)
    local = client.download_artifacts(run.info.run_id, "README.md", str(tmp_path / "dl"))
    assert open(local).read() == card

    # Weights & Biases, offline: the run file under RUN/wandb
    files = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1
    records = _wandb_records(files[0])
    started = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {item.key: json.loads(item.value_json) for item in started.config.update}
    assert started.display_name == "trk" and config["learning_rate"] == 0.001 and config["epochs"] == 2
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            item = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            if "step/loss" in item:
                logged[item["_step"]] = item["step/loss"]
    assert logged == pytest.approx(steps, abs=1e-9)
    final = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in r.summary.update})
    assert final["final_val_accuracy"] == pytest.approx(summary["final_val_accuracy"], abs=1e-9)
    saved = [f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files]
    assert "README.md" in saved

    # TensorBoard: the hyperparameters beside the scalars
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    plugins = {v.metadata.plugin_data.plugin_name
               for path in glob.glob(str(run_dir / "tensorboard" / "events.*"))
               for event in EventFileLoader(path).Load() for v in event.summary.value}
    assert {"hparams", "scalars", "text"} <= plugins


@pytest.mark.parametrize("value, message", [
    ("tensorbord", "--report_to: unknown tracker 'tensorbord': choose from tensorboard, mlflow, wandb"),
    ("none,mlflow", "--report_to none cannot go with other trackers"),
])
def test_report_to_bad_names_are_one_line_errors(value, message, run_main, tmp_path):
    proc = run_main("train_single.py", "--report_to", value, "--checkpoint_dir", tmp_path)
    assert proc.returncode == 2 and proc.stderr.startswith(f"error: {message}") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr and not list(tmp_path.iterdir())
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        fit(report_to=value)


def test_a_tracker_not_installed_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    train = write_rows(tmp_path / "train.csv", synthetic_rows(32, seed=5))
    with pytest.raises(UserError, match=r"--report_to wandb needs the wandb package: pip install wandb"):
        fit(train, model=str(tiny_model_dir), device="cpu", checkpoint_dir=tmp_path / "ck", report_to="wandb")
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def test_a_tracker_that_fails_mid_run_is_dropped_with_one_warning(capsys):
    """A tracker's own library failing at a log step (a network error) costs the run nothing: said once, dropped."""
    from encoderfit.run.tracking import Trackers

    class Flaky:
        calls = 0

        def scalars(self, values, step):
            Flaky.calls += 1
            raise ConnectionError("the tracking server went away")

    class Steady:
        seen = []

        def scalars(self, values, step):
            Steady.seen.append((step, values))

        def finish(self, final, card):
            Steady.seen.append(("final", final))

    trackers = Trackers()
    trackers.open = [Flaky(), Steady()]
    trackers.scalars("step", {"loss": 0.5, "epoch": 1}, 1)
    trackers.scalars("step", {"loss": 0.4}, 2)
    trackers.finish({"final_val_accuracy": 0.8, "test_metrics": {"accuracy": 0.7}, "task": "x"}, None)
    err = capsys.readouterr().err
    assert Flaky.calls == 1 and err.count("warning: Flaky failed to log metrics (the tracking server went away)") == 1
    assert Steady.seen == [(1, {"step/loss": 0.5}), (2, {"step/loss": 0.4}),
                           ("final", {"final_val_accuracy": 0.8, "test_accuracy": 0.7})]
