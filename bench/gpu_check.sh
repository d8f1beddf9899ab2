#!/usr/bin/env bash
# Every GPU check and GPU figure of the project, in one go on a node with an NVIDIA GPU, most
# wanted first: training throughput against a plain PyTorch loop at one rank, contiguous and
# channels-last (the measurement that decides --channels-last auto on GPUs), the fused kernel
# against copy_, the CUDA tests (kernel, training, buffers, the step that waits for nothing),
# throughput with two ranks sharing the GPU, then what compilation changes in psops_mpi and
# in the plain loop (and augmentation in the latter).
#
#   OUT=gpu_out BUDGET_S=600 bash bench/gpu_check.sh
#
# Each step has its own timeout and the whole run a budget (BUDGET_S seconds): a step that
# would start with under 30 s left is skipped and says so. The log and the JSON results go
# to $OUT; the exit code is the worst of the steps'. Needs the package and its test extra
# installed (`pip install -e ".[test,mpich]"`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
deadline=$((SECONDS + ${BUDGET_S:-600}))
worst=0

step() {  # step LIMIT_S COMMAND...: run it under min(LIMIT_S, time left), print its exit code
    local limit=$1 left=$((deadline - SECONDS))
    shift
    if ((left < 30)); then
        echo "== skipped, out of time: $*"
        worst=124
        return
    fi
    ((limit > left)) && limit=$left
    echo "== $* (timeout ${limit}s)"
    local start=$SECONDS rc=0
    timeout -k 5 "$limit" "$@" || rc=$?
    echo "== exit $rc after $((SECONDS - start)) s"
    ((rc > worst)) && worst=$rc
}

bench=(python bench/gpu_bench.py --train-samples 25000 --epochs 3)
run_all() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
    step 300 "${bench[@]}" --ranks 1 --precisions fp32,bf16 --repeats 3 \
        --variants channels_last --json "$OUT/gpu_bench_1rank.json"
    step 90 python bench/kernel_bench.py --sizes 1e6,1e7,1e8,1e9 --repeats 20 \
        --json "$OUT/kernel_cuda.json"
    step 240 python -m pytest -q -rs -p no:cacheprovider tests/unit/test_kernels_triton.py \
        tests/unit/test_data.py tests/unit/test_precision.py tests/e2e/test_gpu_train.py
    step 90 mpiexec -n 2 python tests/mpi/run_rank.py -q -rs -p no:cacheprovider \
        -k "step_sync or cuda"
    step 180 "${bench[@]}" --ranks 2 --precisions fp32 --repeats 2 \
        --json "$OUT/gpu_bench_2ranks.json"
    step 300 "${bench[@]}" --ranks 1 --precisions bf16 --repeats 2 \
        --variants compile,noaug --json "$OUT/gpu_bench_variants.json"
    return $worst
}

run_all 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
