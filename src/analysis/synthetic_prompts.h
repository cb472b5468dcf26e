#pragma once
// Math word problems in GSM8K's style, made from templates, for demos and benchmarks on machines
// without the GSM8K files. Deterministic for a seed.
#include <cstdint>
#include <string>
#include <vector>

namespace moescope::analysis {

std::vector<std::string> synthetic_math_prompts(int n, uint64_t seed);

}  // namespace moescope::analysis
