#pragma once
// JSON helpers over nlohmann::json: reading a file with an error that names it.
#include <nlohmann/json.hpp>

#include <filesystem>
#include <string>

namespace moescope {

using Json = nlohmann::json;

// Parses a JSON file; throws Error naming the file on a missing file or malformed JSON.
Json read_json_file(const std::filesystem::path& path);

// Reads a whole file into a string; throws Error naming the file when it cannot be read.
std::string read_text_file(const std::filesystem::path& path);

// Writes a string to a file (replacing it); throws Error naming the file on failure.
void write_text_file(const std::filesystem::path& path, const std::string& text);

}  // namespace moescope
