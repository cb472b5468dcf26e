#!/usr/bin/env bash
# The GPU machine's whole check in one call (device time is scarce): every CUDA test, then the
# benchmark at the published Qwen1.5-MoE-A2.7B shapes (CUDA graphs on, then eager, then a per-stage
# profile). Logs go to $OUT; a summary is printed last.
# Expects the binaries built here (build-cuda, -DMOESCOPE_CUDA=ON) carried along:
#   build-cuda/moescope build-cuda/tests/cuda_kernels_test build-cuda/tests/cuda_backend_test
set -u
out=${OUT:-/tmp/moescope-out}
mkdir -p "$out"
model=/tmp/qwen1.5-moe-a2.7b-random
# The test binaries were built with the sources at /work/main: make that path lead here.
if [ ! -e /work/main ]; then mkdir -p /work && ln -s "$PWD" /work/main; fi
export OMP_WAIT_POLICY=PASSIVE
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.max.sm,clocks.max.mem --format=csv
  nproc; free -g | head -2; df -h /tmp | tail -1
  for b in build-cuda/moescope build-cuda/tests/cuda_kernels_test build-cuda/tests/cuda_backend_test; do
    ldd "$b" | grep "not found" && echo "MISSING LIBRARIES for $b"
  done
} >"$out/machine.txt" 2>&1
cat "$out/machine.txt"

step() {  # step NAME TIMEOUT COMMAND...: runs it with its log in $OUT/NAME.log, notes exit status and seconds
  local name=$1 limit=$2 start
  shift 2
  start=$(date +%s)
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $?, $(($(date +%s) - start)) s" >>"$out/summary.txt"
}
step kernels 150 build-cuda/tests/cuda_kernels_test
step backend 200 build-cuda/tests/cuda_backend_test
step make_model 200 build-cuda/moescope make-model --arch qwen2_moe --preset qwen1.5-moe-a2.7b --seed 0 --out "$model"
step bench 200 build-cuda/moescope bench "$model" --device cuda --batch 1,4,16,64 --repeats 3 --prefill-tokens 2048 \
  --json "$out/bench.json"
step bench_eager 120 build-cuda/moescope bench "$model" --device cuda --batch 1,64 --repeats 2 --enforce-eager
step profile 120 env MOESCOPE_CUDA_PROFILE=1 build-cuda/moescope bench "$model" --device cuda --batch 1,64 --repeats 1 \
  --decode-tokens 8 --prefill-tokens 2048

echo "== kernel tests"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error:|Expected|Which is|actual" "$out/kernels.log" | cut -c1-220 | head -40
echo "== backend tests"; grep -E "^\[  (FAILED|PASSED|SKIPPED) |Failure|error:|Expected|Which is|actual|near-tie|bit for bit" "$out/backend.log" | cut -c1-220 | head -60
for b in bench bench_eager; do echo "== $b"; grep -vE "^(command|moescope bench)" "$out/$b.log" | tail -14; done
echo "== profile"; grep -E "ms per pass|prefill|^ +[0-9]" "$out/profile.log" | head -70
echo "== summary"; cat "$out/summary.txt"
