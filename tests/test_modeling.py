"""The model: SSD scan vs the plain recurrence and vs transformers, the multi-directional mixer's semantics, image
placement, bad inputs, training mode. Budget: ~30 s."""

import pytest
import torch
import torch.nn.functional as F
from utils import chat, digit_images, tiny_model

from modeling_ml_mamba.ml_mamba_compat import mamba2_chunk_scan
from modeling_ml_mamba.ml_mamba_scan import MultiScanMamba2Mixer, scan_orders
from modeling_ml_mamba.ml_mamba_ssd import ssd_chunked, ssd_scan, ssd_sequential


def _ssm_inputs(batch=2, length=37, heads=4, head_dim=8, groups=2, state=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        x=torch.randn(batch, length, heads, head_dim, generator=g),
        dt=torch.randn(batch, length, heads, generator=g),
        A=-torch.rand(heads, generator=g) * 4,
        B=torch.randn(batch, length, groups, state, generator=g),
        C=torch.randn(batch, length, groups, state, generator=g),
        D=torch.randn(heads, generator=g),
        dt_bias=torch.randn(heads, generator=g),
    )


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 64])
@pytest.mark.parametrize("groups", [1, 2, 4])
def test_chunked_ssd_equals_the_recurrence(chunk_size, groups):
    inputs = _ssm_inputs(groups=groups)
    initial = torch.randn(2, 4, 8, 16)
    expected, expected_state = ssd_sequential(**inputs, dt_softplus=True, initial_state=initial,
                                              return_final_state=True)
    got, state = ssd_chunked(**inputs, chunk_size=chunk_size, dt_softplus=True, initial_state=initial,
                             return_final_state=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, expected_state, atol=1e-4, rtol=1e-4)


