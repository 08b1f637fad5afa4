"""Model cards: metadata and prose rendered from a real model, `ModelCard.load` round trip, and the card's usage
snippet run against a saved tiny model in a process that cannot import this package. Budget: ~35 s."""

import re

import pytest
from huggingface_hub import EvalResult, ModelCard
from utils import run_without_package, tiny_model

from ml_mamba.model_cards import describe_model, save_model_card

EVAL_RESULTS = [
    dict(task_type="image-text-to-text", dataset_type="digits-vqa", dataset_name="Digits VQA", dataset_split="test",
         metric_type="accuracy", metric_value=0.8125, metric_name="exact match"),
    EvalResult(task_type="image-text-to-text", dataset_type="lmms-lab/VQAv2", dataset_name="VQAv2",
               dataset_split="validation", metric_type="accuracy", metric_value=75.26),
]
TRAINING = {"recipe": "Stage 2 fine-tuning: connector + LM, vision tower frozen.", "data": ["digits VQA", "captions"],
            "hyperparameters": {"learning_rate": 1e-3, "batch_size": 8}, "steps": 120, "train_time_s": 95.5,
            "metrics": {"train_loss": 0.4321}, "seed": 1234}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny fused-tower ML-Mamba saved Hub-style under <root>/ml-mamba/tiny-card (so "ml-mamba/tiny-card" resolves
    to it as a local folder from <root>)."""
    root = tmp_path_factory.mktemp("cards")
    model, processor = tiny_model("msc", "mamba2", "fused")
    folder = root / "ml-mamba" / "tiny-card"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return root, folder, model


def test_card_metadata_round_trips_and_prose_has_measured_facts(saved):
    _, folder, model = saved
    card = save_model_card(folder, model, model_id="ml-mamba/tiny-card", base_models="state-spaces/mamba2-2.7b",
                           datasets=["my-org/digits-vqa"], training=TRAINING, eval_results=EVAL_RESULTS,
                           tags=["digits"])
    loaded = ModelCard.load(folder / "README.md")
    data = loaded.data
    assert data.library_name == "transformers" and data.pipeline_tag == "image-text-to-text"
    assert data.license == "apache-2.0"
    assert data.base_model == ["state-spaces/mamba2-2.7b"] and data.datasets == ["my-org/digits-vqa"]
    assert {"ml-mamba", "mamba2", "custom_code", "digits"} <= set(data.tags)
    assert [(r.dataset_type, r.metric_type, r.metric_value) for r in data.eval_results] == [
        ("digits-vqa", "accuracy", 0.8125), ("lmms-lab/VQAv2", "accuracy", 75.26)]
    assert data.model_name == "tiny-card"
    assert "model-index" in (folder / "README.md").read_text()

    text = loaded.text
    total = sum(p.numel() for p in model.parameters())  # tied LM head counted once
    counts = describe_model(model)["parameters"]
    assert counts["total"] == total and counts["lm_head"] == 0  # the tiny LM ties its embeddings
    assert counts["vision_tower"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts["connector"] == sum(p.numel() for p in model.model.connector.parameters())
    for number in (total, counts["vision_tower"], counts["connector"], counts["language_model"]):
        assert f"{number:,}" in text
    assert "Mamba-2 Scan Connector" in text and "DINOv2 with registers" in text and "SigLIP" in text
    assert "Stage 2 fine-tuning" in text and "| learning_rate | 0.001 |" in text and "**seed:** 1234" in text
    assert "120 in 1 min 36 s" in text and "| train_loss | 0.4321 |" in text
    assert "| exact match | 0.8125 |" in text
    for arxiv in ("2407.19832", "2403.14520", "2403.13600"):
        assert f"arXiv:{arxiv}" in text
    assert card.content == loaded.content


def test_card_from_folder_measures_the_saved_config(saved):
    _, folder, model = saved
    card = save_model_card(folder)  # no model: the config is built on the meta device
    assert f"{sum(p.numel() for p in model.parameters()):,}" in card.text
    assert "No training details" in card.text and "No evaluation results" in card.text
    assert card.data.eval_results is None and card.data.pipeline_tag == "image-text-to-text"


def test_bad_eval_results_are_refused_with_the_keys(saved):
    _, folder, model = saved
    with pytest.raises(ValueError, match=r"unknown keys \['score'\], missing keys \['metric_value'\]"):
        save_model_card(folder, model, eval_results=[dict(task_type="vqa", dataset_type="d", dataset_name="d",
                                                          metric_type="accuracy", score=1.0)])
    with pytest.raises(FileNotFoundError, match="config.json"):
        save_model_card(folder.parent / "missing")


def test_card_usage_snippet_runs_on_the_saved_model(saved):
    root, folder, model = saved
    card = save_model_card(folder, model, model_id="ml-mamba/tiny-card")
    blocks = re.findall(r"```python\n(.*?)```", card.text, re.S)
    assert len(blocks) == 1 and "trust_remote_code=True" in blocks[0]
    # The snippet as printed in the card, run from <root> where "ml-mamba/tiny-card" is the saved folder.
    out = run_without_package(blocks[0] + '\nprint("SNIPPET-OK", type(model).__name__, len(output[0]))', cwd=root)
    assert "SNIPPET-OK MLMambaForConditionalGeneration" in out
