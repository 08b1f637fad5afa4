"""The one place that reaches into TRL's internals (as `modeling_ml_mamba/ml_mamba_compat.py` does for transformers).

TRL's trainers (`SFTTrainer`, `DPOTrainer`, `GRPOTrainer`) train through a fused LM head (`trl.add_fused_lm_head`)
that projects hidden states onto the vocabulary in tiles. On Triton devices it projects only the positions that carry
a label; everywhere else it projects every position (trl 1.16, `trl/trainer/utils.py`), so that compiled backends
(Neuron, XLA) keep one tile shape. Eager CPU training compiles nothing, and in a vision-language batch most positions
carry no label (729 image tokens and the prompt per sample, against a few dozen answer tokens): projecting them costs
a large share of the step for nothing. `score_labelled_positions_on_cpu` turns the labelled-only projection on for
CPU tensors too: the same loss and gradients, and on the benchmark's 129M model an assistant-only SFT step on a
LLaVA-like batch takes 66 s instead of 102 s, at 8.0 instead of 11.8 GB (`benchmarks/RESULTS.md`, "Training through
TRL's fused LM head").
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)

_MARK = "_ml_mamba_scores_labelled_positions_on_cpu"


def score_labelled_positions_on_cpu() -> bool:
    """Make TRL's fused LM head project only the labelled positions of CPU tensors, as it does on Triton devices.

    Idempotent; process-wide (every model trained through TRL's fused head in this process, ours or not). Under
    `torch.compile` the number of labelled positions changes the shapes from batch to batch (Dynamo then compiles a
    dynamic-shape graph). Returns whether the switch is in place: False, with a warning, when the installed TRL
    decides differently (its internals moved), in which case training is unchanged, only slower on CPU.
    """
    try:
        from trl.trainer import utils as trl_utils
    except ImportError:
        return False
    decides = getattr(trl_utils, "_use_triton", None)
    if decides is None or not callable(decides):
        logger.warning("This TRL's fused LM head has no `_use_triton` switch; it keeps projecting every position "
                       "on CPU (correct, slower).")
        return False
    if getattr(decides, _MARK, False):
        return True

    def labelled_only(device) -> bool:
        return device.type == "cpu" or decides(device)

    setattr(labelled_only, _MARK, True)
    trl_utils._use_triton = labelled_only
    return True


__all__ = ["score_labelled_positions_on_cpu"]
