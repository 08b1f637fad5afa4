"""Processing for ML-Mamba: the processor (shipped as Hub remote code), chat templates, images and tokenizers."""

from .ml_mamba_chat_templates import ZEPHYR_CHAT_TEMPLATE
from .ml_mamba_image_utils import load_rgb, to_rgb
from .processing_ml_mamba import DINO_SIGLIP_NORMALIZATIONS, MLMambaProcessor

__all__ = ["MLMambaProcessor", "DINO_SIGLIP_NORMALIZATIONS", "ZEPHYR_CHAT_TEMPLATE", "load_rgb", "to_rgb"]
