#!/usr/bin/env bash
# Everything that needs a GPU, in one go, with its tables written to DIR (default ./gpu-results):
#   versions.txt (nvidia-smi, torch, CUDA, cuDNN), cuda_checks.md (benchmarks/cuda_checks.py),
#   test_against_cuda.txt (the suite's GPU tests), accuracy.md (the accuracy suite on CUDA, 3 optimizers x
#   3 AMP modes, merged from SHARDS processes), full_size.md (models at training sizes, AdamW, float32 and
#   bf16 AMP), cli_verify.txt (the command line's --verify on the ResNet-50 example of docs/cli.md), traces/ (allocator
#   traces of the accuracy cases off by more than 0.1 %), and each script's stderr. The parts run side by side: each process has its own caching
#   allocator and its own peak statistics, so they do not disturb one another's numbers; each has its own
#   time limit, so a slow part still leaves the others' results. Run from the repository root:
#
#     bash benchmarks/gpu_run.sh /path/to/results
#
# Then copy the tables, with their headers, into benchmarks/RESULTS.md.
set -u
out=${1:-gpu-results}
shards=${SHARDS:-6}
limit=${LIMIT_SECONDS:-300}
mkdir -p "$out/traces"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONUNBUFFERED=1
python -m pip install -q --no-deps --no-build-isolation -e . > "$out/install.log" 2>&1
{ nvidia-smi; python -c "import torch; print(torch.__version__, 'CUDA', torch.version.cuda, 'cuDNN',
torch.backends.cudnn.version(), torch.cuda.get_device_name(0))"; } > "$out/versions.txt" 2>&1
timeout "$limit" python benchmarks/cuda_checks.py --traces "$out/traces" > "$out/cuda_checks.md" 2> "$out/cuda_checks.err" &
timeout "$limit" python -m pytest -q -p no:cacheprovider tests/test_against_cuda.py > "$out/test_against_cuda.txt" 2>&1 &
for k in $(seq 1 "$shards"); do
    timeout "$limit" python benchmarks/accuracy.py --device cuda --optimizers sgd,adam,adamw --amp off,fp16,bf16 \
        --shard "$k/$shards" --rows-json "$out/accuracy.$k.json" --traces "$out/traces" --markdown \
        > "$out/accuracy.$k.md" 2> "$out/accuracy.$k.err" &
done
timeout "$limit" python benchmarks/accuracy.py --device cuda --full-size --optimizers adamw --amp off,bf16 \
    --rows-json "$out/full_size.json" --traces "$out/traces" --trace-above 0.5 --markdown \
    > "$out/full_size.md" 2> "$out/full_size.err" &
timeout "$limit" memtrace torchvision.models:resnet50 --input-shape 3,224,224 --batch-size 64 --amp fp16 --depth 1 \
    --verify > "$out/cli_verify.txt" 2>&1 &
wait
python benchmarks/accuracy.py --device cuda --markdown --merge $(seq -f "$out/accuracy.%g.json" 1 "$shards") \
    > "$out/accuracy.md"
cat "$out/accuracy.md"
ls -l "$out" "$out/traces"
