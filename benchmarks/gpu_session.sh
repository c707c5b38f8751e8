#!/usr/bin/env bash
# The one prepared script for a session that is lent a GPU (issue "GPU runner"): about 6-7 minutes on one H100 / H200
# (each stage's time limit below bounds it at 10). Run from the repository root on the GPU machine (its python3 holds
# a CUDA torch and triton; nothing is installed):
#
#     bash benchmarks/gpu_session.sh                    # every stage; logs under $OUT (the device tool) or
#                                                       # benchmarks/results/gpu_session
#     bash benchmarks/gpu_session.sh profile throughput # a rerun of some stages only
#
# 1. tests: the CUDA tests: Triton kernels compiled = their PyTorch references, CUDA-graph replay = eager, MoE grouped
#    GEMM, the GPU engine = the CPU reference on tiny shapes (tests/test_triton_kernels.py, test_cuda_graph.py,
#    test_engine.py -k cuda);
# 2. check: benchmarks/gpu_check.py: the LFM2.5-350M and LFM2-8B-A1B shapes (random bf16 weights) served on the GPU
#    against the CPU float32 reference;
# 3. throughput: benchmarks/gpu_throughput.py --quick: output tok/s, TTFT, ITL against transformers' batched generate;
# 4. profile: benchmarks/gpu_profile.py: where a decode step's time goes (graph replay vs host, kernels per family,
#    the bandwidth roofline) for 350M at C=256 and 8B-A1B at C=32 with 8,192-token prompts.
# Each stage has its own time limit, so one stage that hangs or fails leaves the others' results.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-benchmarks/results/gpu_session}"
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 LFM_KERNELS=0 HF_HUB_OFFLINE=1
export TRITON_DEFAULT_FP_FUSION=1
py=${PYTHON:-python3}
start=$(date +%s)
stages="${*:-tests check throughput profile}"
stage() { echo; echo "=== $1 ($(( $(date +%s) - start )) s in)"; }
want() { [[ " $stages " == *" $1 "* ]]; }

stage "machine"
{ nvidia-smi -L; $py -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/machine.txt"

if want tests; then
stage "CUDA tests"
timeout 150 $py -m pytest -q -p no:cacheprovider -x --tb=short \
  tests/test_triton_kernels.py tests/test_cuda_graph.py "tests/test_engine.py::test_engine_on_cuda_equals_the_cpu_reference" \
  -k "not compile_for_a_gpu" 2>&1 | tee "$out/cuda_tests.txt"
echo "pytest exit: ${PIPESTATUS[0]}" | tee -a "$out/cuda_tests.txt"
fi

if want check; then
stage "real shapes against the CPU reference"
timeout 130 $py benchmarks/gpu_check.py --models 350M,8B-A1B 2>&1 | tee "$out/gpu_check.txt"
echo "gpu_check exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_check.txt"
fi

if want throughput; then
stage "throughput"
timeout 240 $py benchmarks/gpu_throughput.py --quick --out "$out/gpu_throughput.md" 2>&1 | tee "$out/gpu_throughput.txt"
echo "gpu_throughput exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_throughput.txt"
fi

if want profile; then
stage "decode step profile"
timeout 80 $py benchmarks/gpu_profile.py --out "$out/gpu_profile.md" 2>&1 | tee "$out/gpu_profile.txt"
echo "gpu_profile exit: ${PIPESTATUS[0]}" | tee -a "$out/gpu_profile.txt"
fi

stage "summary"  # the lines that matter, together at the end of the output
{
  grep -hE "passed|failed|error" "$out/cuda_tests.txt" 2>/dev/null | tail -2
  grep -hE "PASS|FAIL|exit" "$out/gpu_check.txt" 2>/dev/null
  grep -hE "^\| (LFM|model)|^Targets|exit" "$out/gpu_throughput.txt" 2>/dev/null
  grep -hE "^## |decode step as served|graph replay|roofline|exit" "$out/gpu_profile.txt" 2>/dev/null
} | tee "$out/summary.txt"
stage "done"
