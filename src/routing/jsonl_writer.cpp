#include "routing/jsonl_writer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <ctime>
#include <cstring>

#include "util/error.h"

namespace moescope {
namespace {

struct LineBlock final : JsonlWriter::Block {
  explicit LineBlock(std::string l) : line(std::move(l)) {}
  void append_lines(std::string& out) const override {
    out += line;
    out += '\n';
  }
  std::string line;
};

}  // namespace

JsonlWriter::JsonlWriter(const std::filesystem::path& path, bool append, size_t capacity)
    : path_(path), capacity_(capacity == 0 ? 1 : capacity), wake_at_(std::max<size_t>(1, capacity_ / 4)) {
  fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_CLOEXEC | (append ? O_APPEND : O_TRUNC), 0644);
  if (fd_ < 0) fail("{}: cannot open for writing: {}", path.string(), std::strerror(errno));
  thread_ = std::thread([this] { run(); });
}

JsonlWriter::~JsonlWriter() { close(); }

bool JsonlWriter::push(std::unique_ptr<const Block> block) {
  std::unique_lock lock(mutex_);
  if (queue_.size() >= capacity_ && !failed_ && !closing_) {
    ++stats_.producer_waits;
    not_full_.wait(lock, [&] { return queue_.size() < capacity_ || failed_ || closing_; });
  }
  if (failed_ || closing_) return false;
  queue_.push_back(std::move(block));
  ++pushed_;
  // Waking the writer is a system call; the engine pays it only when a quarter of the queue waits. The
  // writer also looks every k_poll on its own, so lines reach the file within that time.
  if (queue_.size() >= wake_at_) not_empty_.notify_one();
  return true;
}

bool JsonlWriter::push_line(std::string line) { return push(std::make_unique<LineBlock>(std::move(line))); }

void JsonlWriter::flush() {
  std::unique_lock lock(mutex_);
  const int64_t target = pushed_;
  not_empty_.notify_one();
  drained_.wait(lock, [&] { return written_ >= target; });
}

void JsonlWriter::close() {
  {
    std::lock_guard lock(mutex_);
    if (closing_) return;
    closing_ = true;
  }
  not_empty_.notify_all();
  not_full_.notify_all();
  if (thread_.joinable()) thread_.join();
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

bool JsonlWriter::failed() const {
  std::lock_guard lock(mutex_);
  return failed_;
}

std::string JsonlWriter::error() const {
  std::lock_guard lock(mutex_);
  return error_;
}

JsonlWriter::Stats JsonlWriter::stats() const {
  std::lock_guard lock(mutex_);
  return stats_;
}

void JsonlWriter::run() {
  std::string text;
  for (;;) {
    std::deque<std::unique_ptr<const Block>> batch;
    {
      std::unique_lock lock(mutex_);
      not_empty_.wait_for(lock, k_poll, [&] { return queue_.size() >= wake_at_ || closing_; });
      if (queue_.empty()) {
        if (closing_) break;  // closing and drained
        continue;
      }
      batch.swap(queue_);
    }
    not_full_.notify_all();
    text.clear();
    for (const auto& block : batch) block->append_lines(text);
    const bool ok = failed() ? false : write_all(text);
    std::lock_guard lock(mutex_);
    written_ += static_cast<int64_t>(batch.size());
    if (ok) {
      stats_.blocks += static_cast<int64_t>(batch.size());
      stats_.bytes += static_cast<int64_t>(text.size());
    }
    drained_.notify_all();
  }
  timespec cpu{};
  ::clock_gettime(CLOCK_THREAD_CPUTIME_ID, &cpu);
  std::lock_guard lock(mutex_);
  stats_.cpu_seconds = static_cast<double>(cpu.tv_sec) + static_cast<double>(cpu.tv_nsec) * 1e-9;
  drained_.notify_all();
}

bool JsonlWriter::write_all(const std::string& text) {
  const off_t start = ::lseek(fd_, 0, SEEK_END);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::write(fd_, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      const int err = n < 0 ? errno : ENOSPC;
      // Cut a partly written batch back to where it began, so the file ends with a whole line.
      if (done > 0 && start >= 0 && ::ftruncate(fd_, start) != 0) {
        // Nothing more can be done; the error below is what the user needs.
      }
      std::lock_guard lock(mutex_);
      failed_ = true;
      error_ = fmt::format("{}: write failed, recording to this file stopped: {}", path_.string(), std::strerror(err));
      not_full_.notify_all();
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace moescope
