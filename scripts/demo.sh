#!/usr/bin/env bash
# The demo: installs the dependencies, builds moescope, and runs the whole study on the small MoE that
# ships in models/ (moescope-tiny-gsm8k, trained on GSM8K train):
#   prompts -> timed run without the routing log -> timed run with it -> report (plots, metrics, overhead,
#   experts by token class)
#   -> the server and the seed document's curl sequence (configure per_pass, start, complete, dump, stop).
# Usage: bash scripts/demo.sh [path/to/gsm8k/test.jsonl]   (without a path: generated math word problems)
# CTest runs it on the tests' build with MOESCOPE_DEMO_BINARY and MOESCOPE_DEMO_OUT set (no set-up, no build).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${MOESCOPE_DEMO_BINARY:-}" ]]; then
  bash scripts/setup.sh
  bash scripts/build.sh
fi
moescope=${MOESCOPE_DEMO_BINARY:-./build/moescope}
out=${MOESCOPE_DEMO_OUT:-out/demo}
rm -rf "$out"
mkdir -p "$out"

echo "== 1. prompts"
if [[ $# -ge 1 ]]; then
  $moescope prompts --gsm8k "$1" --n 25 --out "$out/prompts.txt"
else
  $moescope prompts --synthetic --n 25 --seed 1234 --out "$out/prompts.txt"
fi
head -3 "$out/prompts.txt"

echo
echo "== 2. timed run without the routing log (label no_log)"
$moescope run --prompts "$out/prompts.txt" --max-tokens 128 --temperature 0 --seed 1234 --timing "$out/timing.json"
echo
echo "== 3. the same run with the routing log on every MoE layer (label log)"
# This run writes the outputs: the report joins the routes with these very tokens (--tokens), which holds
# whether or not a rerun would generate the same ones.
MOESCOPE_LOG_MOE="$out/moe_routes.jsonl" MOESCOPE_LOG_MOE_LAYER=all \
  $moescope run --prompts "$out/prompts.txt" --max-tokens 128 --temperature 0 --seed 1234 --timing "$out/timing.json" \
  --expert-distribution-jsonl "$out/passes.jsonl" --output "$out/outputs.jsonl"
echo "first answer: $(head -1 "$out/outputs.jsonl" | python3 -c 'import json,sys; print(json.load(sys.stdin)["text"][:160])')"

echo
echo "== 4. report: expert_hist.png, expert_heatmap.png, expert_metrics.json; by token class: token_classes.json,"
echo "      expert_token_classes.png"
$moescope report "$out/moe_routes.jsonl" --out-dir "$out/report" --timing "$out/timing.json" \
  --tokens "$out/outputs.jsonl"

echo
echo "== 5. the server, and the seed document's curl sequence"
$moescope serve --port 0 >"$out/serve.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
  port=$(grep -o 'http://127.0.0.1:[0-9]*' "$out/serve.log" | head -1 | cut -d: -f3 || true)
  [[ -n "$port" ]] && break
  sleep 0.1
done
[[ -n "${port:-}" ]] || { cat "$out/serve.log"; echo "demo: the server did not start" >&2; exit 1; }
base="http://localhost:$port"
show() { echo "\$ $1"; eval "$1"; echo; }  # curl -f: an HTTP error fails the demo
show "curl -sf -X POST \"$base/configure_expert_distribution?mode=per_pass\""
show "curl -sf -X POST \"$base/start_expert_distribution\""
show "curl -sf -X POST \"$base/v1/completions\" -H \"Content-Type: application/json\" -d '{\"model\": \"moescope-tiny-gsm8k\", \"prompt\": \"Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. How many clips did Natalia sell altogether in April and May?\", \"max_tokens\": 100, \"temperature\": 0}'"
show "curl -sf -X POST \"$base/dump_expert_distribution?summary_only=true\" | python3 -m json.tool"
show "curl -sf -X POST \"$base/stop_expert_distribution\""
kill -TERM $server
wait $server || true
trap - EXIT

for f in prompts.txt timing.json moe_routes.jsonl passes.jsonl outputs.jsonl report/expert_hist.png \
  report/expert_heatmap.png report/expert_metrics.json report/token_classes.json report/expert_token_classes.png; do
  [[ -s "$out/$f" ]] || { echo "demo: $out/$f was not written" >&2; exit 1; }
done

echo
echo "== files written"
find "$out" -type f | sort | while read -r f; do printf '%10s  %s\n' "$(stat -c %s "$f")" "$f"; done
