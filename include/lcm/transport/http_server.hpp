// A generic HTTP/1.1 server on Boost.Beast, over TCP or TLS: one coroutine per connection,
// limits on message sizes, time and connections, and a graceful stop.
#pragma once

#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/transport/http_message.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/stream_base.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <list>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace lcm::transport {

/// Limits and timeouts of an `http_server`.
struct http_server_options {
    /// The address to listen on. The default is loopback, so only this host can connect.
    std::string address = "127.0.0.1";
    /// The TCP port; 0 lets the system pick a free port, which `local_endpoint()` reports.
    std::uint16_t port = 0;
    /// Maximum number of open connections. Further connections get 503 and are closed.
    std::size_t max_connections = 256;
    /// Maximum size in bytes of a request's start line and header fields.
    std::size_t max_header_size = 8 * 1024;
    /// Maximum size in bytes of a request body. Larger requests get 413.
    std::size_t max_body_size = 64 * 1024;
    /// Maximum time a connection may wait for the first byte of its next request.
    std::chrono::milliseconds idle_timeout{30'000};
    /// Maximum time from the first byte of a request until the whole request has arrived,
    /// so a client that sends slowly is cut off.
    std::chrono::milliseconds request_timeout{10'000};
    /// Maximum time to write one response.
    std::chrono::milliseconds write_timeout{10'000};
    /// Maximum time `run()` lets in-flight requests finish after `stop()` before it closes
    /// their connections.
    std::chrono::milliseconds shutdown_timeout{5'000};
    /// Called once on the server's strand when the server begins to stop, through `stop()`
    /// or a cancelled `run()`. Handlers that hold requests open on purpose, such as
    /// long-polls, use it to end those requests at once, so the stop does not wait for them
    /// until `shutdown_timeout`.
    std::function<void()> on_stop;
    /// When set, every connection starts with a TLS handshake with this context, which must
    /// hold the certificate chain and private key. The handshake must end within
    /// `request_timeout`. Empty serves plain HTTP.
    std::shared_ptr<boost::asio::ssl::context> tls_context;
};

/// Thrown by a request handler to close the connection without sending a response, as a
/// server that crashed or a network that failed would. Tests use it to simulate lost
/// responses.
class connection_dropped : public std::runtime_error {
public:
    connection_dropped() : std::runtime_error("connection dropped by the request handler") {}
};

/// Handles one request. The handler returns a response for errors the client caused,
/// usually from `make_error_response`. The server treats an exception as a bug and responds
/// 500, except `connection_dropped`, which closes the connection without a response.
using request_handler = std::function<boost::asio::awaitable<http_response>(http_request)>;

/// An HTTP/1.1 server that passes every request to one `request_handler`.
///
/// Call `listen()`, then `co_await run()`, which accepts connections until `stop()` and
/// returns after every connection has closed. The acceptor, every connection and every
/// handler call run on one strand of the given executor, so handlers need no locking
/// against each other. The io_context may still run on several threads.
///
/// Thread safety: `stop()`, `connection_count()` and `local_endpoint()` may be called from
/// any thread; `listen()` and `run()` from one caller. The server must outlive `run()`.
/// Logging: starts, stops, rejected connections, timeouts and each request with method,
/// path without the query, status and duration. Header fields and bodies are never logged.
class http_server {
public:
    http_server(boost::asio::any_io_executor executor, http_server_options options, request_handler handler,
                logger log = {})
        : strand_(boost::asio::make_strand(std::move(executor))),
          acceptor_(strand_),
          drained_(strand_),
          options_(std::move(options)),
          handler_(std::move(handler)),
          log_(std::move(log))
    {
    }

    http_server(const http_server&) = delete;
    http_server& operator=(const http_server&) = delete;

    /// Opens, binds and listens on the configured address and port. Fails with the socket
    /// error, for example `address_in_use`, or `errc::invalid_argument` for a malformed address.
    result<void> listen()
    {
        boost::system::error_code error;
        const auto address = boost::asio::ip::make_address(options_.address, error);
        if (error) {
            return errc::invalid_argument;
        }
        const boost::asio::ip::tcp::endpoint endpoint{address, options_.port};
        acceptor_.open(endpoint.protocol(), error);
        if (!error) {
            acceptor_.set_option(boost::asio::socket_base::reuse_address(true), error);
        }
        if (!error) {
            acceptor_.bind(endpoint, error);
        }
        if (!error) {
            acceptor_.listen(boost::asio::socket_base::max_listen_connections, error);
        }
        if (error) {
            log_.error("http server failed to listen", {{"address", options_.address},
                                                        {"port", std::to_string(options_.port)},
                                                        {"error", error.message()}});
            acceptor_.close(error);
            return error;
        }
        endpoint_ = acceptor_.local_endpoint(error);
        return success();
    }

    /// Returns the address and port the server listens on, valid after `listen()` succeeded.
    boost::asio::ip::tcp::endpoint local_endpoint() const { return endpoint_; }

    /// Accepts connections until `stop()`, then waits for in-flight requests up to
    /// `shutdown_timeout`, closes the remaining connections and returns once all have ended.
    /// Awaits on the server's strand. Cancelling `run()` stops the server at once, without
    /// the grace period.
    boost::asio::awaitable<void> run()
    {
        co_await boost::asio::co_spawn(strand_, run_on_strand(), boost::asio::use_awaitable);
    }

    /// Stops accepting, calls `on_stop` and closes idle connections. Requests in flight still
    /// get their response, on a connection that then closes. `run()` returns when all have ended.
    void stop()
    {
        boost::asio::post(strand_, [this] { begin_stop(); });
    }

    /// Returns the number of open connections, those being rejected included.
    std::size_t connection_count() const noexcept { return connection_count_.load(); }

    /// Returns the number of connections accepted since `listen()`, rejected ones included.
    std::uint64_t accepted_connections() const noexcept { return accepted_count_.load(); }

private:
    using tls_stream = boost::beast::ssl_stream<boost::beast::tcp_stream>;

    struct connection {
        connection(boost::asio::ip::tcp::socket socket, std::uint64_t number,
                   const std::shared_ptr<boost::asio::ssl::context>& tls_context)
            : plain(std::move(socket)), id(number)
        {
            if (tls_context) {
                tls.emplace(std::move(plain), *tls_context);
            }
        }

        /// Returns the TCP layer, which carries the timeouts of both kinds of stream.
        boost::beast::tcp_stream& tcp() noexcept { return tls ? tls->next_layer() : plain; }

        /// Cancels every operation of the connection and closes its socket, on the strand.
        void close()
        {
            signal.emit(boost::asio::cancellation_type::terminal);
            boost::system::error_code ignored;
            tcp().socket().close(ignored);
        }

        /// The stream of a plain connection; moved into `tls` for a TLS connection.
        boost::beast::tcp_stream plain;
        std::optional<tls_stream> tls;
        std::uint64_t id;
        boost::asio::cancellation_signal signal;
        /// Whether the connection waits for the first byte of a request, so stop may close it.
        bool idle = false;
    };

    using connection_list = std::list<std::shared_ptr<connection>>;

    boost::asio::awaitable<void> run_on_strand()
    {
        // Cancellation ends the accept loop; the waits below must still run to the end.
        co_await boost::asio::this_coro::throw_if_cancelled(false);
        log_.info("http server started", {{"address", endpoint_.address().to_string()},
                                          {"port", std::to_string(endpoint_.port())},
                                          {"tls", options_.tls_context ? "on" : "off"}});

        const bool cancelled = co_await accept_loop();
        begin_stop();
        if (!cancelled && !connections_.empty()) {
            drained_.expires_after(options_.shutdown_timeout);
            co_await drained_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        }
        if (!connections_.empty()) {
            log_.warning("closing connections that outlived the shutdown timeout",
                         {{"connections", std::to_string(connections_.size())}});
            for (auto& entry : connections_) {
                entry->close();
            }
            drained_.expires_at(std::chrono::steady_clock::time_point::max());
            if (!connections_.empty()) {
                co_await drained_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
            }
        }
        log_.info("http server stopped", {{"port", std::to_string(endpoint_.port())}});
    }

    /// Returns whether the loop ended because `run()` was cancelled, not because of `stop()`.
    boost::asio::awaitable<bool> accept_loop()
    {
        std::uint64_t next_id = 1;
        while (!stopping_) {
            // The socket takes the acceptor's executor, the strand, so every connection runs on it.
            auto [error, socket] = co_await acceptor_.async_accept(boost::asio::as_tuple(boost::asio::use_awaitable));
            if (stopping_) {
                co_return false;
            }
            if (error == boost::asio::error::operation_aborted) {
                co_return true;
            }
            if (error) {
                // Running out of file descriptors fails every accept until a connection
                // closes, so wait a moment instead of spinning.
                log_.error("accepting a connection failed", {{"error", error.message()}});
                boost::asio::steady_timer pause(strand_, std::chrono::milliseconds(50));
                co_await pause.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
                continue;
            }
            spawn_connection(std::move(socket), next_id++);
        }
        co_return false;
    }

    void spawn_connection(boost::asio::ip::tcp::socket socket, std::uint64_t id)
    {
        auto entry = std::make_shared<connection>(std::move(socket), id, options_.tls_context);
        const bool rejected = active_ >= options_.max_connections;
        auto position = connections_.insert(connections_.end(), entry);
        ++connection_count_;
        ++accepted_count_;
        if (!rejected) {
            ++active_;
        }

        auto body = start(*entry, rejected);
        boost::asio::co_spawn(strand_, std::move(body),
                              boost::asio::bind_cancellation_slot(
                                  entry->signal.slot(), [this, entry, position, rejected](std::exception_ptr failure) {
                                      finish_connection(*entry, position, rejected, failure);
                                  }));
    }

    void finish_connection(connection& entry, connection_list::iterator position, bool rejected,
                           std::exception_ptr failure)
    {
        if (failure) {
            try {
                std::rethrow_exception(failure);
            }
            catch (const std::exception& exception) {
                log_.debug("connection ended by exception",
                           {{"connection_id", std::to_string(entry.id)}, {"error", exception.what()}});
            }
        }
        boost::system::error_code ignored;
        entry.tcp().socket().close(ignored);
        connections_.erase(position);
        --connection_count_;
        if (!rejected) {
            --active_;
        }
        if (stopping_ && connections_.empty()) {
            drained_.cancel();
        }
    }

    void begin_stop()
    {
        if (!stopping_) {
            stopping_ = true;
            log_.info("http server stopping", {{"connections", std::to_string(connections_.size())}});
            if (options_.on_stop) {
                options_.on_stop();
            }
        }
        boost::system::error_code ignored;
        acceptor_.close(ignored);
        for (auto& entry : connections_) {
            if (entry->idle) {
                entry->close();
            }
        }
    }

    /// Completes the TLS handshake, if any, then serves or rejects the connection.
    boost::asio::awaitable<void> start(connection& entry, bool rejected)
    {
        // Each call gets its own co_await statement: g++ 12 destroys the awaitable of a
        // conditional expression inside co_await twice.
        if (!entry.tls) {
            if (rejected) {
                co_await reject(entry, entry.plain);
            }
            else {
                co_await serve(entry, entry.plain);
            }
            co_return;
        }
        entry.tcp().expires_after(options_.request_timeout);
        auto [error] = co_await entry.tls->async_handshake(boost::asio::ssl::stream_base::server,
                                                           boost::asio::as_tuple(boost::asio::use_awaitable));
        if (error) {
            log_.info("TLS handshake failed", {{"connection_id", std::to_string(entry.id)}, {"error", error.message()}});
            co_return;
        }
        if (rejected) {
            co_await reject(entry, *entry.tls);
        }
        else {
            co_await serve(entry, *entry.tls);
        }
    }

    /// Answers a connection over the limit with 503 and closes it.
    template <class Stream>
    boost::asio::awaitable<void> reject(connection& entry, Stream& stream)
    {
        log_.warning("connection rejected: too many connections",
                     {{"connection_id", std::to_string(entry.id)},
                      {"max_connections", std::to_string(options_.max_connections)}});
        auto response = make_error_response(errc::unavailable, "too many connections; retry later");
        response.keep_alive(false);
        entry.tcp().expires_after(options_.write_timeout);
        auto [error, written] =
            co_await http::async_write(stream, response, boost::asio::as_tuple(boost::asio::use_awaitable));
        if (!error) {
            co_await close_gracefully(entry, stream);
        }
    }

    template <class Stream>
    boost::asio::awaitable<void> serve(connection& entry, Stream& stream)
    {
        const auto connection_id = std::to_string(entry.id);
        boost::beast::flat_buffer buffer;
        for (;;) {
            if (buffer.size() == 0) {
                if (stopping_) {
                    break;
                }
                entry.idle = true;
                entry.tcp().expires_after(options_.idle_timeout);
                auto [error, received] = co_await stream.async_read_some(
                    buffer.prepare(4096), boost::asio::as_tuple(boost::asio::use_awaitable));
                entry.idle = false;
                if (error) {
                    if (error == boost::beast::error::timeout) {
                        log_.debug("idle connection timed out", {{"connection_id", connection_id}});
                    }
                    break;
                }
                buffer.commit(received);
            }

            http::request_parser<http::string_body> parser;
            parser.header_limit(static_cast<std::uint32_t>(options_.max_header_size));
            parser.body_limit(options_.max_body_size);
            entry.tcp().expires_after(options_.request_timeout);
            auto [read_error, read] =
                co_await http::async_read(stream, buffer, parser, boost::asio::as_tuple(boost::asio::use_awaitable));
            if (read_error) {
                co_await answer_read_error(entry, stream, read_error);
                break;
            }

            const auto started = std::chrono::steady_clock::now();
            auto request = parser.release();
            const auto method = std::string(request.method_string());
            const auto path = path_of(request.target());
            const bool keep_alive = request.keep_alive();
            const auto version = request.version();

            http_response response;
            try {
                response = co_await handler_(std::move(request));
            }
            catch (const connection_dropped&) {
                log_.info("connection dropped by the handler",
                          {{"connection_id", connection_id}, {"method", method}, {"path", path}});
                break;
            }
            catch (const boost::system::system_error& exception) {
                if (exception.code() == boost::asio::error::operation_aborted) {
                    log_.info("request cancelled", {{"connection_id", connection_id}, {"method", method}, {"path", path}});
                    break;
                }
                log_.error("request handler failed", {{"connection_id", connection_id}, {"method", method},
                                                      {"path", path}, {"error", exception.what()}});
                response = make_error_response(boost::system::errc::make_error_code(boost::system::errc::io_error));
            }
            catch (const std::exception& exception) {
                log_.error("request handler failed", {{"connection_id", connection_id}, {"method", method},
                                                      {"path", path}, {"error", exception.what()}});
                response = make_error_response(boost::system::errc::make_error_code(boost::system::errc::io_error));
            }

            response.version(version);
            response.keep_alive(keep_alive && !stopping_);
            response.prepare_payload();
            entry.tcp().expires_after(options_.write_timeout);
            auto [write_error, written] =
                co_await http::async_write(stream, response, boost::asio::as_tuple(boost::asio::use_awaitable));

            const auto elapsed = std::chrono::duration_cast<std::chrono::microseconds>(std::chrono::steady_clock::now() - started);
            log_.info("request", {{"connection_id", connection_id},
                                  {"method", method},
                                  {"path", path},
                                  {"status", std::to_string(response.result_int())},
                                  {"duration_ms", format_milliseconds(elapsed)}});
            if (write_error) {
                log_.debug("writing a response failed", {{"connection_id", connection_id}, {"error", write_error.message()}});
                break;
            }
            if (!response.keep_alive()) {
                co_await close_gracefully(entry, stream);
                break;
            }
        }
    }

    /// Answers a request that could not be read, when the client can still read an answer.
    template <class Stream>
    boost::asio::awaitable<void> answer_read_error(connection& entry, Stream& stream, boost::system::error_code error)
    {
        const auto connection_id = std::to_string(entry.id);
        // A TLS client that closes without close_notify ends the read with stream_truncated.
        if (error == http::error::end_of_stream || error == boost::asio::error::eof ||
            error == boost::asio::error::operation_aborted || error == boost::asio::ssl::error::stream_truncated) {
            co_return;
        }
        if (error == boost::beast::error::timeout) {
            log_.info("request timed out; closing the connection", {{"connection_id", connection_id}});
            co_return;
        }

        http_response response;
        if (error == http::error::body_limit) {
            response = make_error_response(errc::payload_too_large, "request body exceeds " +
                                                                        std::to_string(options_.max_body_size) + " bytes");
        }
        else if (error == http::error::header_limit) {
            // NOTE: 431 would be the precise status, but lcm::http_status is the only mapping
            // from errors to statuses and has no error for it.
            response = make_error_response(errc::payload_too_large, "request header exceeds " +
                                                                        std::to_string(options_.max_header_size) +
                                                                        " bytes");
        }
        else if (error.category() == http::make_error_code(http::error::bad_target).category()) {
            response = make_error_response(errc::invalid_argument, "malformed HTTP request");
        }
        else {
            log_.debug("reading a request failed", {{"connection_id", connection_id}, {"error", error.message()}});
            co_return;
        }
        log_.info("request rejected", {{"connection_id", connection_id},
                                       {"status", std::to_string(response.result_int())},
                                       {"error", error.message()}});
        response.keep_alive(false);
        entry.tcp().expires_after(options_.write_timeout);
        auto [write_error, written] =
            co_await http::async_write(stream, response, boost::asio::as_tuple(boost::asio::use_awaitable));
        if (!write_error) {
            co_await close_gracefully(entry, stream);
        }
    }

    /// Sends FIN and reads what the client still sends, for a bounded time and size, so the
    /// close does not reset the connection before the client has read the response. A TLS
    /// connection first sends close_notify.
    template <class Stream>
    boost::asio::awaitable<void> close_gracefully(connection& entry, Stream& stream)
    {
        const auto linger = std::min(options_.request_timeout, std::chrono::milliseconds(1000));
        if constexpr (std::is_same_v<Stream, tls_stream>) {
            // The client may close first, so any outcome of the TLS shutdown is fine.
            entry.tcp().expires_after(linger);
            co_await stream.async_shutdown(boost::asio::as_tuple(boost::asio::use_awaitable));
        }
        boost::beast::tcp_stream& tcp = entry.tcp();
        boost::system::error_code ignored;
        tcp.socket().shutdown(boost::asio::ip::tcp::socket::shutdown_send, ignored);
        tcp.expires_after(linger);
        std::array<char, 4096> scratch;
        std::size_t drained = 0;
        while (drained <= options_.max_body_size + options_.max_header_size) {
            auto [error, received] =
                co_await tcp.async_read_some(boost::asio::buffer(scratch), boost::asio::as_tuple(boost::asio::use_awaitable));
            if (error) {
                break;
            }
            drained += received;
        }
        tcp.socket().close(ignored);
    }

    /// Returns the path of a request target without its query, which may hold values that
    /// must not be logged.
    static std::string path_of(std::string_view target)
    {
        return std::string(target.substr(0, target.find_first_of("?#")));
    }

    static std::string format_milliseconds(std::chrono::microseconds elapsed)
    {
        const auto count = elapsed.count();
        auto text = std::to_string(count / 1000) + ".";
        const auto fraction = std::to_string(count % 1000);
        text.append(3 - fraction.size(), '0');
        return text + fraction;
    }

    boost::asio::strand<boost::asio::any_io_executor> strand_;
    boost::asio::ip::tcp::acceptor acceptor_;
    /// Expires at the shutdown deadline; cancelled when the last connection ends during a stop.
    boost::asio::steady_timer drained_;
    http_server_options options_;
    request_handler handler_;
    logger log_;
    boost::asio::ip::tcp::endpoint endpoint_;
    connection_list connections_;
    /// Connections counted against `max_connections`, without those being rejected.
    std::size_t active_ = 0;
    std::atomic<std::size_t> connection_count_{0};
    std::atomic<std::uint64_t> accepted_count_{0};
    bool stopping_ = false;
};

} // namespace lcm::transport
