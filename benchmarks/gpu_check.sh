#!/usr/bin/env bash
# One GPU check for the speed issue, under 5 minutes on one H100/H200: the train step of gpt2
# (124M, T 1024) and gpt3-xl (1.3B, T 2048) in bf16 compute (float32 params and optimizer
# state: train/run.py platform_defaults) with `fused` attention (jax.nn.dot_product_attention),
# each printing tokens/s and MFU against the chip's dense bf16 peak (train/planning/chips.py).
#
# The device machine has jax[cuda] but no network and not all our dependencies. Prepare a
# wheelhouse here first (names only what its image lacks), then carry it:
#   pip download -d .wheels --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
#       tyro grain array-record tensorflow-datasets tensorboardX
#   echo /.wheels/ >> .git/info/exclude
#   device run: bash benchmarks/gpu_check.sh   (carry: .wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ -d .wheels ]; then
  "$PY" -m pip install -q --no-index --find-links .wheels tyro grain array-record tensorflow-datasets tensorboardX
fi
"$PY" -m pip install -q --no-deps --no-build-isolation -e .
"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())"
export PYTHONUNBUFFERED=1
for spec in "gpt2 16" "gpt3-xl 8"; do
  set -- $spec
  timeout 150 "$PY" benchmarks/bench_train_step.py --preset "$1" --steps 10 --no-pipeline \
    --set model.attention_impl=fused --set batch_size="$2" || echo "$1: failed or timed out (exit $?)"
done
