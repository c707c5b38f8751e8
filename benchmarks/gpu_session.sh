#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (issue "GPU runner"): about 7 minutes on one H100 / H200.
# Run from the repository root on the GPU machine (its python3 holds a CUDA torch and triton; nothing is installed):
#
#     bash benchmarks/gpu_session.sh            # logs under $OUT (the device tool) or benchmarks/results/gpu_session
#
# 1. the CUDA tests: Triton kernels compiled = their PyTorch references, CUDA-graph replay = eager, MoE grouped GEMM,
#    the GPU engine = the CPU reference on tiny shapes (tests/test_triton_kernels.py, test_cuda_graph.py,
#    test_engine.py -k cuda);
# 2. benchmarks/gpu_check.py: the LFM2.5-350M and LFM2-8B-A1B shapes (random bf16 weights) served on the GPU against
#    the CPU float32 reference;
# 3. benchmarks/gpu_throughput.py --quick: output tok/s, TTFT, ITL against transformers' batched generate.
# Each stage has its own time limit, so one stage that hangs or fails leaves the others' results.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu_session}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LFM_KERNELS=0 HF_HUB_OFFLINE=1
export TRITON_DEFAULT_FP_FUSION=1
py=${PYTHON:-python3}
start=$(date +%s)
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s in)"; }

stage "machine"
{ nvidia-smi -L; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/machine.txt"

stage "CUDA tests"
timeout 200 $py -m pytest -q -p no:cacheprovider -x --tb=short \
  tests/test_triton_kernels.py tests/test_cuda_graph.py "tests/test_engine.py::test_engine_on_cuda_equals_the_cpu_reference" \
  -k "not compile_for_a_gpu" 2>&1 | tee "$out/cuda_tests.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/cuda_tests.txt"

stage "real shapes against the CPU reference"
timeout 150 $py benchmarks/gpu_check.py --models 350M,8B-A1B 2>&1 | tee "$out/gpu_check.txt"
echo "gpu_check exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_check.txt"

stage "throughput"
timeout 240 $py benchmarks/gpu_throughput.py --quick --out "$out/gpu_throughput.md" 2>&1 | tee "$out/gpu_throughput.txt"
echo "gpu_throughput exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_throughput.txt"

stage "done"
