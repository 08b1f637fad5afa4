"""Model cards for ml-mamba models: Hub metadata from `ModelCardData`, prose from a Jinja template.

```python
>>> from ml_mamba.model_cards import save_model_card
>>> card = save_model_card("outputs/my-model", model, model_id="me/ml-mamba-digits",
...                        training={"recipe": "LoRA SFT", "steps": 200}, datasets=["my-org/digits-vqa"])
```
"""

from .model_card import ARCHITECTURE_PAPERS, build_model_card, describe_model, save_model_card, usage_snippet

__all__ = ["save_model_card", "build_model_card", "describe_model", "usage_snippet", "ARCHITECTURE_PAPERS"]
