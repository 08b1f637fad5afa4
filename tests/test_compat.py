"""The one-compatibility-module rule: outside `modeling_ml_mamba/ml_mamba_compat.py`, code imports only transformers'
public API, so a release that renames an internal breaks one module (with a branch per release), never the
package or a saved folder's remote code."""

import ast
import pathlib

import pytest
import transformers

from modeling_ml_mamba import ml_mamba_compat

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODE_FOLDERS = ("modeling_ml_mamba", "processing", "training", "evaluation", "conversion", "publishing",
                "benchmarks", "scripts", "tests")
COMPAT = ROOT / "modeling_ml_mamba" / "ml_mamba_compat.py"
# Runs inside transformers' own test tree, whose tables it fills in as a built-in model would be listed there.
HARNESS = ROOT / "scripts" / "transformers_common"
# transformers' documented public modules besides the top level.
PUBLIC_SUBMODULES = {"modeling_outputs", "image_utils", "utils", "initialization", "trainer_utils",
                     "dynamic_module_utils"}


def _transformers_imports(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name


def test_only_the_compat_module_imports_transformers_internals():
    offenders = []
    for folder in CODE_FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == COMPAT or HARNESS in path.parents:
                continue
            for line, module in _transformers_imports(path):
                parts = module.split(".")
                if parts[0] == "transformers" and len(parts) > 1 and parts[1] not in PUBLIC_SUBMODULES:
                    offenders.append(f"{path.relative_to(ROOT)}:{line}: {module}")
    assert not offenders, "import these through modeling_ml_mamba/ml_mamba_compat.py:\n" + "\n".join(offenders)


def test_the_checker_catches_an_internal_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer\nimport transformers\n")
    assert list(_transformers_imports(bad)) == [(1, "transformers.models.mamba2.modeling_mamba2"),
                                                (2, "transformers")]


def test_compat_names_follow_the_installed_release():
    version = tuple(int(p) for p in transformers.__version__.split(".")[:2])
    assert ml_mamba_compat.CACHE_NAME == ("cache" if version >= (5, 24) else "cache_params")
    assert ml_mamba_compat.Mamba2Mixer.__name__ == "Mamba2Mixer"


@pytest.mark.filterwarnings("ignore:`(cache_params|past_key_values|cache)` is deprecated:FutureWarning")
@pytest.mark.parametrize("names", [("cache",), ("cache_params",), ("past_key_values",), ("cache", "cache_params")])
def test_pick_cache_takes_any_name_once(names):
    cache = object()
    assert ml_mamba_compat.pick_cache(**dict.fromkeys(names, cache)) is cache
    with pytest.raises(ValueError, match="Pass the cache once"):
        ml_mamba_compat.pick_cache(cache=object(), cache_params=object())
