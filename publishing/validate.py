"""Checks that a model folder is fit for the Hub, without the network.

* weights: safetensors only; a sharded index names exactly the shard files present; no pickle anywhere
  (`.bin`, `.pt`, `.pth`, `.pkl`, `.pickle`, `.ckpt`);
* remote code: every `auto_map` entry (config.json, processor/tokenizer/preprocessor configs) names a `.py` file of the
  folder that defines the class, and every relative import of those files resolves inside the folder (the files are
  flat siblings, HF-NOTES §1.2); a non-stock `model_type` needs an `AutoConfig` entry, and a vision-language model an
  `AutoModelForImageTextToText` one (what `pipeline("image-text-to-text")` loads);
* loading: the folder loads offline with `trust_remote_code=True` in a fresh Python process that cannot import this
  package, i.e. as a Hub user without ml-mamba would load it, and answers one forward pass.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
CODE_CONFIGS = ("config.json", "processor_config.json", "tokenizer_config.json", "preprocessor_config.json")
SAFETENSORS_INDEX = "model.safetensors.index.json"


@dataclass
class ValidationReport:
    """What `validate_folder` found: ``errors`` make the folder unfit for upload; ``checks`` are what passed."""

    folder: Path
    errors: list[str] = field(default_factory=list)
    checks: list[str] = field(default_factory=list)
    load_output: dict | None = None

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> str:
        lines = [f"{'OK' if self.ok else 'FAILED'}: {self.folder}"]
        lines += [f"  ok    {check}" for check in self.checks]
        lines += [f"  ERROR {error}" for error in self.errors]
        return "\n".join(lines)


def _read_json(path: Path, report: ValidationReport) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        report.errors.append(f"{path.name} cannot be read as JSON: {error}")
        return None


def _classes_in(path: Path) -> set[str]:
    return {node.name for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.ClassDef)}


def _auto_map_references(folder: Path, report: ValidationReport) -> dict[str, list[tuple[str, str]]]:
    """{config file: [(auto class, "module.Class"), ...]} for every auto_map in the folder's configs."""
    references = {}
    for name in CODE_CONFIGS:
        if not (folder / name).is_file():
            continue
        data = _read_json(folder / name, report) or {}
        entries = []
        for auto_class, value in (data.get("auto_map") or {}).items():
            for reference in (value if isinstance(value, list) else [value]):
                if reference:  # tokenizers map to [slow, fast], either may be null
                    entries.append((auto_class, reference))
        references[name] = entries
    return references


def check_remote_code(folder: Path, report: ValidationReport) -> None:
    from transformers.dynamic_module_utils import get_relative_imports
    from transformers import CONFIG_MAPPING

    config = _read_json(folder / "config.json", report) if (folder / "config.json").is_file() else None
    if config is None:
        if not (folder / "config.json").is_file():
            report.errors.append("config.json is missing: save the model with save_pretrained(folder).")
        return
    references = _auto_map_references(folder, report)
    config_map = dict(references.get("config.json", []))
    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING and "AutoConfig" not in config_map:
        report.errors.append(f"config.json has model_type={model_type!r}, which transformers does not know, and no "
                             f"auto_map['AutoConfig']: the folder cannot be loaded with trust_remote_code.")
    if "vision_config" in config and config_map and "AutoModelForImageTextToText" not in config_map:
        report.errors.append("config.json auto_map has no 'AutoModelForImageTextToText': pipeline('image-text-to-text') "
                             "and AutoModelForImageTextToText cannot load this vision-language model.")

    code_files = set()
    for config_name, entries in references.items():
        for auto_class, reference in entries:
            if "--" in reference:  # "owner/repo--module.Class": code hosted in another repo
                report.errors.append(f"{config_name} auto_map[{auto_class!r}] = {reference!r} points to code in "
                                     f"another repo; ship the code in this folder instead.")
                continue
            module, _, class_name = reference.rpartition(".")
            path = folder / f"{module}.py"
            if not module or not path.is_file():
                report.errors.append(f"{config_name} auto_map[{auto_class!r}] = {reference!r} but {module}.py is not "
                                     f"in the folder.")
                continue
            if class_name not in _classes_in(path):
                report.errors.append(f"{config_name} auto_map[{auto_class!r}] = {reference!r} but {module}.py defines "
                                     f"no class {class_name}.")
                continue
            code_files.add(path)
    # Every relative import of the remote code must be a file of the folder (transformers copies them flat).
    pending, seen = list(code_files), set()
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for module in get_relative_imports(str(path)):
            target = folder / f"{module}.py"
            if not target.is_file():
                report.errors.append(f"{path.name} imports .{module} but {module}.py is not in the folder.")
            else:
                pending.append(target)
    if seen:
        report.checks.append(f"remote code: {len(seen)} file(s) ({', '.join(sorted(p.name for p in seen))}) cover "
                             f"every auto_map entry and relative import")
    elif model_type in CONFIG_MAPPING:
        report.checks.append(f"stock transformers model_type {model_type!r}: no remote code needed")


