#include "util/shutdown.h"

#include <signal.h>
#include <unistd.h>

#include <atomic>

namespace moescope {
namespace {

std::atomic<int> stop_signal{0};

extern "C" void on_signal(int signal_number) {
  int expected = 0;
  if (!stop_signal.compare_exchange_strong(expected, signal_number)) _exit(128 + signal_number);  // the second one
}

}  // namespace

void install_shutdown_handlers() {
  struct sigaction action = {};
  action.sa_handler = on_signal;
  action.sa_flags = SA_RESTART;  // blocking calls resume; the loops poll the flag
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

bool shutdown_requested() { return stop_signal.load(std::memory_order_relaxed) != 0; }

int shutdown_signal() { return stop_signal.load(std::memory_order_relaxed); }

void request_shutdown(int signal_number) {
  int expected = 0;
  stop_signal.compare_exchange_strong(expected, signal_number);
}

}  // namespace moescope
