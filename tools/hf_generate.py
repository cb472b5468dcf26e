#!/usr/bin/env python3
"""Greedy generation with Hugging Face transformers (fp32, CPU) on model directories, as JSON lines.

Checks that a checkpoint written by `moescope make-model` loads in transformers, and gives the ids to
compare with `moescope generate DIR --prompt-ids ... --max-tokens N --ignore-eos --json`:

    python3 tools/hf_generate.py --prompt-ids 1,2,3,4,5 --max-tokens 16 DIR [DIR ...]
"""
import argparse
import json

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("dirs", nargs="+")
    parser.add_argument("--prompt-ids", required=True)
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args()
    prompt = [int(x) for x in args.prompt_ids.split(",")]
    for d in args.dirs:
        model, info = AutoModelForCausalLM.from_pretrained(
            d, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
        missing = [k for k in info["missing_keys"] if k != "lm_head.weight"]
        assert not missing and not info["unexpected_keys"], f"{d}: loading info {info}"
        model.eval()
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=args.max_tokens,
                                 min_new_tokens=args.max_tokens, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
        print(json.dumps({"dir": d, "prompt_ids": prompt, "output_ids": out[0, len(prompt):].tolist()}))


if __name__ == "__main__":
    main()
