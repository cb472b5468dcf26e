#include "util/json.h"

#include <fstream>
#include <sstream>

#include "util/error.h"

namespace moescope {

std::string read_text_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) fail("{}: cannot open file", path.string());
  std::ostringstream buffer;
  buffer << in.rdbuf();
  if (in.bad()) fail("{}: read error", path.string());
  return buffer.str();
}

Json read_json_file(const std::filesystem::path& path) {
  const std::string text = read_text_file(path);
  try {
    return Json::parse(text);
  } catch (const Json::parse_error& e) {
    fail("{}: malformed JSON: {}", path.string(), e.what());
  }
}

void write_text_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) fail("{}: cannot open file for writing", path.string());
  out << text;
  out.close();
  if (!out) fail("{}: write error", path.string());
}

}  // namespace moescope
