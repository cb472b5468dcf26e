#!/usr/bin/env bash
# Installs the dependencies, fetches the test fixtures, builds moescope and its tests, runs them all;
# then the concurrent parts (the recorder, the JSONL writers, the server) again under ThreadSanitizer and
# under AddressSanitizer with UndefinedBehaviorSanitizer.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
bash scripts/fetch_fixtures.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure -j "$(nproc)"
bash scripts/sanitize.sh
