#!/usr/bin/env bash
# The demo: installs the dependencies, builds moescope, makes a tiny random-weight MoE checkpoint
# (Qwen2-MoE layout) and generates from it, showing the ids, text and timing.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/build.sh
out=out/demo
mkdir -p "$out"
echo "== make-model: a tiny Qwen2-MoE checkpoint in Hugging Face layout"
./build/moescope make-model --arch qwen2_moe --preset tiny --seed 1 --out "$out/tiny-qwen2-moe"
ls -l "$out/tiny-qwen2-moe"
echo
echo "== generate (greedy, --json): ids, text and timing"
./build/moescope generate "$out/tiny-qwen2-moe" --prompt "Janet has 16 eggs. She eats 3." --max-tokens 24 --json
echo
echo "== generate with the chat template, sampled (temperature 0.8, top-p 0.9, seed 7)"
./build/moescope generate "$out/tiny-qwen2-moe" --prompt "How many eggs are left?" --chat --max-tokens 24 \
  --temperature 0.8 --top-p 0.9 --seed 7
echo
echo "== tokenize"
echo "Janet has 16 eggs." | ./build/moescope tokenize --tokenizer "$out/tiny-qwen2-moe"
echo
echo "The weights are random, so the text is noise; the routing work that follows uses this model."
echo "Files written: $out/tiny-qwen2-moe/{config.json,model.safetensors,tokenizer.json,tokenizer_config.json}"
