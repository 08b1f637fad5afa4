#!/usr/bin/env bash
# The wheels the GPU machine lacks (Python 3.12, torch 2.11, transformers 5.17, no package registry), downloaded
# here into .whl/ (git-ignored) at the versions this environment runs, for `benchmarks/gpu_check.sh` to install
# there. About 18 MB; the device run carries .whl with the working tree (64 MiB limit).
#
#   bash scripts/gpu_wheels.sh            # then: device run `bash benchmarks/gpu_check.sh`, carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
# transformers 5.25 and what it needs newer than the machine has (its hub client, the hub's HTTP stack, regex),
# and the training stack the machine lacks (TRL, datasets) or has older (peft).
PACKAGES="transformers huggingface_hub httpx2 httpcore2 truststore regex trl datasets dill multiprocess peft"
pins=$("$PYTHON" - "$PACKAGES" <<'PY'
import sys
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in sys.argv[1].split()))
PY
)
rm -rf .whl && mkdir -p .whl
echo "downloading: $pins"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $pins
du -sh .whl
