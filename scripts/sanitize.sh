#!/usr/bin/env bash
# The concurrent parts under sanitizers: recorder_test and server_test built with -fsanitize=thread and
# with -fsanitize=address,undefined (CPU only, -O1 to keep the builds short), run by ctest. Only the code
# linked into the tests is sanitized; the few tests that run the moescope binary (make-model, the CLI)
# use the main build's (build/moescope, made by scripts/build.sh first).
# OpenMP runs one thread here: libgomp is not instrumented, so TSan cannot see its barriers.
set -euo pipefail
cd "$(dirname "$0")/.."
for sanitizer in thread address,undefined; do
  dir="build-${sanitizer//,/-}"
  cmake -S . -B "$dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DCMAKE_CXX_FLAGS_RELEASE=-O1 -DMOESCOPE_CUDA=OFF \
    -DMOESCOPE_SANITIZE="$sanitizer" -DMOESCOPE_TEST_CLI=OFF >/dev/null
  cmake --build "$dir" -j "$(nproc)" --target recorder_test server_test
  MOESCOPE_TEST_BINARY="$PWD/build/moescope" OMP_NUM_THREADS=1 TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" \
    ASAN_OPTIONS="detect_leaks=1" UBSAN_OPTIONS="halt_on_error=1 print_stacktrace=1" \
    ctest --test-dir "$dir" --output-on-failure -j "$(nproc)" -R "^(RecorderTest|JsonlWriter|ServerTest)\."
done
