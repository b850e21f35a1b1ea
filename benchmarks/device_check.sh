#!/usr/bin/env bash
# The prepared check for a machine with an accelerator (issue #17), in under 8 minutes:
#   1. installs what is missing: the JAX accelerator plugin (requirements-gpu.txt) and the project's
#      requirements, from the wheels in .whl/ when the machine cannot reach a package index
#      (make them here: python3 -m pip download --only-binary=:all: --python-version 3.12
#      --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any --no-deps
#      -d .whl grain array-record ml-collections nibabel portpicker; carry .whl along);
#   2. prints the devices;
#   3. benches configs/paper.py in float32 (matmul precision "highest", the default: true float32),
#      float32 at "default" (TF32 on NVIDIA GPUs) and bfloat16: train-step time, achieved FLOP/s and
#      its fraction of the device's peak, peak device memory, whole-volume inference at the paper's
#      spacing, and (first row) whether the input pipeline keeps up (`launch.py --mode=bench`);
#   4. trains 200 steps of configs/paper.py on a small synthetic set, in TF32 (at "highest" the
#      200 steps alone took 4 minutes on an H200), and prints the loss falling.
#
#   bash benchmarks/device_check.sh [OUT_DIR]          # OUT_DIR defaults to $OUT, else /tmp/device_check
#   QUICK=1 bash benchmarks/device_check.sh /tmp/dc    # the same steps at test size (a CPU smoke run)
#
# Every step's output is also written to OUT_DIR/device_check.log; the bench lines are JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-/tmp/device_check}}
mkdir -p "$out"
log="$out/device_check.log"
exec > >(tee -a "$log") 2>&1
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
config=configs/paper.py
train_overrides=(--config.num_epochs=0 --config.num_train_steps=200 --config.data.num_cases=24
                 --config.log_every_steps=20 --config.eval_every_steps=200
                 --config.checkpoint_every_steps=200 --config.train.matmul_precision=default)
if [[ -n "${QUICK:-}" ]]; then
    config=configs/test.py
    train_overrides=(--config.num_train_steps=20 --config.log_every_steps=5)
fi
step() { echo; echo "=== $* ($(date -u +%H:%M:%S) UTC)"; }

step "1. install"
# SimpleITK (other image formats) is imported only when such a file is read: not needed here.
need=$("$py" - <<'EOF'
import importlib.util
mods = {"nibabel": "nibabel", "ml_collections": "ml-collections", "grain": "grain",
        "flax": "flax", "optax": "optax", "orbax.checkpoint": "orbax-checkpoint",
        "scipy": "scipy", "matplotlib": "matplotlib", "absl": "absl-py", "tqdm": "tqdm"}
print(" ".join(p for m, p in mods.items() if importlib.util.find_spec(m.split(".")[0]) is None))
EOF
)
if [[ -n "$need" ]]; then
    echo "missing: $need"
    "$py" -m pip install -q --no-index --find-links .whl $need \
        || "$py" -m pip install -q $need \
        || echo "could not install: $need"
fi
# The plugin only where there is an NVIDIA GPU that JAX does not see yet.
if nvidia-smi -L >/dev/null 2>&1 \
        && ! "$py" -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null; then
    echo "an NVIDIA GPU that JAX does not see: installing the plugin (requirements-gpu.txt)"
    "$py" -m pip install -q -r requirements-gpu.txt || echo "could not install the plugin"
fi
"$py" -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|jax-cuda[0-9]+-(plugin|pjrt)|flax|optax|orbax-checkpoint|grain|numpy) '

step "2. devices"
"$py" -c "import jax; print(jax.__version__, jax.default_backend(), jax.devices())"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true

bench() {  # $1: a label, then launch.py's overrides
    step "3. bench $config, $1"
    "$py" launch.py --mode=bench --config="$config" "${@:2}"
}
bench "float32, highest" --config.model.dtype=float32 --config.train.matmul_precision=highest \
    --parts=model,step,inference,pipeline,memory
bench "float32, default (TF32)" --config.model.dtype=float32 \
    --config.train.matmul_precision=default --parts=step,inference,memory
bench "bfloat16" --config.model.dtype=bfloat16 --parts=step,inference,memory

step "4. train 200 steps of $config"
rm -rf "$out/train"
"$py" launch.py --mode=train --config="$config" --workdir="$out/train" "${train_overrides[@]}" \
    --config.data.data_dir="$out/data" --noeval
"$py" - "$out/train/metrics.jsonl" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if r["split"] == "train"]
for r in train:
    print(f"step {r['step']:4d}  loss {r['loss']:.4f}  {r['steps_per_s']:.2f} steps/s")
if len(train) >= 2:
    print(f"loss {train[0]['loss']:.4f} -> {train[-1]['loss']:.4f} "
          f"({'falls' if train[-1]['loss'] < train[0]['loss'] else 'does NOT fall'})")
EOF
step "done: $log"
