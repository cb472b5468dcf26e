#pragma once
// The outputs file `moescope run --output` writes: one JSON line per request,
//   {"req_id":"r0","prompt_ids":[...],"output_ids":[...],"finish_reason":"length","text":"..."}
// read to join routes with the tokens they routed: token_idx i of a request is prompt_ids[i] for
// i < len(prompt_ids), else output_ids[i - len(prompt_ids)] (docs/RECORDING.md, "token_idx"). The
// sampled token that ends a request is never fed back, so it has no routes: with "length" that is the
// last of output_ids; with "stop" it is the eos, which output_ids leaves out.
#include <cstdint>
#include <filesystem>
#include <string>
#include <unordered_map>
#include <vector>

namespace moescope::analysis {

struct RequestTokens {
  std::vector<int32_t> prompt_ids;  // [prompt tokens]
  std::vector<int32_t> output_ids;  // [generated tokens], without the eos that ended a "stop"
  std::string finish_reason;        // "length", "stop", ...; empty when the line has none
  int64_t line = 0;                 // where the request is in the file, 1-based

  int64_t size() const { return static_cast<int64_t>(prompt_ids.size() + output_ids.size()); }
  bool is_prompt(int64_t token_idx) const { return token_idx < static_cast<int64_t>(prompt_ids.size()); }
  // The id at token_idx; token_idx must be below size().
  int32_t id_at(int64_t token_idx) const {
    return is_prompt(token_idx) ? prompt_ids[static_cast<size_t>(token_idx)]
                                : output_ids[static_cast<size_t>(token_idx) - prompt_ids.size()];
  }
};

struct OutputsFile {
  std::filesystem::path path;
  std::unordered_map<std::string, RequestTokens> requests;  // by req_id (an integer req_id as its digits)
  std::vector<std::string> order;                           // req_ids in file order
};

// Reads every request. Strict, unlike the routes reader: the join must not guess, so a line that is not
// a JSON object with a string or integer "req_id" and lists of non-negative integer "prompt_ids" and
// "output_ids" (and a string "finish_reason" when it has one), a repeated req_id, an unreadable file or
// one with no request throws Error naming the file and the line. Blank lines are skipped; other fields
// are ignored.
OutputsFile read_outputs_file(const std::filesystem::path& path);

}  // namespace moescope::analysis
