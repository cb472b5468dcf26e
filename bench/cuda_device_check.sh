#!/usr/bin/env bash
# The GPU machine's whole check in one call (device time is scarce): every CUDA test, then at the
# published Qwen1.5-MoE-A2.7B shapes (random weights): transformers beside us on the same checkpoint
# (tools/hf_side_by_side.py: a float32 reference and transformers' own bf16 throughput), the CUDA backend
# against that reference (tests/cuda_real_size_test.cpp), and the benchmark (CUDA graphs on, then eager,
# then a per-stage profile). Logs go to $OUT; a summary is printed last.
# Expects the binaries built here (build-cuda, -DMOESCOPE_CUDA=ON) carried along:
#   build-cuda/moescope build-cuda/tests/cuda_kernels_test build-cuda/tests/cuda_backend_test
#   build-cuda/tests/cuda_real_size_test
# ONLY="make_model hf_side_by_side real_size" (step names, space-separated) runs those steps alone, e.g. to
# stay within one call's time limit.
set -u
# The binaries may come as one archive (the carried tree is capped at 64 MiB): build-cuda/bins.tar.xz of
# moescope and tests/ (and, for the kernels_bench step, cuda_kernels_bench with lib/ holding the Google
# Benchmark library it links, which the GPU machine lacks), made with
# `tar cf - -C DIR moescope tests [cuda_kernels_bench lib] | xz > build-cuda/bins.tar.xz`.
if [ -f build-cuda/bins.tar.xz ]; then tar xJf build-cuda/bins.tar.xz -C build-cuda; fi
out=${OUT:-/tmp/moescope-out}
mkdir -p "$out"
model=/tmp/qwen1.5-moe-a2.7b-random
# The test binaries were built with the sources at /work/main: make that path lead here.
if [ ! -e /work/main ]; then mkdir -p /work && ln -s "$PWD" /work/main; fi
export OMP_WAIT_POLICY=PASSIVE
export MOESCOPE_TEST_BINARY="$PWD/build-cuda/moescope"  # the CLI tests run the carried binary
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  nproc; free -g | head -2; df -h /tmp | tail -1
  for b in build-cuda/moescope build-cuda/tests/cuda_kernels_test build-cuda/tests/cuda_backend_test \
      build-cuda/tests/cuda_real_size_test; do
    ldd "$b" | grep "not found" && echo "MISSING LIBRARIES for $b"
  done
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

step() {  # step NAME TIMEOUT COMMAND...: runs it with its log in $OUT/NAME.log, notes exit status and seconds
  local name=$1 limit=$2 start
  shift 2
  if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return; fi
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $?, $(($(date +%s) - start)) s" >>"$out/summary.txt"
}
step kernels 150 build-cuda/tests/cuda_kernels_test
step backend 200 build-cuda/tests/cuda_backend_test
step make_model 200 build-cuda/moescope make-model --arch qwen2_moe --preset qwen1.5-moe-a2.7b --seed 0 --out "$model"
# transformers on the same checkpoint: the float32 reference (reference.json), then its bf16 generate throughput
# at batch 1 and 8 (hf_throughput.json); about 4 minutes, the checkpoint still in the page cache.
step hf_side_by_side 420 python3 tools/hf_side_by_side.py --model "$model" --out "$out/hf"
# REFERENCE=PATH: a reference.json that hf_side_by_side.py wrote for this checkpoint in an earlier run
# (make-model is deterministic for a seed), so that a run without the hf_side_by_side step can still compare.
step real_size 300 env MOESCOPE_REAL_SIZE_MODEL="$model" MOESCOPE_REAL_SIZE_REFERENCE="${REFERENCE:-$out/hf/reference.json}" \
  build-cuda/tests/cuda_real_size_test
step bench 330 build-cuda/moescope bench "$model" --device cuda --batch 1,8,64,256 --repeats 3 --prefill 1x2048,16x512 \
  --recording-overhead --overhead-rounds 5 --overhead-prompts 16 --overhead-max-tokens 64 --json "$out/bench.json"
# --matmul-precision high (two bf16 terms per activation, the f32 KV cache): what the exact routes cost.
step bench_high 150 build-cuda/moescope bench "$model" --device cuda --batch 1,64 --repeats 3 --prefill 1x2048,16x512 \
  --matmul-precision high
# Programmatic dependent launch off (MOESCOPE_CUDA_PDL=0): what it brings, in the same session.
step bench_nopdl 120 env MOESCOPE_CUDA_PDL=0 build-cuda/moescope bench "$model" --device cuda --batch 1,64 --repeats 3 \
  --prefill 1x2048
