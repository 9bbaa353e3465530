// Helpers of the integration tests: a raw HTTP client, a running server, a one-shot event,
// log capture, and a control plane served over HTTP on 127.0.0.1.
#pragma once

#include <lcm/application/control_plane.hpp>
#include <lcm/application/event_sink.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/memory_repository.hpp>
#include <lcm/testing/run.hpp>
#include <lcm/transport/control_plane_api.hpp>
#include <lcm/transport/http_server.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/json/parse.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <exception>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::test {

namespace asio = boost::asio;
namespace http = boost::beast::http;
using transport::http_request;
using transport::http_response;

// Distinct values, so a test can search every captured log line for them.
inline const std::string admin_token = "admin-Tok3n-5e3f0c2d";
inline const std::string api_key = "internal-K3y-9a7b1e44";
inline const std::string license_token = "LICENSE-token-77f1c0de";

/// Collects every log record as a formatted line. Thread-safe.
class log_capture {
public:
    logger make_logger()
    {
        return logger(log_level::trace, [this](const log_record& record) {
            std::lock_guard lock(mutex_);
            lines_.push_back(format_log_line(record));
        });
    }

    std::vector<std::string> lines() const
    {
        std::lock_guard lock(mutex_);
        return lines_;
    }

    /// Returns the lines that contain `text`.
    std::vector<std::string> lines_with(std::string_view text) const
    {
        std::vector<std::string> found;
        for (auto& line : lines()) {
            if (line.find(text) != std::string::npos) {
                found.push_back(line);
            }
        }
        return found;
    }

private:
    mutable std::mutex mutex_;
    std::vector<std::string> lines_;
};

/// A flag that coroutines can await, set once. Use from one thread.
class event {
public:
    explicit event(asio::any_io_executor executor) : timer_(std::move(executor), asio::steady_timer::time_point::max())
    {
    }

    void set()
    {
        set_ = true;
        timer_.cancel();
    }

    bool is_set() const noexcept { return set_; }

    asio::awaitable<void> wait()
    {
        while (!set_) {
            co_await timer_.async_wait(asio::as_tuple(asio::use_awaitable));
        }
    }

private:
    asio::steady_timer timer_;
    bool set_ = false;
};

/// Opens a connection to 127.0.0.1:port.
inline asio::awaitable<boost::beast::tcp_stream> connect_to(unsigned short port)
{
    boost::beast::tcp_stream stream(co_await asio::this_coro::executor);
    stream.expires_after(std::chrono::seconds(5));
    co_await stream.async_connect(asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), port),
                                  asio::use_awaitable);
    co_return stream;
}

/// Writes a request on an open connection and reads the response.
inline asio::awaitable<http_response> exchange(boost::beast::tcp_stream& stream, http_request request)
{
    request.set(http::field::host, "127.0.0.1");
    request.prepare_payload();
    stream.expires_after(std::chrono::seconds(5));
    co_await http::async_write(stream, request, asio::use_awaitable);
    boost::beast::flat_buffer buffer;
    http_response response;
    co_await http::async_read(stream, buffer, response, asio::use_awaitable);
    co_return response;
}

/// Sends one request on a new connection and returns the response.
inline asio::awaitable<http_response> send(unsigned short port, http_request request)
{
    auto stream = co_await connect_to(port);
    co_return co_await exchange(stream, std::move(request));
}

/// Reads until the server closes the connection and returns the error that ended the read
/// (`eof` or `connection_reset`), or `timed_out` after 5 s.
inline asio::awaitable<boost::system::error_code> read_until_closed(boost::beast::tcp_stream& stream)
{
    stream.expires_after(std::chrono::seconds(5));
    char scratch[1024];
    for (;;) {
        auto [error, received] = co_await stream.async_read_some(asio::buffer(scratch), asio::as_tuple(asio::use_awaitable));
        if (error == boost::beast::error::timeout) {
            co_return asio::error::timed_out;
        }
        if (error) {
            co_return error;
        }
    }
}

enum class credentials { none, admin, internal };

