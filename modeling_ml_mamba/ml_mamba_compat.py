"""What differs between the transformers releases this package supports (5.23 and later 5.x).

transformers 5.24 renamed the cache of every model, in `forward` arguments, in model outputs and in `generate`,
from `cache_params` (Mamba models) / `past_key_values` to `cache`, and renames the old keywords on the way in.
The remote code in a saved folder meets whatever transformers its user has, so it follows the installed release.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers.generation.utils import ALL_CACHE_NAMES

# The keyword and output field under which this transformers passes a recurrent cache around.
CACHE_NAME = "cache" if "cache" in ALL_CACHE_NAMES else "cache_params"


def pick_cache(cache=None, cache_params=None, past_key_values=None):
    """The one cache given under any of the names the releases use (an error if two differ)."""
    given = [c for c in (cache, cache_params, past_key_values) if c is not None]
    if any(c is not given[0] for c in given[1:]):
        raise ValueError("Pass the cache once: `cache`, `cache_params` and `past_key_values` name the same argument.")
    return given[0] if given else None


def output_with_cache(cls):
    """`@dataclass` for a `ModelOutput` whose field ``cache`` takes this transformers' cache name (`CACHE_NAME`)."""
    if CACHE_NAME != "cache":
        cls.__annotations__ = {CACHE_NAME if name == "cache" else name: kind
                               for name, kind in cls.__annotations__.items()}
        setattr(cls, CACHE_NAME, cls.__dict__["cache"])
        delattr(cls, "cache")
    return dataclass(cls)
