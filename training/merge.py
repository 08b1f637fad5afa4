"""Merge a LoRA adapter into a plain ML-Mamba checkpoint (safetensors + remote code + processor + model card) that
loads with `AutoModelForImageTextToText.from_pretrained(..., trust_remote_code=True)` and no peft.

```bash
ml-mamba-merge-lora --adapter out/lora --output_dir out/merged     # or: python -m ml_mamba.training.merge
```
"""

from __future__ import annotations

import argparse
import json
import os

from modeling_ml_mamba import MLMambaForConditionalGeneration, MLMambaProcessor


def merge_lora(adapter, output_dir: str, base_model: str | None = None, processor=None,
               base_models: list[str] | None = None, max_shard_size: str = "5GB") -> str:
    """Merge ``adapter`` into its base model and save the result to ``output_dir``; returns ``output_dir``.

    Args:
        adapter: a peft `PeftModel` (e.g. ``trainer.model`` after LoRA training) or an adapter folder / Hub id.
        base_model: the base ML-Mamba folder or Hub id (default: the adapter's ``base_model_name_or_path``).
        processor: the processor to save alongside (default: the adapter folder's, else the base model's).
        base_models: Hub ids for the model card's ``base_model`` metadata.
    """
    from peft import PeftConfig, PeftModel

    adapter_dir = adapter if isinstance(adapter, str) else None
    if adapter_dir is not None:
        config = PeftConfig.from_pretrained(adapter_dir)
        base_model = base_model or config.base_model_name_or_path
        if not base_model:
            raise ValueError(f"{adapter_dir!r} does not name its base model; pass `base_model`.")
        base = MLMambaForConditionalGeneration.from_pretrained(base_model)
        adapter = PeftModel.from_pretrained(base, adapter_dir)
        if processor is None:
            source = adapter_dir if os.path.isfile(os.path.join(adapter_dir, "processor_config.json")) else base_model
            processor = MLMambaProcessor.from_pretrained(source)
    elif not isinstance(adapter, PeftModel):
        raise TypeError(f"`adapter` must be a PeftModel or an adapter folder, got {type(adapter).__name__}.")
    merged = adapter.merge_and_unload()
    merged.save_pretrained(output_dir, max_shard_size=max_shard_size)
    if processor is None:
        processor = MLMambaProcessor.from_pretrained(base_model or merged.name_or_path)
    processor.save_pretrained(output_dir)

    from ml_mamba.model_cards import save_model_card

    training = None
    if adapter_dir is not None and os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        with open(os.path.join(adapter_dir, "adapter_config.json")) as handle:
            lora = json.load(handle)
        training = {"recipe": "LoRA fine-tuning, merged into the weights",
                    "hyperparameters": {k: lora.get(k) for k in ("r", "lora_alpha", "target_modules")}}
    save_model_card(output_dir, merged, base_models=base_models, training=training or {
        "recipe": "LoRA fine-tuning, merged into the weights"})
    return output_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder or Hub id (ml-mamba-train output).")
    parser.add_argument("--output_dir", required=True, help="Where the merged checkpoint goes.")
    parser.add_argument("--base_model", default=None, help="Base ML-Mamba (default: the adapter's base).")
    parser.add_argument("--max_shard_size", default="5GB")
    args = parser.parse_args(argv)
    output = merge_lora(args.adapter, args.output_dir, base_model=args.base_model, max_shard_size=args.max_shard_size)
    print(f"Merged checkpoint saved to {os.path.abspath(output)}")


if __name__ == "__main__":
    main()
