#!/usr/bin/env bash
# Server throughput under load: N concurrent /v1/completions requests (greedy, ignore_eos, fixed lengths)
# against `moescope serve`, repeated R times. Prints the machine, the command, generated tokens/s per
# repeat (median, min, max) and a checksum of the responses' texts (the same on every repeat, since
# greedy decoding is batch-invariant here).
# Usage: bench/serve_load.sh [MODEL_DIR] [N=64] [MAX_TOKENS=128] [REPEATS=3] [extra serve flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
model=${1:-models/moescope-tiny-gsm8k}
n=${2:-64}
max_tokens=${3:-128}
repeats=${4:-3}
shift $(( $# < 4 ? $# : 4 ))
moescope=./build/moescope
work=$(mktemp -d)
trap 'kill $server 2>/dev/null || true; rm -rf "$work"' EXIT

echo "moescope serve load  $(date -u '+%Y-%m-%d %H:%M:%S') UTC"
echo "command: bench/serve_load.sh $model $n $max_tokens $repeats $*"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cores"
$moescope serve "$model" --port 0 --served-model-name m "$@" >"$work/serve.log" 2>&1 &
server=$!
for _ in $(seq 300); do
  port=$(grep -o 'http://127.0.0.1:[0-9]*' "$work/serve.log" | head -1 | cut -d: -f3 || true)
  [[ -n "$port" ]] && break
  sleep 0.1
done
[[ -n "${port:-}" ]] || { cat "$work/serve.log"; exit 1; }
$moescope prompts --synthetic --n "$n" --seed 7 --out "$work/prompts.txt" >/dev/null
# One JSON body per prompt.
python3 - "$work/prompts.txt" "$max_tokens" "$work" <<'PY'
import json, sys
prompts = [l.rstrip("\n") for l in open(sys.argv[1], encoding="utf-8")]
for i, p in enumerate(prompts):
    json.dump({"model": "m", "prompt": p, "max_tokens": int(sys.argv[2]), "temperature": 0, "ignore_eos": True},
              open(f"{sys.argv[3]}/req{i}.json", "w"))
PY
rates=()
for r in $(seq "$repeats"); do
  rm -f "$work"/resp*.json
  start=$(date +%s.%N)
  seq 0 $((n - 1)) | xargs -P "$n" -I{} curl -s -o "$work/resp{}.json" -H 'Content-Type: application/json' \
    --data-binary "@$work/req{}.json" "http://127.0.0.1:$port/v1/completions"
  end=$(date +%s.%N)
  read -r tokens checksum < <(python3 - "$work" "$n" <<'PY'
import json, sys, hashlib
h = hashlib.sha256(); tokens = 0
for i in range(int(sys.argv[2])):
    r = json.load(open(f"{sys.argv[1]}/resp{i}.json"))
    tokens += r["usage"]["completion_tokens"]; h.update(r["choices"][0]["text"].encode())
print(tokens, h.hexdigest()[:16])
PY
)
  rate=$(python3 -c "print(f'{$tokens / ($end - $start):.1f}')")
  rates+=("$rate")
  echo "repeat $r: $n requests, $tokens generated tokens in $(python3 -c "print(f'{$end - $start:.3f}')") s: $rate tok/s; checksum $checksum"
done
python3 -c "import statistics,sys; v=sorted(map(float, sys.argv[1:])); print(f'generated tokens/s: median {statistics.median(v):.1f} (min {v[0]:.1f}, max {v[-1]:.1f}) over {len(v)} repeats')" "${rates[@]}"
