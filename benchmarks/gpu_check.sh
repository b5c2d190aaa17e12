#!/usr/bin/env bash
# The GPU benchmark pass (issue 14): bench_forward and bench_sweep on an accelerator machine, the
# torch peers on the same GPU. Logs and JSON records go to $OUT (default ./gpu_out). Expects
# transformer_lens importable (carry its wheels where the machine has no registry); without it,
# bench_forward times jaxpatch alone and bench_sweep has nothing to compare against.
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
for f in bench_forward bench_sweep; do
  [ -f benchmarks/results/$f.jsonl ] && wc -l < benchmarks/results/$f.jsonl > "$OUT/$f.lines0" || echo 0 > "$OUT/$f.lines0"
done
{
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv
  python3 -c "import jax, torch; print('jax', jax.__version__, jax.devices()); print('torch', torch.__version__, torch.cuda.is_available())"
  python3 -c "import transformer_lens, transformers; print('transformer_lens ok; transformers', transformers.__version__)"
} 2>&1 | tee "$OUT/env.log"
step() { local t=$1; shift; echo "== $* (limit ${t}s)"; local s=$SECONDS; timeout "$t" "$@"; echo "== rc $? in $((SECONDS - s)) s"; }
step 100 python3 benchmarks/bench_forward.py --runs 10 2>&1 | tee "$OUT/forward_8x16.log"
step 300 python3 benchmarks/bench_sweep.py --runs 3 2>&1 | tee "$OUT/sweep.log"
step 70 python3 benchmarks/bench_forward.py --batch 32 --pos 512 --runs 5 2>&1 | tee "$OUT/forward_32x512.log"
JAX_DEFAULT_MATMUL_PRECISION=tensorfloat32 step 60 python3 benchmarks/bench_forward.py --batch 32 --pos 512 --runs 5 2>&1 | tee "$OUT/forward_32x512_tf32.log"
for f in bench_forward bench_sweep; do
  [ -f benchmarks/results/$f.jsonl ] && tail -n +$(( $(cat "$OUT/$f.lines0") + 1 )) benchmarks/results/$f.jsonl > "$OUT/$f.gpu.jsonl"
done
ls -la "$OUT"
