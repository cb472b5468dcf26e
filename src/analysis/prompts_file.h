#pragma once
// The prompts file: one prompt per line, UTF-8. A prompt's own line breaks and backslashes are
// escaped so that every prompt stays on one line: "\n" is a newline, "\r" a carriage return, "\\"
// a backslash; any other backslash is kept as it is, so hand-written files with Windows paths read
// back unchanged. Empty lines are skipped; a trailing "\r" (CRLF files) is dropped.
// Format details: docs/ANALYSIS.md.
#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

namespace moescope::analysis {

// One prompt as one line of a prompts file (without the newline).
std::string escape_prompt(std::string_view prompt);
// The prompt a line of a prompts file stands for.
std::string unescape_prompt(std::string_view line);

// Every prompt of a prompts file, in order; throws Error naming the file if it cannot be read.
// The one reader `generate --prompts` and `run --prompts` use.
std::vector<std::string> read_prompts_file(const std::filesystem::path& path);
// Writes prompts one per line (escaped); throws Error naming the file on failure.
void write_prompts_file(const std::filesystem::path& path, const std::vector<std::string>& prompts);

struct Gsm8kQuestions {
  std::vector<std::string> questions;  // at most `n`, from record `offset` on
  int64_t records_seen = 0;            // records read (the file is read only as far as needed)
};

// The "question" fields of GSM8K JSONL (one object per line, e.g. test.jsonl), records
// [offset, offset + n). Blank lines are skipped and do not count as records. A line that is not a
// JSON object with a string "question" throws Error naming the file and the line number; lines after
// the last one needed are not read.
Gsm8kQuestions read_gsm8k_questions(const std::filesystem::path& path, int64_t offset, int64_t n);

}  // namespace moescope::analysis
