#pragma once
// A small HTTP/1.1 server over Boost.Beast: one thread per connection, keep-alive, bodies up to a limit,
// chunked streaming responses. Debian 12's cpp-httplib (0.11) answers a POST without a body and without
// Content-Length (what `curl -X POST URL` sends, and so the seed's expert-distribution commands) with a
// 400 after a five-second wait; Beast reads such a request as RFC 9112 says: no body.
#include <atomic>
#include <condition_variable>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <string_view>
#include <thread>

namespace moescope::server {

struct HttpRequest {
  std::string method;                         // "GET", "POST", ...
  std::string path;                           // without the query
  std::map<std::string, std::string> query;   // percent-decoded; the last value of a repeated key
  std::string authorization;                  // the Authorization header
  std::string body;
};

struct HttpResponse {
  int status = 200;
  std::string content_type = "application/json";
  std::string body;
  // A streamed body (server-sent events): called once after the headers; `write` sends one chunk and
  // returns false once the client is gone. The producer returns when the stream is complete.
  std::function<void(const std::function<bool(std::string_view)>& write)> stream;
};

using HttpHandler = std::function<void(const HttpRequest&, HttpResponse&)>;

class HttpListener {
 public:
  // The body of an error the listener answers itself (malformed HTTP, 413, 503).
  using ErrorBody = std::function<std::string(int status, const std::string& message)>;

  // Answers 413 above max_body_bytes and 503 above max_connections open connections.
  HttpListener(std::string host, int port, size_t max_body_bytes, int max_connections, HttpHandler handler, ErrorBody error_body);
  ~HttpListener();  // close()
  // Binds and listens; throws Error naming host and port when it cannot. Returns the port (for port 0).
  int bind();
  // Accepts connections until stop(); then returns (open connections go on until close()).
  void serve();
  // Stops accepting; safe from any thread (a signal watcher).
  void stop();
  // Shuts the open connections down and waits for their threads.
  void close();

 private:
  void session(int fd);
  void reply_error(int fd, int status, const std::string& message);

  std::string host_;
  int port_;
  size_t max_body_bytes_;
  int max_connections_;
  HttpHandler handler_;
  ErrorBody error_body_;
  int listen_fd_ = -1;
  std::atomic<bool> stopping_{false};
  std::mutex mutex_;
  std::set<int> open_;  // connection sockets, shut down by stop()
  int sessions_ = 0;    // running session threads
  std::condition_variable sessions_done_;
};

// "a=1&b=x%20y" -> {a: 1, b: "x y"}; '+' is a space.
std::map<std::string, std::string> parse_query(std::string_view query);

}  // namespace moescope::server
