#!/usr/bin/env bash
# One GPU call: the CUDA tests the L2 prefetch touches, then `moescope bench` at Qwen1.5-MoE-A2.7B's
# shapes (random weights) with each L2-prefetch setting (MOESCOPE_CUDA_L2_PREFETCH_MB / _LAST), the
# baseline first and last, so that the settings are compared on one GPU in one run. The logs come back
# as one archive, $OUT/l2_prefetch_sweep.tar.gz (a call returns few files); the summary is printed last.
# Expects build-cuda/{moescope,tests/cuda_kernels_test,tests/cuda_backend_test} carried along.
# SETTINGS="0:1 32:1 ..." (MB:evict_last pairs) and BATCH (default 1,8,64,256) choose what runs.
# KERNEL_FILTER and BACKEND_FILTER (gtest filters) run part of the two test binaries.
set -u
out=/tmp/l2_prefetch_sweep
mkdir -p "$out"
trap 'tar czf "${OUT:-/tmp}/l2_prefetch_sweep.tar.gz" -C "$(dirname "$out")" "$(basename "$out")"' EXIT
model=/tmp/qwen1.5-moe-a2.7b-random
if [ ! -e /work/main ]; then mkdir -p /work && ln -s "$PWD" /work/main; fi  # the tests' fixture paths
export OMP_WAIT_POLICY=PASSIVE MOESCOPE_TEST_BINARY="$PWD/build-cuda/moescope"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem --format=csv,noheader | tee "$out/machine.txt"
run() {  # run NAME TIMEOUT COMMAND...
  local name=$1 limit=$2 start=$(date +%s)
  shift 2
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  echo "$name: exit $?, $(($(date +%s) - start)) s" | tee -a "$out/summary.txt"
}
run kernels 120 build-cuda/tests/cuda_kernels_test ${KERNEL_FILTER:+--gtest_filter=$KERNEL_FILTER}
run backend 200 build-cuda/tests/cuda_backend_test ${BACKEND_FILTER:+--gtest_filter=$BACKEND_FILTER}
run make_model 200 build-cuda/moescope make-model --arch qwen2_moe --preset qwen1.5-moe-a2.7b --seed 0 --out "$model"
n=0
for s in ${SETTINGS:-0:1 16:1 32:1 44:1 66:1 32:0 0:1}; do
  mb=${s%%:*} last=${s##*:}
  run "bench_${mb}_${last}_$((++n))" 90 env MOESCOPE_CUDA_L2_PREFETCH_MB="$mb" MOESCOPE_CUDA_L2_PREFETCH_LAST="$last" \
    build-cuda/moescope bench "$model" --device cuda --batch "${BATCH:-1,8,64,256}" --repeats 3 --prefill 1x16
done
echo "== tests"
grep -hE "^\[  (FAILED|PASSED|SKIPPED) |Failure|prefetch" "$out/kernels.log" "$out/backend.log" | cut -c1-200
echo "== decode tok/s (ratio to the floor) per MOESCOPE_CUDA_L2_PREFETCH_MB:LAST"
for f in "$out"/bench_*.log; do
  printf '%-16s' "$(basename "$f" .log | sed 's/^bench_//')"
  awk '$1 ~ /^[0-9]+$/ && NF >= 6 && $2 ~ /^[0-9.]+$/ {printf "  b%s %s (%s)", $1, $2, $NF} /checksum/ {printf "  %s", $NF}' "$f"
  echo
done
grep -h "read bandwidth" "$out"/bench_*.log | head -3
cat "$out/summary.txt"
