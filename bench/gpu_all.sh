#!/usr/bin/env bash
# The GPU checks and benchmarks of issue 6, by stage, for device calls (carry .whl and .devmodel):
#   bash bench/gpu_all.sh tests check profile bench    # all four: about 10 minutes, so use two calls
#   bash bench/gpu_all.sh tp_tests tp_check tp_b1      # issue 9, on two GPUs; then tp_bench in a call of its own
#   bash bench/gpu_all.sh profile_ci ci_trace          # decode steps at CI batch sizes; a trace of the CI run
# Each stage has its own time limit, so one failure still leaves the others' results.
source bench/device_env.sh || exit 1
out=${OUT:-/tmp}
tok=.devmodel/smollm2
mini=/tmp/llama3-mini && mkdir -p $mini && cp bench/configs/llama3-mini/config.json $mini/ && cp $tok/tok* $tok/*.jinja $mini/
nvidia-smi --query-gpu=name --format=csv,noheader
for stage in "$@"; do
  echo "== $stage"
  case $stage in
    tests) timeout 300 python -m pytest tests/unit/test_triton_attention.py tests/unit/test_fused_ops.py \
             tests/unit/test_model_runner.py tests/unit/test_sampler.py tests/unit/test_triton_gemv.py tests/unit/test_lora.py \
             tests/unit/test_triton_argmax.py \
             -p no:cacheprovider -rfE 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -15 ;;
    rope_bits) timeout 120 python -m pytest tests/unit/test_fused_ops.py -k same_bits -x -p no:cacheprovider 2>&1 \
                 | grep -E "Mismatch|Greatest|index|passed|failed" | head -12 ;;
    check) timeout 170 python bench/gpu_check.py --config-dir $tok --config-dir $mini 2>&1 \
             | grep -E "relative|identical|PASS|FAIL|Error" ;;
    profile) timeout 120 python bench/gpu_profile.py --config bench/configs/llama-3.1-8b/config.json \
               --batch 1 --batch 128 2>&1 | grep -v -i warn ;;
    bench) timeout 130 python bench/gpu_bench.py --shape smollm2 --tokenizer-dir $tok --out $out/bench.jsonl 2>&1 | grep '^{'
           timeout 330 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --out $out/bench.jsonl 2>&1 | grep '^{' ;;
    tp_tests) timeout 150 python -m pytest tests/unit/test_custom_all_reduce.py tests/unit/test_allreduce_norm.py \
                -p no:cacheprovider -rfE 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -15 ;;
    tp_check) timeout 300 python bench/gpu_tp_check.py --config bench/configs/llama-3.1-8b/config.json --tp 2 2>&1 | grep tp_size
              timeout 120 python bench/gpu_tp_check.py --config $mini/config.json --tp 2 --dtype float32 2>&1 | grep tp_size ;;
    tp_fusion) timeout 150 python bench/gpu_tp_check.py --config $mini/config.json --tp 2 --fusion 2>&1 | grep tp_size
               timeout 100 python bench/gpu_profile.py --config bench/configs/llama-3.1-8b/config.json --graphs-only \
                 --batch 1 --tp 2 --fusion 2>&1 | grep -v -i warn | head -16 ;;
    layouts) timeout 300 python bench/gpu_layouts_check.py --config-dir $mini 2>&1 | grep "prompts\|FAILED" ;;
    tp_b1) for args in '{}' '{"gemv_backend": "cublas"}' '{"tp_size": 2, "gemv_backend": "cublas"}' '{"tp_size": 2}'; do
             timeout 100 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts a --skip-hf \
               --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep '^{'
           done ;;
    ci_trace) timeout 60 python bench/gpu_bench.py --shape smollm2 --tokenizer-dir $tok --parts a --skip-hf 2>&1 | grep '^{'
              timeout 200 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts b --ci-prompts 200 --skip-hf \
                --profile-ci 600:40 --profile-dir $out/traces --out $out/bench.jsonl 2>&1 | grep '^{'
              python bench/trace_summary.py $out/traces/*.trace.json.gz ;;
    fp8_ci) for args in '{}' '{"kv_cache_dtype": "fp8_e4m3"}'; do
              timeout 200 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts b --skip-hf --ci-prompts 200 \
                --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep '^{'
            done ;;
    gemv) timeout 330 python bench/gemv_bench.py 2>&1 | grep -v -i warn ;;
    pdl) timeout 300 python bench/pdl_bench.py 2>&1 | grep -v -i warn ;;
    gemv_layouts) timeout 120 python bench/gemv_layouts.py 2>&1 | grep -v -i warn ;;
    smol_b1) timeout 60 python bench/gpu_bench.py --shape smollm2 --tokenizer-dir $tok --parts a --skip-hf 2>&1 | grep '^{' ;;
    b1_8b) timeout 100 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts a --skip-hf \
             --out $out/bench.jsonl 2>&1 | grep '^{' ;;
    b1_gemv) for args in '{}' '{"gemv_backend": "cublas"}'; do  # batch 1: the Triton GEMV with PDL (default on Hopper), cuBLAS
               for shape in llama8b smollm2; do
                 timeout 100 python bench/gpu_bench.py --shape $shape --tokenizer-dir $tok --parts a --skip-hf \
                   --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep '^{'
               done
             done ;;
    ci500_1) for args in '{}' '{"kv_cache_dtype": "fp8_e4m3"}'; do  # the whole CI workload on one GPU, bf16 and FP8 K/V
               timeout 220 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts b --skip-hf \
                 --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep '^{'
             done ;;
    tests_log) timeout 300 python -m pytest tests/unit/test_triton_attention.py tests/unit/test_fused_ops.py \
                 tests/unit/test_model_runner.py tests/unit/test_sampler.py tests/unit/test_triton_gemv.py tests/unit/test_lora.py \
                 -p no:cacheprovider -rfE > $out/tests.txt 2>&1; echo "pytest exit $?"; tail -5 $out/tests.txt ;;
    mm) TREADLE_TEST_TOKENIZER_DIR=$tok timeout 200 python -m pytest tests/unit/test_llava.py tests/unit/test_media.py \
          -p no:cacheprovider -rfE 2>&1 | grep -E "^(FAILED|ERROR)|passed|failed" | tail -8
        timeout 200 python bench/gpu_mm_check.py --tokenizer-dir $tok 2>&1 | grep -E "image|PASS|FAIL|Error" ;;
    mm_bench) timeout 300 python bench/mm_bench.py --tokenizer-dir $tok --out $out/bench.jsonl 2>&1 | grep '^{' ;;
    mm_trace) timeout 300 python bench/mm_bench.py --tokenizer-dir $tok --profile-dir $out/traces 2>&1 | grep '^{'
              python bench/trace_summary.py $out/traces/*.trace.json.gz ;;
    ci500) for args in '{}' '{"tp_size": 2}' '{"dp_size": 2}'; do  # the whole CI workload, one GPU / tp 2 / dp 2
             timeout 230 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts b --skip-hf \
               --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep '^{'
           done ;;
    tp_pair) for args in '{}' '{"tp_size": 2}'; do  # batch 1, one GPU and tp 2, default settings
               timeout 100 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts a --skip-hf \
                 --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep '^{'
             done ;;
    tp_push) for off in 1 0; do  # tp 2 at batch 1: the fused all-reduce with flags, then with the GEMV pushing its row
               TREADLE_DISABLE_GEMV_PUSH=$off timeout 100 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts a \
                 --skip-hf --engine-args '{"tp_size": 2}' --out $out/bench.jsonl 2>&1 | grep batch1 | sed "s/^/push_disabled=$off /"
             done ;;
    tp_cost) prof="timeout 100 python bench/gpu_profile.py --config bench/configs/llama-3.1-8b/config.json --graphs-only --batch 1"
             $prof 2>&1 | grep "a step ("  # one GPU; then tp 2: default, flags at batch 1, no collectives at all
             for v in "" "TREADLE_DISABLE_GEMV_PUSH=1" "--no-comm"; do
               case $v in --*) $prof --tp 2 --fusion $v ;; *) env $v $prof --tp 2 --fusion ;; esac 2>&1 | grep "a step (" | sed "s/^/[$v] /"
             done
             TREADLE_DISABLE_PDL=1 $prof --tp 2 --fusion 2>&1 | grep -v -i warn | head -20 ;;
    attn_tune) for major in "" --head-major; do  # the launch-config grid, token-major and head-major pools
                 timeout 200 python bench/decode_attn_bench.py --rows 150 --rows 256 $major 2>&1 | grep -v -i warn
               done
               for layout in contiguous shuffled; do  # what the pool's fragmentation costs, engine config only
                 for major in "" --head-major; do
                   timeout 60 python bench/decode_attn_bench.py --rows 150 --layout $layout --configs engine $major 2>&1 \
                     | grep -v -i warn | sed "s/^/[$layout $major] /"
                 done
               done ;;
    ci_mem) for args in ${CI_ARGS:-'{}'}; do  # the CI workload (one GPU) with the card's memory in use polled each second
              (while sleep 1; do nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits; done) > /tmp/mem.txt &
              poll=$!
              timeout 230 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts b --skip-hf \
                --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep -E '^\{|KV|pool'
              kill $poll; sort -t, -k1 -n /tmp/mem.txt | tail -1 | sed "s/^/peak MiB used, total: /"
            done ;;
    profile_tp) for tp in 1 2; do
                  timeout 100 python bench/gpu_profile.py --config bench/configs/llama-3.1-8b/config.json --graphs-only \
                    --batch 1 --tp $tp 2>&1 | grep -v -i warn
                done ;;
    profile_ci) timeout 150 python bench/gpu_profile.py --config bench/configs/llama-3.1-8b/config.json --graphs-only \
                  --batch 64 --batch 192 --context 2048 2>&1 | grep -v -i warn ;;
    fp8_profile) for kv in auto fp8_e4m3; do  # decode attention with a bf16 and an FP8 cache, CI-like batch
                   timeout 100 python bench/gpu_profile.py --config bench/configs/llama-3.1-8b/config.json --graphs-only \
                     --batch 64 --context 2048 --kv-cache-dtype $kv 2>&1 | grep -v -i warn | head -10
                 done ;;
    tp_bench) for args in '{}' '{"tp_size": 2, "enable_allreduce_fusion": false}' '{"tp_size": 2}' '{"dp_size": 2}'; do
                timeout 200 python bench/gpu_bench.py --shape llama8b --tokenizer-dir $tok --parts b --skip-hf --ci-prompts 200 \
                  --engine-args "$args" --out $out/bench.jsonl 2>&1 | grep '^{'
              done ;;
    *) echo "unknown stage $stage (tests, check, fp8_ci, gemv, pdl, gemv_layouts, smol_b1, b1_8b, b1_gemv, ci500, ci500_1, tests_log, rope_bits, mm, mm_bench, mm_trace, ci_trace, profile, profile_tp, profile_ci, fp8_profile, bench, tp_tests, tp_check, tp_fusion, layouts, tp_b1, tp_pair, tp_push, tp_cost, attn_tune, ci_mem, tp_bench)" ;;
  esac
  pkill -9 -f multiprocessing.spawn 2>/dev/null  # a stage cut off by its time limit leaves no engine processes behind
done
