"""Evaluation harness: the seed papers' benchmarks (VQAv2, TextVQA, VizWiz, GQA, POPE, VSR, ScienceQA-IMG, MME) and
local exact-match VQA files, scored the official way, batched, resumable and shardable with `accelerate`.

    from ml_mamba.evaluation import evaluate_model, load_model
    model, processor = load_model("outputs/demo")
    results = evaluate_model(model, processor, ["digits-vqa"], "outputs/eval",
                             data={"digits-vqa": "outputs/demo/eval/digits_vqa.jsonl"})

Command line: `ml-mamba-eval --help`. Metrics as `evaluate` modules: `evaluate.load(metric_path("vqa_accuracy"))`.
"""

from .data import load_examples, open_image
from .harness import evaluate_model, load_model
from .metric_modules import METRIC_NAMES, load_metric, metric_path
from .results import summary_table
from .runner import run_task
from .tasks import TASKS, Example, Task, TaskDataError, get_task

__all__ = ["evaluate_model", "load_model", "load_examples", "open_image", "run_task", "get_task", "TASKS", "Task",
           "Example", "TaskDataError", "load_metric", "metric_path", "METRIC_NAMES", "summary_table"]
