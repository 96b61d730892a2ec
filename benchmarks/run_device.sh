#!/usr/bin/env bash
# All benchmarks in one prepared run on a lent GPU machine (which also has 16 CPU cores). Used with the workplace's
# device tool: the wheels under .whl/ (transformers 5.24, huggingface_hub 2.4, faiss-cpu 1.15) travel with the tree.
set -u
OUT="${OUT:-/tmp/bench_out}"; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  rm -rf /tmp/site; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TQDM_DISABLE=1
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  lscpu | grep -E "Model name|^CPU\(s\)"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/machine.txt"
run() { local name=$1 limit=$2; shift 2; echo "### $name"; timeout "$limit" "$@" 2>&1 | grep -v -E "Warning|warn\(" | tee "$OUT/$name.txt"; }
run encoder_gpu_bf16 75 python3 benchmarks/bench_encoder.py --size base --device cuda --dtype bfloat16 --batch 64 --repeats 20
run encoder_gpu_fp32 50 python3 benchmarks/bench_encoder.py --size base --device cuda --dtype float32 --batch 64 --repeats 10
run encoder_cpu_fp32 90 python3 benchmarks/bench_encoder.py --size small --device cpu --batch 32 --repeats 5
run search_gpu 80 python3 benchmarks/bench_search.py --device cuda --output "$OUT/search_gpu.json"
run search_cpu 100 python3 benchmarks/bench_search.py --device cpu --output "$OUT/search_cpu.json"
run training_gpu 100 python3 benchmarks/bench_training.py --device cuda --size small --batch-sizes 64 128 256 512 1024 --chunk-size 64 --json "$OUT/training_gpu.json"
run extract_gpu 120 python3 benchmarks/bench_extract.py --device cuda --num-images 1024 --batch-size 256 --extractors RN50 RN101 ViT-B/32 --json "$OUT/extract_gpu.json"