def test_ssd_matches_transformers_torch_path():
    inputs = _ssm_inputs(length=50)
    ours = ssd_scan(**inputs, chunk_size=16, dt_softplus=True, dt_limit=(0.0, float("inf")))
    theirs = mamba2_chunk_scan(inputs["x"], inputs["dt"], inputs["A"], inputs["B"], inputs["C"], chunk_size=16,
                               D=inputs["D"], dt_bias=inputs["dt_bias"], dt_softplus=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def _direction_reference(mixer, direction, xbc, dt):
    """One direction computed by hand with the plain recurrence: conv over the given order, then the SSM."""
    length = xbc.shape[1]
    conv = F.conv1d(xbc.transpose(1, 2), direction.conv1d.weight, direction.conv1d.bias,
                    padding=direction.conv1d.kernel_size[0] - 1, groups=mixer.conv_dim)[..., :length]
    xbc = F.silu(conv).transpose(1, 2)
    x, B, C = xbc.split([mixer.intermediate_size, mixer.n_groups * mixer.state_size,
                         mixer.n_groups * mixer.state_size], dim=-1)
    y = ssd_sequential(x.reshape(*x.shape[:2], mixer.num_heads, mixer.head_dim), dt,
                       -torch.exp(direction.A_log), B.reshape(*B.shape[:2], mixer.n_groups, -1),
                       C.reshape(*C.shape[:2], mixer.n_groups, -1), D=direction.D, dt_bias=direction.dt_bias,
                       dt_softplus=True)
    return y.reshape(*x.shape[:2], -1)


@pytest.mark.parametrize("scan", ["bidirectional", "cross"])
def test_multi_directional_mixer_semantics(scan):
    torch.manual_seed(0)
    mixer = MultiScanMamba2Mixer(32, scan=scan, state_size=8, head_dim=8, chunk_size=4)
    for direction in mixer.directions:  # distinct, non-trivial parameters per direction
        direction.reset_ssm_parameters()
        direction.D.data.normal_()
        direction.A_log.data += torch.rand_like(direction.A_log)
    hidden = torch.randn(2, 16, 32)  # a 4 x 4 patch grid
    gate, xbc, dt = mixer.in_proj(hidden).split([mixer.intermediate_size, mixer.conv_dim, mixer.num_heads], dim=-1)
    grid = torch.arange(16).view(4, 4)
    orders = {"bidirectional": [grid.flatten(), grid.flatten().flip(0)],
              "cross": [grid.flatten(), grid.flatten().flip(0), grid.t().flatten(), grid.t().flatten().flip(0)]}[scan]
    assert all(torch.equal(a, b) for a, b in zip(scan_orders(scan, 16), orders))
    merged = 0
    for direction, order in zip(mixer.directions, orders):
        y = _direction_reference(mixer, direction, xbc[:, order], dt[:, order])
        restored = torch.empty_like(y)
        restored[:, order] = y  # each direction's outputs go back to their patch positions
        merged = merged + mixer.norm(restored, gate)
    expected = mixer.out_proj(merged / len(orders))
    torch.testing.assert_close(mixer(hidden), expected, atol=1e-4, rtol=1e-4)


def test_cross_scan_needs_a_square_grid():
    mixer = MultiScanMamba2Mixer(32, scan="cross", state_size=8, head_dim=8)
    with pytest.raises(ValueError, match="square patch grid, got 15"):
        mixer(torch.randn(1, 15, 32))


@pytest.mark.parametrize("connector", ["mlp", "fused-mlp", "ldp", "msc", "vss-l2"])
def test_connectors_emit_the_advertised_number_of_tokens(connector):
    model, _ = tiny_model(connector)
    pixel_values = torch.randn(3, 3, 32, 32)
    output = model.get_image_features(pixel_values)
    features = output.pooler_output
    assert features.shape == (3, model.config.num_image_tokens, model.config.text_config.hidden_size)
    assert output.last_hidden_state.shape[:2] == (3, (32 // 8) ** 2) and output.hidden_states is None


def test_get_image_features_follows_the_vision_language_api():
    """transformers 5.24+'s convention (as LLaVA): an output with `pooler_output` (the projected features),
    `last_hidden_state`, optional `hidden_states`, and a tuple with `return_dict=False`."""
    model, _ = tiny_model("msc")
    pixel_values = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        output = model.get_image_features(pixel_values, output_hidden_states=True)
        as_tuple = model.get_image_features(pixel_values, output_hidden_states=True, return_dict=False)
        earlier_layer = model.get_image_features(pixel_values, vision_feature_layer=-1).last_hidden_state
    assert len(output.hidden_states) == model.config.vision_config.num_hidden_layers + 1
    torch.testing.assert_close(output.last_hidden_state,
                               output.hidden_states[model.config.vision_feature_layer])
    assert not torch.equal(earlier_layer, output.last_hidden_state)
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[1], output.pooler_output)


def test_return_dict_false_gives_transformers_tuples():
    model, processor = tiny_model("mlp")
    inputs = processor(images=digit_images(1), text=["<image>Which digit?"], return_tensors="pt")
    with torch.no_grad():
        output = model(**inputs, labels=inputs["input_ids"])
        loss, logits = model(**inputs, labels=inputs["input_ids"], return_dict=False)[:2]
        hidden = model.model(**inputs, return_dict=False)[0]
        expected_hidden = model.model(**inputs).last_hidden_state
    assert torch.equal(loss, output.loss) and torch.equal(logits, output.logits)
    assert torch.equal(hidden, expected_hidden)


def test_images_can_sit_anywhere_and_samples_can_hold_several_or_none():
    model, processor = tiny_model("msc")
    images = digit_images(3)
    batch = processor(images=[[images[0]], [images[1], images[2]], []],
                      text=["<image>Which digit is shown?", "Compare <image> with <image> please", "text only"],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
        # each sample alone gives the same last-token logits as inside the (left-padded) batch
        for index, (sample_images, text) in enumerate([([images[0]], "<image>Which digit is shown?"),
                                                       (images[1:], "Compare <image> with <image> please"),
                                                       (None, "text only")]):
            alone = processor(images=sample_images, text=[text], return_tensors="pt")
            torch.testing.assert_close(model(**alone).logits[0, -1], logits[index, -1], atol=1e-4, rtol=1e-4)


def test_the_image_changes_the_answer_distribution():
    model, processor = tiny_model("msc")
    images = digit_images(2)
    logits = []
    for image in images:
        inputs = processor.apply_chat_template(chat(image), add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        logits.append(model(**inputs).logits[0, -1])
    assert not torch.allclose(logits[0], logits[1])


def test_mismatched_placeholders_and_features_are_clear_errors():
    model, processor = tiny_model("mlp")
    inputs = processor(images=digit_images(2), text=["<image>a", "<image>b"], padding=True, return_tensors="pt")
    with pytest.raises(ValueError, match=r"holds 32 `<image>` tokens \(per sample: \[16, 16\]\) but 1 image"):
        model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])
    text_only = processor(text=["no image here"], return_tensors="pt")
    with pytest.raises(ValueError, match="holds 0 `<image>` tokens .* but 2 image"):
        model(input_ids=text_only["input_ids"], pixel_values=inputs["pixel_values"])
    with pytest.raises(ValueError, match="32 `<image>` tokens but no `pixel_values`"):
        model(input_ids=inputs["input_ids"])


def test_inputs_embeds_path_matches_input_ids():
    model, processor = tiny_model("msc")
    inputs = processor(images=digit_images(1), text=["<image>Which digit?"], return_tensors="pt")
    with torch.no_grad():
        by_ids = model(**inputs).logits
        embeds = model.get_input_embeddings()(inputs["input_ids"])
        by_embeds = model(inputs_embeds=embeds, pixel_values=inputs["pixel_values"]).logits
    torch.testing.assert_close(by_ids, by_embeds)


def test_training_step_with_gradient_checkpointing():
    model, processor = tiny_model("msc")
    model.train()
    model.activation_checkpointing_enable()
    inputs = processor(images=digit_images(2), text=["<image>It is a seven.", "<image>Odd."], padding=True,
                       return_tensors="pt")
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    for name in ("model.connector.input_proj.weight", "model.connector.blocks.0.mixer.directions.1.A_log",
                 "model.language_model.layers.0.mixer.in_proj.weight", "lm_head.weight"):
        assert model.get_parameter(name).grad is not None and model.get_parameter(name).grad.abs().sum() > 0, name


def test_image_positions_carry_no_loss_in_the_models_own_loss():
    model, processor = tiny_model("mlp")
    inputs = processor(images=digit_images(1), text=["<image>It is a seven."], return_tensors="pt")
    labels = inputs["input_ids"].clone()
    loss = model(**inputs, labels=labels).loss
    manual = labels.masked_fill(labels == processor.image_token_id, -100)
    logits = model(**inputs).logits
    expected = F.cross_entropy(logits[0, :-1], manual[0, 1:], ignore_index=-100)
    torch.testing.assert_close(loss, expected)
