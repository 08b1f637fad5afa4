"""`ml-mamba-push`: validate a saved model folder and upload it to the Hugging Face Hub.

    ml-mamba-push outputs/my-model me/ml-mamba-digits --dry-run       # list + validate, upload nothing
    ml-mamba-push outputs/my-model me/ml-mamba-digits --private
    ml-mamba-push outputs/my-model me/ml-mamba-digits --revision v2 --create-pr

The token comes from --token, HF_TOKEN or `hf auth login`. Safetensors files above --max-shard-size are re-sharded;
a README.md model card is generated when the folder has none; pickles, missing remote code or an auto_map that does
not match the code make the push fail before anything is sent.
"""

from __future__ import annotations

import argparse
import sys

from .push import PublishError, push_to_hub


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ml-mamba-push", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the model folder (save_pretrained of model and processor)")
    parser.add_argument("repo_id", help="Hub model repo, e.g. me/ml-mamba-digits (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repo private")
    parser.add_argument("--revision", "--branch", dest="revision", default=None,
                        help="branch to upload to (created if missing; default main)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.add_argument("--commit-message", default=None)
    parser.add_argument("--max-shard-size", default="5GB", help="re-shard safetensors files above this (default 5GB)")
    parser.add_argument("--exclude", nargs="*", default=[], metavar="GLOB", help="more files not to upload")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")
    parser.add_argument("--dry-run", action="store_true", help="list and validate what would be uploaded, then stop")
    parser.add_argument("--skip-load-check", action="store_true",
                        help="do not load the folder in a fresh process (the static checks still run)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = push_to_hub(args.folder, args.repo_id, private=args.private, revision=args.revision,
                             commit_message=args.commit_message, create_pr=args.create_pr,
                             max_shard_size=args.max_shard_size, exclude=args.exclude, token=args.token,
                             dry_run=args.dry_run, load_check=not args.skip_load_check)
    except PublishError as error:
        print(f"ml-mamba-push: not uploaded, the folder failed validation:\n{error}", file=sys.stderr)
        return 1
    except Exception as error:  # Hub errors: auth, offline mode, permissions, network
        print(f"ml-mamba-push: upload to {args.repo_id} failed: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
