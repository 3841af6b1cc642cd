#!/usr/bin/env bash
# One device call that re-validates the engine and refreshes the headline numbers on the H100 box.
# Usage (device tool, carry [".whl"] for the DeepSpeed stages; each stage writes under $OUT):
#   bash benchmarks/run_on_box.sh tests            # GPU tests (~1.5 min)
#   bash benchmarks/run_on_box.sh tests bench3b    # + 3B capped at 24 GiB vs ZeRO-2/3 (~5 min)
#   bash benchmarks/run_on_box.sh bench8b profile  # 8B vs the no-offload peak (~3 min), 3B timeline (~1 min)
# Session 6 ran `tests chunk3b rss3b profile_chunk3b`, `edf3b profile_chunk3b`, `tests spread8b profile8b`.
# Session 7 ran `tests rows3b`, `place8b`, `profile8b_top rss3b`, `auto8b tests` (the last on an H200: name
# kind nvidia-h100-x1 on every call). Session 8 ran `profile8b park8b_top` (engine 216ad23), `tests ab8b`,
# `profile8b ab3b`, `profile_chunk3b rss3b`, `tied3b`, `families_rl` (ed5b54d; ab* need ab/prev/src, made with
# `git archive 216ad23 src | tar -x -C ab/prev`, carried as an ignored path). Session 9 ran `adam ab3b9`,
# `tests ab8b`, `final3b`, `tests cast3b`, `final3b profile_copy`,
# `split3b9`, `tests final3b9`,
# `cast8b profile_copy`, `tied3b80` (ab/prev/src from e401d35: the CPU AdamW before its AVX-512 loop).
# Session 10 ran `tests ab3b10 profile3b10`, `ab8b10 tied80_10`, `ab8b10r ab3b10r`, `ab3b10x`, `ab3b10y`,
# `final3b10`, `b16cap24`; session 11 `tests head11` (stopped by the kernel test's FP32 bound), `tests_ce head11 tied80_11`, `ab3b11`,
# `profile3b11 ab8b11`, `place3b11 cast8b11`, `pool3b11`, `b16_8b11 eff8b11`, `final3b11` (ab/prev10/src = `git archive
# 1438dd4 src`); session 12 `tests_vh vh3b12`, `profile3b12 vh3b12b`, `tests r16_12`, `final3b12`, `pool3b12`, `gth3b12`, `gth8b12`; session 13 `hp13`, `ck13`, `eff8b13`, `cast13`; session 14 `r16c14`, `r16s14`, `auto3b14` (ab: a probe tree, see the stage), `nice3b14`, `reserve14`, `final14`, `fam14` (ab/ckdev, ab/ckhalf: probe trees, see the stage); session 15 `tests`, `mem15`, `alias15`
# (ab/main15/src = `git archive 1fd229c src`), `ring15` (ab/prev9/src from 6718133, session 9's final engine: `git archive 6718133 src | tar -x -C
# ab/prev9`; ab/bonly/src: a65efee's src with session 9's upload order; both carried); session 16 `pair16`, `joint16`,
# `side16` (ab/main16/src = `git archive 25694d6 src`, carried), `final16`; session 17 `tests`, `read17ab` (ab/side16/src =
# `git archive 46749cd src`, carried), `blockev17`, `prof17`, `floor17`, `late17` (probe trees built from their
# patches), `final17`, `gpuprof17`, `chunk17` (ab/main17/src = `git archive a4d6f4d src`, carried); prepared for
# session 18: `read18`, `read18ab`, `chunk18`, `dgather18`; session 18 ran those, then `ev18` (ab/main18/src = `git archive
# f188c6e src`, carried), `final18`, `eff8b18`, `ab8b18`
# (ab/s12/src = `git archive 9a7f1bf src`, carried); prepared for session 19: `chunk19`; session 19 ran `chunk19`,
# `tests prof8b19`, `park8b19`, `effpark19`; prepared for session 20: `tests dgather20` (one call), `rows20`, `bfpark20`;
# session 20 ran `tests dgather20` (twice: the first stopped at the embedding sums' GPU test), `rows20`, `bfpark20`,
# `prof8b20`, `tests hint20` (its second engine, built while the first was still referenced, found no host RAM: fixed).
# Stages run in the order given; a failing test stage stops the rest (no numbers from a broken engine).
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD/src:$PWD:${PYTHONPATH:-}
# Issue 3's headline configuration: Llama-3.2-3B, b8 x 1024, GPU capped at 24 GiB, Liger in every system, planner
# residents and the BF16 copy for slideformer; the systems (ZeRO-2/3 and slideformer variants) compared in one run.
# headline3b NAME SYSTEMS [more bench_step options] -> $OUT/llama3.2-3b_cap24g_NAME_h100_bench.{json,md}, NAME3b.log
headline3b() {
  local name=$1 systems=$2
  shift 2
  timeout 580 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
    --systems "$systems" --gpu-memory-gib 24 --steps 5 --warmup 2 --time-budget-s 560 --kernels liger \
    --engine-opt resident_layers=-1 --engine-opt host_copy=bf16 "$@" \
    --out "$OUT/llama3.2-3b_cap24g_${name}_h100_bench.json" > "$OUT/${name}3b.log" 2>&1
  sed -n '/## Results/,/## Roofline/p' "$OUT/llama3.2-3b_cap24g_${name}_h100_bench.md"
}
# The whole GPU test set; stops every later stage unless some passed and none failed.
gpu_tests_or_stop() {
  bash "$0" tests
  grep -q " passed" "$OUT/gpu_tests.log" && ! grep -q " failed" "$OUT/gpu_tests.log" || exit 1
}
# The headline, this tree against the engine in SRC (slideformer@LABEL), ABBA, then the roofline's table when there is
# one: abba3b NAME LABEL SRC [more bench_step options]
abba3b() {
  local name=$1 label=$2 src=$3
  shift 3
  headline3b "$name" "slideformer,slideformer@$label,slideformer@$label+window=2,slideformer+window=2" \
    --engine-src "$label=$src" "$@"
  sed -n '/^| batch | GPU compute/,/^$/p' "$OUT/llama3.2-3b_cap24g_${name}_h100_bench.md"
  rm -f "$OUT"/*.png
}
# A probe tree: this tree's src and tests with a committed patch, at ab/NAME: probe_tree NAME PATCH (stops the call on
# failure)
probe_tree() {
  rm -rf "ab/$1" && mkdir -p "ab/$1" && cp -r src tests "ab/$1/" && patch -s -p1 -d "ab/$1" < "benchmarks/results/$2" \
    || exit 1
}
# Llama-3.1-8B on a 24 GiB cap, every default (planner residents), roofline unless ARGS say otherwise:
# cap24_8b NAME BATCH SYSTEMS [ARGS] (a later --time-budget-s in ARGS wins)
cap24_8b() {
  local name=$1 batch=$2 systems=$3
  shift 3
  timeout 450 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size "$batch" --seq-len 1024 \
    --systems "$systems" --gpu-memory-gib 24 --steps 5 --warmup 2 --time-budget-s 430 \
    --engine-opt resident_layers=-1 "$@" \
    --out "$OUT/llama3.1-8b_cap24g_${name}_h100_bench.json" > "$OUT/${name}8b.log" 2>&1
  sed -n '/## Results/,/## Issue 3/p' "$OUT/llama3.1-8b_cap24g_${name}_h100_bench.md" | grep -E "^\| $batch "
}
# The 3B b8 on the whole card (all 28 resident), Liger, this engine against ab/PREV/src, with the roofline:
# tied80 NAME PREV
tied80() {
  timeout 400 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
    --systems slideformer,slideformer@prev --steps 5 --warmup 2 --time-budget-s 380 \
    --kernels liger --engine-opt resident_layers=-1 --engine-src prev=ab/$2/src \
    --out "$OUT/llama3.2-3b_tied80_$1_h100_bench.json" > "$OUT/tied80_$1.log" 2>&1
  sed -n '/## Results/,/## Issue 3/p' "$OUT/llama3.2-3b_tied80_$1_h100_bench.md" | grep -E "^\| 8"
}
# The headline configuration's steady-state period on this tree's engine: profile3b NAME (the timeline's suffix)
# (more profile_step options after NAME)
profile3b() {
  local name=$1
  local stem=timeline_llama3.2-3b_b8_cap24_${name}_h100_202611
  shift
  timeout 200 python3 benchmarks/profile_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
    --gpu-memory-gib 24 --engine-opt resident_layers=-1 --engine-opt host_copy=bf16 --engine-opt kernels=liger \
    --name "$stem" --out-dir "$OUT" "$@" > "$OUT/profile3b_${name}.log" 2>&1
  tail -18 "$OUT/profile3b_${name}.log" | grep -v Backend
  python3 benchmarks/timeline_read.py "$OUT/$stem.json.gz" --min-gap-ms 2 | head -40
}
for stage in "$@"; do
  case "$stage" in
    tests)
      python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_gpu.py tests/test_offload.py tests/test_liger.py tests/test_activations_disk.py \
        tests/test_cross_entropy.py tests/test_vocab_head.py tests/test_embedding_backward.py 2>&1 | tee "$OUT/gpu_tests.log" \
        | grep -E "rel|bytes|passed|failed|Error" || exit 1
      grep -q " failed" "$OUT/gpu_tests.log" && exit 1 ;;
    bench3b)
      timeout 420 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --systems slideformer,zero2,zero3,resident --gpu-memory-gib 24 --steps 5 --warmup 2 --time-budget-s 400 \
        --out "$OUT/llama3.2-3b_cap24g_h100_bench.json" > "$OUT/bench3b.log" 2>&1
      sed -n '/## Results/,/## Ratios/p' "$OUT"/llama3.2-3b_cap24g_h100_bench.md ;;
    bench3b_resident)
      # 8 of the 28 layers resident on the GPU (their AdamW there, ~11 GiB): the lowest layers (default)
      # against the same 8 spread over the depth and against 9, with ZeRO-2/3 in the same run.
      timeout 560 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+resident_placement=spread,slideformer+resident_layers=9,zero2,zero3 \
        --gpu-memory-gib 24 --steps 5 --warmup 2 --time-budget-s 540 --engine-opt resident_layers=8 \
        --out "$OUT/llama3.2-3b_cap24g_resident8_h100_bench.json" > "$OUT/bench3b_res.log" 2>&1
      sed -n '/## Results/,/## Ratios/p' "$OUT"/llama3.2-3b_cap24g_resident8_h100_bench.md ;;
    bench3b_auto)
      # engine.resident_layers=-1: the placement planner picks the resident count for the 24 GiB cap.
      timeout 560 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --systems slideformer,zero2,zero3 --gpu-memory-gib 24 --steps 5 --warmup 2 --time-budget-s 540 \
        --engine-opt resident_layers=-1 --out "$OUT/llama3.2-3b_cap24g_auto_h100_bench.json" > "$OUT/bench3b_auto.log" 2>&1
      sed -n '/## Results/,/## Ratios/p' "$OUT"/llama3.2-3b_cap24g_auto_h100_bench.md ;;
    bench3b_copy)
      # engine.host_copy=bf16 (issue 3): uploads DMA the optimizer's pinned BF16 copy (2 B/param, no cast)
      # instead of the page-locked FP32 master (4 B/param, cast on the GPU); same resident planner for both.
      timeout 560 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+host_copy=bf16,zero2,zero3 --gpu-memory-gib 24 --steps 5 --warmup 2 \
        --time-budget-s 540 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.2-3b_cap24g_copy_h100_bench.json" > "$OUT/bench3b_copy.log" 2>&1
      sed -n '/## Results/,/## Ratios/p' "$OUT"/llama3.2-3b_cap24g_copy_h100_bench.md ;;
    bench3b_liger)
      # engine.kernels=liger (issue 3 "Means"): Liger-Kernel's Triton RMSNorm/SwiGLU/RoPE in every system alike
      # (slideformer via the engine option, zero2/zero3 via the same instance patch); otherwise bench3b_copy.
      headline3b liger slideformer,zero2,zero3 ;;
    split3b)
      # engine.embedding_update (runtime/embedding_split.py): the tied embedding's rows outside the batch updated
      # during backward ('split', opt-in since session 6) vs one whole-matrix update after the embedding backward ('whole'),
      # with ZeRO-2/3 in the same run; otherwise bench3b_liger (issue 3 target 1).
      headline3b split slideformer,slideformer+embedding_update=whole,zero2,zero3 ;;
    split8b)
      # 8B b8 on the whole card (planner residents, resident_placement=auto: 21 of 32 resident -> spread), against
      # the whole-matrix embedding update, the lowest layers resident (first), and the BF16 upload copy.
      timeout 580 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+embedding_update=whole,slideformer+resident_placement=first,slideformer+host_copy=bf16 \
        --steps 4 --warmup 2 --time-budget-s 560 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.1-8b_split_h100_bench.json" > "$OUT/split8b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_split_h100_bench.md ;;
    chunk3b)
      # Issue 3 target 1: a smaller loss chunk frees GPU memory (the planner counts 20 B per logit of a chunk:
      # 5.25 GB at 2,048 tokens x 128,256) for more resident layers on the 24 GiB cap (measured: 9 at 2,048, 12 at
      # 512, 13 at 256), i.e. fewer parameters for the host's AdamW; ZeRO-2/3 in the same run. The baseline pins
      # 2,048 (512 is the default since session 6).
      headline3b chunk slideformer,slideformer+loss_chunk_tokens=512,slideformer+loss_chunk_tokens=256,zero2,zero3 \
        --engine-opt loss_chunk_tokens=2048 ;;
    edf3b)
      # Issue 3 target 1 after session 6's pipeline order (background work by unit index: the embedding's early
      # update before the layers, the top layers' updates left to overlap the next forward) and the 512-token
      # loss chunk default: split vs whole embedding update, and a 4 GiB parking pool, with ZeRO-2/3, one run.
      headline3b edf slideformer,slideformer+embedding_update=whole,slideformer+grad_park_mib=4096,zero2,zero3 ;;
    rows3b)
      # Issue 3 target 1 after session 6's last changes (non-temporal BF16 copy stores, a chunk per optimizer turn,
      # the split update's row-wise kernel that keeps nothing aside): whole (auto) vs split, ZeRO-2/3, one run.
      headline3b rows slideformer,slideformer+embedding_update=split,zero2,zero3 ;;
    place8b)
      # 8B b8, planner residents (22 of 32): auto (spread: streamed layers 1, 4, ..., 30) vs spread_top (streamed 3,
      # 6, ..., 31, the three lowest resident: the host's time for the lowest streamed layer's update, whose
      # gradient lands last), each with the whole and the split embedding update, one run.
      timeout 560 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+embedding_update=split,slideformer+resident_placement=spread_top,slideformer+resident_placement=spread_top+embedding_update=split \
        --steps 5 --warmup 2 --time-budget-s 540 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.1-8b_place_h100_bench.json" > "$OUT/place8b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_place_h100_bench.md ;;
    ab8b|ab3b)
      # The engine of this tree against an earlier one (ab/prev/src, made here with
      # `git archive REF src | tar -x -C ab/prev`, carried as an ignored path), same run, each with its defaults:
      # 8B b8 planner residents (ab8b), or 3B b8 on the 24 GiB cap with Liger + residents + BF16 copy (ab3b).
      if [ "$stage" = ab8b ]; then
        timeout 420 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
          --systems slideformer,slideformer@prev --steps 5 --warmup 2 --time-budget-s 400 \
          --engine-opt resident_layers=-1 --engine-src prev=ab/prev/src \
          --out "$OUT/llama3.1-8b_ab_h100_bench.json" > "$OUT/ab8b.log" 2>&1
        sed -n '/## Results/,/## Issue 3/p' "$OUT"/llama3.1-8b_ab_h100_bench.md
      else
        headline3b ab slideformer,slideformer@prev --engine-src prev=ab/prev/src
      fi ;;
    adam)
      # The CPU AdamW kernel on this host's CPU: its bitwise tests (the AVX-512 loop runs here), then its rate alone
      # and while host<->GPU copies run (--dma), this tree's kernel and ab/prev/src's, one after the other.
      python3 -m pytest -q -p no:cacheprovider tests/test_cpu_adam.py tests/test_cpu_adam_rows.py \
        tests/test_bench_cpu_adam.py -m "gpu or not gpu" 2>&1 | tee "$OUT/adam_tests.log" | tail -2
      grep -q " failed" "$OUT/adam_tests.log" && exit 1
      for tree in new prev; do
        src=$PWD/src; [ $tree = prev ] && src=$PWD/ab/prev/src
        PYTHONPATH=$src:$PYTHONPATH timeout 240 python3 benchmarks/bench_cpu_adam.py --threads 8,14,16 --repeats 5 \
          --variants torch_fused_fp32,ext_bf16_nt,ext_fp32 --dma none,h2d,d2h,both \
          --out "$OUT/cpu_adam_dma_${tree}_h100host.json" > "$OUT/adam_$tree.log" 2>&1
        tail -3 "$OUT/adam_$tree.log"
      done ;;
    ab3b9)
      # Session 9: the fused AVX-512 CPU AdamW against the kernel before it (ab/prev/src), in the headline
      # configuration, with 14 optimizer threads and the split embedding update on the new kernel, one run.
      headline3b ab9 slideformer,slideformer@prev,slideformer+optimizer_threads=14,slideformer+embedding_update=split \
        --engine-src prev=ab/prev/src ;;
    cast3b)
      # Session 9: resident layers whose weights are cast on use (auto picks it here: 14 resident instead of 12)
      # against the weights kept, in the headline configuration, one run, with the roofline.
      headline3b cast slideformer,slideformer+resident_weights=keep ;;
    split3b9)
      # Session 9: with the weights cast on use (14 resident) the CPU AdamW has slack and the step waits ~80 ms at
      # its start for the tied embedding's whole update; the split update against it, one run, with the roofline.
      headline3b split9 slideformer,slideformer+embedding_update=split ;;
    cast8b)
      # Session 9: Llama-3.1-8B b8 on a 24 GiB cap (a 4090-sized card), every default: the resident weights cast on
      # use (auto: 5 resident) against kept (4), one run, with the roofline.
      timeout 450 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+resident_weights=keep --gpu-memory-gib 24 --steps 5 --warmup 2 \
        --time-budget-s 430 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.1-8b_cap24g_cast_h100_bench.json" > "$OUT/cast8b.log" 2>&1
      sed -n '/## Results/,/## Issue 3/p' "$OUT"/llama3.1-8b_cap24g_cast_h100_bench.md | grep -E "^\| 8" ;;
    tied3b80)
      # Session 9: the 3B b8 on the whole card (every layer resident: the CPU updates only the tied embedding), where
      # 'auto' now splits the tied update (the plan predicts it pays): against the whole update, one run, roofline.
      timeout 400 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+embedding_update=whole --steps 5 --warmup 2 --time-budget-s 380 \
        --kernels liger --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.2-3b_tied80_h100_bench.json" > "$OUT/tied3b80.log" 2>&1
      sed -n '/## Results/,/## Issue 3/p' "$OUT"/llama3.2-3b_tied80_h100_bench.md | grep -E "^\| 8" ;;
    ab3b10)
      # Session 10: the tied head's upload no longer waits for the final norm's update, and the embedding rows are
      # gathered from the BF16 upload copy; against session 9's final engine (ab/prev9/src), and one more resident
      # layer than the planner picks (15, cast), one run, with the roofline.
      headline3b ab10 slideformer,slideformer@prev,slideformer+resident_layers=15+resident_weights=cast \
        --engine-src prev=ab/prev9/src ;;
    ab8b10)
      # Session 10's engine against session 9's (ab/prev9/src) where the tied-head and gather changes do not apply
      # (untied): Llama-3.1-8B b8 on a 24 GiB cap, every default, one run, with the roofline.
      cap24_8b ab10 8 slideformer,slideformer@prev --engine-src prev=ab/prev9/src ;;
    ab8b10r)
      # ab8b10 with the children in the other order (session 9's engine first): the first run had the new engine
      # 4% slower where nothing it changed applies; a child's place in the run is the one thing that differed.
      cap24_8b ab10r 8 slideformer@prev,slideformer --engine-src prev=ab/prev9/src ;;
    ab3b10r)
      # ab3b10 with session 9's engine first, and this engine twice (its run-to-run spread in the same process tree).
      headline3b ab10r slideformer@prev,slideformer,slideformer+window=2 --engine-src prev=ab/prev9/src ;;
    ab3b10x)
      # ab3b10r's later children ran 20-45% slower than its first, the same engine 19% apart: interleave the engines
      # (session 9's, this one, this one with session 9's upload order = the gather change alone, ab/bonly/src), each
      # of the first two twice, to read drift and difference apart. One run, with the roofline.
      headline3b ab10x slideformer@prev,slideformer,slideformer@bonly,slideformer@prev+window=2,slideformer+window=2 \
        --engine-src prev=ab/prev9/src --engine-src bonly=ab/bonly/src ;;
    ab3b10y)
      # ab3b10x again in another order, each engine twice (the box's process-to-process spread is 20-40% on some
      # instances: only the pattern over several children reads).
      headline3b ab10y slideformer,slideformer@prev,slideformer@bonly,slideformer+window=2,slideformer@prev+window=2,\
slideformer@bonly+window=2 --engine-src prev=ab/prev9/src --engine-src bonly=ab/bonly/src ;;
    tests_ce)
      python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_cross_entropy.py 2>&1 | tee "$OUT/gpu_tests_ce.log" \
        | grep -E "rel|passed|failed|Error" || exit 1
      grep -q " failed" "$OUT/gpu_tests_ce.log" && exit 1 ;;
    head11)
      # Session 11: the LM head with its loss, torch path against the fused Triton kernel, at each chunk size, for the
      # 3B and 8B shapes at 8,192 tokens.
      timeout 300 python3 benchmarks/bench_head.py --out "$OUT/head_h100_202611.json" > "$OUT/head11.log" 2>&1
      cat "$OUT/head11.log" | grep -v Backend ;;
    ab3b11)
      # Session 11's engine (fused loss kernel, 2,048-token chunks) against session 10's (ab/prev10/src = git archive
      # 1438dd4 src), interleaved, each twice, in the headline configuration; one child with 1,024-token chunks.
      headline3b ab11 slideformer,slideformer@prev,slideformer+loss_chunk_tokens=1024,slideformer@prev+window=2,\
slideformer+window=2 --engine-src prev=ab/prev10/src ;;
    tied80_11)
      # Session 11's engine against session 10's on the 3B's whole card (GPU-bound: the head is ~12% of the step).
      tied80 ab11 prev10 ;;
    profile3b11)
      # Session 11: the headline configuration's steady-state period with the fused loss kernel (15 resident).
      profile3b s11 ;;
    ab8b11)
      # Session 11's engine against session 10's: Llama-3.1-8B b8 on a 24 GiB cap, every default, with the roofline.
      cap24_8b ab11 8 slideformer,slideformer@prev --engine-src prev=ab/prev10/src ;;
    b16_8b11)
      # Session 11: the 8B at batch 16 on the 24 GiB cap (session 10: efficiency 0.81), slideformer alone.
      cap24_8b b16s11 16 slideformer --time-budget-s 280 ;;
    place3b11)
      # Session 11: with 15 resident layers the 3B headline passes 'auto' placement's "more resident than streamed"
      # rule and gets spread_top (streamed layer 2 waited 14.9 ms at the step's start in profile3b11): against the
      # lowest 15 resident, interleaved, each twice, no roofline (ab11 has it).
      headline3b place11 slideformer,slideformer+resident_placement=first,slideformer+window=2,\
slideformer+resident_placement=first+window=2 --no-roofline ;;
    cast8b11)
      # Session 11: the 8B b8 on a 24 GiB cap chose 5 resident with the weights kept (2.394 s in ab8b11) where session
      # 10's engine cast them (2.087 s): the default against forced cast in one run, no roofline; the records carry
      # the allocator's retries.
      cap24_8b cast11 8 slideformer,slideformer+resident_weights=cast --time-budget-s 280 --no-roofline
      grep -o '"system": "[^"]*"\|"gpu_alloc_retries[a-z_]*": [0-9]*\|"resident_layers": [0-9]*' \
        "$OUT"/llama3.1-8b_cap24g_cast11_h100_bench.json ;;
    pool3b11)
      # Session 11: profile3b11 shows the GPU idle ~60 ms mid-backward with no downloads running: the parking pool
      # (2 GiB) full behind the AdamW (the tied head's 788 MB gradient first). Against a 4 GiB pool and window 3.
      headline3b pool11 slideformer,slideformer+grad_park_mib=4096,slideformer+window=3,slideformer+window=2 \
        --no-roofline ;;
    tests_vh)
      # Session 12: the vocabulary-blocked head's GPU tests (its kernels in BF16, the engine 'vocab' vs 'tokens').
      python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_vocab_head.py 2>&1 | tee "$OUT/gpu_tests_vh.log" \
        | grep -E "rel|passed|failed|Error" || exit 1
      grep -q " failed" "$OUT/gpu_tests_vh.log" && exit 1 ;;
    r16c14)
      # Session 14: a 16th resident layer with its weights cast on use (12 B/param; session 12's `r16_12` forced 16 with
      # the weights kept, 14 B/param, and ran out of memory). The plan puts 16 cast at 22.5 GiB allocated; 15 (the
      # default, 90% headroom) measured 21.4 / 21.8 GiB. The head schedule auto-picks the one-pass head at 16 (the plan
      # then has the GPU as its bound); the blocked head forced beside it. Interleaved, each twice, no roofline.
      headline3b r16c14 slideformer,slideformer+resident_layers=16+resident_weights=cast+head_schedule=vocab,\
slideformer+resident_layers=16+resident_weights=cast,slideformer+window=2,\
slideformer+resident_layers=16+resident_weights=cast+head_schedule=vocab+window=2,\
slideformer+resident_layers=16+resident_weights=cast+window=2 --no-roofline --time-budget-s 540 ;;
    r16s14)
      # Session 14: `r16c14`'s 16 cast layers took the whole embedding update and the one-pass head (the plan, bound by
      # the GPU at 16, turns both off); here 16 cast with the split update and the blocked head forced, against the
      # default, interleaved, each twice, no roofline.
      headline3b r16s14 slideformer,slideformer+resident_layers=16+resident_weights=cast+embedding_update=split+head_schedule=vocab,\
slideformer+window=2,slideformer+resident_layers=16+resident_weights=cast+embedding_update=split+head_schedule=vocab+window=2 \
        --no-roofline --time-budget-s 540 ;;
    auto3b14)
      # Session 14: the planner's allocator reserve (placement.reserve_bytes) puts 16 cast layers on the 3B's 24 GiB
      # cap. As run (placement_reserve14_probe_h100_202611.patch, before the head rule's 95% share) its default took
      # the one-pass head at 16; on f23edd0 and later the default is the blocked head. Against the blocked head at
      # 16 and the previous default (15 cast: split, blocked head), interleaved, each twice, no roofline.
      headline3b auto14 slideformer,slideformer+resident_layers=16+resident_weights=cast+head_schedule=vocab,\
slideformer+resident_layers=15+resident_weights=cast,slideformer+window=2,\
slideformer+resident_layers=16+resident_weights=cast+head_schedule=vocab+window=2,\
slideformer+resident_layers=15+resident_weights=cast+window=2 --no-roofline --time-budget-s 540
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"embedding_update": "[a-z]*"' \
        "$OUT"/llama3.2-3b_cap24g_auto14_h100_bench.json | head -24 ;;
    nice3b14)
      # Session 14: the CPU AdamW's threads at nice +10 (engine.optimizer_nice, optim/priority.py) against the same
      # priority: s12's timeline had 31 ms of 0.1-1 ms compute gaps that ended as their kernel's launch returned
      # (the main thread late), nearly all while the AdamW held every core. The CPU priority tests first; the two
      # interleaved, each three times, no roofline.
      python3 -m pytest -q -p no:cacheprovider tests/test_priority.py 2>&1 | tail -2
      headline3b nice14 slideformer,slideformer+optimizer_nice=10,slideformer+window=2,\
slideformer+optimizer_nice=10+window=2,slideformer+chunk_mib=32,slideformer+optimizer_nice=10+chunk_mib=32 \
        --no-roofline --time-budget-s 540 ;;
    reserve14)
      # Session 14: the planner's memory probe (placement_reserve14_probe_h100_202611.patch: HF's MLP counted with
      # 7 intermediates per token, and the allocator's reserve as 15% of the streaming buffers + 3% of the budget
      # instead of a flat 10%) in the working tree, against main's engine (ab/main14/src, `git archive HEAD src`).
      # Llama-3.1-8B with torch kernels: b32 on a 24 GiB cap (main's plan under-counts its activations by ~2.6 GiB),
      # then b8 on the whole card (22 -> 23 kept), interleaved, each twice. No roofline.
      timeout 250 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 32 --seq-len 1024 \
        --systems slideformer,slideformer@main --gpu-memory-gib 24 --steps 3 --warmup 1 --time-budget-s 230 \
        --engine-opt resident_layers=-1 --engine-src main=ab/main14/src --no-roofline \
        --out "$OUT/llama3.1-8b_cap24g_b32res14_h100_bench.json" > "$OUT/b32res14.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_cap24g_b32res14_h100_bench.md
      timeout 330 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer@main,slideformer+window=2,slideformer@main+window=2 --steps 5 --warmup 2 \
        --time-budget-s 310 --engine-opt resident_layers=-1 --engine-src main=ab/main14/src --no-roofline \
        --out "$OUT/llama3.1-8b_res14_h100_bench.json" > "$OUT/res14.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_res14_h100_bench.md
      grep -ho '"system": "[^"]*"\|"resident_layers": [0-9]*\|"resident_weights": "[a-z]*"' \
        "$OUT"/llama3.1-8b_*res14_h100_bench.json | head -40 ;;
    blockev17)
      # Prepared in session 16: every engine event blocking (blocking_events17_probe_h100_202611.patch), so the worker
      # threads' host waits (the optimizer's per-chunk download waits, the uploaders' ring waits) sleep instead of
      # spinning cores beside the CPU AdamW's threads. The probe tree is this tree's src with the patch, built here;
      # the headline against it, ABBA, no roofline.
      probe_tree blockev blocking_events17_probe_h100_202611.patch
      abba3b blockev17 block ab/blockev/src --no-roofline --time-budget-s 300 ;;
    read17)
      # Prepared in session 16 for the next device session: the commits after 46749cd (eac399f, 7ed6daa, 88cff48,
      # 5b64d45) ran on the CPU only. The whole
      # GPU set, then the headline: this tree (the loss read asleep, eac399f) against 46749cd's engine
      # (ab/side16/src = `git archive 46749cd src | tar -x -C ab/side16`, carried), ABBA, with the roofline; each
      # child's markdown row in "Main thread" says how much of its step the main thread spent issuing it.
      gpu_tests_or_stop
      abba3b read17 side ab/side16/src --time-budget-s 330 ;;
    final17)
      # Session 17's closing measurement (the engine unchanged since 98d55f6): the headline with every default,
      # twice, with the roofline.
      headline3b final17 slideformer,slideformer+window=2 --time-budget-s 200
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_final17_h100_bench.md
      rm -f "$OUT"/*.png ;;
    late17)
      # Session 17 probe, timing only (numerically wrong: the next step's gather does not wait for its rows): the
      # tied embedding's early part (the head's gradient outside the batch's rows, ~100 ms of host AdamW at the start
      # of backward in timeline_..._s17all) consumed after every landed layer instead of before them, the batch
      # rows' update not held back by it, the gather waiting for the rows' update only and the head's upload for
      # both. Bounds what a correct deferral (the next batch's rows updated first) could gain. ab/late/src: this
      # tree's src with the probe's five changes (late17_probe_h100_202611.patch). ABBA, no roofline.
      probe_tree late late17_probe_h100_202611.patch
      abba3b late17 late ab/late/src --no-roofline --time-budget-s 330 ;;
    floor17)
      # Session 17 probe: the lowest streamed layer of spread_top raised (2 -> 4 or 6, the streamed layers spread
      # evenly from it to the top) so the host has more time to update it before the next forward needs it (the
      # step's start gap). ab/floor4, ab/floor6: this tree's src with pick_resident's spread_top changed
      # (floor17_lowest{4,6}_probe_h100_202611.patch). ABCCBA, no roofline.
      probe_tree floor4 floor17_lowest4_probe_h100_202611.patch
      probe_tree floor6 floor17_lowest6_probe_h100_202611.patch
      headline3b floor17 "slideformer,slideformer@f4,slideformer@f6,slideformer@f6+window=2,slideformer@f4+window=2,slideformer+window=2" \
        --engine-src f4=ab/floor4/src --engine-src f6=ab/floor6/src --no-roofline --time-budget-s 500
      rm -f "$OUT"/*.png ;;
    chunk17)
      # Session 17: the upload copies a chunk at a time (the box runs copies to the device one at a time, each to
      # its end: the head's 788 MB held the forward's next layer upload in timeline_..._s17gpu). The headline
      # against main before it (ab/main17/src = `git archive a4d6f4d src`, carried), ABBA, no roofline (the
      # decision first), then the GPU tests that hold the engine's copies and races. Ran on the working tree that
      # is now chunked_uploads17_probe_h100_202611.patch (reverted: even, the fourth child cut); see chunk18.
      abba3b chunk17 main ab/main17/src --no-roofline --time-budget-s 250
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests_chunk17.log" | tail -3 ;;
    hint20)
      # Session 20: the train log's parking-pool hint (build.park_hint, e183813) from a real engine of the 8B b8 on a
      # 24 GiB budget, as `slideformer train` builds it (resident_layers=-1, micro-batch 8,192 tokens), without and with
      # the BF16 copy: which pool it names, and the resident count it planned with.
      timeout 330 python3 - <<'PY' 2>&1 | grep -v Backend | tee "$OUT/hint20.log"
import gc
import sys
sys.path.insert(0, "benchmarks")
from shapes import hf_config
from slideformer import Engine, EngineConfig, OptimConfig


def hint(copy: str) -> None:  # (a function: its engine's ~100 GiB of host state is freed before the next is built)
    cfg = EngineConfig(device="cuda", gpu_memory_gib=24, resident_layers=-1, max_tokens_per_micro_batch=8192,
                       host_copy=copy)
    with Engine.from_config(hf_config("llama3.1-8b"), cfg, OptimConfig()) as e:
        print(f"host_copy={copy}: {e.memory_report()['resident_layers']} resident; hint: {e.park_hint!r}", flush=True)


for copy in ("none", "bf16"):
    hint(copy)
    gc.collect()  # (close() keeps the host masters for the model's parameters; the engine goes with its last ref)
PY
      ;;
    prof8b20)
      # Session 20: bfpark20's fastest configuration (8B b8, 24 GiB cap, BF16 copy + 8 GiB pool: 1.68-1.69 s against a
      # 1.243 s CPU term, 0.73), profiled as prof8b19: does the host AdamW run the whole step, and at what in-step rate
      # against the roofline's isolated one?
      timeout 330 python3 benchmarks/profile_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --gpu-memory-gib 24 --engine-opt resident_layers=-1 --engine-opt host_copy=bf16 --engine-opt grad_park_mib=8192 \
        --name timeline_llama3.1-8b_b8_cap24_bfpark_prof20_h100_202611 --out-dir "$OUT" > "$OUT/prof8b20.log" 2>&1
      tail -20 "$OUT/prof8b20.log" | grep -v Backend
      python3 benchmarks/timeline_read.py "$OUT/timeline_llama3.1-8b_b8_cap24_bfpark_prof20_h100_202611.json.gz" \
        --min-gap-ms 5 > "$OUT/prof8b20_read.txt"; head -60 "$OUT/prof8b20_read.txt" ;;
    prof8b19)
      # Session 19: target 3's missed configuration (8B b8 on a 24 GiB cap, every default) had never been profiled.
      # One steady-state period with every thread's ranges (the CPU optimizer's lane shows where the host idles and
      # how fast each layer's AdamW runs beside the transfers; tracing the CPU stretches the step).
      timeout 330 python3 benchmarks/profile_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --gpu-memory-gib 24 --engine-opt resident_layers=-1 --name timeline_llama3.1-8b_b8_cap24_prof19_h100_202611 \
        --out-dir "$OUT" > "$OUT/prof8b19.log" 2>&1
      tail -20 "$OUT/prof8b19.log" | grep -v Backend
      python3 benchmarks/timeline_read.py "$OUT/timeline_llama3.1-8b_b8_cap24_prof19_h100_202611.json.gz" \
        --min-gap-ms 5 > /tmp/prof8b19_read.txt; head -40 /tmp/prof8b19_read.txt ;;
    park8b19)
      # Session 19: prof8b19's timeline of the 8B b8 on a 24 GiB cap (every default) shows the backward paced by the
      # CPU AdamW (the 2 GiB parking pool, ~4.7 layers of BF16 gradients, fills and each slot is released only as
      # AdamW frees chunks), then the host idle for ~420 ms of the next forward. A larger pool lets the backward run at
      # the GPU's and the link's pace and leaves the host a backlog for the forward. One run, no roofline.
      timeout 590 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+grad_park_mib=12288,slideformer+grad_park_mib=8192,slideformer+window=2 \
        --gpu-memory-gib 24 --steps 5 --warmup 2 --time-budget-s 570 --engine-opt resident_layers=-1 --no-roofline \
        --out "$OUT/llama3.1-8b_cap24g_park19_h100_bench.json" > "$OUT/park8b19.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT/llama3.1-8b_cap24g_park19_h100_bench.md" ;;
    effpark19)
      # Session 19: park8b19 measured an 8 GiB parking pool 11% faster on the 8B b8 on a 24 GiB cap. Target 3's
      # efficiency with it, by default and with the BF16 upload copy, against this run's roofline.
      cap24_8b effpark19 8 slideformer+grad_park_mib=8192,slideformer+host_copy=bf16+grad_park_mib=8192 \
        --time-budget-s 420 ;;
    rows20)
      # Prepared in session 19 for session 20, after `tests` (the embedding backward's per-row sums, a9d468b, ran on
      # the CPU only): the headline, this tree against df7bda6's engine (ab/main19/src = `git archive df7bda6 src`,
      # carried), ABBA, no roofline: the sums' kernel (sort + FP32 segments, ~8k tokens) must not cost the step.
      abba3b rows20 main ab/main19/src --no-roofline --time-budget-s 400 ;;
    bfpark20)
      # Prepared in session 19: effpark19's BF16 copy with the 8 GiB pool ran 1.920 s (steps 1.74-2.25) against 1.675
      # without the copy, where the host-memory model says the copy should reach ~1.6 s (efficiency ~0.85). The two,
      # ABA, with the roofline.
      cap24_8b bfpark20 8 slideformer+host_copy=bf16+grad_park_mib=8192,slideformer+grad_park_mib=8192,\
slideformer+host_copy=bf16+grad_park_mib=8192 --time-budget-s 430 ;;
    dgather20)
      # Prepared in session 19: the device gather's failing GPU test (dgather18) compared two runs bit for bit while
      # the embedding backward's index_add_ was not reproducible on CUDA (atomics in no fixed order). With a9d468b's
      # deterministic sums, does it pass? The probe tree from its patch, its GPU test only (~1 min).
      probe_tree dgather device_gather18_probe_h100_202611.patch
      (cd ab/dgather && PYTHONPATH=$PWD/src:$PWD:$PYTHONPATH python3 -m pytest -m gpu -q -p no:cacheprovider -c /dev/null \
        --rootdir=. tests/test_host_rows.py 2>&1 | tee "$OUT/gpu_tests_dgather20.log" | tail -5) ;;
    chunk19)
      # Prepared in session 18: chunk18's A/B ran on a disturbed instance (this tree's first child 0.44 -> 0.56 s
      # mid-run), while the probe's timeline idled 44.5 ms against s17gpu's 50.5. The A/B alone, first in its call (no
      # profile or tests before it), with a larger budget; the records' /proc/vmstat table tells a disturbed child.
      probe_tree chunk chunked_uploads17_probe_h100_202611.patch
      abba3b chunk19 chunk ab/chunk/src --no-roofline --time-budget-s 400 ;;
    ev18)
      # Session 18: DeviceOps.record's events from a ring per stream (no CUDA event made and destroyed per record, ~320
      # per 3B step). The whole GPU set (with the ring's own test), then this tree against f188c6e's engine
      # (ab/main18/src = `git archive f188c6e src`, carried), ABBA, no roofline.
      gpu_tests_or_stop
      abba3b ev18 main ab/main18/src --no-roofline --time-budget-s 300 ;;
    final18)
      # Session 18's closing measurement of targets 1 and 3 on the headline: this engine against ZeRO-2 and ZeRO-3 in
      # one run (last run together in session 12), slideformer first and last, with the roofline. Needs the DeepSpeed
      # wheels (../shared/gpu/wheels.sh) in .whl/.
      headline3b final18 slideformer,zero2,zero3,slideformer+window=2
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_final18_h100_bench.md ;;
    eff8b18)
      # Session 18: target 3's missed configuration, Llama-3.1-8B b8 on a 24 GiB cap, with this engine (last measured
      # in session 13 by session 12's engine), every default and with the BF16 upload copy, interleaved, roofline.
      cap24_8b eff18 8 slideformer,slideformer+host_copy=bf16,slideformer+window=2 --time-budget-s 430 ;;
    ab8b18)
      # Session 18: eff8b18's steps (2.52 / 2.17 s) were slower than eff13's (1.98 / 1.73 s) on an instance whose AdamW
      # ran 5.18 Gparam/s (eff13's ~6.3). Same run: this engine against session 12's (ab/s12/src = `git archive
      # 9a7f1bf src`, carried), both with the BF16 upload copy, this tree first and last, no roofline.
      cap24_8b ab18 8 slideformer+host_copy=bf16,slideformer@s12+host_copy=bf16,slideformer+host_copy=bf16+window=2 \
        --engine-src s12=ab/s12/src --no-roofline --time-budget-s 400 ;;
    read18)
      # Prepared in session 17 for the next device session: the preamble's layer arguments reused without a mask or
      # position ids (ModelAdapter.layer_calls), which ran on the CPU only. The whole GPU set (with its new no-sync
      # test), then the GPU-only timeline: the 1-byte read at the forward's start (18.29 ms in timeline_..._s17gpu)
      # should be gone, and the first kernel should follow the embedding rows' copy at once.
      gpu_tests_or_stop
      profile3b s18gpu --threads none ;;
    read18ab)
      # read18's A/B (the two together pass the 600 s call limit): this tree against a4d6f4d's engine
      # (ab/main17/src = `git archive a4d6f4d src`, carried), ABBA, with the roofline.
      abba3b read18 main ab/main17/src --time-budget-s 480 ;;
    dgather18)
      # Prepared in session 17: session 12's device gather of the embedding rows (764314f, reverted then as even)
      # re-applied to this tree (device_gather18_probe_h100_202611.patch). timeline_..._s17gpu shows the step's first
      # kernel 20 ms in, behind the rows' 50 MB copy (16.95-18.23 ms), itself behind the host's gather on cores the
      # AdamW holds; the GPU reads the rows in ~1 ms. Its GPU tests in the probe tree, its GPU-only timeline, then
      # the headline against this tree, ABBA, no roofline.
      probe_tree dgather device_gather18_probe_h100_202611.patch
      (cd ab/dgather && PYTHONPATH=$PWD/src:$PWD:$PYTHONPATH python3 -m pytest -m gpu -q -p no:cacheprovider -c /dev/null \
        --rootdir=. tests/test_host_rows.py 2>&1 | tee "$OUT/gpu_tests_dgather18.log" | tail -2)
      PYTHONPATH=$PWD/ab/dgather/src:$PYTHONPATH profile3b s18dgather --threads none
      abba3b dgather18 dgather ab/dgather/src --no-roofline --time-budget-s 300 ;;
    chunk18)
      # Prepared in session 17: does chunking the uploads let the device interleave them? The GPU-only timeline of
      # the probe tree (chunked_uploads17_probe_h100_202611.patch): in timeline_..._s17gpu the head's 788 MB copy
      # ran 18.2-40.1 ms and the forward's next layer upload started only when it ended (the compute stream waited
      # 3.2 ms), and the embedding rows' copy started when two layer uploads ended. If the probe's copies
      # interleave and those waits go, the headline A/B, ABBA, with a larger budget than chunk17's.
      probe_tree chunk chunked_uploads17_probe_h100_202611.patch
      PYTHONPATH=$PWD/ab/chunk/src:$PYTHONPATH profile3b s18chunk --threads none
      abba3b chunk18 chunk ab/chunk/src --no-roofline --time-budget-s 330 ;;
    gpuprof17)
      # Session 17: the headline's timeline with GPU work only traced (profile_step --threads none: steps marked on
      # the compute stream, no tracing cost on the issuing threads), each compute-stream gap named by the copy or
      # kernel it waited for; three unprofiled steps beside it.
      profile3b s17gpu --threads none ;;
    prof17)
      # Session 17: is the profile representative? The headline's timeline with every thread traced (as before) and
      # with the main thread's ops only; each prints the unprofiled steps just before it beside its profiled period.
      profile3b s17all
      profile3b s17main --threads main ;;
    read17ab)
      # read17's A/B alone, for a call after the `tests` stage passed (the two together pass the 600 s call limit).
      abba3b read17 side ab/side16/src --time-budget-s 480 ;;
    final16)
      # Session 16's final tree (the joint count, the side stream): the headline with every default, twice, with the
      # roofline (the device budget's last minutes), then its timeline.
      headline3b final16 slideformer,slideformer+window=2 --time-budget-s 170
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_final16_h100_bench.md
      rm -f "$OUT"/*.png
      profile3b s16side ;;
    side16)
      # Session 16: the resident layers' norm and AdamW on a stream of their own (the compute stream copies the
      # gradient and goes on). The whole GPU set (with the side stream's race amplifier), then the headline: this
      # tree against main before it (ab/main16/src, the joint count's commit), ABBA, with the roofline; the timeline.
      gpu_tests_or_stop
      abba3b side16 main ab/main16/src --time-budget-s 300
      profile3b s16side ;;
    joint16)
      # Session 16: the planner chooses the count and the head together (17 cast with the blocked head on the
      # headline); every default against 16 forced (the count before), ABBA, with the roofline; then the default's
      # timeline (where the ~75 ms between the GPU term and the step go).
      headline3b joint16 slideformer,slideformer+resident_layers=16+resident_weights=cast,\
slideformer+resident_layers=16+resident_weights=cast+window=2,slideformer+window=2 --time-budget-s 330
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_joint16_h100_bench.md
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"head_schedule": "[a-z]*"\|"error": "[^"]\{0,160\}' \
        "$OUT"/llama3.2-3b_cap24g_joint16_h100_bench.json | head -32
      rm -f "$OUT"/*.png
      profile3b s16 ;;
    pair16)
      # Session 16: the whole GPU set on the tree (session 15's last engine commits ran on the CPU only), then the
      # headline's 17 cast layers with the blocked head (the ring frees its memory only there) against every default
      # (16 cast), ABBA so neither runs first every time, with the roofline.
      gpu_tests_or_stop
      headline3b pair16 slideformer+resident_layers=17+resident_weights=cast+head_schedule=vocab,slideformer,\
slideformer+window=2,slideformer+resident_layers=17+resident_weights=cast+head_schedule=vocab+window=2 \
        --time-budget-s 330
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_pair16_h100_bench.md
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"head_schedule": "[a-z]*"\|"error": "[^"]\{0,160\}' \
        "$OUT"/llama3.2-3b_cap24g_pair16_h100_bench.json | head -24
      rm -f "$OUT"/*.png ;;
    ring15)
      # Session 15: the blocked head's gradient in a ring of two vocabulary blocks (0.55 GiB less on the 3B) beside the
      # resident scratch in the head's idle weights (alias15). The resident and head GPU tests, then the headline:
      # every default (16 cast, blocked head, ring) against 17 cast with the blocked head (forced: the plan's head rule
      # takes the one-pass head at 17), with the roofline (the device budget's last minutes: one pair).
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_vocab_head.py 2>&1 \
        | tee "$OUT/gpu_tests_ring15.log" | tail -2
      grep -q " passed" "$OUT/gpu_tests_ring15.log" && ! grep -q " failed" "$OUT/gpu_tests_ring15.log" || exit 1
      headline3b ring15 slideformer,slideformer+resident_layers=17+resident_weights=cast+head_schedule=vocab \
        --time-budget-s 200
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_ring15_h100_bench.md
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"error": "[^"]\{0,160\}' \
        "$OUT"/llama3.2-3b_cap24g_ring15_h100_bench.json | head -20
      rm -f "$OUT"/*.png ;;
    alias15)
      # Session 15: the resident layers' gradient scratch in the vocabulary slot's idle weights (0.38 GiB on the 3B).
      # The whole GPU test set first, then the headline with every default against main before it (ab/main15/src,
      # 1fd229c's src) twice, interleaved, and 17 cast layers forced (they fit at 23.9 of 24 GiB reserved before,
      # mem15), with the roofline.
      [ -n "${SKIP_TESTS:-}" ] || bash "$0" tests
      [ -n "${SKIP_TESTS:-}" ] || { grep -q " passed" "$OUT/gpu_tests.log" && ! grep -q " failed" "$OUT/gpu_tests.log"; } \
        || exit 1
      headline3b alias15 slideformer,slideformer@main,slideformer+resident_layers=17+resident_weights=cast,\
slideformer@main+window=2 --engine-src main=ab/main15/src --time-budget-s 400
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_alias15_h100_bench.md
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"error": "[^"]\{0,160\}' \
        "$OUT"/llama3.2-3b_cap24g_alias15_h100_bench.json | head -20
      rm -f "$OUT"/*.png ;;
    mem15)
      # Session 15 probe: does a 17th (18th) cast resident layer fit the headline's 24 GiB cap, and what does it buy?
      # The allocator as is, then with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True (the reserve the planner leaves
      # is the caching allocator's fragmentation, measured), every default otherwise.
      headline3b mem15 slideformer,slideformer+resident_layers=17+resident_weights=cast --no-roofline
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"error": "[^"]\{0,160\}' \
        "$OUT"/llama3.2-3b_cap24g_mem15_h100_bench.json | head -12
      export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
      headline3b mem15x \
        slideformer,slideformer+resident_layers=17+resident_weights=cast,slideformer+resident_layers=18+resident_weights=cast
      unset PYTORCH_CUDA_ALLOC_CONF
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"error": "[^"]\{0,160\}' \
        "$OUT"/llama3.2-3b_cap24g_mem15x_h100_bench.json | head -12
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_mem15x_h100_bench.md
      rm -f "$OUT"/*.png ;;
    final14)
      # Session 14's final tree (the planner's memory terms and reserve, the head rule's 95% share): the resident and
      # blocked-head GPU tests, then the headline configuration with every default (now 16 cast layers, split update,
      # blocked head) against 15 forced, interleaved, each twice, with the roofline.
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_vocab_head.py 2>&1 \
        | tee "$OUT/gpu_tests_final14.log" | tail -2
      grep -q " failed" "$OUT/gpu_tests_final14.log" && exit 1
      headline3b final14 slideformer,slideformer+resident_layers=15+resident_weights=cast,slideformer+window=2,\
slideformer+resident_layers=15+resident_weights=cast+window=2 --time-budget-s 420
      sed -n '/^| batch | GPU compute/,/^$/p' "$OUT"/llama3.2-3b_cap24g_final14_h100_bench.md
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"embedding_update": "[a-z]*"' \
        "$OUT"/llama3.2-3b_cap24g_final14_h100_bench.json | head -16
      rm -f "$OUT"/*.png ;;
    fam14)
      # Session 14: the planner's reserve adds a kept layer on the whole card for Qwen3-8B and Qwen2.5-7B (b8, HF's
      # layers); this engine against main before it (ab/main14/src, 8fcbe55's src), one pair each, no roofline.
      for m in qwen3-8b qwen2.5-7b; do
        timeout 280 python3 benchmarks/bench_step.py --model $m --batch-size 8 --seq-len 1024 \
          --systems slideformer,slideformer@main --steps 5 --warmup 2 --time-budget-s 260 \
          --engine-opt resident_layers=-1 --engine-src main=ab/main14/src --no-roofline \
          --out "$OUT/${m}_res14_h100_bench.json" > "$OUT/${m}_res14.log" 2>&1
        sed -n '/## Results/,/## Roofline/p' "$OUT/${m}_res14_h100_bench.md" | grep "^| 8"
        grep -o '"resident_layers": [0-9]*' "$OUT/${m}_res14_h100_bench.json" | head -4
      done
      rm -f "$OUT"/*.png ;;
    cast13)
      # Session 13: the planner's rates refit (550 TFLOP/s, 5.2 Gparam/s) and the cast rule on the host's AdamW plus
      # copies move one measured-shape default: Llama-3.1-8B b8 on the whole card under the deferred schedule (the
      # schedule clipping takes; its gradient buffer in BF16, as the FP32 one leaves this host short: HostMemoryError at
      # 121.9 of 124.1 GiB), 'auto' now casts 19 resident layers where it kept 17. The two, interleaved, each twice, no
      # roofline; the resident and blocked-head GPU tests first (CAST13_TESTS=0 skips them).
      if [ "${CAST13_TESTS:-1}" = 1 ]; then
        python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py tests/test_vocab_head.py 2>&1 \
          | tee "$OUT/gpu_tests_cast13.log" | tail -2
        grep -q " failed" "$OUT/gpu_tests_cast13.log" && exit 1
      fi
      timeout 480 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer+schedule=deferred,slideformer+schedule=deferred+resident_weights=keep,\
slideformer+schedule=deferred+window=2,slideformer+schedule=deferred+resident_weights=keep+window=2 \
        --steps 5 --warmup 2 --time-budget-s 460 --engine-opt resident_layers=-1 --no-roofline \
        --engine-opt grad_accumulator=compute \
        --out "$OUT/llama3.1-8b_cast13_h100_bench.json" > "$OUT/cast13.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_cast13_h100_bench.md
      grep -o '"system": "[^"]*"\|"resident_layers": [0-9]*\|"resident_weights": "[a-z]*"' \
        "$OUT"/llama3.1-8b_cast13_h100_bench.json | head -24 ;;
    eff8b13)
      # Session 13: Llama-3.1-8B b8 on a 24 GiB cap with this engine (last measured by session 11's), every default,
      # with the roofline; and the BF16 upload copy there (uploads DMA 2 instead of 4 B/param, twice per step; +2 B/param
      # of host RAM), interleaved.
      cap24_8b eff13 8 slideformer,slideformer+host_copy=bf16,slideformer+window=2 --time-budget-s 430 ;;
    ck13)
      # Session 13: the activation checkpoints kept on the GPU instead of the host (a probe tree, ab/ckdev/src: every
      # layer input held on the device; ab/ckhalf/src: layers 14-27 only), which takes ~2.8 GB per step off the host's
      # memory bus (27 x 50 MB down in forward, up in backward), against this engine, interleaved, each twice.
      headline3b ck13 slideformer@ckdev,slideformer,slideformer@ckhalf,slideformer@ckdev+window=2,slideformer+window=2,\
slideformer@ckhalf+window=2 --engine-src ckdev=ab/ckdev/src --engine-src ckhalf=ab/ckhalf/src --no-roofline \
        --time-budget-s 450 ;;
    hp13)
      # Session 13: the large host buffers (masters, moments, BF16 upload copies) on 2 MiB transparent huge pages
      # (engine.host_pages=huge) against torch's 4 KiB pages. The kernel's THP policy, the GPU tests, the CPU AdamW
      # on both pages with and without copies running beside it, then (where the policy allows huge pages) the
      # headline configuration, interleaved, each three times, no roofline.
      grep -H . /sys/kernel/mm/transparent_hugepage/enabled /sys/kernel/mm/transparent_hugepage/defrag
      grep -E "AnonHugePages|MemFree|MemAvailable" /proc/meminfo
      python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_host_pages.py 2>&1 \
        | tee "$OUT/gpu_tests_hp.log" | grep -E "passed|failed|Error" || exit 1
      grep -q " failed" "$OUT/gpu_tests_hp.log" && exit 1
      python3 benchmarks/bench_cpu_adam.py --threads 16 --variants ext_bf16_nt --pages small,huge --dma none,both \
        --repeats 9 --out "$OUT/cpu_adam_pages_h100.json" 2>&1 | tee "$OUT/cpu_adam_pages.log" | tail -8
      grep -q "\[never\]" /sys/kernel/mm/transparent_hugepage/enabled && exit 0
      headline3b hp13 slideformer+host_pages=huge,slideformer,slideformer+host_pages=huge+window=2,slideformer+window=2,\
slideformer+window=2+host_pages=huge,slideformer+host_pages=small --no-roofline --time-budget-s 420 ;;
    vh3b12)
      # Session 12: engine.head_schedule (auto: 'vocab' here, the planner predicts a host-bound step) against the
      # one-pass head ('tokens'), interleaved, each twice, in the headline configuration, with the roofline.
      headline3b vh12 slideformer,slideformer+head_schedule=tokens,slideformer+window=2,\
slideformer+head_schedule=tokens+window=2 ;;
    profile3b12)
      # Session 12: the headline configuration's steady-state period with the vocabulary-blocked head.
      profile3b s12 ;;
    vh3b12b)
      # Session 12: the same A/B as vh3b12 in the other order, no roofline (vh3b12 has it).
      headline3b vh12b slideformer+head_schedule=tokens,slideformer,slideformer+head_schedule=tokens+window=2,\
slideformer+window=2 --no-roofline ;;
    r16_12)
      # Session 12: with the blocked head the step sits on the host's memory bus (host-memory efficiency 0.97 in
      # vh3b12): a 16th resident layer takes 0.1 B parameters off the host; the planner's headroom keeps 15.
      headline3b r16_12 slideformer,slideformer+resident_layers=16,slideformer+window=2,\
slideformer+resident_layers=16+window=2 --no-roofline
      grep -o '"system": "[^"]*"\|"gpu_alloc_retries[a-z_]*": [0-9]*\|"resident_layers": [0-9]*' \
        "$OUT"/llama3.2-3b_cap24g_r16_12_h100_bench.json ;;
    final3b12)
      # Session 12's final engine (the vocabulary-blocked head): issue 3 targets 1 and 3 in the headline configuration
      # against ZeRO-2 and ZeRO-3, one run, with the roofline.
      headline3b final12 slideformer,zero2,zero3 ;;
    pool3b12)
      # Session 12: with the blocked head the host idles ~50 ms before some heads while backward waits ~65 ms on slot
      # releases behind the parking pool: a 4 GiB pool (the backlog spills into the forward), and 15 AdamW threads
      # (a core for the main thread's launches), against the default, interleaved, each twice, no roofline.
      python3 benchmarks/probe_gather.py 2>&1 | tail -12
      headline3b pool12 slideformer,slideformer+grad_park_mib=4096,slideformer+optimizer_threads=15,slideformer+window=2,\
slideformer+grad_park_mib=4096+window=2,slideformer+optimizer_threads=15+window=2 --no-roofline --time-budget-s 470 ;;
    gth3b12)
      # Session 12: the GPU's own gather of the embedding rows out of page-locked host memory (embedding_gather=auto)
      # and 15 CPU AdamW threads (the new defaults) against the host gather and against 16 threads, interleaved, each
      # twice, no roofline; the host_rows and blocked-head GPU tests first.
      python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_host_rows.py tests/test_vocab_head.py 2>&1 \
        | tee "$OUT/gpu_tests_hr.log" | grep -E "passed|failed|Error" || exit 1
      grep -q " failed" "$OUT/gpu_tests_hr.log" && exit 1
      headline3b gth12 slideformer,slideformer+embedding_gather=host,slideformer+optimizer_threads=16,slideformer+window=2,\
slideformer+embedding_gather=host+window=2,slideformer+optimizer_threads=16+window=2 --no-roofline --time-budget-s 480 ;;
    gth8b12)
      # Session 12: the GPU's gather of the untied 8B embedding's rows (its FP32 master page-locked for it; the host
      # gathered and cast 8,192 rows in 10-27 ms of the step's start) against the host gather, 24 GiB cap, b8.
      cap24_8b gth12 8 slideformer,slideformer+embedding_gather=host,slideformer+window=2,\
slideformer+embedding_gather=host+window=2 --no-roofline --time-budget-s 440 ;;
    final3b11)
      # Session 11's final engine: issue 3 targets 1 and 3 in the headline configuration against ZeRO-2 and ZeRO-3,
      # one run, with the roofline.
      headline3b final11 slideformer,zero2,zero3 ;;
    eff8b11)
      # Session 11: Llama-3.1-8B b8 on the whole card, every default (GPU-bound; target 3 was met there at 0.88 by
      # session 8's engine against the torch-loss peak), slideformer alone with the roofline.
      timeout 300 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer --steps 5 --warmup 2 --time-budget-s 280 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.1-8b_eff11_h100_bench.json" > "$OUT/eff8b11.log" 2>&1
      sed -n '/## Results/,/## Issue 3/p' "$OUT"/llama3.1-8b_eff11_h100_bench.md | grep -E "^\| 8" ;;
    tied80_10)
      # Session 10's engine against session 9's on the 3B's whole card (all 28 resident, the CPU updates only the
      # tied embedding: the head upload and the gather are most of what the host adds), one run, with the roofline.
      tied80 ab10 prev9 ;;
    profile3b10)
      # Session 10: the headline configuration's steady-state period on this tree's engine.
      profile3b s10 ;;
    final3b10)
      # Session 10's final engine: issue 3 targets 1 and 3 in the headline configuration against ZeRO-2 and ZeRO-3,
      # one run, with the roofline.
      headline3b final10 slideformer,zero2,zero3 ;;
    b16cap24)
      # Session 10: batch 16 on the 24 GiB cap, where the GPU's work per step doubles and the host's does not: the 3B
      # (headline options) and the 8B (every default), slideformer alone, each with its roofline.
      timeout 280 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 16 --seq-len 1024 \
        --systems slideformer --gpu-memory-gib 24 --steps 5 --warmup 2 --time-budget-s 260 --kernels liger \
        --engine-opt resident_layers=-1 --engine-opt host_copy=bf16 \
        --out "$OUT/llama3.2-3b_cap24g_b16_h100_bench.json" > "$OUT/b16cap24_3b.log" 2>&1
      sed -n '/## Results/,/## Issue 3/p' "$OUT"/llama3.2-3b_cap24g_b16_h100_bench.md | grep -E "^\| 16"
      cap24_8b b16 16 slideformer --time-budget-s 280 ;;
    final3b9)
      # Session 9's final tree against session 8's engine (ab/prev/src) and ZeRO-2/3, the headline configuration,
      # one run, with the roofline.
      headline3b final9 slideformer,slideformer@prev,zero2,zero3 --engine-src prev=ab/prev/src ;;
    final3b)
      # Issue 3 targets 1 and 3 on this tree's engine: the headline configuration against ZeRO-2 and ZeRO-3, one run,
      # with the roofline.
      headline3b final slideformer,zero2,zero3 ;;
    tied3b)
      # Issue 3 target 1's configuration after session 8's pipeline rule (only completed copies are consumed): the
      # tied default (auto = whole) against the split update, one run, with the roofline.
      headline3b tied slideformer,slideformer+embedding_update=split ;;
    park8b_top)
      # 8B b8 with the defaults (planner residents, spread_top, split): against a 4 GiB parking pool (session 7's
      # start-wait hypothesis: the untied head's 1 GiB gradient, consumed last, holds half of the 2 GiB pool all
      # backward, so the split's early part yields to landed layers and is left for the next step's gather) and
      # against window 3 (the forward's upload waits). One run, with the roofline.
      timeout 480 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+grad_park_mib=4096,slideformer+window=3 --steps 5 --warmup 2 \
        --time-budget-s 460 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.1-8b_park_top_h100_bench.json" > "$OUT/park8b_top.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_park_top_h100_bench.md ;;
    window8b)
      # 8B b8 with the defaults (planner residents, spread_top, split): window 2 vs 3. Session 7's timeline had the
      # forward wait ~32 ms for uploads with the CPU AdamW idle; a third slot prefetches one more streamed layer
      # (the planner may keep one resident layer fewer for it). One run, with the roofline.
      timeout 400 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+window=3 --steps 5 --warmup 2 --time-budget-s 380 \
        --engine-opt resident_layers=-1 --out "$OUT/llama3.1-8b_window_h100_bench.json" > "$OUT/window8b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_window_h100_bench.md ;;
    profile8b_top)
      # The 8B b8 step with spread_top placement and the split embedding update: where the step time goes.
      timeout 200 python3 benchmarks/profile_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --engine-opt resident_layers=-1 --engine-opt resident_placement=spread_top --engine-opt embedding_update=split \
        --name timeline_llama3.1-8b_b8_top_split --out-dir "$OUT" > "$OUT/profile8b_top.log" 2>&1; tail -20 "$OUT/profile8b_top.log" ;;
    spread8b)
      # 8B b8, planner residents (auto -> spread), whole embedding update (auto) vs split, one run (session 6: with
      # the optimizer's order by unit index and 512-token loss chunks).
      timeout 400 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+embedding_update=split --steps 5 --warmup 2 --time-budget-s 380 \
        --engine-opt resident_layers=-1 --out "$OUT/llama3.1-8b_spread_h100_bench.json" > "$OUT/spread8b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_spread_h100_bench.md ;;
    auto8b)
      # 8B b8 with every engine default (planner residents; auto placement = spread_top, auto embedding update =
      # split since session 7), with the roofline: the default's step and efficiency (issue 3 target 3).
      timeout 250 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer --steps 5 --warmup 2 --time-budget-s 240 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.1-8b_defaults_h100_bench.json" > "$OUT/auto8b.log" 2>&1
      sed -n '/## Results/,/## Issue 3/p' "$OUT"/llama3.1-8b_defaults_h100_bench.md ;;
    rss3b)
      # Issue 3 target 4 for the default engine (nothing resident, no BF16 copy, torch kernels): the tied default
      # (auto = whole) against the split update (row-wise since session 7: nothing kept aside), one run (no
      # DeepSpeed, no roofline: host RSS is the figure). Session 7's run named 'whole' as the second system while
      # auto was whole too, so both ran whole.
      timeout 300 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+embedding_update=split --gpu-memory-gib 24 --steps 5 --warmup 2 \
        --no-roofline --time-budget-s 280 --out "$OUT/llama3.2-3b_cap24g_rss_h100_bench.json" > "$OUT/rss3b.log" 2>&1
      sed -n '/## Results/,/## Ratios/p' "$OUT"/llama3.2-3b_cap24g_rss_h100_bench.md ;;
    threads3b)
      # The CPU AdamW's OpenMP threads during training (default: all 16 cores, beside the engine's own
      # upload/download/main threads) against 14 and 12, with Liger + planner residents + BF16 copy, and ZeRO-2.
      headline3b threads slideformer,slideformer+optimizer_threads=14,slideformer+optimizer_threads=12,zero2 \
        --no-roofline ;;
    park8b)
      # 8B b8 (planner residents): a larger gradient parking pool lets backward run further ahead of the CPU
      # AdamW, so the backlog it leaves covers the next forward (the optimizer works it off bottom-up).
      timeout 570 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems slideformer,slideformer+grad_park_mib=4096,slideformer+grad_park_mib=6144 --steps 4 --warmup 2 \
        --no-roofline --time-budget-s 550 --engine-opt resident_layers=-1 \
        --out "$OUT/llama3.1-8b_park_h100_bench.json" > "$OUT/park8b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_park_h100_bench.md ;;
    profile8b)
      # The 8B b8 steady-state step with the defaults (planner residents, 22 of 32 on an H100; since session 7
      # auto = spread_top placement and the split update for this untied embedding): where the step time goes.
      timeout 300 python3 benchmarks/profile_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --engine-opt resident_layers=-1 --name timeline_llama3.1-8b_b8_auto --out-dir "$OUT" \
        > "$OUT/profile8b.log" 2>&1; tail -20 "$OUT/profile8b.log" ;;
    bench8b_auto)
      # 8B on the whole 80 GB card with the placement planner's resident layers (overlap schedule), with the
      # roofline child (its CPU AdamW and PCIe rates give the report's host-memory figure).
      timeout 560 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8,32 --seq-len 1024 \
        --systems slideformer,resident --steps 4 --warmup 2 --time-budget-s 540 \
        --engine-opt resident_layers=-1 --out "$OUT/llama3.1-8b_auto_h100_bench.json" > "$OUT/bench8b_auto.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_auto_h100_bench.md ;;
    ds8b)
      # Issue 3 target 5: DeepSpeed ZeRO-2/3 (CPU offload) on Llama-3.1-8B b8 on this 125 GiB host; the
      # harness's host-memory guard stops a child before the kernel's OOM killer would, and files its RSS.
      timeout 560 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8 --seq-len 1024 \
        --systems zero2,zero3 --steps 3 --warmup 1 --no-roofline --time-budget-s 540 \
        --out "$OUT/llama3.1-8b_deepspeed_h100_bench.json" > "$OUT/ds8b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_deepspeed_h100_bench.md ;;
    sweep3b)
      # Issue 3's plot: tokens/s vs batch size per system (3B, 24 GiB cap), placement + BF16 copy for slideformer.
      timeout 590 python3 benchmarks/bench_step.py --model llama3.2-3b --batch-size 4,8,16 --seq-len 1024 \
        --systems slideformer,zero2,zero3 --gpu-memory-gib 24 --steps 4 --warmup 2 --time-budget-s 570 \
        --engine-opt resident_layers=-1 --engine-opt host_copy=bf16 \
        --out "$OUT/llama3.2-3b_cap24g_sweep_h100_bench.json" > "$OUT/sweep3b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.2-3b_cap24g_sweep_h100_bench.md ;;
    families)
      # The other families of issue 3 (7-8B shapes, b8, whole card): slideformer with placement vs the peak.
      # 5 files per model: written under /tmp/fam and returned as one tarball (the device returns 8 files).
      mkdir -p /tmp/fam
      for m in qwen2.5-7b qwen3-8b mistral-7b-v0.3; do
        timeout 190 python3 benchmarks/bench_step.py --model $m --batch-size 8 --seq-len 1024 \
          --systems slideformer,resident --steps 3 --warmup 2 --no-roofline --time-budget-s 180 \
          --engine-opt resident_layers=-1 --out "/tmp/fam/${m}_auto_h100_bench.json" > "/tmp/fam/families_$m.log" 2>&1
        sed -n '/## Results/,/## Roofline/p' "/tmp/fam/${m}_auto_h100_bench.md"
      done
      tar -C /tmp/fam -czf "$OUT/families.tgz" . ;;
    families_rl)
      # The other families of issue 3 (7-8B shapes, b8, whole card) with every engine default and the roofline
      # (issue 3 target 3 for each: efficiency against the same machine's GPU, CPU AdamW and PCIe terms).
      # Written under /tmp/famrl and returned as one tarball (the device returns 8 files).
      mkdir -p /tmp/famrl
      for m in qwen2.5-7b qwen3-8b mistral-7b-v0.3; do
        timeout 200 python3 benchmarks/bench_step.py --model $m --batch-size 8 --seq-len 1024 \
          --systems slideformer --steps 5 --warmup 2 --time-budget-s 190 \
          --engine-opt resident_layers=-1 --out "/tmp/famrl/${m}_defaults_h100_bench.json" \
          > "/tmp/famrl/families_rl_$m.log" 2>&1
        sed -n '/## Results/,/## Issue 3/p' "/tmp/famrl/${m}_defaults_h100_bench.md" | grep -E "^\| 8 \|"
      done
      tar -C /tmp/famrl -czf "$OUT/families_defaults.tgz" . ;;
    bench8b)
      timeout 300 python3 benchmarks/bench_step.py --model llama3.1-8b --batch-size 8,32 --seq-len 1024 \
        --systems slideformer,resident --steps 4 --warmup 2 --no-roofline --time-budget-s 290 \
        --out "$OUT/llama3.1-8b_h100_bench.json" > "$OUT/bench8b.log" 2>&1
      sed -n '/## Results/,/## Roofline/p' "$OUT"/llama3.1-8b_h100_bench.md ;;
    disk)
      # Issue 5: moments on disk vs in RAM, 3B shape, plus the raw disk speed (needs ~30 GB free under /tmp).
      timeout 560 python3 benchmarks/bench_disk.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --dir /tmp/sf_offload --out "$OUT/disk_llama3.2-3b_h100.json" > "$OUT/disk.log" 2>&1
      tail -30 "$OUT/disk.log" ;;
    soak)
      timeout 400 python3 benchmarks/soak.py --steps 1000 --out "$OUT/soak_h100.json" 2>&1 | tail -8 ;;
    dist_tests)
      # 2 GPUs (nvidia-h100-x2): N-rank training == one rank with N times the batch, BF16, NCCL.
      timeout 150 python3 -m pytest -m gpu -q -s -p no:cacheprovider tests/test_dist_gpu.py 2>&1 \
        | tee "$OUT/dist_gpu_tests.log" | tail -15 ;;
    multi_sf|multi_zero3|multi_all)
      # 2 GPUs: Llama-3.1-8B b16/GPU; slideformer x1 and x2 in one call, DeepSpeed ZeRO-3 x2 in the next (each
      # system under its own torchrun; an 8B build takes 1-2 min, so one call cannot hold all three).
      systems=slideformer1,slideformerN; [ "$stage" = multi_zero3 ] && systems=zero3N
      [ "$stage" = multi_all ] && systems=slideformer1,slideformerN,zero3N  # all three: ~6 min with threads set
      (cd benchmarks && timeout 560 python3 bench_multi.py --model llama3.1-8b --seq-len 1024 --batch-size 16 \
        --gpus 2 --systems "$systems" --timeout 270 --out "$OUT/${stage}_llama3.1-8b_2gpu" > "$OUT/$stage.log" 2>&1)
      cat "$OUT/${stage}_llama3.1-8b_2gpu.md" ;;
    multi_resident)
      # 2 GPUs: slideformer x1 and x2 with the placement planner's resident layers (data-parallel resident layers:
      # whole on each GPU, gradients all-reduced on the compute stream), against multi_all's streamed runs.
      (cd benchmarks && timeout 560 python3 bench_multi.py --model llama3.1-8b --seq-len 1024 --batch-size 16 \
        --gpus 2 --systems slideformer1,slideformerN --timeout 270 --engine-opt resident_layers=-1 \
        --out "$OUT/multi_resident_llama3.1-8b_2gpu" > "$OUT/multi_resident.log" 2>&1)
      cat "$OUT/multi_resident_llama3.1-8b_2gpu.md" ;;
    multi_diag)
      # 2 GPUs: why 2 ranks run no faster than 1 (docs/distributed.md). One step of each rank under the
      # profiler (per-thread timelines, tarred into one file), then slideformer x2 with a deeper window (more
      # slack for each layer's collectives) and with 12 optimizer threads per rank (less CPU oversubscription).
      mkdir -p /tmp/diag && timeout 200 torchrun --standalone --nproc-per-node 2 benchmarks/profile_step.py \
        --model llama3.1-8b --batch-size 16 --seq-len 1024 --warmup 2 --name timeline_llama3.1-8b_b16_2gpu \
        --out-dir /tmp/diag > "$OUT/multi_diag.log" 2>&1
      tar -C /tmp/diag -czf "$OUT/diag_timelines.tgz" . ; grep -A12 '"busy_fraction"' /tmp/diag/*_summary.json | head -40
      for opt in window=3 optimizer_threads=12; do
        (cd benchmarks && timeout 170 python3 bench_multi.py --model llama3.1-8b --seq-len 1024 --batch-size 16 \
          --gpus 2 --systems slideformerN --steps 3 --timeout 160 --engine-opt $opt \
          --out "$OUT/multi_diag_${opt%%=*}_llama3.1-8b_2gpu" >> "$OUT/multi_diag.log" 2>&1)
        cat "$OUT/multi_diag_${opt%%=*}_llama3.1-8b_2gpu.md"
      done ;;
    profile_resident)
      timeout 150 python3 benchmarks/profile_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --gpu-memory-gib 24 --engine-opt resident_layers=8 --name timeline_llama3.2-3b_b8_resident8 \
        --out-dir "$OUT" > "$OUT/profile.log" 2>&1; tail -20 "$OUT/profile.log" ;;
    profile_copy)
      # Issue 3's timeline of the headline configuration: 3B b8, 24 GiB cap, planner's residents + BF16 copy + Liger;
      # one steady-state period (start of a step to the start of the next).
      timeout 200 python3 benchmarks/profile_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --gpu-memory-gib 24 --engine-opt resident_layers=-1 --engine-opt host_copy=bf16 --engine-opt kernels=liger \
        --name timeline_llama3.2-3b_b8_cap24_copy_liger --out-dir "$OUT" > "$OUT/profile_copy.log" 2>&1; tail -20 "$OUT/profile_copy.log" ;;
    profile_chunk3b)
      # Issue 3's headline configuration as chunk3b left it: 3B b8, 24 GiB cap, Liger, planner residents, BF16 copy,
      # loss chunks of 512 tokens (split embedding update by default); one steady-state period.
      timeout 200 python3 benchmarks/profile_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --gpu-memory-gib 24 --engine-opt resident_layers=-1 --engine-opt host_copy=bf16 --engine-opt kernels=liger \
        --engine-opt loss_chunk_tokens=512 --name timeline_llama3.2-3b_b8_cap24_chunk512 --out-dir "$OUT" \
        > "$OUT/profile_chunk3b.log" 2>&1; tail -20 "$OUT/profile_chunk3b.log" ;;
    e2e8b)
      # A Llama-3.1-8B-shaped checkpoint through `slideformer train` (preset YAML) -> export -> transformers.
      (cd benchmarks && timeout 420 python3 e2e_cli.py --model llama3.1-8b --config ../configs/llama3_1_8b.yaml \
        --workdir /tmp/e2e --steps 6 --out "$OUT/e2e_cli_llama3.1-8b.json" > "$OUT/e2e8b.log" 2>&1)
      tail -25 "$OUT/e2e8b.log" ;;
    profile)
      timeout 150 python3 benchmarks/profile_step.py --model llama3.2-3b --batch-size 8 --seq-len 1024 \
        --out-dir "$OUT" > "$OUT/profile.log" 2>&1; tail -20 "$OUT/profile.log" ;;
    *) echo "unknown stage $stage (tests, edf3b, rss3b, profile_chunk3b, split3b, split8b, spread8b, chunk3b, bench3b, bench3b_resident, bench8b, soak, profile, profile_resident, e2e8b, dist_tests, multi_sf, multi_zero3, multi_resident, bench3b_auto, bench3b_copy, bench3b_liger, threads3b, profile_copy, park8b, profile8b, bench8b_auto, disk, ds8b, multi_all, multi_diag, sweep3b, families)"; exit 2 ;;
  esac
done
