"""`ml-mamba-train`: supervised fine-tuning of ML-Mamba with TRL's `SFTTrainer` (+ optional LoRA), on one process
or many (`accelerate launch`).

```bash
ml-mamba-train --config recipe.yaml                          # YAML recipe (see training/recipes/)
ml-mamba-train --model_name_or_path out/aligned --data_path llava_v1_5_mix665k.json --image_folder data \\
    --stage finetune --output_dir out/finetuned --per_device_train_batch_size 16 --learning_rate 2e-5
accelerate launch --config_file training/accelerate/fsdp.yaml -m ml_mamba.training --config recipe.yaml
```
"""

from __future__ import annotations

import logging
import os
import sys
import time

import datasets
import transformers
from transformers.trainer_utils import get_last_checkpoint

from .allocator import keep_freed_memory
from .arguments import DataArguments, MLMambaSFTConfig, ModelArguments
from .data import PackedSampleCollator, VideoSampleCollator, load_training_data
from .models import apply_stage, load_model_and_processor, lora_config
from .trl_compat import score_labelled_positions_on_cpu

logger = logging.getLogger("ml_mamba.training")


def parse_args(argv: list[str] | None = None):
    """``(model_args, data_args, training_args)`` from ``--config file.yaml`` and/or command-line flags."""
    from trl import TrlParser

    parser = TrlParser((ModelArguments, DataArguments, MLMambaSFTConfig))
    return parser.parse_args_and_config(argv)


def _setup_logging(training_args: MLMambaSFTConfig) -> None:
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%H:%M:%S",
                        handlers=[logging.StreamHandler(sys.stdout)])
    level = training_args.get_process_log_level()
    logger.setLevel(level)
    logging.getLogger("ml_mamba").setLevel(level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def resume_checkpoint(training_args: MLMambaSFTConfig) -> str | None:
    """The checkpoint to resume from: ``--resume_from_checkpoint PATH``, or with ``--resume`` the last
    ``checkpoint-*`` in ``output_dir`` (none yet: start from scratch, with a log line)."""
    if training_args.resume_from_checkpoint:
        if not os.path.isdir(training_args.resume_from_checkpoint):
            raise FileNotFoundError(f"--resume_from_checkpoint {training_args.resume_from_checkpoint!r} is not a "
                                    f"folder.")
        return training_args.resume_from_checkpoint
    if not training_args.resume:
        return None
    last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
    if last is None:
        logger.warning("--resume: no checkpoint in %s yet, starting from scratch.", training_args.output_dir)
    else:
        logger.info("Resuming from %s", last)
    return last


def build_trainer(model, processor, training_args: MLMambaSFTConfig, train_dataset, eval_dataset=None,
                  peft_config=None, callbacks=None):
    """TRL's `SFTTrainer` with our processor as ``processing_class`` (the collator, loss and logging are TRL's); its
    fused LM head projects only the labelled positions on CPU too (`score_labelled_positions_on_cpu`)."""
    from trl import SFTTrainer

    if model.config.image_token_id is None:
        raise ValueError("model.config.image_token_id is not set; set it to processor.image_token_id.")
    if processor.image_token_id != model.config.image_token_id:
        raise ValueError(f"The processor's <image> id ({processor.image_token_id}) differs from the model's "
                         f"config.image_token_id ({model.config.image_token_id}); they must come from the same model.")
    videos = "videos" in (getattr(train_dataset, "column_names", None) or [])
    if videos:
        if getattr(model.config, "video_token_id", None) is None:
            raise ValueError("The dataset has a 'videos' column but the model has no video support: set "
                             "config.video_token_id (MLMambaConfig.fit_tokenizer(tokenizer, video_token='<video>')).")
        training_args.remove_unused_columns = False  # TRL would drop the 'videos' column it does not know
    score_labelled_positions_on_cpu()
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processor, peft_config=peft_config, callbacks=callbacks)
    if videos:
        trainer.data_collator = VideoSampleCollator(trainer.data_collator)
    if getattr(training_args, "pack_samples", False):
        if model.config.text_config.model_type != "mamba2":
            raise ValueError("--pack_samples needs a Mamba-2 language model (its scan resets at sample boundaries); "
                             f"this one is {model.config.text_config.model_type!r}.")
        trainer.data_collator = PackedSampleCollator(trainer.data_collator)
    return trainer


def base_model_ids(model_args: ModelArguments) -> list[str] | None:
    if model_args.model_name_or_path:
        return [model_args.model_name_or_path]
    if model_args.vision_tower:
        return [*model_args.vision_tower, model_args.language_model]
    return None


