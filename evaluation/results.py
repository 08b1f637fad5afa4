"""`results.json`: the metrics of every task of an output directory, plus the `model_index` list that
`ml_mamba.model_cards.save_model_card(eval_results=...)` (and `huggingface_hub.EvalResult(**entry)`) accepts as is.

The file holds no timings or dates, so an interrupted-then-resumed run writes the same file as an uninterrupted one.
"""

from __future__ import annotations

import json
from pathlib import Path

from .data import DataSource
from .tasks import TASKS, Task

RESULTS = "results.json"
TASK_TYPE = "visual-question-answering"


def model_index_entries(task: Task, metrics: dict, source: DataSource, num_examples: int) -> list[dict]:
    """`huggingface_hub.EvalResult` keyword arguments for the task's headline metrics.

    Data read from the Hub is named by its dataset id; a local file by the task and the file name. A `limit`ed run
    says so in `dataset_name`, so a subset score is never mistaken for the benchmark's.
    """
    if source.kind == "hub":
        dataset_type, dataset_name = source.location, task.title
    else:
        dataset_type, dataset_name = task.name, f"{task.title} ({Path(source.location).name})"
    if num_examples < source.num_rows:
        dataset_name += f", first {num_examples} of {source.num_rows} questions"
    entries = []
    for metric_type, metric_name, value in task.model_index_metrics(metrics):
        entry = {"task_type": TASK_TYPE, "dataset_type": dataset_type, "dataset_name": dataset_name,
                 "metric_type": metric_type, "metric_value": value, "metric_name": metric_name}
        if source.split:
            entry["dataset_split"] = source.split
        if source.config:
            entry["dataset_config"] = source.config
        entries.append(entry)
    return entries


def task_entry(task: Task, metrics: dict, source: DataSource, num_examples: int, generation: dict) -> dict:
    return {"metrics": metrics, "num_examples": num_examples, "task": task.describe(), "data": source.describe(),
            "generation": generation, "model_index": model_index_entries(task, metrics, source, num_examples)}


def write_results(output_dir: str | Path, model_id: str, entries: dict[str, dict]) -> dict:
    """Add the tasks in `entries` to `<output_dir>/results.json` (tasks of earlier runs there are kept)."""
    path = Path(output_dir) / RESULTS
    results = json.loads(path.read_text()) if path.is_file() else {"model": model_id, "results": {}}
    if results.get("model") != model_id:
        raise RuntimeError(f"{path} holds results of model {results.get('model')!r}, not {model_id!r}; use another "
                           f"output directory.")
    results["results"].update(entries)
    order = [name for name in TASKS if name in results["results"]]
    results["results"] = {name: results["results"][name] for name in order}
    results["model_index"] = [entry for name in order for entry in results["results"][name]["model_index"]]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return results


def summary_table(results: dict) -> str:
    """A Markdown table of the headline numbers (accuracies in %, MME in points)."""
    lines = ["| task | metric | value | questions |", "|---|---|---|---|"]
    for name, entry in results["results"].items():
        for item in entry["model_index"]:
            value = item["metric_value"]
            shown = f"{value:.2f}" if item["metric_type"].startswith("mme") else f"{100 * value:.2f}"
            lines.append(f"| {name} | {item['metric_name']} | {shown} | {entry['num_examples']} |")
    return "\n".join(lines)
