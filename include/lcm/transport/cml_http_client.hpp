// A client of CML's authentication and licensing REST API over HTTP or HTTPS.
#pragma once

#include <lcm/controller/cml_client.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/transport/cml_json.hpp>
#include <lcm/transport/detail/cml_connection.hpp>
#include <lcm/transport/http_message.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/ssl/context.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/ssl/host_name_verification.hpp>
#include <boost/asio/ssl/stream_base.hpp>
#include <boost/asio/ssl/verify_mode.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/beast/core/error.hpp>
#include <boost/beast/core/flat_buffer.hpp>
#include <boost/beast/http/error.hpp>
#include <boost/beast/http/parser.hpp>
#include <boost/beast/http/read.hpp>
#include <boost/beast/http/write.hpp>

#include <openssl/ssl.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lcm::transport {

/// Credentials, TLS settings, timeouts and limits of `cml_http_client`.
struct cml_http_client_options {
    /// The CML user the client logs in as on every host. The password is sent only in the
    /// body of `POST /authenticate`.
    cml_credentials credentials;
    /// A PEM file of the certificate authorities that sign the CML hosts' certificates.
    /// Empty uses the system's default store.
    std::string ca_file;
    /// Skips certificate and host name verification of HTTPS hosts, for lab hosts with
    /// self-signed certificates. The client logs a warning once per host. Anyone on the
    /// network path can then read the CML password and the license tokens.
    bool insecure_skip_tls_verify = false;
    /// Maximum time to resolve the host, connect and finish the TLS handshake.
    std::chrono::milliseconds connect_timeout{5'000};
    /// Maximum time to write one request and read its whole response.
    std::chrono::milliseconds request_timeout{30'000};
    /// Maximum time of one call, including the login before it and the login and repeat
    /// after a 401.
    std::chrono::milliseconds total_timeout{60'000};
    /// Maximum size in bytes of a response body; a larger one is `errc::protocol_error`.
    std::size_t max_response_size = 1024 * 1024;
    /// Maximum size in bytes of a response's status line and header fields.
    std::size_t max_header_size = 16 * 1024;
    /// Maximum number of idle keep-alive connections kept per host.
    std::size_t max_idle_connections_per_host = 2;
    /// Maximum time an idle connection is kept for reuse. Keep it below the hosts' own
    /// keep-alive timeout, so the client rarely picks a connection the host has closed.
    std::chrono::milliseconds max_idle_time{20'000};
    std::string user_agent = "lcm-cml-client";
};

/// Calls the CML REST API of many hosts over HTTP/1.1 or HTTPS and models `lcm::cml_client`.
///
/// An endpoint's base URL is `http://` or `https://` with a host, an optional port and an
/// optional path prefix; calls go to `<base>/api/v0/...`. A URL with user information, a
/// query or a fragment fails with `invalid_argument`. HTTPS verifies the certificate chain
/// and the host name, and sends SNI for host names, unless `insecure_skip_tls_verify` is set.
///
/// The client caches one bearer token per base URL and user, logs in when it has none, and
/// after a 401 logs in again once and repeats the call once. Statuses map through
/// `map_cml_status`. A host that cannot be reached, including a failed TLS handshake, is
/// `unavailable`; an exceeded timeout is `timeout`; a response over the size limits or a
/// body that breaks the contract is `protocol_error`. Idle keep-alive connections are
/// reused per host; a reused connection that the host closed meanwhile is replaced once.
///
/// Thread safety: every member may be called concurrently; each call uses a connection of
/// its own. Cancellation: every call supports terminal cancellation of the awaiting
/// coroutine and then returns `errc::cancelled`. Logging: logins, re-logins, failed calls
/// and TLS failures with the host's origin and base URL. The password, bearer tokens and
/// license tokens are never logged; CML's error text is logged with the license token
/// redacted.
class cml_http_client {
public:
    /// Creates the client and its TLS context. Throws `boost::system::system_error` when
    /// `ca_file` cannot be read.
    cml_http_client(boost::asio::any_io_executor executor, cml_http_client_options options, logger log = {})
        : executor_(std::move(executor)),
          options_(std::move(options)),
          log_(std::move(log)),
          tls_context_(boost::asio::ssl::context::tls_client),
          pool_(options_.max_idle_connections_per_host, options_.max_idle_time)
    {
        tls_context_.set_options(boost::asio::ssl::context::default_workarounds | boost::asio::ssl::context::no_sslv2 |
                                 boost::asio::ssl::context::no_sslv3 | boost::asio::ssl::context::no_tlsv1 |
                                 boost::asio::ssl::context::no_tlsv1_1);
        if (options_.ca_file.empty()) {
            tls_context_.set_default_verify_paths();
        }
        else {
            tls_context_.load_verify_file(options_.ca_file);
        }
    }

    cml_http_client(const cml_http_client&) = delete;
    cml_http_client& operator=(const cml_http_client&) = delete;

    /// Logs in to the host and caches the new bearer token in place of the old one.
    boost::asio::awaitable<result<void>> authenticate(const cml_endpoint& endpoint)
    {
        try {
            BOOST_OUTCOME_CO_TRY(auto base, parse_endpoint(endpoint));
            const auto deadline = std::chrono::steady_clock::now() + options_.total_timeout;
            BOOST_OUTCOME_CO_TRY(co_await log_in(endpoint, base, deadline));
            co_return success();
        }
        catch (const boost::system::system_error& exception) {
            rethrow_unless_cancelled(exception);
        }
        co_return make_error_code(errc::cancelled);
    }

    /// Reads `GET /licensing`. Unknown fields are ignored and timestamps may be ISO 8601 or
    /// CML's `2026-08-20 17:25:30`; a body that is not a JSON object is `protocol_error`.
    boost::asio::awaitable<result<cml_licensing_status>> get_licensing_status(const cml_endpoint& endpoint)
    {
        BOOST_OUTCOME_CO_TRY(auto reply, co_await call(endpoint, cml_call::get_licensing_status, {}));
        if (auto mapped = map_cml_status(cml_call::get_licensing_status, reply.result_int()); !mapped) {
            log_failure(endpoint, cml_call::get_licensing_status, reply, mapped.error(), nullptr);
            co_return mapped.error();
        }
        auto status = decode_licensing_status(reply.body());
        if (!status) {
            log_.warning("CML sent a licensing status that is not a JSON object",
                         {{"endpoint", endpoint.base_url}, {"bytes", std::to_string(reply.body().size())}});
        }
        co_return status;
    }

    /// Posts a registration. CML 2.9 accepts it with 204, and 2.11 and later with 200 or
    /// 202 and a body. Success means only that CML accepted the request, because the
    /// outcome shows later in the licensing status.
    boost::asio::awaitable<result<void>> register_license(const cml_endpoint& endpoint, const secret& token,
                                                          bool reregister)
    {
        auto body = encode_registration_request(token, reregister);
        BOOST_OUTCOME_CO_TRY(auto reply, co_await call(endpoint, cml_call::register_license, std::move(body)));
        if (auto mapped = map_cml_status(cml_call::register_license, reply.result_int()); !mapped) {
            log_failure(endpoint, cml_call::register_license, reply, mapped.error(), &token);
            co_return mapped.error();
        }
        co_return success();
    }

    /// Sends `DELETE /licensing/deregistration`: 204 or 200 is `deregistered`, 202
    /// `deregistered_locally` (logged as a warning), 400 `already_deregistered`.
    boost::asio::awaitable<result<cml_deregistration_outcome>> deregister_license(const cml_endpoint& endpoint)
    {
        BOOST_OUTCOME_CO_TRY(auto reply, co_await call(endpoint, cml_call::deregister_license, {}));
        auto mapped = map_cml_status(cml_call::deregister_license, reply.result_int());
        if (!mapped) {
            log_failure(endpoint, cml_call::deregister_license, reply, mapped.error(), nullptr);
            co_return mapped.error();
        }
        co_return deregistration_outcome_of(mapped.value(), endpoint, log_);
    }

    /// Closes the idle connections. Calls in flight keep theirs.
    void close_idle_connections() { pool_.clear(); }

private:
    using tls_stream = boost::beast::ssl_stream<boost::beast::tcp_stream>;
    using time_point = std::chrono::steady_clock::time_point;

    /// Rethrows the exception being handled unless it reports a cancellation.
    static void rethrow_unless_cancelled(const boost::system::system_error& exception)
    {
        // After a cancellation, awaiting anything throws operation_aborted.
        if (exception.code() != boost::asio::error::operation_aborted) {
            throw;
        }
    }

    result<detail::cml_base_url> parse_endpoint(const cml_endpoint& endpoint) const
    {
        auto base = detail::parse_cml_base_url(endpoint.base_url);
        if (!base) {
            log_.error("CML base URL is invalid; expected http(s)://host[:port][/path] without credentials",
                       {{"endpoint", endpoint.base_url}});
        }
        return base;
    }

    static std::string path_of(cml_call call)
    {
        switch (call) {
        case cml_call::authenticate: return "/api/v0/authenticate";
        case cml_call::get_licensing_status: return "/api/v0/licensing";
        case cml_call::register_license: return "/api/v0/licensing/registration";
        case cml_call::deregister_license: return "/api/v0/licensing/deregistration";
        }
        return {};
    }

    static http::verb method_of(cml_call call)
    {
        switch (call) {
        case cml_call::get_licensing_status: return http::verb::get;
        case cml_call::deregister_license: return http::verb::delete_;
        default: return http::verb::post;
        }
    }

    http_request make_request(const detail::cml_base_url& base, cml_call call, std::string body) const
    {
        http_request request{method_of(call), base.path + path_of(call), 11};
        request.set(http::field::host, base.host_field);
        request.set(http::field::user_agent, options_.user_agent);
        request.set(http::field::accept, json_content_type);
        if (!body.empty()) {
            request.set(http::field::content_type, json_content_type);
            request.body() = std::move(body);
        }
        request.prepare_payload();
        return request;
    }

    // ---------------------------------------------------------------------------------
    // Bearer tokens

    std::string session_key(const cml_endpoint& endpoint) const
    {
        return options_.credentials.username + '\n' + endpoint.base_url;
    }

    std::optional<secret> cached_bearer(const cml_endpoint& endpoint) const
    {
        std::lock_guard lock(mutex_);
        auto found = bearers_.find(session_key(endpoint));
        if (found == bearers_.end()) {
            return std::nullopt;
        }
        return found->second;
    }

    void store_bearer(const cml_endpoint& endpoint, std::optional<secret> bearer)
    {
        std::lock_guard lock(mutex_);
        if (bearer) {
            bearers_.insert_or_assign(session_key(endpoint), std::move(*bearer));
        }
        else {
            bearers_.erase(session_key(endpoint));
        }
    }

    /// Logs in, caches the bearer token and returns it. A failed login drops the cached token.
    boost::asio::awaitable<result<secret>> log_in(const cml_endpoint& endpoint, const detail::cml_base_url& base,
                                                  time_point deadline)
    {
        store_bearer(endpoint, std::nullopt);
        auto request = make_request(base, cml_call::authenticate, encode_authenticate_request(options_.credentials));
        auto reply = co_await send(base, request, deadline);
        if (!reply) {
            const auto level = reply.error() == errc::cancelled ? log_level::debug : log_level::warning;
            log_.log(level, "CML login failed", {{"host", base.origin},
                                                 {"endpoint", endpoint.base_url},
                                                 {"error", reply.error().message()}});
            co_return reply.error();
        }

        const int status = reply.value().result_int();
        if (auto mapped = map_cml_status(cml_call::authenticate, status); !mapped) {
            // The error text of a rejected login may echo the request, so it is not logged.
            log_.warning("CML login failed", {{"host", base.origin},
                                              {"endpoint", endpoint.base_url},
                                              {"status", std::to_string(status)},
                                              {"error", mapped.error().message()}});
            co_return mapped.error();
        }
        auto bearer = decode_authenticate_response(reply.value().body());
        if (!bearer) {
            log_.warning("CML login returned no bearer token", {{"host", base.origin}, {"endpoint", endpoint.base_url}});
            co_return bearer.error();
        }
        log_.debug("logged in to CML", {{"host", base.origin},
                                        {"endpoint", endpoint.base_url},
                                        {"username", options_.credentials.username}});
        store_bearer(endpoint, bearer.value());
        co_return std::move(bearer).value();
    }

    // ---------------------------------------------------------------------------------
    // Calls

    /// Sends one licensing call with the cached bearer token, logging in first when there is
    /// none, and once more after a 401. Returns the response whatever its status, except a
    /// second 401, which is `unauthorized`.
    boost::asio::awaitable<result<http_response>> call(const cml_endpoint& endpoint, cml_call call, std::string body)
    {
        try {
            BOOST_OUTCOME_CO_TRY(auto base, parse_endpoint(endpoint));
            const auto deadline = std::chrono::steady_clock::now() + options_.total_timeout;
            auto request = make_request(base, call, std::move(body));

            auto bearer = cached_bearer(endpoint);
            if (!bearer) {
                BOOST_OUTCOME_CO_TRY(auto fresh, co_await log_in(endpoint, base, deadline));
                bearer = std::move(fresh);
            }
            request.set(http::field::authorization, "Bearer " + bearer->reveal());
            auto reply = co_await send(base, request, deadline);
            if (reply && reply.value().result_int() == 401) {
                log_.info("CML rejected the bearer token; logging in again",
                          {{"host", base.origin}, {"endpoint", endpoint.base_url}, {"call", std::string(to_string(call))}});
                BOOST_OUTCOME_CO_TRY(auto fresh, co_await log_in(endpoint, base, deadline));
                request.set(http::field::authorization, "Bearer " + fresh.reveal());
                reply = co_await send(base, request, deadline);
                if (reply && reply.value().result_int() == 401) {
                    log_.warning("CML rejected a new bearer token", {{"host", base.origin},
                                                                     {"endpoint", endpoint.base_url},
                                                                     {"call", std::string(to_string(call))}});
                    store_bearer(endpoint, std::nullopt);
                    co_return make_error_code(errc::unauthorized);
                }
            }
            if (!reply) {
                const auto level = reply.error() == errc::cancelled ? log_level::debug : log_level::warning;
                log_.log(level, "CML request failed", {{"host", base.origin},
                                                       {"endpoint", endpoint.base_url},
                                                       {"call", std::string(to_string(call))},
                                                       {"error", reply.error().message()}});
            }
            co_return reply;
        }
        catch (const boost::system::system_error& exception) {
            rethrow_unless_cancelled(exception);
        }
        co_return make_error_code(errc::cancelled);
    }

    /// Logs a call that CML answered with an error status, with CML's error text. The text
    /// may quote the license token, so `token` is redacted from it.
    void log_failure(const cml_endpoint& endpoint, cml_call call, const http_response& reply,
                     const boost::system::error_code& error, const secret* token) const
    {
        if (!log_.enabled(log_level::warning)) {
            return;
        }
        auto description = decode_error_body(reply.body()).description;
        if (token != nullptr) {
            description = redact_secret(description, *token);
        }
        log_.warning("CML call failed", {{"endpoint", endpoint.base_url},
                                         {"call", std::string(to_string(call))},
                                         {"status", std::to_string(reply.result_int())},
                                         {"error", std::string(error_name(error))},
                                         {"description", std::move(description)}});
    }

    /// Sends one request and returns the response, whatever its status, or `unavailable`,
    /// `timeout`, `protocol_error` or `cancelled`.
    boost::asio::awaitable<result<http_response>> send(const detail::cml_base_url& base, const http_request& request,
                                                       time_point deadline)
    {
        for (;;) {
            auto connection = pool_.take(base.origin);
            const bool reused = connection != nullptr;
            if (!connection) {
                BOOST_OUTCOME_CO_TRY(connection, co_await connect(base, deadline));
            }

            const auto remaining = remaining_until(deadline);
            if (remaining.count() <= 0) {
                co_return make_error_code(errc::timeout);
            }
            connection->tcp().expires_after(std::min(options_.request_timeout, remaining));
            http::response_parser<http::string_body> parser;
            parser.header_limit(static_cast<std::uint32_t>(options_.max_header_size));
            parser.body_limit(options_.max_response_size);
            boost::system::error_code error;
            if (connection->tls) {
                error = co_await exchange(*connection->tls, request, parser);
            }
            else {
                error = co_await exchange(connection->plain, request, parser);
            }
            if (error) {
                // A kept-alive connection may have been closed by the host just before this
                // request; a fresh connection gets one more try.
                if (reused && is_closed_by_peer(error) && !parser.got_some()) {
                    log_.debug("CML closed an idle connection; retrying on a new one", {{"host", base.origin}});
                    continue;
                }
                co_return map_network_error(error);
            }

            auto response = parser.release();
            if (response.keep_alive()) {
                pool_.put(base.origin, std::move(connection));
            }
            co_return response;
        }
    }

    template <class Stream>
    static boost::asio::awaitable<boost::system::error_code> exchange(Stream& stream, const http_request& request,
                                                                      http::response_parser<http::string_body>& parser)
    {
        auto [write_error, written] =
            co_await http::async_write(stream, request, boost::asio::as_tuple(boost::asio::use_awaitable));
        if (write_error) {
            co_return write_error;
        }
        boost::beast::flat_buffer buffer;
        auto [read_error, read] =
            co_await http::async_read(stream, buffer, parser, boost::asio::as_tuple(boost::asio::use_awaitable));
        co_return read_error;
    }

    static std::chrono::milliseconds remaining_until(time_point deadline)
    {
        return std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    }

    // ---------------------------------------------------------------------------------
    // Connections

    /// Opens a connection and completes the TLS handshake for `https`, all within
    /// `connect_timeout`.
    boost::asio::awaitable<result<std::unique_ptr<detail::cml_connection>>> connect(const detail::cml_base_url& base,
                                                                                     time_point deadline)
    {
        const auto timeout = std::min(options_.connect_timeout, remaining_until(deadline));
        if (timeout.count() <= 0) {
            co_return make_error_code(errc::timeout);
        }
        const auto connect_deadline = std::chrono::steady_clock::now() + timeout;

        std::vector<boost::asio::ip::tcp::endpoint> addresses;
        if (base.host_is_address) {
            addresses.emplace_back(boost::asio::ip::make_address(base.host), base.port);
        }
        else {
            BOOST_OUTCOME_CO_TRY(addresses, co_await resolve(base, timeout));
        }

        auto connection = std::make_unique<detail::cml_connection>(executor_);
        connection->plain.expires_at(connect_deadline);
        auto [connect_error, connected] =
            co_await connection->plain.async_connect(addresses, boost::asio::as_tuple(boost::asio::use_awaitable));
        if (connect_error) {
            log_.info("connecting to CML failed", {{"host", base.origin}, {"error", connect_error.message()}});
            co_return map_network_error(connect_error);
        }
        boost::system::error_code ignored;
        connection->plain.socket().set_option(boost::asio::ip::tcp::no_delay(true), ignored);
        if (!base.tls) {
            co_return connection;
        }

        BOOST_OUTCOME_CO_TRY(prepare_tls(base, *connection));
        auto [handshake_error] = co_await connection->tls->async_handshake(
            boost::asio::ssl::stream_base::client, boost::asio::as_tuple(boost::asio::use_awaitable));
        if (handshake_error) {
            if (handshake_error == boost::asio::error::operation_aborted) {
                co_return make_error_code(errc::cancelled);
            }
            log_.error("TLS handshake with CML failed", {{"host", base.origin}, {"error", handshake_error.message()}});
            co_return handshake_error == boost::beast::error::timeout ? make_error_code(errc::timeout)
                                                                      : make_error_code(errc::unavailable);
        }
        co_return connection;
    }

    /// Wraps the TCP stream in TLS with SNI and, unless insecure, peer and host name verification.
    result<void> prepare_tls(const detail::cml_base_url& base, detail::cml_connection& connection)
    {
        connection.tls.emplace(std::move(connection.plain), tls_context_);
        auto& stream = *connection.tls;
        // SNI carries host names only (RFC 6066), so an address literal is not sent. This is
        // SSL_set_tlsext_host_name without the macro's C-style cast; OpenSSL copies the name.
        if (!base.host_is_address &&
            SSL_ctrl(stream.native_handle(), SSL_CTRL_SET_TLSEXT_HOSTNAME, TLSEXT_NAMETYPE_host_name,
                     const_cast<char*>(base.host.c_str())) != 1) {
            log_.error("setting the TLS server name failed", {{"host", base.origin}});
            return make_error_code(errc::invalid_argument);
        }
        if (options_.insecure_skip_tls_verify) {
            warn_insecure_once(base.origin);
            stream.set_verify_mode(boost::asio::ssl::verify_none);
            return success();
        }
        stream.set_verify_mode(boost::asio::ssl::verify_peer);
        stream.set_verify_callback(boost::asio::ssl::host_name_verification(base.host));
        return success();
    }

    void warn_insecure_once(const std::string& origin)
    {
        {
            std::lock_guard lock(mutex_);
            if (!insecure_warned_.insert(origin).second) {
                return;
            }
        }
        log_.warning("TLS certificate verification is off for this CML host; its identity is not checked",
                     {{"host", origin}});
    }

    /// Resolves the host name, giving up after `timeout`.
    /// NOTE: Asio 1.81's resolver ignores per-operation cancellation, so a call cancelled
    /// during resolution returns only when the resolver or the timer completes.
    boost::asio::awaitable<result<std::vector<boost::asio::ip::tcp::endpoint>>> resolve(const detail::cml_base_url& base,
                                                                                       std::chrono::milliseconds timeout)
    {
        boost::asio::ip::tcp::resolver resolver(executor_);
        boost::asio::steady_timer timer(executor_, timeout);
        auto [order, resolve_error, entries, timer_error] =
            co_await boost::asio::experimental::make_parallel_group(
                resolver.async_resolve(base.host, std::to_string(base.port), boost::asio::deferred),
                timer.async_wait(boost::asio::deferred))
                .async_wait(boost::asio::experimental::wait_for_one(), boost::asio::use_awaitable);
        if (order[0] == 1) {
            log_.info("resolving the CML host timed out", {{"host", base.origin}});
            co_return make_error_code(timer_error ? errc::cancelled : errc::timeout);
        }
        if (resolve_error) {
            log_.info("resolving the CML host failed", {{"host", base.origin}, {"error", resolve_error.message()}});
            co_return map_network_error(resolve_error);
        }
        std::vector<boost::asio::ip::tcp::endpoint> addresses;
        for (const auto& entry : entries) {
            addresses.push_back(entry.endpoint());
        }
        co_return addresses;
    }

    static bool is_closed_by_peer(const boost::system::error_code& error) noexcept
    {
        return error == http::error::end_of_stream || error == boost::asio::error::eof ||
               error == boost::asio::error::connection_reset || error == boost::asio::error::broken_pipe ||
               error == boost::asio::ssl::error::stream_truncated;
    }

    static boost::system::error_code map_network_error(const boost::system::error_code& error) noexcept
    {
        if (error == boost::beast::error::timeout) {
            return errc::timeout;
        }
        if (error == boost::asio::error::operation_aborted) {
            return errc::cancelled;
        }
        if (error == http::error::body_limit || error == http::error::header_limit ||
            (error.category() == http::make_error_code(http::error::bad_version).category() &&
             error != http::error::end_of_stream && error != http::error::partial_message)) {
            return errc::protocol_error;
        }
        return errc::unavailable;
    }

    boost::asio::any_io_executor executor_;
    const cml_http_client_options options_;
    const logger log_;
    boost::asio::ssl::context tls_context_;
    detail::cml_connection_pool pool_;

    mutable std::mutex mutex_;
    std::unordered_map<std::string, secret> bearers_;
    std::set<std::string> insecure_warned_;
};

static_assert(cml_client<cml_http_client>);

} // namespace lcm::transport
