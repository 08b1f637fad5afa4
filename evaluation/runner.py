"""Run a model on a task: batched, left-padded greedy generation (or next-token scoring), predictions appended to a
JSONL file as they are made, sharded over processes with `accelerate`, and resumed where an interrupted run stopped.

Files in `<output_dir>/<task>/`:

- `run_config.json`: what the predictions depend on (model, task options, data, generation); a resumed run must match;
- `predictions.jsonl`: one record per question (`question_id`, `prediction`, `probabilities` in next-token mode,
  `target`, and `score` once the task is scored); while several processes run, each appends to
  `predictions.rank-<k>.jsonl`, and the main process merges them at the end.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import open_image
from .tasks import Example, Task

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
RUN_CONFIG = "run_config.json"


class PredictionStore:
    """The predictions of one task in `task_dir`: read back on resume, appended batch by batch, merged at the end."""

    def __init__(self, task_dir: Path, process_index: int = 0, num_processes: int = 1):
        self.task_dir = Path(task_dir)
        self.final = self.task_dir / PREDICTIONS
        self.own = self.final if num_processes == 1 else self.task_dir / f"predictions.rank-{process_index}.jsonl"

    def files(self) -> list[Path]:
        paths = [self.final, *sorted(self.task_dir.glob("predictions.rank-*.jsonl"))]
        return [path for path in paths if path.is_file()]

    @staticmethod
    def _read(path: Path) -> list[dict]:
        """Complete records of a file; a last line cut short by an interruption is dropped."""
        records = []
        with open(path, encoding="utf-8") as file:
            lines = file.read().split("\n")
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                if number == len(lines) - 1:  # no newline after it: the write was interrupted
                    logger.warning("Dropping an incomplete last line of %s (interrupted write).", path)
                    continue
                raise ValueError(f"{path}, line {number + 1}: not a JSON record; the predictions file is "
                                 f"corrupt.") from error
        return records

    def load(self) -> dict[str, dict]:
        """All predictions made so far (any process, any earlier run), by question id."""
        done = {}
        for path in self.files():
            for record in self._read(path):
                done[record["question_id"]] = record
        return done

    def consolidate(self, order: list[str], records: list[dict] | None = None) -> list[dict]:
        """Rewrite `records` (default: everything on disk) into `predictions.jsonl` atomically, in `order` with
        records of other questions after, and remove the rank files."""
        done = self.load() if records is None else {record["question_id"]: record for record in records}
        ordered = [done.pop(uid) for uid in order if uid in done] + list(done.values())
        tmp = self.final.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as file:
            for record in ordered:
                file.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, self.final)
        for path in self.task_dir.glob("predictions.rank-*.jsonl"):
            path.unlink()
        return ordered

    def append(self, records: list[dict]) -> None:
        """Append complete lines and push them to disk, so a crash loses at most the batch in flight."""
        with open(self.own, "a", encoding="utf-8") as file:
            file.write("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records))
            file.flush()
            os.fsync(file.fileno())


def process_state():
    """accelerate's `PartialState`; several processes on a machine without an accelerator use gloo on the CPU
    (accelerate picks that only when asked, e.g. after `torchrun` or `accelerate launch --multi_gpu` on a CPU box)."""
    from accelerate import PartialState

    has_accelerator = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return PartialState(cpu=several and not has_accelerator)


def check_run_config(task_dir: Path, config: dict, overwrite: bool = False) -> None:
    """Write `run_config.json`, or check that the one already there (a run to resume) is the same."""
    path = task_dir / RUN_CONFIG
    if path.is_file() and not overwrite:
        previous = json.loads(path.read_text())
        if previous != config:
            changed = sorted(key for key in set(previous) | set(config) if previous.get(key) != config.get(key))
            raise RuntimeError(
                f"{task_dir} holds predictions of a different run (differs in: {', '.join(changed)}; before: "
                f"{ {k: previous.get(k) for k in changed} }, now: { {k: config.get(k) for k in changed} }). "
                f"Use another output directory, or --overwrite to start this task again.")
        return
    if overwrite:
        for stale in task_dir.glob("predictions*.jsonl"):
            stale.unlink()
    task_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def user_prompt(processor, task: Task, example: Example, prompt_template: str | None = None) -> str:
    """The full model input text of an example: the task's prompt after one image, through the processor's chat
    template (add_generation_prompt=True) or through `prompt_template` ("{image}", "{prompt}" placeholders)."""
    prompt = task.prompt(example)
    if prompt_template is not None:
        placeholder = (getattr(processor, "video_token", "<video>") if task.media == "video"
                       else getattr(processor, "image_token", "<image>"))
        return prompt_template.format(image=placeholder, prompt=prompt)
    if getattr(processor, "chat_template", None) is None:
        raise ValueError("The processor has no chat template; pass prompt_template (--prompt-template), e.g. "
                         "'{image}In: {prompt}\\nOut:' for a base model.")
    media, text = {"type": task.media}, {"type": "text", "text": prompt}
    messages = [{"role": "user", "content": [text, media] if task.question_first else [media, text]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def candidate_token_ids(tokenizer, candidates: tuple[str, ...]) -> list[int]:
    """The first token of each candidate answer (as the seed papers' harness scores "Yes"/"No", "True"/"False")."""
    ids = [tokenizer.encode(candidate, add_special_tokens=False)[0] for candidate in candidates]
    if len(set(ids)) != len(ids):
        raise ValueError(f"The candidates {candidates} share their first token ({ids}); cannot score them by "
                         f"next-token probability. Use answer_mode='generate'.")
    return ids


class _Collate:
    """Builds the model inputs of a batch (in DataLoader workers when num_workers > 0)."""

    def __init__(self, processor, task, prompt_template):
        self.processor, self.task, self.prompt_template = processor, task, prompt_template

    def __call__(self, examples: list[Example]):
        texts = [user_prompt(self.processor, self.task, example, self.prompt_template) for example in examples]
        if self.task.media == "video":
            videos = [[[open_image(frame) for frame in example.image]] for example in examples]
            inputs = self.processor(videos=videos, text=texts, return_tensors="pt", padding=True)
        else:
            images = [[open_image(example.image)] for example in examples]
            inputs = self.processor(images=images, text=texts, return_tensors="pt", padding=True)
        return examples, inputs


@torch.inference_mode()
def predict_batch(model, processor, inputs, *, max_new_tokens: int, candidates: tuple[str, ...] | None = None,
                  candidate_ids: list[int] | None = None) -> list[dict]:
    """Greedy answers of one left-padded batch; with `candidates`, the answer is the candidate whose first token is
    most probable as the next token (probabilities normalised over the candidates), from a single decoding step."""
    inputs = inputs.to(model.device)
    floating = {k: v.to(model.dtype) for k, v in inputs.items() if torch.is_floating_point(v)}
    inputs.update(floating)
    tokenizer = getattr(processor, "tokenizer", processor)
    out = model.generate(**inputs, do_sample=False, num_beams=1, max_new_tokens=1 if candidates else max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, return_dict_in_generate=True,
                         output_logits=candidates is not None)
    if candidates:
        probabilities = torch.softmax(out.logits[0].float(), dim=-1)[:, candidate_ids]
        probabilities = probabilities / probabilities.sum(dim=-1, keepdim=True)
        records = []
        for row in probabilities.tolist():
            best = max(range(len(candidates)), key=lambda i: (row[i], -i))  # ties -> first candidate, like argmax
            records.append({"prediction": candidates[best],
                            "probabilities": {c: p for c, p in zip(candidates, row)}})
        return records
    new_tokens = out.sequences[:, inputs["input_ids"].shape[1]:]
    texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return [{"prediction": text.strip()} for text in texts]


@dataclass
class TaskRun:
    """What `run_task` returns on the main process: the metrics and the predictions in example order."""

    metrics: dict
    predictions: list[dict]
    seconds: float
    generated: int  # examples predicted by this call (not read back from an earlier run)


def run_task(model, processor, task: Task, examples: list[Example], task_dir: str | Path, *, batch_size: int = 8,
             max_new_tokens: int | None = None, prompt_template: str | None = None, num_workers: int = 0,
             run_config: dict | None = None, overwrite: bool = False, progress: bool = True) -> TaskRun | None:
    """Predict every example not already in `task_dir`, then score the task.

    Under `accelerate launch` the remaining examples are split over the processes; only the main process scores and
    gets a `TaskRun` (the others get None). Predictions are appended to disk after every batch.
    """
    state = process_state()
    task_dir = Path(task_dir)
    max_new_tokens = max_new_tokens or task.max_new_tokens
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.padding_side != "left":
        logger.info("Setting the tokenizer's padding side to 'left' for batched generation.")
        tokenizer.padding_side = "left"
    candidates = task.candidates if task.answer_mode == "probabilities" else None
    candidate_ids = candidate_token_ids(tokenizer, candidates) if candidates else None
    config = dict(run_config or {}, task=task.describe(), max_new_tokens=max_new_tokens,
                  prompt_template=prompt_template, candidate_token_ids=candidate_ids,
                  example_prompt=user_prompt(processor, task, examples[0], prompt_template))
    store = PredictionStore(task_dir, state.process_index, state.num_processes)
    order = [example.uid for example in examples]
    if state.is_main_process:
        check_run_config(task_dir, config, overwrite)
        if store.files():
            store.consolidate(order)  # one clean file (an interrupted last line dropped) before anyone appends
    state.wait_for_everyone()

    done = store.load()
    remaining = [example for example in examples if example.uid not in done]
    if state.is_main_process and done:
        logger.info("%s: resuming, %d of %d examples already predicted.", task.name, len(examples) - len(remaining),
                    len(examples))
    start = time.perf_counter()
    with state.split_between_processes(remaining) as shard:
        loader = torch.utils.data.DataLoader(shard, batch_size=batch_size, num_workers=num_workers,
                                             collate_fn=_Collate(processor, task, prompt_template))
        bar = tqdm(total=len(shard), desc=f"{task.name}" + (f" [rank {state.process_index}]" if state.num_processes > 1
                                                              else ""), unit="ex", disable=not progress or
                   not state.is_main_process, dynamic_ncols=True)
        for batch, inputs in loader:
            records = predict_batch(model, processor, inputs, max_new_tokens=max_new_tokens, candidates=candidates,
                                    candidate_ids=candidate_ids)
            store.append([{"question_id": example.uid, **record, "target": example.target}
                          for example, record in zip(batch, records)])
            bar.update(len(batch))
        bar.close()
        if state.num_processes > 1:
            logger.info("%s: process %d of %d predicted %d examples.", task.name, state.process_index,
                        state.num_processes, len(shard))
    seconds = time.perf_counter() - start
    state.wait_for_everyone()
    if not state.is_main_process:
        return None

    predictions = store.consolidate(order)
    ours = predictions[:len(order)]
    if [record["question_id"] for record in ours] != order:
        missing = sorted(set(order) - {record["question_id"] for record in predictions})
        raise RuntimeError(f"{task.name}: {len(missing)} examples have no prediction after the run "
                           f"(e.g. {missing[:3]}).")
    metrics = task.score([record["prediction"] for record in ours], examples)
    for record, score in zip(ours, metrics.pop("scores")):
        record["score"] = score  # kept in predictions.jsonl for error analysis
    store.consolidate(order, predictions)
    return TaskRun(metrics=metrics, predictions=ours, seconds=seconds, generated=len(remaining))
