"""Quickstart: build a small ML-Mamba, save it Hub-style, reload it through the Auto classes, run the pipeline.

    python scripts/quickstart.py --output-dir outputs/quickstart

The model has random weights (nothing can be downloaded here), so its answer is noise; what this shows is the
round trip a Hub user relies on: safetensors + config with `auto_map` + remote code + processor, loaded with
`trust_remote_code=True` and answered through `pipeline("image-text-to-text")`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor, SiglipImageProcessor, pipeline

from ml_mamba.processing.ml_mamba_tokenizers import train_bpe_tokenizer
from modeling_ml_mamba import MLMambaForConditionalGeneration, MLMambaProcessor, preset_config


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="outputs/quickstart")
    args = parser.parse_args()

    tokenizer = train_bpe_tokenizer(["Which digit is shown? It is a seven. Is it even or odd?"] * 20, vocab_size=300)
    config = preset_config("tiny", image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    config.text_config.vocab_size = len(tokenizer)
    processor = MLMambaProcessor(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}),
                                 tokenizer=tokenizer, num_image_tokens=config.num_image_tokens)
    torch.manual_seed(0)
    model = MLMambaForConditionalGeneration(config)
    print(f"built ML-Mamba ({config.connector_type} connector, {config.text_config.model_type} LM): "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")

    model.save_pretrained(args.output_dir)
    processor.save_pretrained(args.output_dir)
    print(f"saved to {args.output_dir}: {', '.join(sorted(os.listdir(args.output_dir)))}")

    reloaded = AutoModelForImageTextToText.from_pretrained(args.output_dir, trust_remote_code=True)
    AutoProcessor.from_pretrained(args.output_dir, trust_remote_code=True)
    same = all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()))
    print(f"reloaded through AutoModelForImageTextToText: weights identical = {same}")

    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8))
    pipe = pipeline("image-text-to-text", model=args.output_dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": "Which digit is shown?"}]}]
    answer = pipe(text=messages, max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    print(f"pipeline('image-text-to-text') answered (random weights, so noise): {answer!r}")


if __name__ == "__main__":
    main()
