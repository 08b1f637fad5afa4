"""`ml-mamba-push`: the dry run lists and validates exactly what would be uploaded (re-sharding included, and a load in
a fresh process without the package); broken folders fail with a clear message; the real upload path runs against a
mocked `HfApi` (no network here) and fails fast with `HF_HUB_OFFLINE=1`. Budget: ~40 s."""

import json
import os
import shutil
import subprocess
import sys
from unittest import mock

import pytest
import torch
from safetensors.torch import load_file
from utils import tiny_model

from ml_mamba.publishing import PublishError, push_to_hub, stage_folder, validate_folder
from ml_mamba.publishing.cli import main as push_cli


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("push") / "tiny"
    model, processor = tiny_model("msc", "mamba2", "fused")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def _copy(saved, tmp_path, name="broken"):
    return shutil.copytree(saved, tmp_path / name)


def test_dry_run_reshards_lists_and_loads_without_the_package(saved, capsys):
    assert push_cli([str(saved), "me/tiny", "--dry-run", "--max-shard-size", "300KB"]) == 0
    out = capsys.readouterr().out
    assert "Would upload" in out and "me/tiny" in out
    assert "model-00003-of-00003.safetensors" in out and "model.safetensors.index.json" in out
    assert "model.safetensors                                re-sharded: larger than 300KB" in out
    assert "README.md" in out and "generated model card" in out
    assert "loads offline without ml-mamba: MLMambaForConditionalGeneration" in out and "forward pass OK" in out
    assert not (saved / "README.md").exists()  # a dry run writes nothing into the folder


def test_resharding_keeps_every_tensor(saved, tmp_path):
    planned, excluded = stage_folder(saved, tmp_path, repo_id="me/tiny", max_shard_size="250KB")
    shards = [f.path_in_repo for f in planned if f.path_in_repo.endswith(".safetensors")]
    assert len(shards) >= 3 and all(f.size <= 250_000 + 50_000 for f in planned if f.path_in_repo in shards)
    original = load_file(saved / "model.safetensors")
    resharded = {}
    for shard in shards:
        resharded.update(load_file(tmp_path / shard))
    assert original.keys() == resharded.keys() and all(torch.equal(original[k], resharded[k]) for k in original)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(original) and ("model.safetensors", ) == tuple(e[0] for e in excluded)


@pytest.mark.parametrize("breakage, message", [
    ("missing_modeling", "auto_map['AutoModelForImageTextToText'] = 'modeling_ml_mamba.MLMambaForConditionalGeneration' "
                         "but modeling_ml_mamba.py is not in the folder"),
    ("missing_helper", "modeling_ml_mamba.py imports .ml_mamba_scan but ml_mamba_scan.py is not in the folder"),
    ("pickle", "pickle files cannot be uploaded (they can run code when loaded): ['training_args.bin']"),
    ("auto_map_class", "config.json auto_map['AutoModelForImageTextToText'] = 'modeling_ml_mamba.MLMambaForVQA' but "
                       "modeling_ml_mamba.py defines no class MLMambaForVQA"),
    ("processor_auto_map", "processor_config.json auto_map['AutoProcessor'] = 'processing_mlm.MLMambaProcessor' but "
                           "processing_mlm.py is not in the folder"),
    ("no_pipeline_class", "config.json auto_map has no 'AutoModelForImageTextToText'"),
])
def test_broken_folders_fail_with_a_clear_message(saved, tmp_path, capsys, breakage, message):
    folder = _copy(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    if breakage == "missing_modeling":
        (folder / "modeling_ml_mamba.py").unlink()
    elif breakage == "missing_helper":
        (folder / "ml_mamba_scan.py").unlink()
    elif breakage == "pickle":
        torch.save({"learning_rate": 1e-3}, folder / "training_args.bin")
    elif breakage == "auto_map_class":
        config["auto_map"]["AutoModelForImageTextToText"] = "modeling_ml_mamba.MLMambaForVQA"
    elif breakage == "no_pipeline_class":
        del config["auto_map"]["AutoModelForImageTextToText"]
    elif breakage == "processor_auto_map":
        processor_config = json.loads((folder / "processor_config.json").read_text())
        processor_config["auto_map"]["AutoProcessor"] = "processing_mlm.MLMambaProcessor"
        (folder / "processor_config.json").write_text(json.dumps(processor_config))
    (folder / "config.json").write_text(json.dumps(config))

    assert push_cli([str(folder), "me/tiny", "--dry-run"]) == 1
    err = capsys.readouterr().err
    assert "not uploaded, the folder failed validation" in err and message in err, err
    with pytest.raises(PublishError):
        push_to_hub(folder, "me/tiny", load_check=False, api=mock.MagicMock())  # nothing reaches the Hub either


def test_validate_catches_code_that_does_not_load(saved, tmp_path):
    folder = _copy(saved, tmp_path)
    source = (folder / "modeling_ml_mamba.py").read_text()
    (folder / "modeling_ml_mamba.py").write_text("import ml_mamba.training  # a dependency Hub users lack\n" + source)
    report = validate_folder(folder)  # every static check passes; only loading as a Hub user shows the problem
    assert not report.ok and "does not load with trust_remote_code" in report.errors[0]


def test_upload_goes_through_hfapi_with_the_planned_files(saved, tmp_path, capsys):
    folder = _copy(saved, tmp_path, "trained")
    torch.save({"step": 1}, folder / "training_args.bin")  # a Trainer leftover, excluded below
    (folder / "checkpoint-10").mkdir()
    torch.save({}, folder / "checkpoint-10" / "optimizer.pt")
    uploaded = {}

    def upload_folder(**kwargs):  # record what the real call would send, while the staged folder exists
        root = kwargs["folder_path"]
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = os.path.join(dirpath, name)
                uploaded[os.path.relpath(path, root)] = open(path, "rb").read()
        return mock.Mock(commit_url="https://huggingface.co/me/tiny/commit/abc")

    with mock.patch("huggingface_hub.HfApi") as hf_api:
        hf_api.return_value.upload_folder.side_effect = upload_folder
        assert push_cli([str(folder), "me/tiny", "--private", "--revision", "dev", "--token", "hf_test",
                         "--exclude", "training_args.bin", "--skip-load-check"]) == 0
    hf_api.assert_called_once_with(token="hf_test")
    api = hf_api.return_value
    api.create_repo.assert_called_once_with(repo_id="me/tiny", repo_type="model", private=True, exist_ok=True)
    api.create_branch.assert_called_once_with(repo_id="me/tiny", branch="dev", repo_type="model", exist_ok=True)
    kwargs = api.upload_folder.call_args.kwargs
    assert kwargs["repo_id"] == "me/tiny" and kwargs["revision"] == "dev" and not kwargs["create_pr"]
    assert "*.safetensors" in kwargs["delete_patterns"]

    expected = {p.name for p in saved.iterdir()} | {"README.md"}
    assert set(uploaded) == expected  # no pickles, no checkpoint folder, the card added
    assert uploaded["model.safetensors"] == (saved / "model.safetensors").read_bytes()
    card = uploaded["README.md"].decode()
    assert "library_name: transformers" in card and 'model_id = "me/tiny"' in card
    out = capsys.readouterr().out
    assert f"Uploaded {len(expected)} file(s)" in out and "checkpoint-10/optimizer.pt" in out and "commit/abc" in out


def test_offline_push_fails_fast_with_the_hub_error(saved):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "ml_mamba.publishing.cli", str(saved), "me/tiny",
                             "--skip-load-check"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2 and "OfflineModeIsEnabled" in result.stderr, result.stderr
