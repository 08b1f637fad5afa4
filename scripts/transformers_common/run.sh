#!/usr/bin/env bash
# transformers' own common model tests (ModelTesterMixin, ConfigTester) of the installed release, run on a tiny
# ML-Mamba of each LM kind, as on any model of the library (issue 18). Not part of the default suite: it downloads the
# transformers source distribution of the installed release (PyPI), which ships tests/test_modeling_common.py.
#
#   bash scripts/transformers_common/run.sh            # prints the pytest summary
#
# The sdist lacks tests/generation/ and tests/exporters/: GenerationTesterMixin and ExportTesterMixin are replaced by
# empty classes (so `test_generation_tester_mixin_inheritance` fails by construction; our own generation tests cover
# greedy, sampling, beam search, streaming and batches), and tests/utils/test_configuration_utils.py by its
# `config_common_kwargs`.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
version=$(python -c "import transformers; print(transformers.__version__)")
work="${TMPDIR:-/tmp}/ml-mamba-transformers-common-$version"
if [ ! -f "$work/transformers-$version/tests/test_modeling_common.py" ]; then
  mkdir -p "$work"
  python -m pip download --quiet --no-deps --no-binary :all: "transformers==$version" -d "$work"
  tar xzf "$work/transformers-$version.tar.gz" -C "$work" "transformers-$version/tests"
fi
tests="$work/transformers-$version/tests"
mkdir -p "$tests/generation" "$tests/exporters" "$tests/utils" "$tests/models/ml_mamba"
touch "$tests/__init__.py" "$tests/generation/__init__.py" "$tests/exporters/__init__.py" "$tests/utils/__init__.py" \
      "$tests/models/__init__.py" "$tests/models/ml_mamba/__init__.py"
printf 'class GenerationTesterMixin:  # not in the sdist\n    pass\n' > "$tests/generation/test_utils.py"
printf 'class ExportTesterMixin:  # not in the sdist\n    pass\n' > "$tests/exporters/test_export.py"
cat > "$tests/utils/test_configuration_utils.py" <<'PY'
config_common_kwargs = {"return_dict": False, "output_hidden_states": True, "output_attentions": True,
                        "dtype": "float16", "chunk_size_feed_forward": 5, "architectures": ["BertModel"],
                        "id2label": {0: "label"}, "label2id": {"label": "0"}, "problem_type": "regression"}
PY
cp "$here/test_modeling_ml_mamba.py" "$tests/models/ml_mamba/"
python -m pip install --quiet parameterized
cd "$work/transformers-$version"
python -m pytest -q -p no:cacheprovider tests/models/ml_mamba/test_modeling_ml_mamba.py "$@"
