"""The `evaluate` metric modules shipped in `metrics/`, loaded offline from their folder."""

from __future__ import annotations

import functools
from pathlib import Path

METRICS_DIR = Path(__file__).parent / "metrics"
METRIC_NAMES = ("vqa_accuracy", "vqa_exact_match", "binary_vqa", "scienceqa_accuracy", "mme")


def metric_path(name: str) -> str:
    """The local folder of a metric module, for `evaluate.load(metric_path("vqa_accuracy"))`."""
    if name not in METRIC_NAMES:
        raise ValueError(f"Unknown metric {name!r}; the metric modules are {', '.join(METRIC_NAMES)}.")
    return str(METRICS_DIR / name)


@functools.cache
def load_metric(name: str, config_name: str | None = None):
    """`evaluate.load` of a shipped metric module (no Hub access), kept in memory only."""
    import evaluate

    return evaluate.load(metric_path(name), config_name=config_name, keep_in_memory=True)
