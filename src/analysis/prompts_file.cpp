#include "analysis/prompts_file.h"

#include <fstream>

#include "util/error.h"
#include "util/json.h"

namespace moescope::analysis {

std::string escape_prompt(std::string_view prompt) {
  std::string out;
  out.reserve(prompt.size());
  for (char c : prompt) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      default: out += c;
    }
  }
  return out;
}

std::string unescape_prompt(std::string_view line) {
  std::string out;
  out.reserve(line.size());
  for (size_t i = 0; i < line.size(); ++i) {
    if (line[i] != '\\' || i + 1 == line.size()) {
      out += line[i];
      continue;
    }
    const char next = line[i + 1];
    if (next == 'n') out += '\n';
    else if (next == 'r') out += '\r';
    else if (next == '\\') out += '\\';
    else {
      out += '\\';  // not an escape: keep the backslash, the next character follows as itself
      continue;
    }
    ++i;
  }
  return out;
}

std::vector<std::string> read_prompts_file(const std::filesystem::path& path) {
  if (std::filesystem::is_directory(path)) fail("{}: is a directory, not a prompts file", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open prompts file", path.string());
  std::vector<std::string> prompts;
  std::string line;
  while (std::getline(in, line)) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (!line.empty()) prompts.push_back(unescape_prompt(line));
  }
  if (in.bad()) fail("{}: read error", path.string());
  return prompts;
}

void write_prompts_file(const std::filesystem::path& path, const std::vector<std::string>& prompts) {
  std::string text;
  for (const std::string& p : prompts) {
    if (p.empty()) fail("{}: cannot write an empty prompt (empty lines are skipped when read)", path.string());
    text += escape_prompt(p);
    text += '\n';
  }
  write_text_file(path, text);
}

Gsm8kQuestions read_gsm8k_questions(const std::filesystem::path& path, int64_t offset, int64_t n) {
  if (offset < 0) fail("--offset must be >= 0");
  if (n < 1) fail("--n must be at least 1");
  if (std::filesystem::is_directory(path)) fail("{}: is a directory, not a GSM8K JSONL file", path.string());
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open GSM8K file", path.string());
  Gsm8kQuestions out;
  std::string line;
  int64_t line_no = 0;
  while (static_cast<int64_t>(out.questions.size()) < n && std::getline(in, line)) {
    ++line_no;
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    const Json j = Json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) fail("{}:{}: not valid JSON", path.string(), line_no);
    if (!j.is_object()) fail("{}:{}: not a JSON object", path.string(), line_no);
    const auto q = j.find("question");
    if (q == j.end()) fail("{}:{}: no \"question\" field", path.string(), line_no);
    if (!q->is_string()) fail("{}:{}: \"question\" is not a string", path.string(), line_no);
    if (out.records_seen++ < offset) continue;
    std::string question = q->get<std::string>();
    if (question.empty()) fail("{}:{}: \"question\" is empty", path.string(), line_no);
    out.questions.push_back(std::move(question));
  }
  if (in.bad()) fail("{}: read error", path.string());
  return out;
}

}  // namespace moescope::analysis
