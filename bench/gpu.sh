#!/usr/bin/env bash
# Everything that needs CUDA, in one go on a GPU machine: the tests that only run there (Triton
# kernels compiled, bf16 at GPT-2 sizes), the kernel, training, agent and generation benchmarks,
# the main job trained on the GPU, and DDP over NCCL. Each step has a time limit and its own log
# under $LOGS; a failing step is reported and the next one runs. The README's Speed section and
# bench/RESULTS.md hold what it printed.
#
#     bash bench/gpu.sh                                  # needs data/default and out/quick
#     SMOLLM2=path/to/hf_folder bash bench/gpu.sh        # generation on another pretrained model
#     STEPS="kernel_tests bench_kernels" BUDGET=300 bash bench/gpu.sh   # some steps, in 5 minutes
set -uo pipefail  # not -e: every step runs, each one's exit status is printed
cd "$(dirname "$0")/.."
LOGS=${LOGS:-bench/gpu_logs}
SMOLLM2=${SMOLLM2:-smollm2-135m}
STEPS=${STEPS:-machine kernel_tests bench_kernels bench_train_tiny bench_train_gpt2 quick_job bench_agent bench_generate ddp all_tests}
mkdir -p "$LOGS"

DEADLINE=$((SECONDS + ${BUDGET:-3600}))  # BUDGET: seconds for all the steps; what is left is skipped
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # transformers, the reference, must not look online

step() {  # step NAME SECONDS COMMAND...: run it if STEPS names it; its log's tail, rc and time
    local name=$1 limit=$2 start=$SECONDS rc
    shift 2
    [[ " $STEPS " == *" $name "* ]] || return 0
    if ((DEADLINE - SECONDS < 15)); then echo "== $name: skipped, BUDGET spent"; return 0; fi
    ((limit > DEADLINE - SECONDS)) && limit=$((DEADLINE - SECONDS))
    echo "== $name: started, limit $limit s"
    timeout -k 5 "$limit" bash -c '"$@"' "$name" "$@" >"$LOGS/$name.log" 2>&1  # bash: steps may be functions
    rc=$?
    echo "== $name: rc $rc, $((SECONDS - start)) s (limit $limit)"
    grep -v -e '^\s*$' "$LOGS/$name.log" | tail -n "${TAIL:-6}" | cut -c1-400
}

machine() {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
    python -c "import torch, triton, platform; print('python', platform.python_version(), 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
    lscpu | grep -E '^Model name|^CPU\(s\)'
}

quick_job() {  # the main job's training and evaluation, on the GPU (quickstart.sh minus the install)
    python train.py config/quick.py --device=cuda --out_dir=out/quick_gpu --overwrite=True || return
    python agent.py --out_dir=out/quick_gpu --split=train --n=1000 --device=cuda || return
    python agent.py --out_dir=out/quick_gpu --split=ood --n=1000 --device=cuda
}

ddp() {  # NCCL with one process per GPU, then the headline command, which must name the mismatch
    local gpus
    gpus=$(python -c 'import torch; print(torch.cuda.device_count())')
    ((gpus > 0)) || { echo "no GPU here: nothing for NCCL to do"; return 1; }
    torchrun --standalone --nproc_per_node="$gpus" train.py config/memory.py --max_iters=40 \
        --eval_interval=20 --out_dir=out/memory_ddp --overwrite=True || return
    torchrun --standalone --nproc_per_node=8 train.py config/memory.py --max_iters=2 --out_dir=out/memory_ddp8
    echo "rc of the 8-process command: $?"
}

export -f machine quick_job ddp
step machine 30 machine
step kernel_tests 300 python -m pytest -q -rs tests/test_kernels.py tests/test_model.py
step bench_kernels 240 python bench/kernels.py --out="$LOGS/kernels.json"
step bench_train_tiny 120 python bench/train.py config/memory.py --device=cuda --max_iters=50
step bench_train_gpt2 180 python bench/train.py config/memory.py --device=cuda --n_layer=12 --n_head=12 \
    --n_embd=768 --block_size=1024 --batch_size=8 --synthetic_vocab=50304 --max_iters=20
step quick_job 300 quick_job
step bench_agent 180 python bench/agent.py --out_dir=out/quick --device=cuda
step bench_generate 180 python bench/generate.py --init_from="$SMOLLM2" --device=cuda --batch_sizes=[1,32] --new_tokens=64
step ddp 180 ddp
step all_tests 600 python -m pytest -q --maxfail=5 --ignore=tests/test_kernels.py --ignore=tests/test_model.py
