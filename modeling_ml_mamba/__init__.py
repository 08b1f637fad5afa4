"""ml-mamba: ML-Mamba, Cobra and VL-Mamba as Hugging Face transformers models.

```python
from modeling_ml_mamba import MLMambaConfig, MLMambaForConditionalGeneration, MLMambaProcessor
```
Importing the package registers the classes with `AutoConfig`, `AutoModel`, `AutoModelForImageTextToText`,
`AutoModelForCausalLM` and `AutoProcessor`; `save_pretrained` writes the `auto_map` and the remote-code files so that
a saved folder loads anywhere with `trust_remote_code=True`, without this package.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from ml_mamba.processing import DINO_SIGLIP_NORMALIZATIONS, MLMambaProcessor

from .configuration_ml_mamba import AUTO_MAP, MLMambaConfig, MLMambaFusedVisionConfig
from .modeling_ml_mamba import MLMambaForConditionalGeneration, MLMambaModel, MLMambaPreTrainedModel
from .ml_mamba_presets import PRESETS, preset_config



def _register():
    AutoConfig.register(MLMambaConfig.model_type, MLMambaConfig, exist_ok=True)
    AutoModel.register(MLMambaConfig, MLMambaModel, exist_ok=True)
    AutoModelForImageTextToText.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
    AutoModelForCausalLM.register(MLMambaConfig, MLMambaForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(MLMambaConfig, MLMambaProcessor, exist_ok=True)
    # `save_pretrained` writes one auto_map entry per registered class; MLMambaConfig adds the others (AUTO_MAP).
    MLMambaConfig.register_for_auto_class("AutoConfig")
    MLMambaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
    MLMambaModel.register_for_auto_class("AutoModel")
    MLMambaProcessor.register_for_auto_class("AutoProcessor")


_register()

__all__ = [
    "MLMambaConfig",
    "MLMambaFusedVisionConfig",
    "MLMambaModel",
    "MLMambaPreTrainedModel",
    "MLMambaForConditionalGeneration",
    "MLMambaProcessor",
    "DINO_SIGLIP_NORMALIZATIONS",
    "PRESETS",
    "preset_config",
    "AUTO_MAP",
]