def check_weights(files: list[str], folder: Path, report: ValidationReport) -> None:
    errors_before = len(report.errors)
    pickles = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        report.errors.append(f"pickle files cannot be uploaded (they can run code when loaded): {pickles}. Keep "
                             f"weights as safetensors (save_pretrained does) and delete or --exclude these files.")
    shards = sorted(name for name in files if name.endswith(".safetensors"))
    if not shards:
        report.errors.append("no .safetensors weights in the folder.")
    elif SAFETENSORS_INDEX in files:
        index = _read_json(folder / SAFETENSORS_INDEX, report) or {}
        named = set((index.get("weight_map") or {}).values())
        missing, orphans = sorted(named - set(shards)), sorted(set(shards) - named)
        if missing:
            report.errors.append(f"{SAFETENSORS_INDEX} names shard(s) that are not in the folder: {missing}.")
        if orphans:
            report.errors.append(f"safetensors file(s) not named by {SAFETENSORS_INDEX}: {orphans}.")
    elif len(shards) > 1:
        report.errors.append(f"{len(shards)} safetensors files but no {SAFETENSORS_INDEX}: {shards}.")
    if len(report.errors) == errors_before:
        report.checks.append(f"weights: {len(shards)} safetensors file(s), no pickles")


_BLOCK_PACKAGE = """
import importlib.abc, sys
class _BlockPackage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("modeling_ml_mamba", "ml_mamba"):
            raise ModuleNotFoundError(f"{name} is blocked: this check plays a Hub user without the ml-mamba package")
sys.meta_path.insert(0, _BlockPackage())
"""

_LOAD_SCRIPT = """
import json, sys
import torch
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor
folder = sys.argv[1]
config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
vlm = "AutoModelForImageTextToText" in (getattr(config, "auto_map", None) or {})
auto = AutoModelForImageTextToText if vlm else AutoModel
model = auto.from_pretrained(folder, trust_remote_code=True).eval()
result = {"config": type(config).__name__, "model": type(model).__name__,
          "parameters": sum(p.numel() for p in model.parameters())}
if vlm:
    from PIL import Image
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    size = getattr(config, "image_size", None) or 224
    messages = [{"role": "user", "content": [{"type": "image", "image": Image.new("RGB", (size, size), "gray")},
                                             {"type": "text", "text": "What is in the image?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, logits_to_keep=1).logits
    result["processor"] = type(processor).__name__
    result["finite_logits"] = bool(torch.isfinite(logits).all())
print("RESULT" + json.dumps(result))
"""


def check_loads_without_package(folder: Path, report: ValidationReport, timeout: int = 3600) -> None:
    """Load the folder with `trust_remote_code=True` in a fresh offline process that cannot import ml-mamba."""
    import tempfile

    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with tempfile.TemporaryDirectory() as cwd:  # nothing of this repo on sys.path
        env["HF_HOME"] = os.environ.get("HF_HOME", os.path.join(cwd, "hf_home"))
        script = _BLOCK_PACKAGE + textwrap.dedent(_LOAD_SCRIPT)
        try:
            result = subprocess.run([sys.executable, "-c", script, str(folder.resolve())], cwd=cwd, env=env,
                                    capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            report.errors.append(f"loading took longer than {timeout} s in a fresh process.")
            return
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT")]
    if result.returncode != 0 or not lines:
        tail = "\n".join(result.stderr.strip().splitlines()[-8:])
        report.errors.append(f"the folder does not load with trust_remote_code in a process without ml-mamba "
                             f"installed:\n{textwrap.indent(tail, '        ')}")
        return
    report.load_output = json.loads(lines[-1][len("RESULT"):])
    if report.load_output.get("finite_logits") is False:
        report.errors.append("the model loads but gives non-finite logits on a test prompt.")
        return
    report.checks.append(f"loads offline without ml-mamba: {report.load_output['model']} "
                         f"({report.load_output['parameters']:,} parameters)"
                         + (f" + {report.load_output['processor']}, forward pass OK" if "processor" in
                            report.load_output else ""))


def validate_folder(folder, files: list[str] | None = None, load_check: bool = True) -> ValidationReport:
    """Run every check on ``folder`` (``files``: the relative paths that would be uploaded; default all files)."""
    folder = Path(folder)
    report = ValidationReport(folder)
    if not folder.is_dir():
        report.errors.append(f"{folder} is not a folder.")
        return report
    if files is None:
        files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    check_weights(files, folder, report)
    check_remote_code(folder, report)
    if "README.md" in files:
        report.checks.append("model card README.md present")
    if load_check and report.ok:  # a load attempt on a folder with known errors would only repeat them
        check_loads_without_package(folder, report)
    return report
