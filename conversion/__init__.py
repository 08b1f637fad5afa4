"""Converters from the original checkpoints into this package's format (`ml-mamba-convert`).

```python
>>> from ml_mamba.conversion import convert_ml_mamba, convert_cobra, convert_mamba_ssm_lm
>>> convert_ml_mamba("huangwenjun1994/ML-Mamba", "ml-mamba-2.7b")     # -> AutoModelForImageTextToText folder
>>> convert_cobra("han1997/cobra", "cobra-3.5b")                      # cobra+3b
>>> convert_mamba_ssm_lm("state-spaces/mamba2-2.7b", "mamba2-2.7b-hf", tokenizer="EleutherAI/gpt-neox-20b")
```
Every converter reads pickles with `torch.load(weights_only=True)`, accounts for every tensor (an unused or missing key
is an error that lists the keys), checks all shapes before writing, and reloads the result through the Auto classes.
"""

from .assemble import IMAGE_FIRST_ZEPHYR_TEMPLATE, VISION_BACKBONES
from .checkpoints import ConversionError, KeyMapper, load_pickle, resolve_file
from .mamba_ssm_lm import convert_mamba_ssm_lm, read_mamba_ssm_config, text_config_from_mamba_ssm
from .original_vlms import convert_cobra, convert_ml_mamba, map_cobra, map_ml_mamba, ml_mamba_connector_rules

__all__ = [
    "convert_ml_mamba",
    "convert_cobra",
    "convert_mamba_ssm_lm",
    "ConversionError",
    "KeyMapper",
    "load_pickle",
    "resolve_file",
    "read_mamba_ssm_config",
    "text_config_from_mamba_ssm",
    "ml_mamba_connector_rules",
    "map_ml_mamba",
    "map_cobra",
    "IMAGE_FIRST_ZEPHYR_TEMPLATE",
    "VISION_BACKBONES",
]
