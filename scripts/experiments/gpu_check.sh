#!/usr/bin/env bash
# The GPU check (scripts/experiments/gpu_check.py, docs/gpu.md) with what it needs on a machine without a registry.
#
#   scripts/experiments/gpu_check.sh wheels      here, where PyPI is reachable: fairseq and the packages that the
#                                                GPU machine's image lacks, as CPython 3.12 x86-64 wheels, into .whl/
#                                                (git-ignored; the device tool carries it with carry: [".whl"])
#   scripts/experiments/gpu_check.sh [OPTIONS]   anywhere: the project's .venv if there is one, else python3 (on the
#                                                GPU machine, the image's CUDA torch); if that python cannot import
#                                                fairseq, .whl/ is installed into /tmp/gpu_check_site first; then
#                                                gpu_check.py OPTIONS (--help for them)
set -euo pipefail
cd "$(dirname "$0")/../.."

# fairseq as the project pins it (Makefile), and the runtime needs of it that the GPU image does not hold
# (torch, numpy, PyYAML, regex, sacrebleu, tqdm, scikit-learn, packaging are there). --no-deps: fairseq's metadata
# asks for torchaudio, which would replace the image's torch.
WHEELS=(ve-fairseq==0.12.3 hydra-core==1.3.2 omegaconf==2.3.0 bitarray==2.9.2)
SOURCE_ONLY=(antlr4-python3-runtime==4.9.3)  # hydra's and omegaconf's parser, published as an sdist only
PYTHON_VERSION=${GPU_CHECK_PYTHON_VERSION:-3.12}  # the GPU image's python3 (KINDS.md: Python 3.12.3)

if [ "${1:-}" = wheels ]; then
  rm -rf .whl && mkdir -p .whl
  platforms=()
  for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
    platforms+=(--platform "$p")
  done
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" --implementation cp \
    "${platforms[@]}" -d .whl "${WHEELS[@]}"
  python3 -m pip wheel -q --no-deps -w .whl "${SOURCE_ONLY[@]}"  # pure Python: one wheel fits every interpreter
  ls -l .whl && du -sh .whl
  exit 0
fi

if [ -x .venv/bin/python ]; then PYTHON=${PYTHON:-.venv/bin/python}; else PYTHON=${PYTHON:-python3}; fi
if ! "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('fairseq') is None)"; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: $PYTHON cannot import fairseq and .whl/ holds no wheels: run '$0 wheels' where PyPI is" \
         "reachable and carry .whl" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/gpu_check_site .whl/*.whl
  export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
exec "$PYTHON" scripts/experiments/gpu_check.py "$@"
