"""The installable package: a wheel into a fresh virtualenv gives the ``encoderfit`` command; its dispatcher."""
from __future__ import annotations

import subprocess
import sys
import zipfile

from conftest import ROOT, cli_env


def test_a_wheel_installed_in_a_fresh_virtualenv_gives_the_command(tmp_path):
    """``pip install .`` as a user runs it, split in two so that nothing is downloaded: the wheel is built with
    this environment's pinned build backend, then installed alone (no dependencies) into a new virtualenv,
    whose ``encoderfit`` answers --help from the standard library only."""
    import shutil

    source = tmp_path / "source"  # a copy: the build writes build/ and *.egg-info beside the sources
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".git", ".venv", ".device", ".whl", "build",
                                                                  "*.egg-info", "checkpoints", "__pycache__"))
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
                            "-w", tmp_path / "dist", source], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("encoderfit-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "encoderfit/api.py" in names and "encoderfit/tasks/registry.py" in names
    assert not [n for n in names if n.startswith(("tests/", "training/", "bench/"))]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True, timeout=300)
    installed = subprocess.run([venv / "bin" / "python", "-m", "pip", "install", "--no-deps", "--no-index",
                                "--quiet", "--disable-pip-version-check", wheel], capture_output=True, text=True,
                               timeout=300)
    assert installed.returncode == 0, installed.stderr
    top = subprocess.run([venv / "bin" / "encoderfit", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert top.returncode == 0 and "train" in top.stdout and "predict" in top.stdout, top
    train = subprocess.run([venv / "bin" / "encoderfit", "train", "--help"], capture_output=True, text=True,
                           cwd=tmp_path)
    assert train.returncode == 0 and "--learning_rate" in train.stdout and "encoderfit train" in train.stdout
    bad = subprocess.run([venv / "bin" / "encoderfit", "train", "--epochs", "0"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert (bad.returncode, bad.stderr) == (2, "error: --epochs must be positive, got 0\n")


def test_the_dispatcher_names_its_commands_and_refuses_others():
    def run(*args):
        return subprocess.run([sys.executable, "-m", "encoderfit", *args], capture_output=True, text=True,
                              cwd=ROOT, env=cli_env(PYTHONPATH=str(ROOT / "src")), timeout=120)

    listed = run("--help")
    assert listed.returncode == 0
    assert [ln.split()[0] for ln in listed.stdout.splitlines() if ln.startswith("  ")] == \
        ["train", "predict", "evaluate", "sweep", "plot", "export", "push", "launch"]
    unknown = run("fine-tune")
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1 and "'fine-tune'" in unknown.stderr
    assert run().returncode == 2  # no command: the usage, and the exit code of a usage error
    for command, flag in (("predict", "--checkpoint"), ("evaluate", "--checkpoint"), ("sweep", "--sweep_dir"),
                          ("plot", "--output"), ("push", "--repo_id"), ("export", "--int8"),
                          ("launch", "--nproc_per_node")):
        shown = run(command, "--help")
        assert shown.returncode == 0 and flag in shown.stdout, (command, shown.stderr)
