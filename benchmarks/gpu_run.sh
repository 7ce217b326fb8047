#!/usr/bin/env bash
# Everything that needs a GPU, in one go, with its tables written to DIR (default ./gpu-results):
#   nvidia-smi.txt, cuda_checks.md (benchmarks/cuda_checks.py), test_against_cuda.txt (the suite's GPU
#   tests), accuracy.md (the accuracy suite on CUDA, 3 optimizers x 3 AMP modes), and each script's
#   stderr. Each part has its own time limit (together under 10 minutes), so a slow part still leaves the
#   others' results. Run from the repository root:
#
#     bash benchmarks/gpu_run.sh /path/to/results
#
# Then copy the tables, with their headers, into benchmarks/RESULTS.md.
set -u
out=${1:-gpu-results}
mkdir -p "$out"
python -c "import memtrace" 2>/dev/null || pip install -q --no-deps -e . > "$out/install.log" 2>&1
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version(),
torch.cuda.get_device_name(0))" > "$out/versions.txt" 2>&1
timeout "${CHECKS_SECONDS:-150}" python benchmarks/cuda_checks.py > "$out/cuda_checks.md" 2> "$out/cuda_checks.err"
echo "cuda_checks.py exit status $?" >> "$out/cuda_checks.err"
timeout "${TESTS_SECONDS:-90}" python -m pytest -q -p no:cacheprovider tests/test_against_cuda.py \
    > "$out/test_against_cuda.txt" 2>&1
echo "test_against_cuda exit status $?" >> "$out/test_against_cuda.txt"
timeout "${ACCURACY_SECONDS:-330}" python benchmarks/accuracy.py --device cuda --optimizers sgd,adam,adamw \
    --amp off,fp16,bf16 --markdown > "$out/accuracy.md" 2> "$out/accuracy.err"
echo "accuracy.py exit status $?" >> "$out/accuracy.err"
ls -l "$out"
