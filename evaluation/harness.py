"""One call to score a model on several benchmarks: `evaluate_model`. The CLI (`ml-mamba-eval`) is a thin layer on it.

    from ml_mamba.evaluation import evaluate_model, load_model

    model, processor = load_model("path/or/hub-id")
    results = evaluate_model(model, processor, ["pope", "digits-vqa"], "outputs/eval",
                             data={"digits-vqa": "outputs/demo/eval/digits_vqa.jsonl"}, limit=200)
    results["model_index"]  # -> save_model_card(folder, eval_results=results["model_index"])
"""

from __future__ import annotations

import logging
from pathlib import Path

from .data import load_examples
from .results import task_entry, write_results
from .runner import process_state, run_task
from .tasks import TASKS, Task, get_task

logger = logging.getLogger(__name__)


def load_model(model_id: str, *, dtype: str | None = None, device: str | None = None,
               trust_remote_code: bool | None = None, quantize: str | None = None):
    """(model, processor) of any `image-text-to-text` model, through `AutoModelForImageTextToText`/`AutoProcessor`.

    ML-Mamba checkpoints load with the installed package's classes, or with their Hub code when
    `trust_remote_code=True`. The model is put on `device` (default: this process's accelerator, see `accelerate`).
    ``quantize="int8"`` makes an ML-Mamba model's language model and head int8 weight-only (`quantize_int8`).
    """
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    import modeling_ml_mamba  # noqa: F401  (registers the ML-Mamba Auto classes)

    torch_dtype = {None: None, "auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}
    if dtype not in torch_dtype:
        raise ValueError(f"dtype must be one of {list(torch_dtype)[1:]}, got {dtype!r}.")
    kwargs = {"dtype": torch_dtype[dtype]} if dtype else {}
    model = AutoModelForImageTextToText.from_pretrained(model_id, trust_remote_code=trust_remote_code, **kwargs)
    processor = AutoProcessor.from_pretrained(model_id, trust_remote_code=trust_remote_code)
    model.to(device or process_state().device).eval()
    if quantize is not None:
        if quantize != "int8":
            raise ValueError(f"quantize must be 'int8' or None, got {quantize!r}.")
        from modeling_ml_mamba.ml_mamba_quant import quantize_int8

        if not hasattr(getattr(model, "model", None), "language_model"):
            raise ValueError(f"quantize='int8' is for ML-Mamba models; {type(model).__name__} is not one.")
        quantize_int8(model)
    return model, processor


def evaluate_model(model, processor, tasks: list[str | Task], output_dir: str | Path, *,
                   data: dict[str, str] | None = None, split: str | None = None, limit: int | None = None,
                   image_dir: str | None = None, batch_size: int = 8, max_new_tokens: int | None = None,
                   prompt_template: str | None = None, num_workers: int = 0, model_id: str | None = None,
                   task_options: dict | None = None, overwrite: bool = False, progress: bool = True) -> dict | None:
    """Score `model` on `tasks` and write `<output_dir>/results.json` (and `<output_dir>/<task>/predictions.jsonl`).

    Args:
        tasks: task names (see `TASKS`) or `Task` objects.
        data: a data source per task name (local file, folder or Hub id); a task without one reads its Hub copy.
        split, limit, image_dir: passed to `load_examples` for every task.
        max_new_tokens: overrides the tasks' own (128 like the seed papers' harness; 8 for digits-vqa).
        task_options: options given to the tasks that have them, e.g. {"ocr": "before", "answer_mode": "generate"}.
        overwrite: start over instead of resuming from predictions already in `output_dir`.

    Returns the results dict on the main process (None on the others under `accelerate launch`).
    """
    data, task_options = dict(data or {}), dict(task_options or {})
    model_id = model_id or getattr(model, "name_or_path", None) or type(model).__name__
    unknown = sorted(set(data) - {task if isinstance(task, str) else task.name for task in tasks})
    if unknown:
        raise ValueError(f"data was given for task(s) {unknown} that are not being run ({[str(t) for t in tasks]}).")
    resolved = []
    for task in tasks:
        if isinstance(task, str):
            options = {k: v for k, v in task_options.items() if k in getattr(TASKS.get(task), "options", {})}
            task = get_task(task, **options)
        resolved.append(task)

    entries, state = {}, process_state()
    for task in resolved:
        examples, source = load_examples(task, data.get(task.name), split=split, limit=limit, image_dir=image_dir)
        logger.info("%s: %d examples from %s", task.name, len(examples), source.location)
        run_config = {"model": model_id, "dtype": str(getattr(model, "dtype", "")),
                      "data": {k: v for k, v in source.describe().items() if k not in ("num_rows", "limit")}}
        run = run_task(model, processor, task, examples, Path(output_dir) / task.name, batch_size=batch_size,
                       max_new_tokens=max_new_tokens, prompt_template=prompt_template, num_workers=num_workers,
                       run_config=run_config, overwrite=overwrite, progress=progress)
        if run is None:  # not the main process
            continue
        logger.info("%s: %d predicted now in %.1f s, %d read back from an earlier run", task.name, run.generated,
                    run.seconds, len(examples) - run.generated)
        generation = {"max_new_tokens": max_new_tokens or task.max_new_tokens, "do_sample": False,
                      "answer_mode": task.answer_mode if task.candidates else "generate",
                      "prompt_template": prompt_template or "chat template"}
        entries[task.name] = task_entry(task, run.metrics, source, len(examples), generation)
    if not state.is_main_process:
        return None
    return write_results(output_dir, model_id, entries)
