"""Packed sequences (padding-free training): with ``seq_idx`` the chunked SSD lets no state flow from one sequence
into the next, and equals the plain recurrence run on each sequence alone (forward and gradients)."""

import pytest
import torch

from modeling_ml_mamba.ml_mamba_ssd import ssd_chunked, ssd_sequential


def _inputs(lengths, heads=4, head_dim=3, groups=2, state=5, seed=0):
    torch.manual_seed(seed)
    total = sum(lengths)
    x = torch.randn(1, total, heads, head_dim, requires_grad=True)
    dt = torch.randn(1, total, heads, requires_grad=True)
    A = -torch.rand(heads) - 0.5
    B = torch.randn(1, total, groups, state, requires_grad=True)
    C = torch.randn(1, total, groups, state, requires_grad=True)
    D = torch.randn(heads)
    seq_idx = torch.cat([torch.full((n,), i) for i, n in enumerate(lengths)])[None]
    return x, dt, A, B, C, D, seq_idx


@pytest.mark.parametrize("lengths, chunk", [([5, 3, 9], 4), ([1, 7, 2, 6], 3), ([16, 16], 8), ([13], 4)])
def test_packed_scan_equals_each_sequence_alone(lengths, chunk):
    x, dt, A, B, C, D, seq_idx = _inputs(lengths)
    packed = ssd_chunked(x, dt, A, B, C, chunk, D=D, dt_softplus=True, seq_idx=seq_idx)
    pieces, start = [], 0
    for n in lengths:
        part = slice(start, start + n)
        pieces.append(ssd_sequential(x[:, part], dt[:, part], A, B[:, part], C[:, part], D=D, dt_softplus=True))
        start += n
    alone = torch.cat(pieces, dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    weights = torch.randn_like(alone)
    grads_packed = torch.autograd.grad((packed * weights).sum(), (x, dt, B, C))
    grads_alone = torch.autograd.grad((alone * weights).sum(), (x, dt, B, C))
    for a, b in zip(grads_packed, grads_alone):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the in-place inference path, and long inputs cut in segments
        torch.testing.assert_close(ssd_chunked(x, dt, A, B, C, chunk, D=D, dt_softplus=True, seq_idx=seq_idx),
                                   alone, atol=1e-5, rtol=1e-5)


def test_packed_batch_gives_the_loss_and_gradients_of_its_samples_alone():
    """Samples of different lengths (with images) concatenated into one row with ``position_ids`` restarting at 0
    (TRL's padding-free layout): the summed loss and every gradient equal those of the samples run one by one."""
    from utils import digit_images, tiny_model

    model, processor = tiny_model("msc", seed=5)
    model.train()
    texts = ["<image>Which digit is shown? seven", "<image>Odd? yes", "<image>Describe the picture in a few words: "
             "a handwritten number on a dark background."]
    samples = [processor(images=[image], text=[text], return_tensors="pt")
               for image, text in zip(digit_images(3), texts)]

    def loss_sum(batch, labels):
        logits = model(**batch).logits[:, :-1]
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100,
                                                 reduction="sum")

    def labels_of(ids):
        labels = ids.masked_fill(ids == model.config.image_token_id, -100)
        labels[:, 0] = -100  # nothing predicts a sample's first token (in a packed row: the previous sample would)
        return labels

    alone = sum(loss_sum({"input_ids": s["input_ids"], "pixel_values": s["pixel_values"]},
                         labels_of(s["input_ids"].clone())) for s in samples)
    grads_alone = torch.autograd.grad(alone, [p for p in model.parameters() if p.requires_grad], allow_unused=True)

    ids = torch.cat([s["input_ids"] for s in samples], dim=1)
    position_ids = torch.cat([torch.arange(s["input_ids"].shape[1]) for s in samples])[None]
    labels = torch.cat([labels_of(s["input_ids"].clone()) for s in samples], dim=1)
    packed = loss_sum({"input_ids": ids, "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
                       "position_ids": position_ids}, labels)
    grads_packed = torch.autograd.grad(packed, [p for p in model.parameters() if p.requires_grad], allow_unused=True)
    torch.testing.assert_close(packed, alone, atol=1e-4, rtol=1e-5)
    for a, b in zip(grads_packed, grads_alone):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_packed_training_through_build_trainer_equals_padded(tmp_path):
    """`--pack_samples`: TRL's SFTTrainer with our packed collator takes the same optimizer steps as padded batches
    (same samples, same global token normalisation), within float tolerance."""
    from datasets import Dataset, Image, List
    from utils import digit_images, tiny_model

    from ml_mamba.training.arguments import MLMambaSFTConfig
    from ml_mamba.training.train import build_trainer

    answers = ["seven", "It is a handwritten number on a dark background, I think.", "odd", "yes, it is."]
    rows = [{"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}]},
                          {"role": "assistant", "content": [{"type": "text", "text": answer}]}],
             "images": [image]} for answer, image in zip(answers * 2, digit_images(8))]
    dataset = Dataset.from_list(rows).cast_column("images", List(Image()))
    weights = {}
    for pack in (False, True):
        model, processor = tiny_model("mlp", seed=7)
        args = MLMambaSFTConfig(output_dir=str(tmp_path / str(pack)), max_steps=2, per_device_train_batch_size=4,
                                learning_rate=1e-3, report_to="none", save_strategy="no", pack_samples=pack,
                                seed=0, data_seed=0)
        trainer = build_trainer(model, processor, args, dataset)
        if pack:
            batch = trainer.data_collator([dataset[0], dataset[1]])
            assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
            assert int((batch["position_ids"] == 0).sum()) == 2
        trainer.train()
        weights[pack] = {name: p.detach().clone() for name, p in model.named_parameters()}
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, atol=5e-5, rtol=1e-4, msg=name)  # Adam-normalised
