#pragma once
// A JSONL file written by its own thread from a bounded queue, so the engine never waits on the disk
// in the common case. A full queue makes the producer wait (back-pressure), never drops a line.
// Blocks are formatted on the writer thread: the engine hands over raw routes (a copy), not text.
// Every write(2) carries whole lines; a failed write (a full disk) is cut back to the last whole line,
// reported once, and the writer stops taking blocks, so generation goes on unharmed.
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <filesystem>
#include <memory>
#include <mutex>
#include <string>
#include <thread>

namespace moescope {

class JsonlWriter {
 public:
  // Some lines, formatted on the writer thread.
  struct Block {
    virtual ~Block() = default;
    virtual void append_lines(std::string& out) const = 0;  // appends whole lines, each ending in '\n'
  };

  struct Stats {
    int64_t blocks = 0;          // blocks taken
    int64_t bytes = 0;           // bytes on disk
    int64_t producer_waits = 0;  // pushes that waited for room in the queue
    double cpu_seconds = 0.0;    // CPU time of the writer thread (formatting and writing), once closed
  };

  // Opens (append or truncate) the file and starts the thread; throws Error naming the path when the
  // file cannot be opened for writing. capacity: blocks the queue holds before a push waits.
  JsonlWriter(const std::filesystem::path& path, bool append, size_t capacity = 256);
  ~JsonlWriter();  // close()
  JsonlWriter(const JsonlWriter&) = delete;
  JsonlWriter& operator=(const JsonlWriter&) = delete;

  // Queues a block; waits while the queue is full. Returns false (and drops the block) once the writer
  // has failed or is closed.
  bool push(std::unique_ptr<const Block> block);
  bool push_line(std::string line);  // one line, without its '\n'
  // Waits until every block pushed before the call is written.
  void flush();
  // Writes what is queued, stops the thread, closes the file. Idempotent.
  void close();

  bool failed() const;
  std::string error() const;  // why it failed, empty if it did not
  Stats stats() const;
  const std::filesystem::path& path() const { return path_; }

 private:
  void run();
  bool write_all(const std::string& text);

  static constexpr std::chrono::milliseconds k_poll{20};  // the writer looks at least this often
  std::filesystem::path path_;
  int fd_ = -1;
  size_t capacity_;
  size_t wake_at_;  // queued blocks that wake the writer at once
  mutable std::mutex mutex_;
  std::condition_variable not_empty_, not_full_, drained_;
  std::deque<std::unique_ptr<const Block>> queue_;
  int64_t pushed_ = 0, written_ = 0;  // blocks pushed / blocks done (written or dropped)
  bool closing_ = false, failed_ = false;
  std::string error_;
  Stats stats_;
  std::thread thread_;
};

}  // namespace moescope
