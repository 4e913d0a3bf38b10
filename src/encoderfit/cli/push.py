"""Upload a finished run's checkpoint to the Hugging Face Hub, with its model card.

    encoderfit push checkpoints/RUN --repo_id you/sentiment-minilm
    encoderfit push checkpoints/RUN/best --repo_id you/sentiment-minilm --private

A run directory means its final/ (or give best/ itself). The model card (README.md) is rewritten so that
its usage snippets load the repository; the repository is created if it does not exist. Needs a login
(hf auth login, or HF_TOKEN).
"""
from __future__ import annotations

import sys
from pathlib import Path

from encoderfit.utils import HelpFormatter, ToolParser, UserError, run_tool


def build_parser() -> ToolParser:
    parser = ToolParser(prog="encoderfit push", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    parser.add_argument("checkpoint", help="A run directory (its final/) or a checkpoint directory (final/, best/).")
    parser.add_argument("--repo_id", required=True, help="The Hub repository, user/name (or org/name).")
    parser.add_argument("--private", action="store_true", help="Create the repository as private.")
    parser.add_argument("--commit_message", default=None, help="The upload's commit message.")
    parser.add_argument("--dry_run", action="store_true",
                        help="Write the model card and list the files that would be uploaded; upload nothing.")
    return parser


def resolve(path: str) -> Path:
    """The checkpoint to upload: ``path`` itself, or a run directory's final/."""
    p = Path(path).resolve()  # a sweep's best/ is a link into its trial
    if not p.is_dir():
        raise UserError(f"{path}: no such run or checkpoint directory")
    if (p / "final").is_dir() and not (p / "config.json").is_file() or (p / "final" / "model.safetensors").is_file():
        p = p / "final"
    if not (p / "model.safetensors").is_file() or not (p / "config.json").is_file():
        raise UserError(f"{path} holds no finished model (config.json and model.safetensors): give a run directory "
                        f"whose run has finished, or its final/ or best/")
    return p


def run(args) -> int:
    from encoderfit.serve import hub

    checkpoint = resolve(args.checkpoint)
    hub.check_repo_id(args.repo_id, "--repo_id")
    if args.dry_run:
        from encoderfit.serve.card import write_model_card

        write_model_card(checkpoint, model_ref=args.repo_id)
        print(f"would upload to {args.repo_id}: " + ", ".join(hub.files_to_upload(checkpoint)))
        return 0
    user = hub.check_hub_access(args.repo_id, "encoderfit push")
    url = hub.push_checkpoint(checkpoint, args.repo_id, private=args.private, commit_message=args.commit_message)
    print(f"pushed {checkpoint} to {url} (as {user})")
    return 0


def main(argv=None) -> int:
    return run_tool(lambda: run(build_parser().parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
