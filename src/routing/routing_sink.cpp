#include "routing/routing_sink.h"

namespace moescope {

const char* to_string(ForwardMode mode) {
  switch (mode) {
    case ForwardMode::Prefill: return "prefill";
    case ForwardMode::Decode: return "decode";
    case ForwardMode::Mixed: return "mixed";
  }
  return "?";
}

}  // namespace moescope
