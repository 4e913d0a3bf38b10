"""Sharing on the Hugging Face Hub: the real client's answers where this machine can get them (offline, no
network, a bad name), and, at the network's edge, exactly what would be sent."""
from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from conftest import ROOT, cli_env, synthetic_rows, write_rows
from encoderfit import UserError, fit, push_to_hub

TINY = dict(epochs=1, batch_size=16, max_length=32, device="cpu", no_progress=True)


def test_push_to_hub_offline_fails_before_training_in_one_line(tiny_model_dir, tmp_path, run_main):
    train = write_rows(tmp_path / "train.csv", synthetic_rows(40))
    proc = run_main("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--epochs", 1,
                    "--push_to_hub", "someone/model", "--checkpoint_dir", tmp_path / "ck", "--run_name", "r")
    assert proc.returncode == 2 and proc.stderr == (
        "error: --push_to_hub needs the Hub, and HF_HUB_OFFLINE is set: unset it, or leave --push_to_hub out\n")
    assert "epoch" not in proc.stdout and not (tmp_path / "ck" / "r").exists()  # nothing trained, nothing left
    bad = run_main("train_single.py", "--push_to_hub", "not a repo!", "--epochs", 1)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --push_to_hub 'not a repo!' is not a Hub repository")


def test_without_the_network_the_real_client_is_asked_and_the_answer_is_one_line(tmp_path):
    """Online mode, a token, and a Hub endpoint that refuses connections: huggingface_hub's own whoami() runs
    and fails; that is one line naming the problem."""
    env = cli_env(HF_ENDPOINT="http://127.0.0.1:9", HF_TOKEN="hf_not_a_real_token", PYTHONPATH=str(ROOT / "src"))
    env.pop("HF_HUB_OFFLINE")
    proc = subprocess.run([sys.executable, "-m", "encoderfit", "train", "--push_to_hub", "someone/model",
                           "--num_samples", "40", "--epochs", "1", "--device", "cpu", "--checkpoint_dir",
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: --push_to_hub: cannot reach the Hugging Face Hub as a logged-in user (")
    assert proc.stderr.count("\n") == 1 and not any(tmp_path.iterdir())
    env.pop("HF_TOKEN")
    env["HF_HOME"] = str(tmp_path / "hf-home")  # no stored token either
    nologin = subprocess.run([sys.executable, "-m", "encoderfit", "push", str(tmp_path), "--repo_id", "someone/m"],
                             capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert nologin.returncode == 2 and nologin.stderr.count("\n") == 1
    assert "no finished model" in nologin.stderr  # the checkpoint is checked first


class FakeHub:
    """The Hub client's three calls, recorded: what the run would send."""

    def __init__(self, monkeypatch):
        from huggingface_hub import HfApi, constants

        self.calls = []
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(HfApi, "whoami", lambda api, *a, **k: self.calls.append(("whoami",)) or {"name": "me"})
        monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **k: self.calls.append(("create", repo_id, k))
                            or f"https://huggingface.co/{repo_id}")
        monkeypatch.setattr(HfApi, "upload_folder", lambda api, **k: self._upload(**k))

    def _upload(self, **kwargs):
        from pathlib import Path

        folder = Path(kwargs["folder_path"])
        sent = {p.name: p.read_bytes() for p in folder.iterdir() if p.name in kwargs["allow_patterns"]}
        self.calls.append(("upload", kwargs, sent))


def test_a_run_with_push_to_hub_sends_final_with_its_card(tiny_model_dir, tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch)
    result = fit(pd.DataFrame(synthetic_rows(60, seed=2)), model=str(tiny_model_dir), checkpoint_dir=tmp_path,
                 run_name="r", push_to_hub="me/sentiment", hub_private=True, **TINY)
    assert [c[0] for c in hub.calls] == ["whoami", "create", "upload"]  # the login checked before training
    _, repo, options = hub.calls[1]
    assert repo == "me/sentiment" and options["private"] is True and options["exist_ok"] is True
    _, upload, sent = hub.calls[2]
    assert upload["repo_id"] == "me/sentiment" and upload["folder_path"] == str(result.final_checkpoint)
    assert sorted(sent) == ["README.md", "config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]
    assert sent["model.safetensors"] == (result.final_checkpoint / "model.safetensors").read_bytes()
    card = sent["README.md"].decode()
    assert 'pipeline("text-classification", model="me/sentiment")' in card and 'Classifier.load("me/sentiment")' in card
    assert json.loads(sent["config.json"])["id2label"] == {"0": "negative", "1": "positive"}


def test_push_an_existing_run_and_what_a_dry_run_lists(tiny_model_dir, tmp_path, monkeypatch, capsys):
    result = fit(pd.DataFrame(synthetic_rows(60, seed=3)), model=str(tiny_model_dir), checkpoint_dir=tmp_path,
                 run_name="r", **TINY)
    from encoderfit.cli import push

    capsys.readouterr()
    assert push.main([str(tmp_path / "r"), "--repo_id", "me/m", "--dry_run"]) == 0
    assert capsys.readouterr().out == ("would upload to me/m: README.md, config.json, model.safetensors, "
                                       "tokenizer.json, tokenizer_config.json\n")
    assert 'model="me/m"' in (result.final_checkpoint / "README.md").read_text()
    hub = FakeHub(monkeypatch)
    url = push_to_hub(tmp_path / "r" / "best", "me/best-one")
    assert url == "https://huggingface.co/me/best-one"
    _, upload, sent = hub.calls[-1]
    assert upload["folder_path"] == str(result.best_checkpoint) and "README.md" in sent
    with pytest.raises(UserError, match="not a Hub repository name"):
        push_to_hub(tmp_path / "r", "bad name!")
    with pytest.raises(UserError, match="no finished model"):
        push_to_hub(tmp_path, "me/m")


def test_a_finished_run_resumed_with_push_to_hub_still_pushes(tiny_model_dir, tmp_path, monkeypatch):
    rows = pd.DataFrame(synthetic_rows(60, seed=4))
    fit(rows, model=str(tiny_model_dir), checkpoint_dir=tmp_path, run_name="r", **TINY)
    hub = FakeHub(monkeypatch)
    again = fit(rows, model=str(tiny_model_dir), checkpoint_dir=tmp_path, run_name="r", resume="auto",
                push_to_hub="me/later", **TINY)
    assert again.completed and [c[0] for c in hub.calls] == ["whoami", "create", "upload"]
    assert hub.calls[2][1]["folder_path"] == str(tmp_path / "r" / "final")


def test_the_card_of_a_linked_checkpoint_is_its_runs(tiny_model_dir, tmp_path):
    """A sweep's best/ is a link into its trial: the card is read from the trial's run, not the link's folder."""
    from encoderfit import write_model_card

    result = fit(pd.DataFrame(synthetic_rows(60, seed=5)), model=str(tiny_model_dir), checkpoint_dir=tmp_path,
                 run_name="trial-001", **TINY)
    (tmp_path / "best").symlink_to(result.best_checkpoint)
    card = write_model_card(tmp_path / "best", model_ref="me/m").read_text()
    assert f"| accuracy | {result.summary['best_val_accuracy']:.4f} |" in card
    assert f"fine-tuned from `{tiny_model_dir}`" in card and "base_model" not in card.split("---")[1]
