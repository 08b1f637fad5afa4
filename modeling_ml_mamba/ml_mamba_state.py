"""A conversation's recurrent state on disk: the cache a `generate` call returns, saved and loaded again.

A Mamba language model's cache is its whole memory of the conversation: one conv window and one SSM state per
layer, the same size after 10 tokens or 100k. `save_state` writes it to a safetensors file together with the token
ids it has seen; `load_state` rebuilds a transformers cache from that file for a model, which `generate` continues
from (only the tokens the state has not seen are processed; `MLMambaForConditionalGeneration` drops the images
already inside it).

```python
>>> out = model.generate(**inputs, max_new_tokens=32, return_dict_in_generate=True)
>>> save_state(out.past_key_values, "chat.safetensors", token_ids=out.sequences[0, :-1])  # what the state has seen
>>> cache, seen = load_state("chat.safetensors", model)
>>> model.generate(**next_turn_inputs, past_key_values=cache)  # next_turn_inputs' ids start with `seen`
```
"""

from __future__ import annotations

import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from .ml_mamba_compat import advance_cache_count

FORMAT = "ml-mamba-state"
VERSION = "1"


def _states(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    layers = range(len(cache.layers))
    states = [(cache.get_conv_state(i), cache.get_recurrent_state(i)) for i in layers]
    if not states or any(conv is None or ssm is None for conv, ssm in states):
        raise ValueError("save_state needs a cache that holds a state for every layer (one returned by `generate` "
                         "with `return_dict_in_generate=True` or by a forward with `use_cache=True`).")
    return states


def save_state(cache, path: str | os.PathLike, token_ids: torch.Tensor | None = None) -> None:
    """Write ``cache``'s conv windows and SSM states (and the ``token_ids`` it has seen, 1-D, if given: what a later
    turn checks its prompt against) to the safetensors file ``path``."""
    tensors = {}
    for i, (conv, ssm) in enumerate(_states(cache)):
        tensors[f"conv.{i}"], tensors[f"ssm.{i}"] = conv.detach().contiguous().cpu(), ssm.detach().contiguous().cpu()
    metadata = {"format": FORMAT, "version": VERSION, "num_layers": str(len(cache.layers))}
    if token_ids is not None:
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids must be 1-D (one sequence), got shape {tuple(token_ids.shape)}.")
        tensors["token_ids"] = token_ids.detach().to(torch.int64).contiguous().cpu()
    save_file(tensors, os.fspath(path), metadata=metadata)


def load_state(path: str | os.PathLike, model, device: torch.device | str | None = None):
    """``(cache, token_ids or None)`` from a file written by `save_state`, as a fresh transformers cache for
    ``model`` (an ML-Mamba model or its config) on ``device`` (default: the model's)."""
    config = getattr(model, "config", model)
    if device is None and hasattr(model, "parameters"):
        device = next(model.parameters()).device
    with safe_open(os.fspath(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not a state saved by `save_state` (metadata format "
                             f"{metadata.get('format')!r}, expected {FORMAT!r}).")
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    text_config = config.get_text_config(decoder=True)
    num_layers = text_config.num_hidden_layers
    if int(metadata["num_layers"]) != num_layers:
        raise ValueError(f"{path} holds the state of a {metadata['num_layers']}-layer model; this model has "
                         f"{num_layers} layers.")
    token_ids = tensors.pop("token_ids", None)
    cache = DynamicCache(config=config)
    for i in range(num_layers):
        conv, ssm = tensors[f"conv.{i}"].to(device), tensors[f"ssm.{i}"].to(device)
        cache.update_conv_state(conv, i, conv_kernel_size=conv.shape[-1])
        cache.update_recurrent_state(ssm, i)
        if token_ids is not None:  # the token count of transformers 5.25+ (what `generate` slices the prompt by)
            advance_cache_count(cache, i, len(token_ids) - conv.shape[-1])
    return cache, token_ids


__all__ = ["save_state", "load_state"]
