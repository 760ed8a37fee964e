#!/usr/bin/env bash
# The GPU check, for a lent CUDA machine. It builds nothing: it installs wheels carried in .whl/ (nibblora's
# abi3 wheel, built here with `make gpu-wheels`, and bitsandbytes), runs the CUDA tests and the GPU benchmarks,
# and prints a short table. Whole run: under 8 minutes on one H200.
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
# Budget: the step limits below add up to 275 s (plus installing, about 20 s): under 5 minutes on one H200.
step "cuda tests" 55 python3 -m pytest -q -m cuda -p no:cacheprovider /tmp/nibblora_tests -W ignore::DeprecationWarning
# Issue 12: nibblora's own model (group-level LoRA functions, fused RMSNorm, explicit SDPA backends, chunked loss)
# against peft + bitsandbytes, checkpointing on and off, Llama-style layers at batch 4 x 2048.
LORA="python3 bench/bench_lora.py --device cuda --only nibblora-model-qlora peft-bnb nibblora-model-lora peft"
step "lora 4x2048 ckpt on" 40 $LORA nibblora-model-qlora-keepmlp --batch 4 --seq 2048 --layers 4 --steps 3 --warmup 1 \
    --checkpointing
step "lora 4x2048 ckpt off" 20 $LORA --batch 4 --seq 2048 --layers 4 --steps 3 --warmup 1
# Activation offloading (model.offload_activations): the own-model QLoRA row of "ckpt on" above, layer inputs in
# pinned host memory; compare its best s and peak MB with that row.
step "qlora 4x2048 offload" 15 python3 bench/bench_lora.py --device cuda --only nibblora-model-qlora --batch 4 \
    --seq 2048 --layers 4 --steps 2 --warmup 1 --checkpointing --offload-activations
# Llama-3-8B-shaped layers (hidden 4096, MLP 14336, 32/8 heads, vocabulary 128,256), two of them.
step "lora 8B-shaped ckpt on" 35 python3 bench/bench_lora.py --device cuda --only nibblora-model-qlora peft-bnb \
    --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 --vocab 128256 --layers 2 --batch 4 --seq 2048 \
    --steps 3 --warmup 1 --checkpointing
step "chunked loss 128k" 15 python3 bench/bench_loss.py --device cuda --batch 4 --seq 2048 --hidden 4096 \
    --vocab 128256 --dtype bf16 --repeat 3
# The memory calculator against real bf16 runs on the GPU (the quick share of the grid).
step "memory grid (cuda)" 20 python3 bench/memory_grid.py --device cuda --quick
# Issue 10: the serving engine (its CUDA tests ran with the others above). Throughput from 8 to 512 adapters
# (Punica's skewed and distinct workloads, 256 requests, rank 16 on every linear; the other two and identical vs
# merged do not fit the 5 minutes), and distinct-64 against the PEFT baseline; every cell in its own process, with its allocator peak (peak MB).
SERVE="python3 bench/bench_serve.py --device cuda --hidden 1024 --intermediate 2816 --layers 2 --heads 8 --kv-heads 8
    --vocab 8192 --requests 256 --batch 64 --max-loras 64 --prompt-len 16 128 --output-len 8 64"
step "serve 8-512 (cuda)" 45 $SERVE --n 8 512 --workloads skewed distinct --contenders nibblora
step "serve vs peft (cuda)" 30 $SERVE --n 64 --workloads distinct --contenders nibblora peft-per-adapter

echo; echo "=== summary ==="
for k in "${!STATUS[@]}"; do printf '%-24s %s\n' "$k" "${STATUS[$k]}"; done
echo; echo "=== ratios ==="
grep -E "^(nibblora .*/ |chunked / plain|\| [a-z0-9]+-|(uniform|skewed|distinct|identical)[: ])" "$LOG" || true
