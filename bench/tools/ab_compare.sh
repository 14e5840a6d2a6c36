#!/usr/bin/env bash
# A/B timing on one warm GPU: gpu_bench.py of this checkout and of an earlier commit's copy,
# alternating, so both see the same card, clocks and neighbours (issue 20's "within noise of before").
#   git archive COMMIT | tar -x -C .baseline      # here, once; carry .whl .devmodel .baseline
#   bash bench/tools/ab_compare.sh .baseline ROUNDS PARTS [gpu_bench args...]
# Each round runs this checkout, then the baseline; the JSON lines go to $OUT/ab_new.jsonl and
# $OUT/ab_base.jsonl and to stdout prefixed with new/base.
source bench/device_env.sh || exit 1
base=$1 rounds=$2 parts=$3
shift 3
out=${OUT:-/tmp}
tok=$PWD/.devmodel/smollm2
for round in $(seq "$rounds"); do
  for side in new base; do
    dir=$PWD
    [ "$side" = base ] && dir=$(cd "$base" && pwd)
    (cd "$dir" && PYTHONPATH=$dir:/tmp/site timeout -k 10 200 python bench/gpu_bench.py --shape llama8b \
        --tokenizer-dir "$tok" --parts "$parts" --skip-hf --out "$out/ab_$side.jsonl" "$@" 2>&1 \
      | grep '^{' | sed "s/^/$side $round /")
  done
done
