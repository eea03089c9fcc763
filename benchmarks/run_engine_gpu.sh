#!/bin/bash
# The engine's GPU measurements (issue 22), one section per argument, logs to $OUT/<section>.log.
# Run from the project root on a GPU machine with the TRL wheels on PYTHONPATH; MAIN=<an older checkout> for "before".
# Environment settings pass through to every section (e.g. JAXSFT_DECODE_ATTENTION=fused for another kernel).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
B=benchmarks
for section in "$@"; do
  case $section in
    card) nvidia-smi --query-gpu=name,uuid,memory.total --format=csv > $OUT/card.log ;;
    profile_before) (cd $MAIN && PYTHONPATH=/tmp/site:$MAIN timeout 150 python3 $OLDPWD/$B/profile_decode.py --label before --shape qwen05 --batch 512 --new 256) > $OUT/$section.log 2>&1 ;;
    profile_after) timeout 150 python3 $B/profile_decode.py --label after --shape qwen05 --batch 512 --new 256 > $OUT/$section.log 2>&1 ;;
    profile_after_n8) timeout 120 python3 $B/profile_decode.py --label after-n8 --shape qwen05 --batch 512 --samples 8 --new 256 > $OUT/$section.log 2>&1 ;;
    gen05) timeout 240 python3 $B/bench_generate.py --shape qwen05 --batches 64,512,1024 --new-tokens 256 --repeats 2 > $OUT/$section.log 2>&1 ;;
    gen05_jax) timeout 150 python3 $B/bench_generate.py --shape qwen05 --batches 64,512,1024 --new-tokens 256 --repeats 2 --skip-hf > $OUT/$section.log 2>&1 ;;
    gen15_jax) timeout 150 python3 $B/bench_generate.py --shape qwen15 --batches 64,512,1024 --new-tokens 256 --repeats 2 --skip-hf > $OUT/$section.log 2>&1 ;;
    gen135_jax) timeout 120 python3 $B/bench_generate.py --shape smollm2 --batches 64,512 --new-tokens 256 --repeats 2 --skip-hf > $OUT/$section.log 2>&1 ;;
    loop05_jax) timeout 150 python3 $B/bench_loop.py --impl jaxsft --shape qwen05 > $OUT/$section.log 2>&1 ;;
    loop05_trl) timeout 150 python3 $B/bench_loop.py --impl trl --shape qwen05 > $OUT/$section.log 2>&1 ;;
    loop05_compat) timeout 200 python3 $B/bench_loop.py --impl compat --shape qwen05 > $OUT/$section.log 2>&1 ;;
    loop15_jax) timeout 150 python3 $B/bench_loop.py --impl jaxsft --shape qwen15 > $OUT/$section.log 2>&1 ;;
    loop15_trl) timeout 150 python3 $B/bench_loop.py --impl trl --shape qwen15 > $OUT/$section.log 2>&1 ;;
    loop15_max1024_jax) timeout 150 python3 $B/bench_loop.py --impl jaxsft --shape qwen15 --max-length 1024 > $OUT/$section.log 2>&1 ;;
    loop15_max1024_trl) timeout 170 python3 $B/bench_loop.py --impl trl --shape qwen15 --max-length 1024 > $OUT/$section.log 2>&1 ;;
    gen05_t1) timeout 150 python3 $B/bench_generate.py --shape qwen05 --batches 512,1024 --new-tokens 256 --temperature 1 --repeats 2 > $OUT/$section.log 2>&1 ;;
    gen05_t1_before) (cd $MAIN && PYTHONPATH=/tmp/site:$MAIN timeout 150 python3 $B/bench_generate.py --shape qwen05 --batches 512,1024 --new-tokens 256 --temperature 1 --repeats 2 --skip-hf) > $OUT/$section.log 2>&1 ;;
    gen05_t1_no_command_buffers) XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 python3 $B/bench_generate.py --shape qwen05 --batches 512 --new-tokens 256 --temperature 1 --repeats 2 --skip-hf > $OUT/$section.log 2>&1 ;;
    ragged05) timeout 120 python3 $B/bench_generate.py --shape qwen05 --batches 512 --new-tokens 512 --ragged 6 --repeats 2 --skip-hf > $OUT/$section.log 2>&1 ;;
    gemm_floor) for sh in "qwen05 512,1024" "smollm2 64" "qwen15 512"; do set -- $sh; timeout 60 python3 $B/bench_decode_gemms.py --shape $1 --rows $2; done > $OUT/$section.log 2>&1 ;;
    memory_4096x8) timeout 590 python3 $B/bench_generate.py --shape qwen05 --batches 4096 --samples 8 --new-tokens 1024 --temperature 1 --repeats 0 --skip-hf > $OUT/$section.log 2>&1 ;;
    loop05_ragged_jax) timeout 150 python3 $B/bench_loop.py --impl jaxsft --shape qwen05 --ragged 6 --new 512 > $OUT/$section.log 2>&1 ;;
    loop05_ragged_trl) timeout 200 python3 $B/bench_loop.py --impl trl --shape qwen05 --ragged 6 --new 512 > $OUT/$section.log 2>&1 ;;
    profile_t1_explain) timeout 150 python3 $B/profile_decode.py --label t1 --shape qwen05 --batch 512 --new 256 --explain --top 14 > $OUT/$section.log 2>&1 ;;
    projection_tier) JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -k "decode_attention or projection" tests/test_gpu_tier.py > $OUT/$section.log 2>&1 ;;
    projection_vs_default) for sh in "qwen05 512" "smollm2 64" "qwen15 512"; do set -- $sh; for form in fused_projection fused_write; do
        echo "### $1 $2 $form"; JAXSFT_DECODE_ATTENTION=$form timeout 60 python3 $B/bench_generate.py --shape $1 --batches $2 --new-tokens 256 --temperature 1 --repeats 2 --skip-hf; done; done > $OUT/$section.log 2>&1 ;;
    decode_kernel_sweep) for sh in "qwen05 512" "smollm2 64"; do set -- $sh; timeout 80 python3 $B/bench_decode_kernel.py --shape $1 --batch $2; done > $OUT/$section.log 2>&1 ;;
    splits_gen) for sh in "smollm2 64" "qwen05 64" "qwen05 512"; do set -- $sh; for splits in 1 2 4; do
        echo "### $1 $2 splits $splits"; JAXSFT_DECODE_TILING=64,2,3,$splits timeout 70 python3 $B/bench_generate.py --shape $1 --batches $2 --new-tokens 256 --temperature 1 --repeats 3 --skip-hf; done; done > $OUT/$section.log 2>&1 ;;
    splits_kernel) for sh in "smollm2 64" "qwen05 64" "qwen05 512"; do set -- $sh; timeout 60 python3 $B/bench_decode_kernel.py --shape $1 --batch $2 --blocks 32,64 --warps 2,4 --stages 2,3 --splits 1,2,4,8; done > $OUT/$section.log 2>&1 ;;
    # the fused norm (the default, "auto") against XLA's form on the fixed workload; NORM_SHAPES=qwen05 (or smol) for one shape
    fused_norm) timeout 560 python3 $B/bench_speed.py --shapes ${NORM_SHAPES:-qwen05,qwen15} --impls jaxsft --workloads fixed --run-timeout-s 250 --variants '{"xla_norm": [{}, {"norm_implementation": "xla"}]}' > $OUT/$section.log 2>&1 ;;
    # in decode "auto" is XLA's form (decoder.decode_norm_implementation): the kernel there is "pallas"
    fused_norm_gen05) for impl in xla pallas; do timeout 100 python3 $B/bench_generate.py --shape qwen05 --batches 512 --new-tokens 256 --temperature 1 --repeats 2 --skip-hf --norm-implementation $impl; done > $OUT/$section.log 2>&1 ;;
    fused_kernel) for h in 576 896 1536; do timeout 50 python3 $B/bench_fused.py --rows 4096 --hidden $h; done > $OUT/$section.log 2>&1 ;;
    roof) timeout 60 python3 $B/roof.py > $OUT/$section.log 2>&1 ;;
    # the scanned layer loop against the default (unrolled up to 48 layers): training speed and first step, both workloads
    # (and scanned with the remat policy that trained scanned layers fastest in the third session, dots saved)
    scan_vs_unroll) timeout 560 python3 $B/bench_speed.py --shapes qwen05 --impls jaxsft --workloads fixed,ragged --run-timeout-s 150 --variants '{"scanned": [{"scan_layers": true}, {}], "scanned_dots": [{"scan_layers": true, "gradient_checkpointing": true}, {"remat_policy": "dots_saveable"}]}' > $OUT/$section.log 2>&1 ;;
    # where a first ragged step's compile goes (XLA's phases from a profiler trace), unrolled and scanned
    first_step_phases) for scan in --no-scan-layers --scan-layers; do JAX_PLATFORMS=cuda timeout 90 python3 $B/first_step_host.py --shape qwen05 --compile call $scan --trace /tmp/first_trace$scan --top 30; done > $OUT/$section.log 2>&1 ;;
    # the whole GPU tier (24 tests: over 200 s on an H100, mostly compiling)
    tier) JAX_PLATFORMS=cuda timeout 420 python3 -m pytest -q -m gpu -p no:cacheprovider --durations=12 tests/test_gpu_tier.py > $OUT/$section.log 2>&1 ;;
    fused_norm_tier) JAX_PLATFORMS=cuda timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider -k "fused" tests/test_gpu_tier.py > $OUT/$section.log 2>&1 ;;
    first_step_cache) rm -rf /tmp/jaxsft-xla; timeout 500 python3 $B/bench_speed.py --shapes qwen05 --impls jaxsft --workloads ragged --run-timeout-s 200 --variants '{"cache_fill": [{"compilation_cache": true, "compilation_cache_dir": "/tmp/jaxsft-xla"}, {}], "cache_rerun": [{"compilation_cache": true, "compilation_cache_dir": "/tmp/jaxsft-xla"}, {}]}' > $OUT/$section.log 2>&1 ;;
    first_step_autotune) timeout 500 python3 $B/bench_speed.py --shapes qwen05 --impls jaxsft --workloads ragged --run-timeout-s 200 --variants '{"autotune_1": [{"xla_options": {"xla_gpu_enable_triton_gemm": false, "xla_gpu_autotune_level": 1}}, {}]}' > $OUT/$section.log 2>&1 ;;
    # where a GPU host's lowering goes (1.9-2.2 s a program on one H100 host, 0.4-0.7 s on the repository's CPU)
    first_step_profile) JAX_PLATFORMS=cuda timeout 120 python3 $B/first_step_host.py --shape qwen05 --compile serial --profile-lowering 45 > $OUT/$section.log 2>&1 ;;
    # compile-time options against the default, first step and speed: PTX compiled in-process (no ptxas process per
    # module) and each program's LLVM module split 16 ways at 0.5B ragged (3 programs in the first call); at 135M
    # (XLA's Triton GEMMs kept) in-process PTX and no autotuning.
    # The driver's JIT cache is off in every run, so no run inherits another's.
    first_step_flags) CUDA_CACHE_DISABLE=1 timeout 340 python3 $B/bench_speed.py --shapes qwen05 --impls jaxsft --workloads ragged --run-timeout-s 110 --variants '{"nvptx_lib": [{"xla_options": {"xla_gpu_enable_triton_gemm": false, "xla_gpu_enable_libnvptxcompiler": true}}, {}], "llvm_split_16": [{"xla_options": {"xla_gpu_enable_triton_gemm": false, "xla_gpu_force_compilation_parallelism": 16}}, {}]}' > $OUT/$section.log 2>&1
        CUDA_CACHE_DISABLE=1 timeout 200 python3 $B/bench_speed.py --shapes smol --impls jaxsft --workloads fixed --run-timeout-s 65 --variants '{"nvptx_lib": [{"xla_options": {"xla_gpu_enable_libnvptxcompiler": true}}, {}], "autotune_0": [{"xla_options": {"xla_gpu_autotune_level": 0}}, {}]}' >> $OUT/$section.log 2>&1 ;;
    profile_sequence_135) timeout 120 python3 $B/profile_decode.py --shape smollm2 --batch 64 --new 256 --explain --sequence 40 --top 12 > $OUT/$section.log 2>&1 ;;
  esac
  echo "== $section done $(date +%T)" >> $OUT/progress.log
done
