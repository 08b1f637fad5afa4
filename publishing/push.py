"""Upload a saved model folder to the Hub: plan, stage, validate, then `create_repo` + `upload_folder`.

The folder is staged in a temporary directory holding exactly what will be uploaded: the folder's files (links, no
copies) minus caches and training leftovers, the model card (`README.md`, generated with `save_model_card` when the
folder has none) and, when a safetensors file is larger than ``max_shard_size``, the weights re-sharded. The staged
folder is validated (`validate_folder`) before anything is sent; ``dry_run`` stops there.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .validate import SAFETENSORS_INDEX, ValidationReport, validate_folder

# Never uploaded: version control, caches, Trainer checkpoints and TensorBoard runs (a trained model's output folder
# holds them next to the final weights). Patterns ending in "/" match a folder at any depth.
DEFAULT_EXCLUDE = (".git/", "__pycache__/", ".cache/", ".ipynb_checkpoints/", "checkpoint-*/", "runs/", "*.pyc",
                   ".DS_Store")


class PublishError(RuntimeError):
    """The folder is not fit for upload (see the message for every problem found)."""


@dataclass
class PlannedFile:
    path_in_repo: str
    size: int
    origin: str  # "folder", "generated model card" or "re-sharded weights"


@dataclass
class PushResult:
    repo_id: str
    files: list[PlannedFile]
    excluded: list[tuple[str, str]]
    report: ValidationReport
    dry_run: bool
    commit_url: str | None = None
    revision: str | None = None
    private: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        total = sum(f.size for f in self.files)
        lines = [f"{'Would upload' if self.dry_run else 'Uploaded'} {len(self.files)} file(s), {_human(total)}, to "
                 f"{self.repo_id}" + (f" (revision {self.revision})" if self.revision else "")
                 + (" [private]" if self.private else "") + ":"]
        lines += [f"  {f.path_in_repo:<48} {_human(f.size):>10}  {f.origin}" for f in self.files]
        if self.excluded:
            lines.append("Not uploaded:")
            lines += [f"  {path:<48} {reason}" for path, reason in self.excluded]
        lines.append(self.report.summary())
        if self.commit_url:
            lines.append(f"Commit: {self.commit_url}")
        return "\n".join(lines)


def _human(size: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size} B"


def parse_size(value: str | int) -> int:
    """Bytes of "5GB", "500MB", "2GiB" or an int (decimal units as in transformers' `max_shard_size`)."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?i?B)?\s*", str(value), re.IGNORECASE)
    if not match:
        raise ValueError(f"max_shard_size must look like '5GB' or '500MB', got {value!r}.")
    number, unit = float(match.group(1)), (match.group(2) or "B").upper()
    factors = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    return int(number * factors[unit])


def _excluded_by(path: str, patterns) -> str | None:
    parts = path.split("/")
    for pattern in patterns:
        if pattern.endswith("/"):
            if any(fnmatch.fnmatch(part, pattern[:-1]) for part in parts[:-1]):
                return pattern
        elif fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(parts[-1], pattern):
            return pattern
    return None


def _reshard(weights: list[Path], staging: Path, max_shard_size: str | int) -> list[str]:
    """Re-split safetensors files into shards of at most ``max_shard_size`` in ``staging`` (one shard in memory at a
    time), with the index transformers reads. Returns the written file names."""
    import torch
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors import safe_open
    from safetensors.torch import save_file

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
              "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
    located, meta = {}, {}
    for path in weights:  # shapes and dtypes from the headers only: meta tensors to plan the split
        with safe_open(path, framework="pt") as handle:
            for key in handle.keys():
                tensor_slice = handle.get_slice(key)
                meta[key] = torch.empty(tensor_slice.get_shape(), dtype=dtypes[tensor_slice.get_dtype()],
                                        device="meta")
                located[key] = path
    split = split_torch_state_dict_into_shards(meta, max_shard_size=max_shard_size)
    written = []
    for filename, keys in tqdm(split.filename_to_tensors.items(), desc="re-sharding", unit="shard"):
        tensors = {}
        for key in keys:
            with safe_open(located[key], framework="pt") as handle:
                tensors[key] = handle.get_tensor(key)
        save_file(tensors, staging / filename, metadata={"format": "pt"})
        written.append(filename)
        del tensors
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (staging / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(SAFETENSORS_INDEX)
    return written


def stage_folder(folder, staging, *, repo_id: str, max_shard_size: str | int = "5GB", exclude=(),
                 card_kwargs: dict | None = None) -> tuple[list[PlannedFile], list[tuple[str, str]]]:
    """Fill ``staging`` with exactly what would be uploaded; returns (planned files, excluded files with reasons)."""
    folder, staging = Path(folder), Path(staging)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder: pass the output folder of save_pretrained.")
    patterns = tuple(DEFAULT_EXCLUDE) + tuple(exclude)
    files, excluded = [], []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        pattern = _excluded_by(relative, patterns)
        if pattern:
            excluded.append((relative, f"excluded by {pattern!r}"))
        else:
            files.append(relative)

    limit = parse_size(max_shard_size)
    weights = [name for name in files if name.endswith(".safetensors")]
    oversized = [name for name in weights if (folder / name).stat().st_size > limit]
    resharded = []
    if oversized:
        resharded = _reshard([folder / name for name in weights], staging, max_shard_size)
        for name in weights + ([SAFETENSORS_INDEX] if SAFETENSORS_INDEX in files else []):
            files.remove(name)
            excluded.append((name, f"re-sharded: larger than {max_shard_size}" if name in oversized
                             else "replaced by the re-sharded weights"))
    for relative in files:
        target = staging / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink((folder / relative).resolve(), target)

    generated_card = False
    if "README.md" not in files:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type") \
            if (folder / "config.json").is_file() else None
        if model_type != "ml_mamba":
            raise PublishError(f"{folder} has no README.md and is not an ml-mamba model (model_type={model_type!r}), "
                               f"so no card can be generated: write a README.md model card first.")
        from ml_mamba.model_cards import save_model_card

        save_model_card(staging, model_id=repo_id, **(card_kwargs or {}))
        generated_card = True
    planned = [PlannedFile(name, (staging / name).stat().st_size, "folder") for name in files]
    planned += [PlannedFile(name, (staging / name).stat().st_size, "re-sharded weights") for name in resharded]
    if generated_card:
        planned.append(PlannedFile("README.md", (staging / "README.md").stat().st_size, "generated model card"))
    return sorted(planned, key=lambda f: f.path_in_repo), excluded


def push_to_hub(folder, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str | None = None, create_pr: bool = False, max_shard_size: str | int = "5GB",
                exclude=(), token: str | None = None, dry_run: bool = False, load_check: bool = True,
                card_kwargs: dict | None = None, api=None) -> PushResult:
    """Validate ``folder`` and upload it to the Hub model repo ``repo_id`` (created if missing).

    Args:
        private: create the repo private (an existing repo keeps its visibility).
        revision: a branch to upload to (created from main if missing); default main.
        create_pr: open a pull request instead of committing to the branch.
        max_shard_size: safetensors files above this are re-sharded before upload.
        exclude: extra glob patterns of files not to upload (on top of `DEFAULT_EXCLUDE`).
        token: a Hub token; default: `HF_TOKEN` or the cached `hf auth login` (huggingface_hub's usual places).
        dry_run: stage and validate, list what would be uploaded, send nothing.
        load_check: load the staged folder in a fresh process without ml-mamba (slow for multi-GB models).
        card_kwargs: keyword arguments of `save_model_card` for the card generated when the folder has no README.md.
        api: an `HfApi` to use (default `HfApi(token=token)`).
    Raises `PublishError` listing every problem when validation fails; nothing is uploaded then.
    """
    with tempfile.TemporaryDirectory(prefix="ml-mamba-push-") as staging:
        planned, excluded = stage_folder(folder, staging, repo_id=repo_id, max_shard_size=max_shard_size,
                                         exclude=exclude, card_kwargs=card_kwargs)
        report = validate_folder(staging, files=[f.path_in_repo for f in planned], load_check=load_check)
        report.folder = Path(folder)
        result = PushResult(repo_id, planned, excluded, report, dry_run, revision=revision, private=private)
        if not report.ok:
            raise PublishError(result.summary())
        if dry_run:
            return result

        from huggingface_hub import HfApi

        api = api if api is not None else HfApi(token=token)
        api.create_repo(repo_id=repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, repo_type="model", exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo_id, repo_type="model", folder_path=staging, revision=revision, create_pr=create_pr,
            commit_message=commit_message or f"Upload {Path(folder).name} with ml-mamba-push",
            # shards of an earlier, differently sharded upload would otherwise stay next to the new ones
            delete_patterns=["*.safetensors", SAFETENSORS_INDEX])
        result.commit_url = getattr(commit, "commit_url", None) or str(commit)
        return result
