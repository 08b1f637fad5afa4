"""`ml-mamba-convert`: the original checkpoints into this package's format.

    ml-mamba-convert ml-mamba  --output-dir ml-mamba-2.7b            # huangwenjun1994/ML-Mamba latest-checkpoint.pt
    ml-mamba-convert cobra     --output-dir cobra-3.5b               # han1997/cobra cobra+3b
    ml-mamba-convert mamba-lm  state-spaces/mamba2-2.7b --output-dir mamba2-2.7b-hf --tokenizer EleutherAI/gpt-neox-20b

Sources are Hub repo ids or local folders/files; vision towers and tokenizers likewise (offline: pass local folders).
"""

from __future__ import annotations

import argparse
import json
import sys

from .assemble import DTYPES
from .checkpoints import ConversionError
from .original_vlms import (
    COBRA_MODEL,
    COBRA_REPO,
    DEFAULT_VISION,
    ML_MAMBA_FILE,
    ML_MAMBA_REPO,
    ZEPHYR_TOKENIZER,
    convert_cobra,
    convert_ml_mamba,
)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output-dir", required=True, help="folder to write the converted model to")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    parser.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (default 5GB)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the cached login)")


def _vlm(parser: argparse.ArgumentParser, towers_default) -> None:
    parser.add_argument("--vision-towers", nargs="+", default=towers_default, metavar="ID_OR_DIR",
                        help="transformers ports of the vision towers, DINOv2 first (default: %(default)s)")
    parser.add_argument("--image-size", type=int, default=None, help="input resolution (default: the release's)")
    parser.add_argument("--hub-id", default=None, help="repo id the model card's usage snippet loads (default: the "
                        "output folder's name); use the id you will push to")
    parser.add_argument("--skip-forward-check", action="store_true",
                        help="after reloading, do not run a test forward pass (the weights are still compared)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ml-mamba-convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    ml = commands.add_parser("ml-mamba", help="ML-Mamba's latest-checkpoint.pt -> MSC + Mamba-2 model")
    ml.add_argument("checkpoint", nargs="?", default=ML_MAMBA_REPO, help="the .pt, its folder or a Hub id "
                    "(default: %(default)s)")
    ml.add_argument("--checkpoint-file", default=ML_MAMBA_FILE)
    ml.add_argument("--tokenizer", default=ZEPHYR_TOKENIZER, help="tokenizer Hub id or folder (default: %(default)s)")
    ml.add_argument("--lm-config", default=None, help="mamba_ssm config.json (file, folder or Hub id, e.g. "
                    "state-spaces/mamba2-2.7b) to check the LM against")
    ml.add_argument("--n-groups", type=int, default=1, help="Mamba-2 B/C groups (mamba_ssm default 1)")
    _vlm(ml, list(DEFAULT_VISION[0]))
    _common(ml)

    cobra = commands.add_parser("cobra", help="a Cobra run (config.json + checkpoints/latest-checkpoint.pt)")
    cobra.add_argument("checkpoint", nargs="?", default=COBRA_REPO, help="run folder or Hub id (default: %(default)s)")
    cobra.add_argument("--model-id", default=COBRA_MODEL, help="subfolder of the Hub repo (default: %(default)s)")
    cobra.add_argument("--tokenizer", default=None, help="default: Zephyr's for *-zephyr LMs, else GPT-NeoX-20B's")
    _vlm(cobra, None)
    _common(cobra)

    lm = commands.add_parser("mamba-lm", help="a mamba_ssm LM (config.json + pytorch_model.bin) -> transformers")
    lm.add_argument("source", help="folder or Hub id, e.g. state-spaces/mamba2-2.7b")
    lm.add_argument("--tokenizer", default=None, help="tokenizer to save alongside, e.g. EleutherAI/gpt-neox-20b")
    _common(lm)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    common = dict(dtype=args.dtype, max_shard_size=args.max_shard_size, token=args.token)
    try:
        if args.command == "ml-mamba":
            report = convert_ml_mamba(args.checkpoint, args.output_dir, checkpoint_file=args.checkpoint_file,
                                      vision_towers=args.vision_towers, image_size=args.image_size or DEFAULT_VISION[1],
                                      tokenizer=args.tokenizer, lm_config=args.lm_config, n_groups=args.n_groups,
                                      forward_check=not args.skip_forward_check, hub_id=args.hub_id, **common)
        elif args.command == "cobra":
            report = convert_cobra(args.checkpoint, args.output_dir, model_id=args.model_id,
                                   vision_towers=args.vision_towers, image_size=args.image_size,
                                   tokenizer=args.tokenizer, forward_check=not args.skip_forward_check,
                                   hub_id=args.hub_id, **common)
        else:
            from .mamba_ssm_lm import convert_mamba_ssm_lm

            report = convert_mamba_ssm_lm(args.source, args.output_dir, tokenizer=args.tokenizer, **common)
    except (ConversionError, FileNotFoundError) as error:
        print(f"ml-mamba-convert: error: {error}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
