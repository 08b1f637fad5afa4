"""Everything this package takes from transformers' internals, in one place, with a branch per release.

A saved model folder carries this file and runs inside whatever transformers its user has installed, so the remote
code must not break on a rename. The rest of the package imports only transformers' public API (``transformers``,
``transformers.modeling_outputs``, ``transformers.utils``, ``transformers.image_utils``,
``transformers.initialization``) and this module; ``tests/test_compat.py`` checks that no other module reaches into ``transformers.models.*``,
``transformers.integrations`` or ``transformers.generation.utils``.

What differs across the supported releases (5.23 to 5.25; see the README, "Supported transformers releases"):

* cache name -- 5.24 renamed the cache of every model from ``cache_params`` (Mamba) / ``past_key_values`` to ``cache``
  in forward arguments, ``ModelOutput`` fields and ``generate`` (``CACHE_NAME``, ``pick_cache``, ``output_with_cache``).
* Mamba-2 mixer -- ``Mamba2Mixer`` keeps its name and weights in 5.23-5.25; 5.25 moved its conv into
  ``causal_conv1d_forward`` and its scan into ``mamba2_scan_forward`` (both kernelizable). We subclass the mixer
  (``FastMamba2Mixer``), which works the same way on every release: it is the one internal class we cannot avoid.
* gated RMSNorm -- 5.25 renamed ``MambaRMSNormGated`` to ``Mamba2RMSNormGated``. We own ours
  (``ml_mamba_norm.GatedRMSNorm``) and only read ``weight``/``group_size``/``variance_epsilon`` of transformers'.
* cache token count -- 5.25's linear-attention cache layers count the tokens they have seen (``get_seq_length``),
  which an in-place decode step or a window-only conv update must settle itself; 5.23/5.24 have no count
  (``advance_cache_count`` is then a no-op).
* accelerate hooks -- ``force_accelerate_hooks`` (5.17+) fires a child's offloading hook when its weights are used
  directly; where absent, a no-op decorator (no offloading support is lost on releases that never had it).
* ``SubConfigSpec`` (5.20+) declares the config's sub-configs, ``Cache.is_recording_past`` (5.21+) guards the fast
  path; with ``huggingface_hub<2`` before 5.20, they are why releases before 5.23 (the oldest CI tests) are out.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass

import transformers
from transformers import Mamba2Model

# --- the cache name (5.24+: `cache`; 5.23: `cache_params`) -------------------------------------------------------
try:
    from transformers.generation.utils import ALL_CACHE_NAMES
except ImportError:  # a release that dropped the table: read the name off the LM's forward
    ALL_CACHE_NAMES = [name for name in ("cache", "cache_params", "past_key_values")
                       if name in inspect.signature(Mamba2Model.forward).parameters]

# The keyword and output field under which this transformers passes a recurrent cache around.
CACHE_NAME = "cache" if "cache" in ALL_CACHE_NAMES else "cache_params"
# `generate`'s keyword and output field for the cache (5.23: `past_key_values` there, `cache_params` in forwards).
GENERATE_CACHE_NAME = "cache" if CACHE_NAME == "cache" else "past_key_values"


def pick_cache(cache=None, cache_params=None, past_key_values=None):
    """The one cache given under any of the names the releases use (an error if two differ). A name other than this
    release's (`CACHE_NAME`) works but warns once, as transformers does, so that callers migrate."""
    given = {name: c for name, c in (("cache", cache), ("cache_params", cache_params),
                                      ("past_key_values", past_key_values)) if c is not None}
    caches = list(given.values())
    if any(c is not caches[0] for c in caches[1:]):
        raise ValueError("Pass the cache once: `cache`, `cache_params` and `past_key_values` name the same argument.")
    for name in given:
        if name != CACHE_NAME:  # a FutureWarning, as transformers' own `deprecate_kwarg` gives
            warnings.warn(f"`{name}` is deprecated with transformers {transformers.__version__}: pass the recurrent "
                          f"cache as `{CACHE_NAME}`.", FutureWarning, stacklevel=3)
    return caches[0] if caches else None


def output_with_cache(cls):
    """`@dataclass` for a `ModelOutput` whose field ``cache`` takes this transformers' cache name (`CACHE_NAME`)."""
    if CACHE_NAME != "cache":
        cls.__annotations__ = {CACHE_NAME if name == "cache" else name: kind
                               for name, kind in cls.__annotations__.items()}
        setattr(cls, CACHE_NAME, cls.__dict__["cache"])
        delattr(cls, "cache")
    return dataclass(cls)


def cache_token_count(cache) -> int | None:
    """How many tokens ``cache`` has seen (5.25+), or None on releases whose linear-attention caches keep no count
    (there `generate` cannot continue from a recurrent cache: it asks the cache for a length it does not have)."""
    counter = getattr(cache.layers[0], "cumulative_length_linear", None) if cache.layers else None
    return None if counter is None else int(counter)


def advance_cache_count(cache, layer_idx: int, tokens: int = 1) -> None:
    """Add ``tokens`` to the token count of ``cache``'s layer ``layer_idx`` (what ``cache.get_seq_length()``
    reports). 5.25+ counts tokens per linear-attention layer, inside `update_conv_state` (by the width of the conv
    input it is given) and `increase_count` (one decoded token); a fast path that hands the cache only the conv
    window, or updates it in place, settles the difference here. A no-op on releases without a count."""
    counter = getattr(cache.layers[layer_idx], "cumulative_length_linear", None) if tokens else None
    if counter is not None:
        counter.add_(tokens)


# --- the Mamba-2 mixer (same name, weights and cache calls in 5.23-5.25) --------------------------------------------
from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer  # noqa: E402

# transformers' PyTorch SSD scan and causal conv, the references our tests and benchmarks compare against (same
# signatures in 5.23-5.25).
from transformers.models.mamba2.modeling_mamba2 import causal_conv1d_fn, mamba2_chunk_scan  # noqa: E402

# --- accelerate's offloading hooks for weights used outside a child's forward ---------------------------------------
try:
    from transformers.integrations.accelerate import force_accelerate_hooks
except ImportError:  # not in this release: nothing to fire
    def force_accelerate_hooks(child_module_names):
        return lambda forward: forward

# --- sub-config declarations (5.20+) -------------------------------------------------------------------------------
from transformers.configuration_utils import SubConfigSpec  # noqa: E402

__all__ = ["CACHE_NAME", "GENERATE_CACHE_NAME", "cache_token_count", "pick_cache", "output_with_cache", "advance_cache_count", "Mamba2Mixer",
           "mamba2_chunk_scan", "causal_conv1d_fn", "force_accelerate_hooks", "SubConfigSpec"]
