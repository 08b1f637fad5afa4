#!/usr/bin/env bash
# The GPU check (issue 14) as one command: install what the GPU machine lacks from carried wheels, make this
# checkout importable, run benchmarks/gpu_check.py. Results land in $OUT (the device tool's folder) or
# benchmarks/results/gpu_check: results.{json,md} rewritten after every step, install.log, log.txt.
#
#   bash scripts/gpu_wheels.sh                      # here, once: .whl/ (git-ignored)
#   device run: bash benchmarks/gpu_check.sh        # carry [".whl"]; about 7-9 minutes on an H100/H200
#   bash benchmarks/gpu_check.sh --dry-run          # the same on CPU with tiny shapes (~1 minute)
#
# Extra arguments go to gpu_check.py (--steps, --budget-s, ...).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu_check}"
mkdir -p "$OUT"
PYTHON="${PYTHON:-python3}"
SITE="${GPU_CHECK_SITE:-/tmp/gpu-check-site}"
started=$(date +%s)

dry_run=0
for argument in "$@"; do [ "$argument" = "--dry-run" ] && dry_run=1; done
if [ "$dry_run" = 0 ] && compgen -G ".whl/*.whl" > /dev/null; then  # a dry run uses this environment's packages
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .whl/*.whl > "$OUT/install.log" 2>&1; then
    echo "gpu_check: installing .whl/ failed:"; tail -20 "$OUT/install.log"; exit 1
  fi
fi
# This checkout as the installed package lays it out: modeling_ml_mamba/ at the root, the other folders under the
# ml_mamba namespace (pyproject's package-dir), without building or installing anything.
mkdir -p "$SITE/ml_mamba"
for folder in processing model_cards evaluation conversion publishing training serving; do
  ln -sfn "$PWD/$folder" "$SITE/ml_mamba/$folder"
done
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
echo "gpu_check: setup took $(( $(date +%s) - started )) s" | tee "$OUT/log.txt"
"$PYTHON" -c "import modeling_ml_mamba, ml_mamba.training, transformers, torch; print('gpu_check: transformers', transformers.__version__, 'torch', torch.__version__)" 2>&1 | tee -a "$OUT/log.txt" || exit 1
"$PYTHON" benchmarks/gpu_check.py --out "$OUT" "$@" 2>&1 | tee -a "$OUT/log.txt"
status=${PIPESTATUS[0]}
echo "gpu_check: $(( $(date +%s) - started )) s in all, exit $status" | tee -a "$OUT/log.txt"
exit "$status"
