#include "server/http.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/write.hpp>
#include <boost/beast/core.hpp>
#include <boost/beast/http.hpp>
#include <chrono>
#include <cstring>

#include "util/error.h"

namespace moescope::server {
namespace {

namespace asio = boost::asio;
namespace beast = boost::beast;
namespace http = boost::beast::http;

constexpr int k_idle_seconds = 60;  // a keep-alive connection with no request for this long is closed
constexpr std::chrono::seconds k_close_grace{5};  // close(): how long sessions may take to write what they owe

int hex_value(char c) {
  if (c >= '0' && c <= '9') return c - '0';
  if (c >= 'a' && c <= 'f') return c - 'a' + 10;
  if (c >= 'A' && c <= 'F') return c - 'A' + 10;
  return -1;
}

std::string percent_decode(std::string_view s) {
  std::string out;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '+') {
      out += ' ';
    } else if (s[i] == '%' && i + 2 < s.size() && hex_value(s[i + 1]) >= 0 && hex_value(s[i + 2]) >= 0) {
      out += static_cast<char>(hex_value(s[i + 1]) * 16 + hex_value(s[i + 2]));
      i += 2;
    } else {
      out += s[i];
    }
  }
  return out;
}

}  // namespace

std::map<std::string, std::string> parse_query(std::string_view query) {
  std::map<std::string, std::string> out;
  while (!query.empty()) {
    const size_t amp = query.find('&');
    const std::string_view pair = query.substr(0, amp);
    if (!pair.empty()) {
      const size_t eq = pair.find('=');
      out[percent_decode(pair.substr(0, eq))] = eq == std::string_view::npos ? "" : percent_decode(pair.substr(eq + 1));
    }
    if (amp == std::string_view::npos) break;
    query.remove_prefix(amp + 1);
  }
  return out;
}

HttpListener::HttpListener(std::string host, int port, size_t max_body_bytes, int max_connections, HttpHandler handler,
                           ErrorBody error_body)
    : host_(std::move(host)), port_(port), max_body_bytes_(max_body_bytes), max_connections_(max_connections),
      handler_(std::move(handler)), error_body_(std::move(error_body)) {}

HttpListener::~HttpListener() { close(); }

int HttpListener::bind() {
  addrinfo hints = {};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* found = nullptr;
  const std::string service = std::to_string(port_);
  if (const int rc = ::getaddrinfo(host_.c_str(), service.c_str(), &hints, &found); rc != 0)
    fail("cannot listen on {}:{}: {}", host_, port_, ::gai_strerror(rc));
  std::string why = "no address";
  for (addrinfo* a = found; a != nullptr && listen_fd_ < 0; a = a->ai_next) {
    const int fd = ::socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
    if (fd < 0) continue;
    const int yes = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &yes, sizeof yes);
    if (::bind(fd, a->ai_addr, a->ai_addrlen) == 0 && ::listen(fd, 1024) == 0) {
      listen_fd_ = fd;
    } else {
      why = std::strerror(errno);
      ::close(fd);
    }
  }
  ::freeaddrinfo(found);
  if (listen_fd_ < 0) fail("cannot listen on {}:{}: {}", host_, port_, why);
  sockaddr_storage addr = {};
  socklen_t len = sizeof addr;
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  return ntohs(addr.ss_family == AF_INET6 ? reinterpret_cast<sockaddr_in6*>(&addr)->sin6_port
                                          : reinterpret_cast<sockaddr_in*>(&addr)->sin_port);
}

void HttpListener::serve() {
  while (!stopping_.load()) {
    pollfd p{listen_fd_, POLLIN, 0};
    if (::poll(&p, 1, 100) <= 0) continue;  // wakes every 100 ms to see stop()
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    const timeval idle{k_idle_seconds, 0};
    ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &idle, sizeof idle);
    ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &idle, sizeof idle);
    const int yes = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &yes, sizeof yes);  // stream chunks leave at once
    std::unique_lock lock(mutex_);
    if (sessions_ >= max_connections_) {
      lock.unlock();
      reply_error(fd, 503, "too many open connections");
      ::close(fd);
      continue;
    }
    ++sessions_;
    open_.insert(fd);
    std::thread([this, fd] { session(fd); }).detach();
  }
}

void HttpListener::stop() { stopping_.store(true); }

