#pragma once
// One error type for every module: a message a user can act on (which file, which tensor, what was
// expected). Modules throw it; the CLI and the server catch it at their edge and print or return it.
#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace moescope {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

// MOESCOPE_FAIL("{}: tensor {} has shape {}, expected {}", file, name, got, want);
template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace moescope