def run(model_args: ModelArguments, data_args: DataArguments, training_args: MLMambaSFTConfig, callbacks=None) -> dict:
    """Train as the arguments say and save the result in ``training_args.output_dir``; returns a summary dict."""
    from transformers import set_seed

    _setup_logging(training_args)
    set_seed(training_args.seed)
    model, processor = load_model_and_processor(model_args, training_args.trust_remote_code)
    counts = apply_stage(model, model_args.stage)
    logger.info("Stage %r trains: %s", model_args.stage, ", ".join(f"{part} {n:,}" for part, n in counts.items()))

    data_kwargs = dict(bad_samples=data_args.bad_samples, verify_images=data_args.verify_images,
                       max_samples=data_args.max_samples)
    with training_args.main_process_first(desc="checking the training data"):
        train_dataset, report = load_training_data(
            data_args.data_path, data_args.image_folder, data_args.dataset_name, data_args.dataset_config,
            data_args.dataset_train_split, **data_kwargs)
        eval_dataset = None
        if data_args.eval_data_path or data_args.dataset_test_split:
            eval_dataset, _ = load_training_data(
                data_args.eval_data_path, data_args.image_folder,
                None if data_args.eval_data_path else data_args.dataset_name, data_args.dataset_config,
                data_args.dataset_test_split or "test", **data_kwargs)
    logger.info("Training data: %s", report.summary())

    peft_config = None
    if model_args.use_peft:
        peft_config = lora_config(model_args, model)
        if model_args.model_name_or_path is None:
            # The adapter must point at a base it can be loaded on: save the freshly built base next to it.
            base_dir = os.path.join(training_args.output_dir, "base")
            if training_args.process_index == 0:
                model.save_pretrained(base_dir)
                processor.save_pretrained(base_dir)
            model.config._name_or_path = base_dir

    trainer = build_trainer(model, processor, training_args, train_dataset, eval_dataset, peft_config, callbacks)
    start = time.perf_counter()
    resumed_from = resume_checkpoint(training_args)
    result = trainer.train(resume_from_checkpoint=resumed_from)
    train_time = time.perf_counter() - start
    trainer.save_model(training_args.output_dir)
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    summary = {"output_dir": training_args.output_dir, "train_time_s": round(train_time, 1),
               "steps": trainer.state.global_step, "metrics": result.metrics, "data": report,
               "resumed_from": resumed_from}
    if trainer.is_world_process_zero():
        _write_card(trainer, model_args, data_args, training_args, summary)
        if model_args.use_peft and training_args.merge_lora:
            from .merge import merge_lora

            summary["merged_dir"] = merge_lora(trainer.model, os.path.join(training_args.output_dir, "merged"),
                                               processor=processor, base_models=base_model_ids(model_args))
    trainer.accelerator.wait_for_everyone()
    return summary


def _write_card(trainer, model_args, data_args, training_args, summary) -> None:
    from ml_mamba.model_cards import save_model_card

    base = trainer.model.get_base_model() if model_args.use_peft else trainer.model
    recipe = f"SFTTrainer, stage {model_args.stage}" + (", LoRA" if model_args.use_peft else "")
    hyperparameters = {key: getattr(training_args, key) for key in (
        "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
        "gradient_accumulation_steps", "lr_scheduler_type", "warmup_steps", "weight_decay", "seed", "bf16")}
    if model_args.use_peft:
        hyperparameters.update(lora_r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
                               lora_scope=model_args.lora_scope)
    data = data_args.data_path or data_args.dataset_name
    save_model_card(training_args.output_dir, base, model_id=training_args.hub_model_id,
                    base_models=base_model_ids(model_args),
                    datasets=[data_args.dataset_name] if data_args.dataset_name else None,
                    training={"recipe": recipe, "data": f"{data} ({summary['data'].summary().splitlines()[0]})",
                              "hyperparameters": hyperparameters, "steps": summary["steps"],
                              "train_time_s": summary["train_time_s"],
                              "metrics": {k: v for k, v in summary["metrics"].items() if isinstance(v, float)}})


def main(argv: list[str] | None = None) -> None:
    """Console entry point of ``ml-mamba-train`` (``run(*parse_args(argv))`` returns the summary instead)."""
    keep_freed_memory()  # with ML_MAMBA_KEEP_FREED_MEMORY=1: freed memory reused (training/allocator.py)
    model_args, data_args, training_args = parse_args(argv)
    summary = run(model_args, data_args, training_args)
    if training_args.process_index == 0:
        print(f"Saved to {os.path.abspath(summary['output_dir'])} after {summary['steps']} steps "
              f"({summary['train_time_s']} s of training).")


if __name__ == "__main__":
    main()