void HttpListener::close() {
  stopping_.store(true);
  std::unique_lock lock(mutex_);
  // Reads end at once (an idle keep-alive connection sees the end of its stream), while what a session is
  // still writing goes out: a stream's last chunks after the engine answered "shutting down", and its
  // [DONE]. Whatever is still open after the grace period is cut.
  for (int fd : open_) ::shutdown(fd, SHUT_RD);
  if (!sessions_done_.wait_for(lock, k_close_grace, [&] { return sessions_ == 0; })) {
    for (int fd : open_) ::shutdown(fd, SHUT_RDWR);  // blocked writes return at once
    sessions_done_.wait(lock, [&] { return sessions_ == 0; });
  }
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
}

void HttpListener::reply_error(int fd, int status, const std::string& message) {
  const std::string body = error_body_(status, message);
  const std::string text = fmt::format("HTTP/1.1 {} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                                       status, std::string(http::obsolete_reason(static_cast<http::status>(status))), body.size(), body);
  size_t done = 0;
  while (done < text.size()) {
    const ssize_t n = ::send(fd, text.data() + done, text.size() - done, MSG_NOSIGNAL);
    if (n <= 0) break;
    done += static_cast<size_t>(n);
  }
}

void HttpListener::session(int fd) {
  {
    asio::io_context io;
    asio::ip::tcp::socket socket(io);
    sockaddr_storage addr = {};
    socklen_t len = sizeof addr;
    ::getsockname(fd, reinterpret_cast<sockaddr*>(&addr), &len);
    beast::error_code ec;
    socket.assign(addr.ss_family == AF_INET6 ? asio::ip::tcp::v6() : asio::ip::tcp::v4(), fd, ec);
    beast::flat_buffer buffer;
    while (!ec && !stopping_.load()) {
      http::request_parser<http::string_body> parser;
      parser.body_limit(max_body_bytes_);
      parser.header_limit(64 * 1024);
      http::read(socket, buffer, parser, ec);
      if (ec == http::error::end_of_stream || ec == asio::error::eof || ec == asio::error::connection_reset) break;
      if (ec == http::error::body_limit) {
        reply_error(fd, 413, fmt::format("the body is larger than {} bytes", max_body_bytes_));
        break;
      }
      if (ec) {
        if (ec != asio::error::would_block && ec != asio::error::try_again && ec != asio::error::timed_out &&
            ec != asio::error::operation_aborted && ec != asio::error::bad_descriptor && ec != asio::error::not_connected)
          reply_error(fd, 400, fmt::format("malformed HTTP request: {}", ec.message()));
        break;
      }
      const auto& req = parser.get();
      HttpRequest r;
      r.method = std::string(req.method_string());
      const std::string_view target(req.target().data(), req.target().size());
      const size_t q = target.find('?');
      r.path = std::string(target.substr(0, q));
      if (q != std::string_view::npos) r.query = parse_query(target.substr(q + 1));
      if (auto it = req.find(http::field::authorization); it != req.end()) r.authorization = std::string(it->value());
      r.body = req.body();
      HttpResponse res;
      handler_(r, res);
      const bool keep_alive = req.keep_alive();
      if (res.stream) {
        http::response<http::empty_body> head{static_cast<http::status>(res.status), req.version()};
        head.set(http::field::content_type, res.content_type);
        head.set(http::field::cache_control, "no-cache");
        head.chunked(true);
        head.keep_alive(keep_alive);
        http::response_serializer<http::empty_body> serializer{head};
        http::write_header(socket, serializer, ec);
        if (!ec)
          res.stream([&](std::string_view chunk) {
            if (ec) return false;
            asio::write(socket, http::make_chunk(asio::const_buffer(chunk.data(), chunk.size())), ec);
            return !ec;
          });
        if (!ec) asio::write(socket, http::make_chunk_last(), ec);
      } else {
        http::response<http::string_body> out{static_cast<http::status>(res.status), req.version()};
        out.set(http::field::content_type, res.content_type);
        out.body() = std::move(res.body);
        out.keep_alive(keep_alive);
        out.prepare_payload();
        http::write(socket, out, ec);
      }
      if (!keep_alive) break;
    }
    socket.shutdown(asio::ip::tcp::socket::shutdown_both, ec);
    std::lock_guard lock(mutex_);
    open_.erase(fd);  // before the socket closes fd, so close() never shuts down a reused number
  }
  std::lock_guard lock(mutex_);
  --sessions_;
  sessions_done_.notify_all();
}

}  // namespace moescope::server
