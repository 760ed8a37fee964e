#!/usr/bin/env bash
# The GPU check, for a lent CUDA machine. It builds nothing: it installs wheels carried in .whl/ (nibblora's
# abi3 wheel, built here with `make gpu-wheels`, and bitsandbytes), runs the CUDA tests and the GPU benchmarks,
# and prints a short table. Whole run: under 5 minutes on one H200.
#
#   run: bash bench/gpu_check.sh        (carry: [".whl"])
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check_out}
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "installing the carried wheels failed"; exit 1; }
export PYTHONPATH=/tmp/site
cd /tmp && python3 -c "import nibblora, torch; print('nibblora', nibblora.__version__, 'from', nibblora.__file__); print('torch', torch.__version__, torch.cuda.get_device_name())" && cd - >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

declare -A STATUS
step() {  # step NAME TIMEOUT_S COMMAND...
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name ==="
    local start=$SECONDS
    timeout "$limit" "$@"; local rc=$?
    STATUS[$name]="rc=$rc $((SECONDS - start))s"
}

# Tests run against the installed wheel: copy them out of the tree so `python/` is not imported instead.
rm -rf /tmp/nibblora_tests && cp -r tests /tmp/nibblora_tests
step "cuda tests" 150 python3 -m pytest -q -m cuda -p no:cacheprovider /tmp/nibblora_tests -W ignore::DeprecationWarning
step "quant bench (cuda)" 60 python3 bench/bench_quant.py --device cuda --repeat 10
if [ -f bench/bench_lora.py ]; then
    step "lora bench (cuda)" 90 python3 bench/bench_lora.py --device cuda --batch 4 --seq 2048 --layers 4 --steps 10 --warmup 2
    step "lora bench 7B-wide (cuda)" 90 python3 bench/bench_lora.py --device cuda --hidden 4096 --intermediate 11008 \
        --heads 32 --kv-heads 32 --layers 2 --batch 4 --seq 1024 --steps 6 --warmup 1
fi

echo; echo "=== summary ==="
for k in "${!STATUS[@]}"; do printf '%-22s %s\n' "$k" "${STATUS[$k]}"; done
