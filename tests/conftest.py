"""Shared fixtures: a tiny random-init BERT built from a config, synthetic data files, a CLI runner."""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

POSITIVE = ["good", "great", "excellent", "wonderful", "superb", "delightful"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dreadful", "tedious"]
FILLER = ["the", "movie", "film", "plot", "actors", "story", "was", "quite", "really", "and", "scenes", "music"]


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: the CUDA path; runs only where there is a CUDA GPU (pytest -m gpu)")


def cli_env(**extra) -> dict:
    env = dict(os.environ)
    # No network in tests: hub lookups fail at once instead of retrying.
    # MKL_DYNAMIC=FALSE: MKL would otherwise use fewer threads when the machine is busy (tests in parallel),
    # and a matmul split over another number of threads rounds differently: no bitwise resume to compare
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
                "MKL_DYNAMIC": env.get("MKL_DYNAMIC", "FALSE")})
    if "PYTHONPATH" in extra and env.get("PYTHONPATH"):  # a test's hooks go first; what was there stays
        extra = {**extra, "PYTHONPATH": os.pathsep.join([extra["PYTHONPATH"], env["PYTHONPATH"]])}
    env.update(extra)
    return env


DEVICE_SCRIPTS = ("train_single.py", "train_ddp.py", "predict.py", "evaluate.py")


def on_cpu(script: str, args) -> list:
    """The command's arguments, with ``--device cpu`` unless the test names a device.

    These tests are about CPU semantics (bitwise resume, fp32 tolerances, hooks that count Python
    calls): on a GPU machine they still run on the CPU, as in CI. Tests of the CUDA path say
    ``--device cuda`` (tests/test_gpu.py)."""
    args = [str(a) for a in args]
    if Path(script).name in DEVICE_SCRIPTS and "--device" not in args and "--help" not in args:
        args += ["--device", "cpu"]
    return args


def run_script(script: str, *args, timeout: int = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "training" / script), *on_cpu(script, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=env or cli_env())


def synthetic_rows(n: int, seed: int = 0, labels=("negative", "positive")) -> list:
    """Sentences whose label is given by one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        y = i % len(labels)
        word = rng.choice(POSITIVE if y == 1 else NEGATIVE) if len(labels) == 2 else f"topic{y}"
        words = rng.choices(FILLER, k=rng.randint(3, 10))
        words.insert(rng.randint(0, len(words)), word)
        rows.append({"text": " ".join(words), "label": labels[y]})
    rng.shuffle(rows)
    return rows


def write_rows(path: Path, rows: list, text_key="text", label_key="label") -> Path:
    path = Path(path)
    renamed = [{text_key: r["text"], label_key: r["label"]} for r in rows]
    suffix = path.suffix
    if suffix in (".csv", ".tsv"):
        import csv
        with open(path, "w", newline="", encoding="utf-8") as fh:
            w = csv.DictWriter(fh, fieldnames=[text_key, label_key], delimiter="\t" if suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(renamed)
    elif suffix in (".jsonl", ".json"):
        path.write_text("".join(json.dumps(r) + "\n" for r in renamed))
    elif suffix == ".parquet":
        import pandas as pd
        pd.DataFrame(renamed).to_parquet(path)
    else:
        raise ValueError(suffix)
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 2-layer, 64-wide BERT with random weights and the default model's tokenizer (no dropout)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from training.model import default_model_dir

    out = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    BertForSequenceClassification(config).save_pretrained(out)
    src = default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture
def synthetic_csv(tmp_path) -> Path:
    return write_rows(tmp_path / "train.csv", synthetic_rows(300))


THREE_LABELS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="session")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A run of the tiny model on a 3-class task with string labels, trained once per test session."""
    base = tmp_path_factory.mktemp("trained-three-class")
    train = write_rows(base / "train.csv", synthetic_rows(300, seed=3, labels=THREE_LABELS))
    proc = run_script("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--epochs", 4,
                      "--batch_size", 16, "--learning_rate", 2e-3, "--max_length", 32, "--log_every", 5,
                      "--checkpoint_dir", base / "ck", "--run_name", "r")
    assert proc.returncode == 0, proc.stderr
    return base / "ck" / "r"


def assert_real_png(path: Path, width=(300, 4000), height=(300, 4000)) -> None:
    """A valid PNG of a sensible size that has been drawn on (not a blank canvas)."""
    from PIL import Image
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert width[0] <= im.width <= width[1] and height[0] <= im.height <= height[1], im.size
        colors = im.convert("RGB").getcolors(maxcolors=1 << 20)
        assert colors is not None and len(colors) > 20
