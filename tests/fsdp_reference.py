"""The model, data and loss shared by the FSDP worker and its one-process reference (tests/test_fsdp.py)."""

import torch
from utils import digit_images, tiny_model

ANSWERS = ["It is a zero.", "One.", "Two, I think.", "Three."]


def build():
    model, processor = tiny_model("msc", seed=0)
    return model.train(), processor


def batches(processor, steps: int, size: int = 4):
    """``steps`` global batches of ``size`` samples (right-padded, labels on the answers)."""
    images = digit_images(size * steps)
    for step in range(steps):
        texts = [f"<image>Which digit is shown? {ANSWERS[(step * size + i) % 4]}" for i in range(size)]
        inputs = processor(images=images[step * size:(step + 1) * size], text=texts, padding=True,
                           padding_side="right", return_tensors="pt")
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        yield {**inputs, "labels": labels}


def label_count(model, inputs) -> int:
    """The label tokens `loss_sum` sums over."""
    labels = inputs["labels"].masked_fill(inputs["labels"] == model.config.image_token_id, -100)
    return int((labels[:, 1:] != -100).sum())


def loss_sum(model, inputs) -> torch.Tensor:
    """Summed next-token cross-entropy over the label tokens (the model's `<image>` labels are ignored)."""
    logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits
    labels = inputs["labels"].masked_fill(inputs["labels"] == model.config.image_token_id, -100)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                             ignore_index=-100, reduction="sum")
