#!/usr/bin/env bash
# Named GPU suites for one device call (carry .whl and .devmodel; ../shared/DEVICE.md):
#   bash bench/gpu_all.sh SUITE...     e.g. `tests`, `bench_b1 bench_ci`; a call runs 10 minutes at most
#
#   tests      the CUDA tests of tests/unit (kernels, model runner, sampler, LoRA, LLaVA)   one GPU
#   checks     tests/e2e/test_gpu_parity.py, test_gpu_multimodal.py: the engine against HF  one GPU
#   gemma      sliding windows / soft-caps: kernels, Gemma fused ops, test_gpu_gemma.py     one GPU
#   families   test_gpu_families.py (Qwen3, Phi-3 LongRoPE, Llama YaRN + biases vs HF; FAMILIES_K: a -k filter)  one GPU
#   heads      test_gpu_heads.py: classifier / reward scores and the liuhaotian LLaVA layout vs HF  one GPU
#   memory     memory_release.py: release/resume of weights and KV on the 8B shape (freed bytes, speed)  one GPU
#   warmup     test_warmup.py, then gpu_bench.py parts d, e on the 8B shape: the first 1,024-token prompt vs warm  one GPU
#   tp_tests   the all-reduce kernels, and test_gpu_tp.py at the Llama-3-mini shape         two GPUs
#   tp_8b      test_gpu_tp.py at the Llama-3.1-8B shape                                     two GPUs
#   layouts    test_gpu_layouts.py: tp / pp / dp against one GPU                            two GPUs
#   deterministic  enable_deterministic_inference: its kernels' and the engine's GPU tests      one GPU
#   quant      the FP8 and int4 (AWQ/GPTQ) kernels against dequantize-then-matmul; their engine tests vs HF  one GPU
#   moe        the fused MoE kernels vs the torch path; Qwen3-MoE / Mixtral minis vs HF     one GPU
#   moe_tp     the MoE minis at tp_size=2 and ep_size=2 against one GPU (float32 greedy)    two GPUs
#   spec       speculative decoding: tests/e2e/test_gpu_speculative.py, then spec_bench.py on the 8B shape  one GPU
#   bench_b1   gpu_bench.py part a (batch 1), SHAPES (default: llama8b smollm2), no HF baseline
#   bench_ci   gpu_bench.py part b (SGLang's CI workload, CI_PROMPTS prompts), CI_SHAPES (default: llama8b)
#   bench_all  gpu_bench.py parts a-e with HF baselines, both shapes (about 8 minutes)
#   bench_mm   mm_bench.py (LLaVA-1.5-7B shape)
#   bench_shapes  gpu_bench.py parts a and b (batch 1, CI workload) of each of SHAPES (default: the Qwen3-8B and
#              Gemma-3-12B shapes of issue 24), one engine a shape
#   bench_moe  gpu_bench.py parts a and b at the Qwen3-30B-A3B shape (dummy weights), no HF baseline
#   trace      part b on 200 prompts with steps 600-640 traced, then tools/trace_summary.py
#   kernels    kernels/gpu_profile.py (8B, batch 1 and 128), gemv_bench.py --quick, decode_attn_bench.py
#   pdmux      enable_pdmux: test_pdmux.py (the stream path), kernels/overlap_probe.py (DECODE_SMS: green
#              contexts too), then the bench_ci run without and with it (PDMUX_ARGS: other settings, ';')   one GPU
#
# ENGINE_ARGS: Engine kwargs as JSON objects separated by ';' (default '{}'): the bench_* suites run
# once per object, e.g. ENGINE_ARGS='{};{"tp_size": 2}'. CI_PROMPTS: default 500. BENCH_COMMIT: the
# commit to record (the machine's copy has no .git). Results append to $OUT/bench.jsonl.
# CALL_LIMIT: seconds this call may take in all (the device call's limit less a margin): each
# suite's time limit is cut to what is left, and a suite with under 30 s left is skipped.
# Each suite runs under `timeout`, which signals its whole process group (torch's spawned ranks
# included) and the engine's children exit with their parent, so a suite cut off leaves nothing
# running for the next one.
source bench/device_env.sh || exit 1
out=${OUT:-/tmp}
no_args='{}'
pdmux_on='{"enable_pdmux": true}'
IFS=';' read -ra engine_args <<< "${ENGINE_ARGS:-$no_args}"
started=$SECONDS
cap() {  # LIMIT: the smaller of LIMIT and what CALL_LIMIT leaves
  local left=$(( ${CALL_LIMIT:-100000} - (SECONDS - started) - 10 ))
  echo $(( $1 < left ? $1 : (left > 1 ? left : 1) ))
}
run_tests() {  # LIMIT PYTEST_ARGS...: the verdicts, and the figures the tests print
  timeout -k 10 "$(cap "$1")" python -m pytest "${@:2}" -s -p no:cacheprovider -rfEx 2>&1 \
    | grep -E "relative error|identical|^(FAILED|ERROR|XFAIL)|[0-9]+ (passed|failed|skipped|xfailed|errors?)" | tail -40
}
run_bench() {  # LIMIT SCRIPT ARGS...: once per ENGINE_ARGS object
  for args in "${engine_args[@]}"; do
    timeout -k 10 "$(cap "$1")" python "${@:2}" --engine-args "$args" --out "$out/bench.jsonl" 2>&1 | grep '^{'
  done
}
cfg8b=bench/configs/llama-3.1-8b/config.json
nvidia-smi --query-gpu=name --format=csv,noheader
for suite in "$@"; do
  if [ "$(cap 30)" -lt 30 ]; then echo "== $suite skipped: CALL_LIMIT reached"; continue; fi
  echo "== $suite ($(( SECONDS - started )) s into the call)"
  case $suite in
    tests) run_tests 500 tests/unit/test_triton_attention.py tests/unit/test_fused_ops.py \
             tests/unit/test_model_runner.py tests/unit/test_sampler.py tests/unit/test_triton_gemv.py \
             tests/unit/test_lora.py tests/unit/test_triton_argmax.py tests/unit/test_llava.py \
             tests/unit/test_media.py tests/unit/test_warmup.py tests/unit/test_pdmux.py ;;
    warmup) run_tests 200 tests/unit/test_warmup.py
            run_bench 200 bench/gpu_bench.py --shape llama8b --parts de --skip-hf ;;
    checks) run_tests 500 tests/e2e/test_gpu_parity.py tests/e2e/test_gpu_multimodal.py ;;
    gemma) run_tests 550 tests/unit/test_window_attention.py tests/unit/test_gemma_ops.py tests/e2e/test_gpu_gemma.py ;;
    families) run_tests 300 tests/e2e/test_gpu_families.py ${FAMILIES_K:+-k "$FAMILIES_K"} ;;
    heads) run_tests 200 tests/e2e/test_gpu_heads.py ;;
    memory) timeout -k 10 "${MEMORY_LIMIT:-240}" python bench/memory_release.py --shape llama8b --cycles "${CYCLES:-3}" \
              --out "$out/bench.jsonl" 2>&1 | grep '^{' ;;
    tp_tests) run_tests 450 tests/unit/test_custom_all_reduce.py tests/unit/test_allreduce_norm.py \
                tests/e2e/test_gpu_tp.py -k "not llama-3.1-8b" ;;
    tp_8b) run_tests 330 tests/e2e/test_gpu_tp.py -k llama-3.1-8b ;;
    layouts) run_tests 330 tests/e2e/test_gpu_layouts.py ;;
    spec) run_tests 250 tests/e2e/test_gpu_speculative.py
          run_bench 330 bench/spec_bench.py --shape llama8b ;;
    deterministic) run_tests 500 tests/unit/test_triton_batch_invariant.py tests/e2e/test_gpu_deterministic.py ;;
    quant) run_tests ${QUANT_LIMIT:-400} tests/unit/test_fp8.py tests/unit/test_triton_int4.py tests/unit/test_int4_layers.py \
             tests/e2e/test_gpu_fp8.py tests/e2e/test_gpu_int4.py -k "${QUANT_K:-not two_gpus}" ;;
    moe) run_tests 500 tests/unit/test_triton_moe.py tests/e2e/test_gpu_moe.py -k "not two_gpus" ;;
    moe_tp) run_tests 400 tests/e2e/test_gpu_moe.py -k two_gpus ;;
    bench_b1) for shape in ${SHAPES:-llama8b smollm2}; do
                run_bench 100 bench/gpu_bench.py --shape $shape --parts a --skip-hf
              done ;;
    bench_ci) for shape in ${CI_SHAPES:-llama8b}; do
                run_bench 230 bench/gpu_bench.py --shape $shape --parts b --skip-hf --ci-prompts "${CI_PROMPTS:-500}"
              done ;;
    bench_all) run_bench 130 bench/gpu_bench.py --shape smollm2
               run_bench 330 bench/gpu_bench.py --shape llama8b ;;
    bench_mm) run_bench 300 bench/mm_bench.py ;;
    bench_shapes) for shape in ${SHAPES:-qwen3_8b gemma3_12b}; do
                    run_bench 200 bench/gpu_bench.py --shape $shape --parts ab --skip-hf --ci-prompts "${CI_PROMPTS:-500}"
                  done ;;
    bench_moe) run_bench 560 bench/gpu_bench.py --shape qwen3_30b_a3b --parts ab --skip-hf --ci-prompts "${CI_PROMPTS:-500}" ;;
    trace) run_bench 200 bench/gpu_bench.py --shape llama8b --parts b --ci-prompts 200 --skip-hf \
             --profile-ci 600:40 --profile-dir "$out/traces"
           python bench/tools/trace_summary.py "$out"/traces/*.trace.json.gz ;;
    kernels) timeout -k 10 150 python bench/kernels/gpu_profile.py --config $cfg8b --graphs-only \
               --batch 1 --batch 128 2>&1 | grep -v -i warn
             timeout -k 10 150 python bench/kernels/gemv_bench.py --quick 2>&1 | grep -v -i warn
             timeout -k 10 100 python bench/kernels/decode_attn_bench.py --rows 150 --rows 256 --configs engine \
               2>&1 | grep -v -i warn ;;
    pdmux) run_tests 200 tests/unit/test_pdmux.py
           timeout -k 10 150 python bench/kernels/overlap_probe.py --decode-sms "${DECODE_SMS:-}" 2>&1 | grep '^{'
           IFS=';' read -ra pdmux_args <<< "${PDMUX_ARGS:-$pdmux_on}"
           for args in "$no_args" "${pdmux_args[@]}"; do
             timeout -k 10 230 python bench/gpu_bench.py --shape llama8b --parts b --skip-hf \
               --ci-prompts "${CI_PROMPTS:-500}" --engine-args "$args" --out "$out/bench.jsonl" 2>&1 | grep '^{'
           done ;;
    *) echo "unknown suite $suite: tests checks gemma families heads memory warmup tp_tests tp_8b layouts bench_b1 bench_ci" \
            "bench_all bench_mm bench_shapes trace kernels quant moe moe_tp bench_moe spec pdmux" ;;
  esac
done
