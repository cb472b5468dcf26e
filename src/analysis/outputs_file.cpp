#include "analysis/outputs_file.h"

#include <fstream>
#include <limits>
#include <optional>

#include "util/error.h"
#include "util/json.h"

namespace moescope::analysis {
namespace {

// A list of token ids, or nullopt when it is anything else.
std::optional<std::vector<int32_t>> token_ids(const Json& j) {
  if (!j.is_array()) return std::nullopt;
  std::vector<int32_t> ids;
  ids.reserve(j.size());
  for (const Json& v : j) {
    if (!v.is_number_integer()) return std::nullopt;
    const int64_t id = v.get<int64_t>();
    if (id < 0 || id > std::numeric_limits<int32_t>::max()) return std::nullopt;
    ids.push_back(static_cast<int32_t>(id));
  }
  return ids;
}

}  // namespace

OutputsFile read_outputs_file(const std::filesystem::path& path) {
  if (std::filesystem::is_directory(path)) fail("{}: is a directory, not an outputs file", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open the tokens file (the --output of moescope run)", path.string());
  OutputsFile out;
  out.path = path;
  std::string line;
  int64_t line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded())
      fail("{}:{}: {}", path.string(), line_no,
           in.eof() ? "truncated last line (no newline at the end)" : "not valid JSON");
    if (!j.is_object()) fail("{}:{}: not a JSON object", path.string(), line_no);
    const auto id = j.find("req_id");
    if (id == j.end() || id->is_null()) fail("{}:{}: no \"req_id\"", path.string(), line_no);
    if (!id->is_string() && !id->is_number_integer())
      fail("{}:{}: \"req_id\" is neither a string nor an integer", path.string(), line_no);
    // The routes reader keeps an integer req_id as its digits; so does this, so that they match.
    std::string req_id = id->is_string() ? id->get<std::string>() : id->dump();
    RequestTokens tokens;
    tokens.line = line_no;
    for (auto [key, ids] : {std::pair{"prompt_ids", &tokens.prompt_ids}, std::pair{"output_ids", &tokens.output_ids}}) {
      const auto it = j.find(key);
      if (it == j.end()) fail("{}:{}: no \"{}\"", path.string(), line_no, key);
      std::optional<std::vector<int32_t>> parsed = token_ids(*it);
      if (!parsed) fail("{}:{}: \"{}\" is not a list of token ids", path.string(), line_no, key);
      *ids = std::move(*parsed);
    }
    if (const auto it = j.find("finish_reason"); it != j.end() && !it->is_null()) {
      if (!it->is_string()) fail("{}:{}: \"finish_reason\" is not a string", path.string(), line_no);
      tokens.finish_reason = it->get<std::string>();
    }
    const auto [it, inserted] = out.requests.try_emplace(req_id, std::move(tokens));
    if (!inserted)
      fail("{}:{}: req_id \"{}\" again (first on line {})", path.string(), line_no, req_id, it->second.line);
    out.order.push_back(std::move(req_id));
  }
  if (in.bad()) fail("{}: read error after line {}", path.string(), line_no);
  if (out.requests.empty())
    fail("{}: no requests (one JSON line per request, as moescope run --output writes)", path.string());
  return out;
}

}  // namespace moescope::analysis
