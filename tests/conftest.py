"""Shared fixtures: a tiny random-init BERT built from a config, synthetic data files, a CLI runner."""
from __future__ import annotations

import contextlib
import functools
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
sys.path.insert(0, str(ROOT / "src"))  # this checkout's package, installed or not

# pytest -n 2 on two cores: two workers, each training in this process or in commands of two OpenMP threads
# (four or more threads for two cores). OpenMP's default has an idle thread spin, holding a core that
# another process's thread has work for; passive waiting changes no result (the work is split over the
# threads the same way), only how a thread waits. Set before torch is loaded here; the commands the tests
# start inherit it (cli_env copies the environment). An OMP_WAIT_POLICY already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The commands the tests start use 2 threads without MKL's dynamic thread count (cli_env), and so do runs in
# this process (run_main): a run compared bitwise with another process's must split its matmuls the same way,
# on any number of cores and however busy they are.
os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("MKL_DYNAMIC", "FALSE")

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
    # PYTHONFAULTHANDLER: a process killed by SIGABRT (a C++ abort) prints every thread's Python stack first
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1",
                "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS", "2"),
                "MKL_DYNAMIC": env.get("MKL_DYNAMIC", "FALSE")})
    if "PYTHONPATH" in extra and env.get("PYTHONPATH"):  # a test's hooks go first; what was there stays
        extra = {**extra, "PYTHONPATH": os.pathsep.join([extra["PYTHONPATH"], env["PYTHONPATH"]])}
    env.update(extra)
    return env


DEVICE_SCRIPTS = ("train_single.py", "train_ddp.py", "predict.py", "evaluate.py", "sweep.py")


def tail(stderr: str, n: int = 3000) -> str:
    """A failed process's stderr for an assertion message: its last ``n`` characters, led by the line of a
    gloo abort at exit if there is one (the one failure pyproject's rerun rule runs again: the interpreter's
    fatal-error dump after it can push it out of the tail)."""
    abort = [line for line in stderr.splitlines() if "terminate called without an active exception" in line]
    return "\n".join(abort[:1] + [stderr[-n:]])


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


_ONE_PROCESS = """
import json, runpy, sys
script, runs = sys.argv[1], json.loads(sys.argv[2])
for args in runs:
    sys.argv = [script, *args]
    try:
        runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, (int, type(None))):
            print(exc.code, file=sys.stderr)  # as the interpreter prints sys.exit("message")
    sys.stdout.flush()
    print("\\n@@ exit", code, flush=True)
    if code:
        break
"""


def run_scripts_in_one_process(script: str, *runs, timeout: int = 600) -> list:
    """``run_script(script, *args)`` for each ``args`` in ``runs``, one after another in one new interpreter:
    for a module fixture's runs, which cannot use ``run_main``, without paying the imports once a run.
    Each answer has its run's exit code and standard output; standard error is the process's, given to the
    last answer. It stops after the first run that fails."""
    proc = subprocess.run([sys.executable, "-c", _ONE_PROCESS, str(ROOT / "training" / script),
                           json.dumps([on_cpu(script, args) for args in runs])],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=cli_env())
    parts = proc.stdout.split("\n@@ exit ")  # run 1's output, then "code\nrun 2's output", ...
    outs = [parts[0], *(p.split("\n", 1)[1] if "\n" in p else "" for p in parts[1:])]
    answers = [subprocess.CompletedProcess(runs[k], int(p.split("\n", 1)[0]), outs[k], "")
               for k, p in enumerate(parts[1:])]
    if not answers or answers[-1].returncode == 0 and len(answers) < len(runs):  # the interpreter itself died
        answers.append(subprocess.CompletedProcess(runs[len(answers)], proc.returncode or 1, outs[-1], ""))
    elif proc.returncode and answers[-1].returncode == 0:  # it died after the last run, at its exit
        answers[-1].returncode = proc.returncode
    answers[-1].stderr = proc.stderr
    return answers


