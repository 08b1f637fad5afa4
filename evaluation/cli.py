"""`ml-mamba-eval` (also `python -m ml_mamba.evaluation`): score a model on the seed papers' benchmarks.

    ml-mamba-eval --model outputs/demo --tasks digits-vqa --data digits-vqa=outputs/demo/eval/digits_vqa.jsonl
    ml-mamba-eval --model <hub id> --tasks vqav2 gqa pope --limit 500 --batch-size 16 --dtype bfloat16
    accelerate launch --num_processes 8 -m ml_mamba.evaluation --model <hub id> --tasks textvqa --ocr before
    accelerate launch --multi_gpu --num_processes 2 -m ml_mamba.evaluation ...   # two processes on a CPU-only box

Interrupted runs resume from `<output-dir>/<task>/predictions.jsonl` when started again with the same arguments.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from .harness import evaluate_model, load_model
from .results import summary_table
from .tasks import TASKS, get_task


@dataclass
class EvalArguments:
    model: str = field(metadata={"help": "Model folder or Hub id of any image-text-to-text model."})
    tasks: list[str] = field(metadata={"help": f"Tasks to run (space- or comma-separated): {', '.join(TASKS)}."})
    data: list[str] = field(default_factory=list, metadata={
        "help": "TASK=SOURCE: a .jsonl/.json/.parquet file, a folder, or a Hub dataset id for TASK (default: the "
                "task's Hub copy). Repeatable. See --list-tasks for the fields of a row."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "Where results.json and predictions go."})
    split: str | None = field(default=None, metadata={"help": "Dataset split (default: each task's own)."})
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N questions of each task only."})
    image_dir: str | None = field(default=None, metadata={"help": "Folder that relative image paths are in "
                                                                  "(default: the data file's folder)."})
    batch_size: int = field(default=8, metadata={"help": "Questions per generate() call (left padded)."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Default: 128 (the seed papers' harness); "
                                                                       "8 for digits-vqa."})
    ocr: str | None = field(default=None, metadata={"help": "TextVQA: OCR tokens 'before' or 'after' the question, "
                                                             "or 'none' (default)."})
    answer_mode: str | None = field(default=None, metadata={
        "help": "POPE/VSR: 'probabilities' (default; next-token Yes/No, True/False, as the seed papers) or "
                "'generate' (parse generated text)."})
    prompt_template: str | None = field(default=None, metadata={
        "help": "Use this format string instead of the processor's chat template, with {image} and {prompt}."})
    dtype: str | None = field(default=None, metadata={"help": "auto, float32, bfloat16 or float16."})
    quantize: str | None = field(default=None, metadata={"help": "'int8': int8 weight-only language model and head "
                                                                 "(ML-Mamba models, CPU kernel)."})
    device: str | None = field(default=None, metadata={"help": "Default: this process's device (accelerate)."})
    trust_remote_code: bool | None = field(default=None, metadata={"help": "Run the model's Hub code (ML-Mamba "
                                                                           "checkpoints work without it when this "
                                                                           "package is installed)."})
    num_workers: int = field(default=0, metadata={"help": "DataLoader workers that open images and run the "
                                                          "processor ahead of the model."})
    overwrite: bool = field(default=False, metadata={"help": "Start the tasks over instead of resuming."})
    no_progress: bool = field(default=False, metadata={"help": "No progress bar."})


def _list_tasks() -> str:
    lines = []
    for name, task in TASKS.items():
        hub = f"{task.hub.repo} ({task.hub.split})" if task.hub else "local files only"
        options = "; ".join(f"--{k.replace('_', '-')} {'/'.join(v)}" for k, v in task.options.items())
        lines.append(f"{name}: {task.title}, Hub: {hub}{'; options: ' + options if options else ''}\n    rows: "
                     f"{task.schema}")
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> dict | None:
    """Parse `argv` (default: the command line), evaluate, print the summary; the results on the main process."""
    argv = sys.argv[1:] if argv is None else argv
    if "--list-tasks" in argv:
        print(_list_tasks())
        return None
    parser = HfArgumentParser(EvalArguments, description=__doc__)
    (args,) = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    tasks = [name for item in args.tasks for name in item.split(",") if name]
    data = {}
    for item in args.data:
        name, sep, source = item.partition("=")
        if not sep or not source:
            parser.error(f"--data expects TASK=SOURCE, got {item!r}.")
        data[name] = source
    for name in tasks + list(data):
        get_task(name)  # unknown names fail here, before the model is loaded
    model, processor = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize,
                                  trust_remote_code=args.trust_remote_code)
    results = evaluate_model(
        model, processor, tasks, args.output_dir, data=data, split=args.split, limit=args.limit,
        image_dir=args.image_dir, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
        prompt_template=args.prompt_template, num_workers=args.num_workers, model_id=args.model,
        task_options={"ocr": args.ocr, "answer_mode": args.answer_mode}, overwrite=args.overwrite,
        progress=not args.no_progress)
    if results is not None:
        print(summary_table(results))
        print(f"\nresults: {args.output_dir}/results.json")
    return results


def main() -> None:
    """Console entry point of `ml-mamba-eval`."""
    run()


if __name__ == "__main__":
    main()
