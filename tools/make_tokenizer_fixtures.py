#!/usr/bin/env python3
"""Writes the golden token ids that tests/tokenizer_test.cpp compares moescope's tokenizer against.

Needs the Python `tokenizers` package (0.23; no network). Run from the repository root:

    python3 tools/make_tokenizer_fixtures.py \
        --tokenizer .cache/qwen-tokenizer/tokenizer.json \
        --strings tools/tokenizer_strings.json \
        --out tests/fixtures/tokenizer/qwen_golden.json

(scripts/fetch_fixtures.sh puts the tokenizer in .cache/qwen-tokenizer/.)

Output: a JSON object whose "cases" is a list of
    {"text": ..., "ids": [...], "decoded": ..., "decoded_skip_special": ...}
with ids = Tokenizer.encode(text, add_special_tokens=False).ids, decoded = decode(ids,
skip_special_tokens=False) and decoded_skip_special = decode(ids, skip_special_tokens=True);
plus the versions and the tokenizer's sha256, so a golden made from another file shows it.
"""

import argparse
import hashlib
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--strings", required=True, help="JSON list of strings to encode")
    parser.add_argument("--out", required=True, help="golden JSON to write")
    args = parser.parse_args()

    import tokenizers  # imported here so --help works without it

    tokenizer = tokenizers.Tokenizer.from_file(args.tokenizer)
    with open(args.strings, encoding="utf-8") as f:
        strings = json.load(f)
    if not isinstance(strings, list) or not all(isinstance(s, str) for s in strings):
        print(f"{args.strings}: expected a JSON list of strings", file=sys.stderr)
        return 1
    with open(args.tokenizer, "rb") as f:
        tokenizer_sha256 = hashlib.sha256(f.read()).hexdigest()

    cases = []
    for text in strings:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        cases.append({
            "text": text,
            "ids": ids,
            "decoded": tokenizer.decode(ids, skip_special_tokens=False),
            "decoded_skip_special": tokenizer.decode(ids, skip_special_tokens=True),
        })

    golden = {
        "generator": "tools/make_tokenizer_fixtures.py",
        "tokenizers_version": tokenizers.__version__,
        "tokenizer_sha256": tokenizer_sha256,
        "cases": cases,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        # ASCII escapes keep every byte (\r, combining marks, NUL) visible and exact in the file.
        json.dump(golden, f, ensure_ascii=True, indent=1)
        f.write("\n")
    print(f"wrote {len(cases)} cases to {args.out} (tokenizers {tokenizers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
