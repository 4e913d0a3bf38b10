"""Share a checkpoint on the Hugging Face Hub, through huggingface_hub's own client: its model card rewritten
to load from the repository, the repository created if need be, and the checkpoint's folder uploaded.

``check_hub_access`` runs before any training (``--push_to_hub``): offline, without a login, or with a
repository name the Hub would refuse, the run stops at once with one line rather than after hours.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from encoderfit.utils import UserError


def check_repo_id(repo_id: str, flag: str = "--push_to_hub") -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UserError(f"{flag} {repo_id!r} is not a Hub repository name (user/name): "
                        f"{' '.join(str(exc).split())[:160]}") from None


def check_hub_access(repo_id: str, flag: str = "--push_to_hub") -> str:
    """The logged-in user's name, or a UserError saying why nothing could be uploaded (asked of the Hub)."""
    from huggingface_hub import HfApi, constants

    check_repo_id(repo_id, flag if flag.startswith("--") else "--repo_id")
    instead = f", or leave {flag} out" if flag.startswith("--") else ""
    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{flag} needs the Hub, and HF_HUB_OFFLINE is set: unset it{instead}")
    try:
        from huggingface_hub.errors import LocalTokenNotFoundError
    except ImportError:  # pragma: no cover - older huggingface_hub
        LocalTokenNotFoundError = OSError
    try:
        who = HfApi().whoami()
    except LocalTokenNotFoundError:
        raise UserError(f"{flag}: not logged in to the Hugging Face Hub: run `hf auth login` (or set HF_TOKEN) "
                        f"first{instead}") from None
    except Exception as exc:  # no network, a refused token, the Hub down: all mean "cannot upload now"
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"{flag}: cannot reach the Hugging Face Hub as a logged-in user ({message}): check the "
                        f"network and the login (hf auth login){instead}") from None
    return who.get("name", "?") if isinstance(who, dict) else "?"


def files_to_upload(checkpoint: Path) -> list:
    """The checkpoint's files that go to the repository (everything but temporaries and training state), with its
    ONNX export where there is one (onnx/: the layout the Hub's model repositories use)."""
    from encoderfit.run.checkpoint import TRAINING_STATE
    from encoderfit.serve.onnx import ONNX_DIR

    def kept(p: Path) -> bool:
        return p.is_file() and not p.name.startswith(".") and not p.name.endswith(".tmp") and p.name != TRAINING_STATE

    root = Path(checkpoint)
    onnx = [f"{ONNX_DIR}/{p.name}" for p in (root / ONNX_DIR).iterdir() if kept(p)] if (root / ONNX_DIR).is_dir() else []
    return sorted(p.name for p in root.iterdir() if kept(p)) + sorted(onnx)


def push_checkpoint(checkpoint: Path, repo_id: str, *, private: bool = False,
                    commit_message: Optional[str] = None) -> str:
    """Upload ``checkpoint`` (final/ or best/) with its model card, rewritten so that its snippets load
    ``repo_id``; returns the repository's URL."""
    from huggingface_hub import HfApi

    from encoderfit.serve.card import write_model_card

    checkpoint = Path(checkpoint)
    check_repo_id(repo_id)
    write_model_card(checkpoint, model_ref=repo_id)
    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(checkpoint),
                          allow_patterns=files_to_upload(checkpoint),
                          commit_message=commit_message or f"Upload {checkpoint.parent.name}/{checkpoint.name}")
    except Exception as exc:
        message = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise UserError(f"cannot upload {checkpoint} to {repo_id} ({message}); it is kept on disk: push it later "
                        f"with encoderfit push {checkpoint.parent} --repo_id {repo_id}") from None
    return str(url)