step bench_eager 120 build-cuda/moescope bench "$model" --device cuda --batch 1,64 --repeats 2 --enforce-eager
# Switches still off by default until measured (docs/CUDA.md "Diagnostic switches"): the backend tests with
# them on, then the benchmark with them off and on, alternated twice in the same call (SHARED_GROUPED moves
# the prefill figures, DOWN_FOLD batch 1's).
AB_SWITCHES="MOESCOPE_CUDA_SHARED_GROUPED MOESCOPE_CUDA_DOWN_FOLD"
ab_env() { local v=$1 e="" n; for n in $AB_SWITCHES; do e="$e $n=$v"; done; echo "$e"; }
# shellcheck disable=SC2046  # one word per NAME=VALUE
step backend_switches_on 200 env $(ab_env 1) build-cuda/tests/cuda_backend_test
ab() {
  local v
  for v in 0 1 0 1; do
    echo "== switches $v:$(ab_env "$v")"
    # shellcheck disable=SC2046
    env $(ab_env "$v") build-cuda/moescope bench "$model" --device cuda --batch 1 --repeats 3 --prefill 1x2048,16x512 || return
  done
}
export -f ab ab_env
export AB_SWITCHES model
step switches_ab 200 bash -c ab
# The kernels alone (Google Benchmark, CUDA events): prefill and decode attention, the grouped expert GEMMs.
if [ -x build-cuda/cuda_kernels_bench ]; then
  step kernels_bench 200 env LD_LIBRARY_PATH="$PWD/build-cuda/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
    build-cuda/cuda_kernels_bench
fi
step profile 120 env MOESCOPE_CUDA_PROFILE=1 build-cuda/moescope bench "$model" --device cuda --batch 1,64,256 --repeats 1 \
  --decode-tokens 8 --prefill 1x2048
# The README's demo on the GPU: the shipped model, generation with the routing log and the per-pass JSONL,
# the report, then the server with the recorder driven over HTTP.
step demo_gpu 120 env MOESCOPE_DEMO_BINARY=build-cuda/moescope MOESCOPE_DEMO_OUT=/tmp/moescope-demo-gpu bash scripts/demo.sh

echo "== kernel tests"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error:|Expected|Which is|actual" "$out/kernels.log" 2>/dev/null | cut -c1-220 | head -40
echo "== backend tests"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error:|Expected|Which is|actual|near-tie|bit for bit" "$out/backend.log" 2>/dev/null | cut -c1-220 | head -60
echo "== transformers side by side"; grep -E "SUMMARY|FAILED|SKIPPED|OUT OF GPU MEMORY|WARNING|Error" "$out/hf_side_by_side.log" 2>/dev/null | cut -c1-240 | head -30
echo "== real size vs transformers"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|real size|Expected|Which is|actual|Skipped" "$out/real_size.log" 2>/dev/null | cut -c1-300 | head -60
echo "== kernels_bench"; grep -E "^BM_" "$out/kernels_bench.log" 2>/dev/null | sed -E 's/NVIDIA[^,]*, //' | cut -c1-200
echo "== backend tests with the switches on"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|Expected|Which is" "$out/backend_switches_on.log" 2>/dev/null | cut -c1-220 | head -20
echo "== switches off / on"; grep -E "^== switches|^prefill|^ +1 |checksum" "$out/switches_ab.log" 2>/dev/null | cut -c1-220
for b in bench bench_high bench_nopdl bench_eager; do echo "== $b"; grep -vE "^(command|moescope bench)" "$out/$b.log" 2>/dev/null | tail -30; done
echo "== demo on the GPU"; grep -E "on cuda|demo:|== |exit" "$out/demo_gpu.log" 2>/dev/null | head -20
echo "== decode and prefill tok/s, moescope (bench.json: 32 steps after a 128-token prompt) beside transformers (hf_throughput.json: generate, 127 steps after a 128-token prompt)"
python3 - "$out/bench.json" "$(dirname "${REFERENCE:-$out/hf/reference.json}")/hf_throughput.json" <<'PY' 2>&1 | head -12
import json, sys
def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:
        print(f"  {path}: {exc}")
        return None
ours, hf = load(sys.argv[1]), load(sys.argv[2])
ours = ours["models"][0] if ours and ours.get("models") else {}
hf = hf or {}
mine = {d["batch_size"]: d.get("tokens_per_s_median") for d in ours.get("decode", [])}
theirs = {d["batch_size"]: d.get("tokens_per_s_median") for d in hf.get("decode", [])}
fmt = lambda v: f"{v:10.1f}" if isinstance(v, (int, float)) else f"{'-':>10}"
print(f"  {'':14} {'moescope':>10} {'transformers':>13}   ({hf.get('gpu', '?')}, transformers {hf.get('transformers', '?')}, "
      f"torch {hf.get('torch', '?')}, experts {hf.get('experts_implementation', '?')})")
for b in sorted(set(mine) | set(theirs)):
    print(f"  decode batch {b:<2} {fmt(mine.get(b))} {fmt(theirs.get(b)):>13}")
mine_prefill = {p["shape"]: p.get("tokens_per_s_median") for p in ours.get("prefill", [])}
print(f"  prefill 1x2048 {fmt(mine_prefill.get('1x2048'))} "
      f"{fmt(hf.get('prefill', {}).get('tokens_per_s_median')):>13}")
PY
echo "== profile"; grep -E "ms per pass|prefill|^ +[0-9]" "$out/profile.log" 2>/dev/null | head -70
echo "== summary"; cat "$out/summary.txt"
