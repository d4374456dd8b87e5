#!/usr/bin/env bash
# The GPU tests and benchmarks in one go, on a machine with a CUDA GPU and the package with its test extras:
#
#     bash benchmarks/gpu_checks.sh [folder]
#
# About 7 minutes on an H200. Each part is bounded in time; what it prints is kept in the folder (default
# gpu-checks/): the CUDA tests, the speed against the official loop, live re-runs on 4096 x 4096 with the model on
# the GPU, and each method's time and GPU memory.
set -u
out=${1:-gpu-checks}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
part() {
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt"
}
nvidia-smi -L 2>&1 | tee "$out/gpu.txt"
part test_cuda 240 python -m pytest -q -p no:cacheprovider -rs tests/engine/test_cuda.py
part speed 150 python benchmarks/benchmark_speed.py --device cuda --repeat 10
part live 300 python benchmarks/benchmark_live.py --device cuda --threads "$(nproc)" --sizes 4096 --scenes mosaic \
    --strokes 4 --release ''
part methods 360 python benchmarks/benchmark_methods.py --device cuda
echo "== done ($(date -u +%H:%M:%S)); outputs in $out/"
