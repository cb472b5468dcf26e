#pragma once
// SIGINT and SIGTERM as a request to stop: the first one sets a flag that long-running commands check
// between forward passes, so they stop cleanly and every JSONL file is flushed and ends with a whole
// line; a second one exits at once.
namespace moescope {

void install_shutdown_handlers();
bool shutdown_requested();
// The signal that asked for the stop (0 if none); a command exits with 128 + it.
int shutdown_signal();
// Ask for a stop as a signal would (for tests and for the server's own shutdown).
void request_shutdown(int signal_number);

}  // namespace moescope