# Python's own warning filters (python -W default is not set): what a fresh `python script.py` shows.
_PYTHON_DEFAULT_WARNING_FILTERS = (("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                                   ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                                   ("ignore", ResourceWarning, ""))


@contextlib.contextmanager
def _as_in_a_fresh_process(monkeypatch):
    """The library state a new interpreter started by ``run_script`` has, for the length of one in-process run.

    Earlier tests in this process may have turned the Hugging Face libraries' warnings and progress bars
    off (as the tools themselves do), and their log handlers write to the stream that was ``sys.stderr``
    when they were made: reset the first, point the second at the captured standard error, and put
    both back after. Offline as ``cli_env`` (those flags are read when the libraries are imported)."""
    import logging

    for name, value in cli_env().items():
        if os.environ.get(name) != value:
            monkeypatch.setenv(name, value)
    restore = []
    if "huggingface_hub" in sys.modules:
        from huggingface_hub import constants
        hub_tqdm = sys.modules["huggingface_hub.utils.tqdm"]
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(hub_tqdm, "progress_bar_states", {})
    if "datasets" in sys.modules:
        import datasets
        ds_logging, ds_tqdm = sys.modules["datasets.utils.logging"], sys.modules["datasets.utils.tqdm"]
        monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
        monkeypatch.setattr(ds_tqdm, "_hf_datasets_progress_bars_disabled",
                            ds_tqdm.HF_DATASETS_DISABLE_PROGRESS_BARS is True)
        restore.append((ds_logging.set_verbosity, ds_logging.get_verbosity()))
        ds_logging.set_verbosity(ds_logging._get_default_logging_level())
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging
        monkeypatch.setattr(hf_logging, "_tqdm_active", True)
        restore.append((hf_logging.set_verbosity, hf_logging.get_verbosity()))
        hf_logging.set_verbosity(hf_logging._get_default_logging_level())
    handlers = {h for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
                for h in getattr(lg, "handlers", [])
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                and not isinstance(getattr(type(h), "stream", None), property)  # those write to sys.stderr already
                and h.stream not in (sys.stdout, sys.__stdout__)}
    streams = {h: h.stream for h in handlers}
    for h in handlers:
        h.stream = sys.stderr
    try:
        yield
    finally:
        for h, stream in streams.items():
            h.stream = stream
        for setter, value in restore:
            setter(value)


def run_in_process(script: str, *args, capfd, monkeypatch, timeout=None) -> subprocess.CompletedProcess:
    """What ``run_script(script, *args)`` answers, from the script run as ``__main__`` in this process.

    For commands whose test reads what they print, write and exit with (bad input, refusals, runs compared
    with another process's, bitwise too: both use the same threads, set at the top of this file): without a
    new interpreter, they do not pay its 3-5 s of importing torch, transformers and datasets. The answer is
    the one a process would
    give: the exit code (``sys.exit``'s, 1 with a traceback on standard error for an uncaught
    exception), everything written to file descriptors 1 and 2 (``capfd``), and the warnings a fresh
    interpreter would print. The RNGs, thread count, working directory, ``sys.argv`` and ``sys.path``
    are put back.
    The true subprocess (``run_script``) stays where the test is about the process itself (a signal, its
    exit), or needs hooks (PYTHONPATH) that only a new interpreter takes.
    ``timeout`` is ``run_script``'s, unused: there is no process to wait for."""
    import random
    import runpy
    import threading
    import traceback
    import warnings

    import numpy as np
    import torch

    path = ROOT / "training" / script if (ROOT / "training" / script).is_file() else ROOT / script
    argv = [str(path), *on_cpu(script, args)]
    rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    threads = torch.get_num_threads()
    torch.set_num_threads(threads)  # also fixes MKL's thread count, as a started command's environment does
    saved_path = list(sys.path)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # printed, as a process prints them
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    capfd.readouterr()  # what this test printed before is not the command's
    extra_err = []
    with _as_in_a_fresh_process(monkeypatch), warnings.catch_warnings(record=True) as shown:
        warnings.resetwarnings()
        for action, category, module in reversed(_PYTHON_DEFAULT_WARNING_FILTERS):
            warnings.filterwarnings(action, category=category, module=module)
        try:
            runpy.run_path(str(path), run_name="__main__")
            code = 0
        except SystemExit as exc:
            if exc.code is None or isinstance(exc.code, int):
                code = exc.code or 0
            else:  # sys.exit("message"): printed, exit code 1
                extra_err.append(f"{exc.code}\n")
                code = 1
        except Exception:  # noqa: BLE001 - what the interpreter does with an uncaught exception
            extra_err.append(traceback.format_exc())
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            sys.path[:] = saved_path
            random.setstate(rng[0])
            np.random.set_state(rng[1])
            torch.set_rng_state(rng[2])
            torch.set_num_threads(threads)
    warned = [warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in shown]
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(argv, code, out, err + "".join(warned + extra_err))


@pytest.fixture
def run_main(capfd, monkeypatch):
    """``run_main(script, *args)``: ``run_in_process`` with this test's captured output."""
    return functools.partial(run_in_process, capfd=capfd, monkeypatch=monkeypatch)


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


def disk_bytes(root: Path) -> int:
    """The bytes of the files under ``root``, a file with several hard links counted once."""
    files = {(st.st_dev, st.st_ino): st.st_size for st in (p.stat() for p in Path(root).rglob("*") if p.is_file())}
    return sum(files.values())


def made_once(tmp_path_factory, name: str, make) -> Path:
    """``make(directory)`` once per test session, also under ``pytest -n``: the workers share the directory.

    For a fixture's read-only product (a trained run the tests only read): with xdist each worker
    would otherwise make its own, and the work-stealing scheduler splits modules across workers. The
    first worker makes it while holding a lock; the others wait and use it. A failed attempt leaves
    nothing marked done, so the next worker to ask tries again (and fails the same way)."""
    import fcntl

    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # this session's directory, above each worker's own
    directory, done = base / f"shared-{name}", base / f"shared-{name}.done"
    with open(base / f"shared-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(directory, ignore_errors=True)
            directory.mkdir()
            make(directory)
            done.write_text("")
    return directory


def make_tiny_bert(out: Path, *, dropout: float = 0.0, seed: int = 0) -> Path:
    """A 2-layer, 64-wide BERT with random weights and the default model's tokenizer, saved in ``out``."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    from encoderfit.modeling.model import default_model_dir

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=128,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    BertForSequenceClassification(config).save_pretrained(out)
    src = default_model_dir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(src / name, out / name)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """The tiny BERT without dropout (train and eval modes compute the same)."""
    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture
def synthetic_csv(tmp_path) -> Path:
    return write_rows(tmp_path / "train.csv", synthetic_rows(300))


THREE_LABELS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="session")
def trained(tiny_model_dir, tmp_path_factory) -> Path:
    """A run of the tiny model on a 3-class task with string labels, trained once per test session
    (once for all the workers of ``pytest -n``: the tests only read it)."""
    def make(base: Path) -> None:
        train = write_rows(base / "train.csv", synthetic_rows(300, seed=3, labels=THREE_LABELS))
        proc = run_script("train_single.py", "--model", tiny_model_dir, "--train_file", train, "--epochs", 4,
                          "--batch_size", 16, "--learning_rate", 2e-3, "--max_length", 32, "--log_every", 5,
                          "--checkpoint_dir", base / "ck", "--run_name", "r")
        assert proc.returncode == 0, proc.stderr

    return made_once(tmp_path_factory, "trained-three-class", make) / "ck" / "r"


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
