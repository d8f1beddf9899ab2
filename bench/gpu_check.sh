#!/usr/bin/env bash
# Every GPU check and GPU figure of the project, in one go on a node with an NVIDIA GPU, most
# wanted first (step names in brackets):
#   [quickstart] the README's first command as printed (2 ranks sharing one GPU);
#   [bench1]     training throughput against a plain PyTorch loop at one rank, fp32 and bf16,
#                contiguous and channels-last (what decides --channels-last auto on GPUs);
#   [kernel]     the fused PSO update against copy_ at 10^6 to 10^9 floats;
#   [tests]      the CUDA tests: kernel, data, precision, training end to end;
#   [mpi]        the MPI tier's CUDA tests: buffers, the step that waits for nothing;
#   [owndata]    your own data on the GPU: the DataLoader path's tests (pinned memory, exact
#                resume with workers, torchvision's transforms and models by name);
#   [data]       the DataLoader path against the in-memory path (bench/data_bench.py);
#   [bench2]     throughput with two ranks sharing the GPU, every algorithm;
#   [compile]    what compilation changes in psops_mpi and in the plain loop (and what
#                augmentation costs the latter).
#
#   OUT=gpu_out BUDGET_S=600 bash bench/gpu_check.sh
#   OUT=gpu_out STEPS=bench2,compile bash bench/gpu_check.sh     # some steps only
#
# Each step has its own timeout and the whole run a budget (BUDGET_S seconds): a step that
# would start with under 30 s left is skipped and says so. The log and the JSON results go
# to $OUT; the exit code is the worst of the steps'. Needs the package and its test extra
# installed (`pip install -e ".[test,mpich]"`).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
STEPS=${STEPS:-quickstart,bench1,kernel,tests,mpi,owndata,data,bench2,compile}
FASHION=${FASHION:-/usr/share/datasets/fashion-mnist}  # Debian's dataset-fashion-mnist
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
deadline=$((SECONDS + ${BUDGET_S:-600}))
worst=0

step() {  # step NAME LIMIT_S COMMAND...: run it if STEPS names it, under min(LIMIT_S, time left)
    local name=$1 limit=$2 left=$((deadline - SECONDS))
    shift 2
    [[ ",$STEPS," == *",$name,"* ]] || return 0
    if ((left < 30)); then
        echo "== [$name] skipped, out of time: $*"
        worst=124
        return
    fi
    ((limit > left)) && limit=$left
    echo "== [$name] $* (timeout ${limit}s)"
    local start=$SECONDS rc=0
    timeout -k 5 "$limit" "$@" || rc=$?
    echo "== [$name] exit $rc after $((SECONDS - start)) s"
    ((rc > worst)) && worst=$rc
}

bench=(python bench/gpu_bench.py --train-samples 25000 --epochs 3)
run_all() {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__)'
    step quickstart 120 mpiexec -n 2 python -m psops_mpi.train
    step bench1 300 "${bench[@]}" --ranks 1 --precisions fp32,bf16 --repeats 3 \
        --variants channels_last --json "$OUT/gpu_bench_1rank.json"
    step kernel 90 python bench/kernel_bench.py --sizes 1e6,1e7,1e8,1e9 --repeats 20 \
        --json "$OUT/kernel_cuda.json"
    step tests 240 python -m pytest -q -rs -p no:cacheprovider tests/unit/test_kernels_triton.py \
        tests/unit/test_data.py tests/unit/test_precision.py tests/e2e/test_gpu_train.py
    step mpi 90 mpiexec -n 2 python tests/mpi/run_rank.py -q -rs -p no:cacheprovider \
        -k "step_sync or cuda"
    step owndata 150 python -m pytest -q -rs -p no:cacheprovider tests/unit/test_loader.py \
        tests/unit/test_folder.py tests/e2e/test_own_data.py -k "not memory_limit"
    step data 150 python bench/data_bench.py --ranks 1 --workers 0,4,8 --model resnet20 \
        --batch-size 256 --repeats 2 --fashion-dir "$FASHION" --json "$OUT/data_gpu.json"
    step bench2 180 "${bench[@]}" --ranks 2 --precisions fp32 --repeats 2 \
        --json "$OUT/gpu_bench_2ranks.json"
    step compile 240 "${bench[@]}" --ranks 1 --precisions bf16 --repeats 1 \
        --variants compile,noaug --json "$OUT/gpu_bench_variants.json"
    return $worst
}

run_all 2>&1 | tee -a "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
