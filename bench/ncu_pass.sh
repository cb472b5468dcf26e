#!/usr/bin/env bash
# Each kernel's time in one pass of the CUDA backend, from Nsight Compute on the GPU machine: for every
# token count in TOKENS (default "2048 1"), `moescope bench` runs with MOESCOPE_CUDA_PROFILER_TOKENS set
# so that only the third pass of that many tokens is profiled (the first two load the modules and capture
# a decode graph), each kernel alone (no overlap between kernels), clocks left as they are.
# Writes $OUT/ncu_T<tokens>.csv and prints the kernels' times summed by name, largest first.
# Usage: bash bench/ncu_pass.sh [MODEL]   (MODEL defaults to the real-size preset, made if missing)
set -eu
out=${OUT:-/tmp/moescope-out}
mkdir -p "$out"
model=${1:-/tmp/qwen1.5-moe-a2.7b-random}
bin=${MOESCOPE_BINARY:-build-cuda/moescope}
if [ ! -d "$model" ]; then
  "$bin" make-model --arch qwen2_moe --preset qwen1.5-moe-a2.7b --seed 0 --out "$model" >"$out/make_model.log" 2>&1
fi
for t in ${TOKENS:-2048 1}; do
  if [ "$t" = 1 ]; then shape="--batch 1 --decode-tokens 4 --prefill 1x16"
  else shape="--batch 1 --decode-tokens 1 --prefill 1x$t"; fi
  # shellcheck disable=SC2086
  MOESCOPE_CUDA_PROFILER_TOKENS=$t ncu --profile-from-start off --clock-control none \
    --metrics gpu__time_duration.sum --csv --print-units base \
    "$bin" bench "$model" --device cuda --repeats 1 $shape >"$out/ncu_T$t.csv" 2>"$out/ncu_T$t.err" || {
    echo "ncu for T=$t failed:"; tail -20 "$out/ncu_T$t.err"; continue; }
  python3 - "$out/ncu_T$t.csv" "$t" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
head = rows[0]; name_i = head.index("Kernel Name"); val_i = head.index("Metric Value")
total = collections.defaultdict(float); count = collections.Counter()
for r in rows[1:]:
    if r[head.index("Metric Name")] != "gpu__time_duration.sum": continue
    name = r[name_i].split("(")[0][:90]
    total[name] += float(r[val_i].replace(",", "")) / 1e3; count[name] += 1
s = sum(total.values())
print(f"== T={sys.argv[2]}: {sum(count.values())} kernels, {s:.1f} us in all (each alone)")
for name, us in sorted(total.items(), key=lambda kv: -kv[1]):
    print(f"{us:10.1f} us {us / s * 100:5.1f}%  x{count[name]:<4d} {us / count[name]:8.2f} us each  {name}")
PY
done
