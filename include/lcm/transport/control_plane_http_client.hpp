// A worker-controller's client of the control plane's internal HTTP API.
#pragma once

#include <lcm/controller/control_plane_client.hpp>
#include <lcm/domain/license.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/transport/detail/wire.hpp>
#include <lcm/transport/http_message.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/url/url.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lcm::transport {

/// Address, credentials, timeouts and limits of `control_plane_http_client`.
struct control_plane_http_client_options {
    /// Host name or address of the control plane. The default is loopback.
    std::string host = "127.0.0.1";
    std::uint16_t port = 0;
    /// The key sent as `X-API-Key`.
    secret api_key;
    /// Maximum time to resolve the host and open a connection.
    std::chrono::milliseconds connect_timeout{2'000};
    /// Maximum time of one attempt: writing the request and reading the whole response.
    std::chrono::milliseconds request_timeout{10'000};
    /// Maximum time of one call, every attempt and backoff included. A change-feed call
    /// gets its wait time on top.
    std::chrono::milliseconds total_timeout{30'000};
    /// Maximum number of attempts of one call. Connection errors, timeouts and 5xx responses
    /// are retried; the internal API's steps are idempotent, so a repeat is safe.
    int max_attempts = 4;
    /// The wait before the second attempt; it doubles for each further attempt.
    std::chrono::milliseconds initial_backoff{50};
    /// Maximum wait between two attempts.
    std::chrono::milliseconds max_backoff{1'000};
    /// Maximum size in bytes of a response body; a larger one is `errc::protocol_error`.
    std::size_t max_response_size = 4 * 1024 * 1024;
    /// Maximum size in bytes of a response's status line and header fields.
    std::size_t max_header_size = 16 * 1024;
    /// How long one change-feed request waits on the server (`timeout_ms`). It must not
    /// exceed the server's `max_change_wait`.
    std::chrono::milliseconds change_wait{25'000};
    /// Maximum number of idle keep-alive connections kept for reuse.
    std::size_t max_idle_connections = 4;
};

/// Calls the control plane's internal API over HTTP/1.1 and models
/// `lcm::controller::control_plane_client`.
///
/// Connections are kept alive and reused; a reused connection that the server closed in
/// the meantime is replaced once without counting as an attempt. Every network call has a
/// timeout, and failed attempts back off exponentially up to `max_backoff`. Errors that the
/// server answered with `{"code", ...}` come back as the same `lcm::errc`, for example
/// `errc::stale_operation`; exhausted retries return the last error, `errc::unavailable` or
/// `errc::timeout`.
///
/// Thread safety: every member may be called concurrently; each call uses a connection of
/// its own. Cancellation: every call supports terminal cancellation of the awaiting
/// coroutine and then returns `errc::cancelled`. The API key is sent only in its header
/// and never logged.
class control_plane_http_client {
public:
    control_plane_http_client(boost::asio::any_io_executor executor, control_plane_http_client_options options,
                              logger log = {})
        : executor_(std::move(executor)), options_(std::move(options)), log_(std::move(log))
    {
    }

    control_plane_http_client(const control_plane_http_client&) = delete;
    control_plane_http_client& operator=(const control_plane_http_client&) = delete;

    /// Returns the tasks of up to `limit` workers with a pending operation, oldest request first.
    boost::asio::awaitable<result<std::vector<controller::license_task>>> list_pending(std::size_t limit)
    {
        auto target = make_target({"api", "internal", "license-tasks"}, {{"limit", std::to_string(limit)}});
        BOOST_OUTCOME_CO_TRY(auto body, co_await call(http::verb::get, std::move(target), std::nullopt));
        const auto* tasks = body.is_object() ? body.get_object().if_contains("tasks") : nullptr;
        if (!tasks || !tasks->is_array()) {
            co_return errc::protocol_error;
        }
        std::vector<controller::license_task> decoded;
        for (const auto& item : tasks->get_array()) {
            BOOST_OUTCOME_CO_TRY(auto task, detail::decode_task(item));
            decoded.push_back(std::move(task));
        }
        co_return decoded;
    }

    /// Returns the worker's pending task, or nothing; `errc::not_found` for an unknown worker.
    boost::asio::awaitable<result<std::optional<controller::license_task>>> get_task(std::string_view worker_id)
    {
        auto target = make_target({"api", "internal", "workers", worker_id, "license-task"});
        BOOST_OUTCOME_CO_TRY(auto body, co_await call(http::verb::get, std::move(target), std::nullopt));
        const auto* task = body.is_object() ? body.get_object().if_contains("task") : nullptr;
        if (!task) {
            co_return errc::protocol_error;
        }
        if (task->is_null()) {
            co_return std::optional<controller::license_task>{};
        }
        BOOST_OUTCOME_CO_TRY(auto decoded, detail::decode_task(*task));
        co_return std::optional<controller::license_task>(std::move(decoded));
    }

    /// Claims the worker's pending operation for `holder` for `lease`, or renews the holder's
    /// claim. The lease is sent in seconds with millisecond precision.
    boost::asio::awaitable<result<controller::license_claim>> claim(std::string_view worker_id, std::string_view holder,
                                                                    std::chrono::milliseconds lease)
    {
        auto target = make_target({"api", "internal", "workers", worker_id, "license", "claim"});
        boost::json::value body = boost::json::object{{"holder", holder},
                                                      {"lease_seconds", static_cast<double>(lease.count()) / 1000.0}};
        boost::json::value error_body;
        const std::chrono::milliseconds no_extra_wait{0};
        auto answer = co_await call(http::verb::post, std::move(target), std::move(body), no_extra_wait, &error_body);
        if (!answer && answer.error() == errc::claimed) {
            co_return detail::decode_foreign_claim(error_body);
        }
        if (!answer) {
            co_return answer.error();
        }
        const auto* task = answer.value().is_object() ? answer.value().get_object().if_contains("task") : nullptr;
        if (!task) {
            co_return errc::protocol_error;
        }
        BOOST_OUTCOME_CO_TRY(auto decoded, detail::decode_task(*task));
        domain::detail::json_reader reader(answer.value());
        controller::license_claim claim;
        claim.remaining = std::chrono::milliseconds(reader.integer("claim_remaining_ms"));
        if (reader.failed() || !decoded.claim_expires_at) {
            co_return errc::protocol_error;
        }
        claim.holder = decoded.claim_holder;
        claim.expires_at = *decoded.claim_expires_at;
        decoded.claim_remaining = claim.remaining;
        claim.task = std::move(decoded);
        co_return claim;
    }

    boost::asio::awaitable<result<void>> start(std::string_view worker_id, domain::operation_key key)
    {
        boost::json::object body;
        co_return co_await report(worker_id, key, "start", std::move(body));
    }

    boost::asio::awaitable<result<void>> complete_registration(std::string_view worker_id, domain::operation_key key,
                                                               domain::registration_details details)
    {
        auto body = detail::encode_details(details);
        co_return co_await report(worker_id, key, "complete-registration", std::move(body));
    }

    boost::asio::awaitable<result<void>> complete_deregistration(std::string_view worker_id, domain::operation_key key,
                                                                 std::optional<std::string> warning)
    {
        boost::json::object body{
            {"warning", warning ? boost::json::value(std::move(*warning)) : boost::json::value(nullptr)}};
        co_return co_await report(worker_id, key, "complete-deregistration", std::move(body));
    }

    /// Reports the failure of an operation. `message` may quote CML's text; the control
    /// plane stores it with tokens redacted.
    boost::asio::awaitable<result<void>> fail(std::string_view worker_id, domain::operation_key key,
                                              std::string error_code, std::string message)
    {
        boost::json::object body{{"code", std::move(error_code)}, {"message", std::move(message)}};
        co_return co_await report(worker_id, key, "fail", std::move(body));
    }

    /// Returns the control plane's current change sequence.
    boost::asio::awaitable<result<std::uint64_t>> change_sequence()
    {
        auto target = make_target({"api", "internal", "changes"});
        BOOST_OUTCOME_CO_TRY(auto body, co_await call(http::verb::get, std::move(target), std::nullopt));
        co_return sequence_of(body);
    }

    /// Waits until the change sequence differs from `after` and returns it. Each long-poll
    /// request waits at most `change_wait` on the server and is repeated until a change
    /// arrives, so the whole wait is unbounded unless cancelled. A sequence below `after`
    /// (the control plane restarted with an empty store) is returned too.
    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        for (;;) {
            auto target = make_target({"api", "internal", "changes"},
                                      {{"after", std::to_string(after)},
                                       {"timeout_ms", std::to_string(options_.change_wait.count())}});
            BOOST_OUTCOME_CO_TRY(auto body, co_await call(http::verb::get, std::move(target), std::nullopt,
                                                          options_.change_wait));
            BOOST_OUTCOME_CO_TRY(auto sequence, sequence_of(body));
            if (sequence != after) {
                co_return sequence;
            }
        }
    }

    /// Closes the idle connections. Calls in flight keep theirs.
    void close_idle_connections()
    {
        std::lock_guard lock(mutex_);
        idle_.clear();
    }

private:
    using connection = boost::beast::tcp_stream;

    static std::string make_target(std::initializer_list<std::string_view> segments,
                                   std::initializer_list<std::pair<std::string_view, std::string>> query = {})
    {
        boost::urls::url target;
        target.set_path_absolute(true);
        for (auto segment : segments) {
            target.segments().push_back(segment);
        }
        for (const auto& [name, value] : query) {
            target.params().append({name, value});
        }
        return std::string(target.buffer());
    }

    static result<std::uint64_t> sequence_of(const boost::json::value& body)
    {
        const auto* sequence = body.is_object() ? body.get_object().if_contains("sequence") : nullptr;
        if (!sequence || !sequence->is_number()) {
            return errc::protocol_error;
        }
        boost::system::error_code error;
        auto value = sequence->to_number<std::uint64_t>(error);
        if (error) {
            return errc::protocol_error;
        }
        return value;
    }

    /// Posts a step report. The body carries the fence of `key` besides the step's own fields.
    boost::asio::awaitable<result<void>> report(std::string_view worker_id, domain::operation_key key,
                                                std::string_view step, boost::json::object fields)
    {
        auto target = make_target(
            {"api", "internal", "workers", worker_id, "operations", std::to_string(key.operation_id), step});
        fields["fence"] = key.fence;
        std::optional<boost::json::value> body(std::move(fields));
        BOOST_OUTCOME_CO_TRY(co_await call(http::verb::post, std::move(target), std::move(body)));
        co_return success();
    }

    /// Sends one request with retries and returns the parsed body of a 2xx response.
    /// `extra_wait` is added to the timeouts for requests the server holds on purpose.
    /// `error_body`, when given, receives the parsed body of a 4xx response.
    boost::asio::awaitable<result<boost::json::value>> call(http::verb method, std::string target,
                                                            std::optional<boost::json::value> body,
                                                            std::chrono::milliseconds extra_wait = {},
                                                            boost::json::value* error_body = nullptr)
    {
        try {
            co_return co_await call_with_retries(method, std::move(target), std::move(body), extra_wait, error_body);
        }
        catch (const boost::system::system_error& exception) {
            // After a cancellation, awaiting anything throws operation_aborted.
            if (exception.code() != boost::asio::error::operation_aborted) {
                throw;
            }
        }
        co_return errc::cancelled;
    }

    boost::asio::awaitable<result<boost::json::value>> call_with_retries(http::verb method, std::string target,
                                                                         std::optional<boost::json::value> body,
                                                                         std::chrono::milliseconds extra_wait,
                                                                         boost::json::value* error_body)
    {
        http_request request{method, target, 11};
        request.set(http::field::host, options_.host + ":" + std::to_string(options_.port));
        request.set(http::field::user_agent, "lcm-control-plane-client");
        request.set(http::field::accept, json_content_type);
        request.set("X-API-Key", options_.api_key.reveal());
        if (body) {
            request.set(http::field::content_type, json_content_type);
            request.body() = boost::json::serialize(*body);
        }
        request.prepare_payload();

        const std::string path = target.substr(0, target.find('?'));
        const auto deadline = std::chrono::steady_clock::now() + options_.total_timeout + extra_wait;
        boost::system::error_code last_error = errc::unavailable;
        for (int attempt = 1;; ++attempt) {
            auto exchanged = co_await exchange(request, deadline, extra_wait);
            if (exchanged) {
                const auto& response = exchanged.value();
                if (response.result_int() < 300) {
                    boost::system::error_code parse_error;
                    auto value = boost::json::parse(response.body(), parse_error);
                    if (parse_error) {
                        co_return errc::protocol_error;
                    }
                    co_return value;
                }
                last_error = error_of(response);
                if (response.result_int() < 500) {
                    if (error_body) {
                        boost::system::error_code parse_error;
                        *error_body = boost::json::parse(response.body(), parse_error);
                    }
                    co_return last_error;
                }
            }
            else {
                last_error = exchanged.error();
                if (last_error != errc::unavailable && last_error != errc::timeout) {
                    co_return last_error;
                }
            }

            const auto backoff = std::min<std::chrono::milliseconds>(
                options_.initial_backoff * (std::int64_t{1} << std::min(attempt - 1, 20)), options_.max_backoff);
            if (attempt >= options_.max_attempts || std::chrono::steady_clock::now() + backoff >= deadline) {
                log_.warning("control plane request failed", {{"method", std::string(http::to_string(method))},
                                                              {"path", std::string(path)},
                                                              {"attempts", std::to_string(attempt)},
                                                              {"error", last_error.message()}});
                co_return last_error;
            }
            log_.info("control plane request failed; retrying", {{"method", std::string(http::to_string(method))},
                                                                 {"path", std::string(path)},
                                                                 {"attempt", std::to_string(attempt)},
                                                                 {"backoff_ms", std::to_string(backoff.count())},
                                                                 {"error", last_error.message()}});
            boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, backoff);
            auto [wait_error] = co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
            if (wait_error) {
                co_return errc::cancelled;
            }
        }
    }

    /// Maps an error response to the `lcm::errc` its body names, or else to one for its status.
    static boost::system::error_code error_of(const http_response& response)
    {
        boost::system::error_code parse_error;
        auto body = boost::json::parse(response.body(), parse_error);
        if (!parse_error && body.is_object()) {
            if (const auto* code = body.get_object().if_contains("code"); code && code->is_string()) {
                if (auto known = detail::errc_from_name(code->get_string())) {
                    return *known;
                }
            }
        }
        switch (response.result_int()) {
        case 401: return errc::unauthorized;
        case 403: return errc::forbidden;
        case 404: return errc::not_found;
        case 413: return errc::payload_too_large;
        case 415: return errc::unsupported_media_type;
        default: break;
        }
        return response.result_int() >= 500 ? make_error_code(errc::unavailable) : make_error_code(errc::protocol_error);
    }

    /// Performs one attempt: takes or opens a connection, writes, reads. Returns the
    /// response, whatever its status, or `unavailable`, `timeout`, `protocol_error` or `cancelled`.
    boost::asio::awaitable<result<http_response>> exchange(const http_request& request,
                                                           std::chrono::steady_clock::time_point deadline,
                                                           std::chrono::milliseconds extra_wait)
    {
        for (;;) {
            auto stream = take_idle();
            const bool reused = stream != nullptr;
            if (!stream) {
                BOOST_OUTCOME_CO_TRY(stream, co_await connect(deadline));
            }

            const auto remaining = std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
            if (remaining.count() <= 0) {
                co_return errc::timeout;
            }
            stream->expires_after(std::min(options_.request_timeout + extra_wait, remaining));
            auto [write_error, written] =
                co_await http::async_write(*stream, request, boost::asio::as_tuple(boost::asio::use_awaitable));

            http::response_parser<http::string_body> parser;
            parser.header_limit(static_cast<std::uint32_t>(options_.max_header_size));
            parser.body_limit(options_.max_response_size);
            boost::beast::flat_buffer buffer;
            boost::system::error_code read_error = write_error;
            if (!write_error) {
                auto [error, read] = co_await http::async_read(*stream, buffer, parser,
                                                               boost::asio::as_tuple(boost::asio::use_awaitable));
                read_error = error;
            }

            if (read_error) {
                // A kept-alive connection may have been closed by the server's idle timeout
                // just before this request; a fresh connection gets one more try.
                if (reused && is_closed_by_peer(read_error) && !parser.got_some()) {
                    continue;
                }
                co_return map_network_error(read_error);
            }

            auto response = parser.release();
            if (response.keep_alive()) {
                put_idle(std::move(stream));
            }
            co_return response;
        }
    }

    boost::asio::awaitable<result<std::unique_ptr<connection>>> connect(std::chrono::steady_clock::time_point deadline)
    {
        const auto remaining =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        const auto timeout = std::min(options_.connect_timeout, remaining);
        if (timeout.count() <= 0) {
            co_return errc::timeout;
        }

        std::vector<boost::asio::ip::tcp::endpoint> endpoints;
        boost::system::error_code error;
        const auto address = boost::asio::ip::make_address(options_.host, error);
        if (!error) {
            endpoints.emplace_back(address, options_.port);
        }
        else {
            BOOST_OUTCOME_CO_TRY(endpoints, co_await resolve(timeout));
        }

        auto stream = std::make_unique<connection>(executor_);
        stream->expires_after(timeout);
        auto [connect_error, endpoint] =
            co_await stream->async_connect(endpoints, boost::asio::as_tuple(boost::asio::use_awaitable));
        if (connect_error) {
            co_return map_network_error(connect_error);
        }
        stream->socket().set_option(boost::asio::ip::tcp::no_delay(true), error);
        co_return stream;
    }

    /// Resolves the host name, giving up after `timeout`.
    boost::asio::awaitable<result<std::vector<boost::asio::ip::tcp::endpoint>>> resolve(std::chrono::milliseconds timeout)
    {
        boost::asio::ip::tcp::resolver resolver(executor_);
        boost::asio::steady_timer timer(executor_, timeout);
        auto [order, resolve_error, results, timer_error] =
            co_await boost::asio::experimental::make_parallel_group(
                resolver.async_resolve(options_.host, std::to_string(options_.port), boost::asio::deferred),
                timer.async_wait(boost::asio::deferred))
                .async_wait(boost::asio::experimental::wait_for_one(), boost::asio::use_awaitable);
        if (order[0] == 1) {
            co_return errc::timeout;
        }
        if (resolve_error) {
            co_return map_network_error(resolve_error);
        }
        std::vector<boost::asio::ip::tcp::endpoint> endpoints;
        for (const auto& entry : results) {
            endpoints.push_back(entry.endpoint());
        }
        co_return endpoints;
    }

    static bool is_closed_by_peer(const boost::system::error_code& error) noexcept
    {
        return error == http::error::end_of_stream || error == boost::asio::error::eof ||
               error == boost::asio::error::connection_reset || error == boost::asio::error::broken_pipe;
    }

    static boost::system::error_code map_network_error(const boost::system::error_code& error) noexcept
    {
        if (error == boost::beast::error::timeout) {
            return errc::timeout;
        }
        if (error == boost::asio::error::operation_aborted) {
            return errc::cancelled;
        }
        if (is_closed_by_peer(error)) {
            return errc::unavailable;
        }
        if (error == http::error::body_limit || error == http::error::header_limit ||
            error.category() == http::make_error_code(http::error::bad_version).category()) {
            return errc::protocol_error;
        }
        return errc::unavailable;
    }

    std::unique_ptr<connection> take_idle()
    {
        std::lock_guard lock(mutex_);
        if (idle_.empty()) {
            return nullptr;
        }
        auto stream = std::move(idle_.back());
        idle_.pop_back();
        return stream;
    }

    void put_idle(std::unique_ptr<connection> stream)
    {
        std::lock_guard lock(mutex_);
        if (idle_.size() < options_.max_idle_connections) {
            idle_.push_back(std::move(stream));
        }
    }

    boost::asio::any_io_executor executor_;
    control_plane_http_client_options options_;
    logger log_;
    std::mutex mutex_;
    std::vector<std::unique_ptr<connection>> idle_;
};

static_assert(controller::control_plane_client<control_plane_http_client>);

} // namespace lcm::transport
