"""Training ML-Mamba with TRL's `SFTTrainer`: arguments, data, model set-up, LoRA merge and the digits demo.

```python
from ml_mamba.training import load_llava_json, apply_stage, lora_config, build_trainer, merge_lora
```
Command line: ``ml-mamba-train`` (``python -m ml_mamba.training``), ``ml-mamba-merge-lora``, ``ml-mamba-demo``.
Accelerate configs for multi-GPU training: `accelerate_config("ddp")` / `accelerate_config("fsdp")`.
"""

import os

from .arguments import LORA_TARGETS, STAGES, DataArguments, MLMambaSFTConfig, ModelArguments
from .data import BadSampleError, DataReport, load_llava_json, load_training_data, prepare_dataset
from .merge import merge_lora
from .models import STAGE_PARTS, apply_stage, build_from_parts, load_model_and_processor, lora_config, processor_for
from .train import build_trainer, main, parse_args, run
from .trl_compat import score_labelled_positions_on_cpu

ACCELERATE_CONFIGS = ("ddp", "fsdp")


def accelerate_config(name: str) -> str:
    """Path of a shipped `accelerate launch --config_file` YAML: ``"ddp"`` or ``"fsdp"``."""
    if name not in ACCELERATE_CONFIGS:
        raise ValueError(f"Unknown accelerate config {name!r}: expected one of {ACCELERATE_CONFIGS}.")
    return os.path.join(os.path.dirname(__file__), "accelerate", f"{name}.yaml")


__all__ = [
    "ModelArguments", "DataArguments", "MLMambaSFTConfig", "STAGES", "STAGE_PARTS", "LORA_TARGETS",
    "load_llava_json", "load_training_data", "prepare_dataset", "BadSampleError", "DataReport",
    "load_model_and_processor", "build_from_parts", "processor_for", "apply_stage", "lora_config",
    "build_trainer", "run", "main", "parse_args", "merge_lora", "accelerate_config", "score_labelled_positions_on_cpu",
]