/// Builds a request with the given credentials and, when `body` is not empty, a JSON body.
inline http_request make_request(http::verb method, std::string_view target, credentials who = credentials::admin,
                                 std::string body = {}, std::string_view content_type = "application/json")
{
    http_request request{method, target, 11};
    if (who == credentials::admin) {
        request.set(http::field::authorization, "Bearer " + admin_token);
    }
    else if (who == credentials::internal) {
        request.set("X-API-Key", api_key);
    }
    if (!body.empty() && !content_type.empty()) {
        request.set(http::field::content_type, content_type);
    }
    request.body() = std::move(body);
    return request;
}

inline boost::json::object json_of(const http_response& response)
{
    return boost::json::parse(response.body()).as_object();
}

/// Returns the `code` of an error response.
inline std::string code_of(const http_response& response)
{
    return std::string(json_of(response).at("code").as_string());
}

/// An `http_server` running on the io_context; `stop()` awaits the end of `run()`.
class running_server {
public:
    running_server(asio::io_context& context, transport::http_server_options options,
                   transport::request_handler handler, logger log)
        : server_(context.get_executor(), std::move(options), std::move(handler), std::move(log)),
          stopped_(context.get_executor())
    {
        REQUIRE(server_.listen());
        asio::co_spawn(context, server_.run(), [this](std::exception_ptr failure) {
            failure_ = failure;
            stopped_.set();
        });
    }

    unsigned short port() const { return server_.local_endpoint().port(); }

    transport::http_server& server() noexcept { return server_; }

    asio::awaitable<void> stop()
    {
        server_.stop();
        co_await stopped_.wait();
        if (failure_) {
            std::rethrow_exception(failure_);
        }
    }

    bool stopped() const noexcept { return stopped_.is_set(); }

private:
    transport::http_server server_;
    event stopped_;
    std::exception_ptr failure_;
};

/// Runs a test coroutine under `run_with_timeout` and stops the server afterwards, also when
/// a failed REQUIRE ended the coroutine early, because a running server keeps
/// `io_context::run()` from returning.
inline void run_served(asio::io_context& context, running_server& server, asio::awaitable<void> body,
                       std::chrono::steady_clock::duration timeout = testing::default_test_timeout)
{
    auto guarded = [](running_server& target, asio::awaitable<void> inner) -> asio::awaitable<void> {
        std::exception_ptr failure;
        try {
            co_await std::move(inner);
        }
        catch (...) {
            failure = std::current_exception();
        }
        co_await target.stop();
        if (failure) {
            std::rethrow_exception(failure);
        }
    };
    testing::run_with_timeout(context, guarded(server, std::move(body)), timeout);
}

using repository_type = storage::memory_repository;
using sink_type = application::memory_event_sink;
using plane_type = application::control_plane<repository_type, sink_type>;
using api_type = transport::control_plane_api<repository_type, sink_type>;

inline transport::control_plane_api_options test_api_options()
{
    transport::control_plane_api_options options;
    options.admin_token = secret(admin_token);
    options.api_key = secret(api_key);
    options.metrics_text = [] { return std::string("# TYPE lcm_test_total counter\nlcm_test_total 3\n"); };
    return options;
}

/// A control plane on an in-memory repository, served over HTTP on 127.0.0.1.
struct served_control_plane {
    explicit served_control_plane(transport::http_server_options server_options = {},
                                  transport::control_plane_api_options api_options = test_api_options(),
                                  application::control_plane_options plane_options = {})
        : plane(repository, sink, logs.make_logger(), std::move(plane_options)),
          api(plane, std::move(api_options), logs.make_logger()),
          server(context, std::move(server_options), api.handler(), logs.make_logger())
    {
    }

    /// Adds a running worker directly through the control plane.
    asio::awaitable<void> add_worker(std::string id)
    {
        application::add_worker_request request{std::move(id), "lab", "https://127.0.0.1:9443",
                                                domain::worker_status::running, "test"};
        auto added = co_await plane.add_worker(std::move(request));
        REQUIRE(added);
    }

    asio::io_context context;
    log_capture logs;
    repository_type repository;
    sink_type sink;
    plane_type plane;
    api_type api;
    running_server server;
};

} // namespace lcm::test
