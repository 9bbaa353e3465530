// The CML HTTP client against the fake CML served over HTTP on 127.0.0.1, and against
// scripted and silent servers: every licensing call, re-login, error mapping, limits,
// timeouts, cancellation and connection reuse.
#include "cml_http_test_support.hpp"

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/detached.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <functional>
#include <optional>
#include <string>

using namespace lcm;
using namespace lcm::test;
using transport::cml_http_client;

namespace {

/// A CML stand-in whose login always succeeds and whose other routes return what
/// `respond` builds, for responses the fake never sends.
struct scripted_cml {
    int logins = 0;
    int requests = 0;
    std::function<http_response(const http_request&)> respond;

    transport::request_handler make()
    {
        return [this](http_request request) -> asio::awaitable<http_response> {
            if (request.target().ends_with("/api/v0/authenticate")) {
                ++logins;
                http_response response{http::status::ok, 11};
                response.body() = "\"eyJhbGciOiJIUzI1NiJ9.e30.c2NyaXB0ZWQ\"";
                co_return response;
            }
            ++requests;
            co_return respond(request);
        };
    }
};

http_response json_response(http::status status, std::string body)
{
    http_response response{status, 11};
    response.set(http::field::content_type, "application/json");
    response.body() = std::move(body);
    return response;
}

/// Registers `token` and returns the result; the arguments are locals because g++ 12
/// mishandles temporaries inside co_await.
asio::awaitable<result<void>> register_token(cml_http_client& client, const cml_endpoint& endpoint,
                                             std::string token, bool reregister = false)
{
    const secret license(std::move(token));
    co_return co_await client.register_license(endpoint, license, reregister);
}

asio::awaitable<http_response> get_admin(unsigned short port, std::string target)
{
    http_request request{http::verb::get, target, 11};
    co_return co_await send(port, std::move(request));
}

/// The outcome of one call to a server that accepts connections and never responds.
struct silent_call_outcome {
    boost::system::error_code error;
    std::chrono::steady_clock::duration elapsed{};
    std::size_t accepted = 0;
};

/// Reads the licensing status from a `silent_server` with a `scheme` base URL.
silent_call_outcome call_silent_server(const transport::cml_http_client_options& options, std::string_view scheme)
{
    asio::io_context context;
    log_capture logs;
    silent_server silent(context);
    asio::co_spawn(context, silent.run(), asio::detached);
    cml_http_client client(context.get_executor(), options, logs.make_logger());
    const cml_endpoint endpoint{std::string(scheme) + "://127.0.0.1:" + std::to_string(silent.port())};

    silent_call_outcome outcome;
    auto body = [&]() -> asio::awaitable<void> {
        const auto started = std::chrono::steady_clock::now();
        auto status = co_await client.get_licensing_status(endpoint);
        outcome.elapsed = std::chrono::steady_clock::now() - started;
        outcome.error = status ? boost::system::error_code{} : status.error();
        outcome.accepted = silent.accepted();
        silent.stop();
    };
    testing::run_with_timeout(context, body(), std::chrono::seconds(10));
    return outcome;
}

} // namespace

TEST_CASE("cml client authenticates once", "[integration]")
{
    served_fake_cml f;
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        REQUIRE(login);
        auto status = co_await f.client.get_licensing_status(endpoint);
        REQUIRE(status);
        CHECK(status.value().registration_status == cml_registration_status::not_registered);
        CHECK(status.value().authorization_status == cml_authorization_status::eval);

        // The cached bearer token serves the second call without a new login.
        const auto counters = f.cml.instance("lab-1").counters();
        CHECK(counters.received_calls(cml_call::authenticate) == 1);
        CHECK(counters.received_calls(cml_call::get_licensing_status) == 1);
    };
    run_served(f.context, f.server, body());
    check_no_secrets_logged(f.logs);
}

TEST_CASE("cml client registers a license", "[integration]")
{
    testing::manual_clock clock;
    auto options = test_cml_options();
    options.registration_delay = std::chrono::seconds(30);
    options.clock = clock.function();
    served_fake_cml f(std::move(options));
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto registered = co_await register_token(f.client, endpoint, license_token);
        REQUIRE(registered);

        auto running = co_await f.client.get_licensing_status(endpoint);
        REQUIRE(running);
        CHECK(running.value().registration_status == cml_registration_status::in_progress);
        CHECK(running.value().registration_attempted.has_value());

        clock.advance(std::chrono::seconds(31));
        auto done = co_await f.client.get_licensing_status(endpoint);
        REQUIRE(done);
        CHECK(done.value().registration_status == cml_registration_status::completed);
        CHECK(done.value().authorization_status == cml_authorization_status::in_compliance);
        CHECK(done.value().registration_expires.has_value());
        CHECK(done.value().features.size() == 2);
        CHECK(done.value().product_license == "CML_Enterprise");

        auto counters = co_await get_admin(f.server_port(), "/_fake/instances/lab-1/counters");
        REQUIRE(counters.result() == http::status::ok);
        const auto json = json_of(counters);
        CHECK(json.at("accepted_registrations").to_number<std::uint64_t>() == 1);
        CHECK(json.at("received").at("register_license").to_number<std::uint64_t>() == 1);

        auto totals = co_await get_admin(f.server_port(), "/_fake/counters");
        REQUIRE(totals.result() == http::status::ok);
        CHECK(json_of(totals).at("accepted_registrations").to_number<std::uint64_t>() == 1);
        CHECK(json_of(totals).at("instances").to_number<std::uint64_t>() == 1);
    };
    run_served(f.context, f.server, body());
    check_no_secrets_logged(f.logs);
}

TEST_CASE("cml client sees rejected token fail", "[integration]")
{
    served_fake_cml f;
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto registered = co_await register_token(f.client, endpoint, rejected_license_token);
        REQUIRE(registered);
        auto status = co_await f.client.get_licensing_status(endpoint);
        REQUIRE(status);
        CHECK(status.value().registration_status == cml_registration_status::failed);
        // CML quotes the token in its failure text; only the redacted form may be logged.
        const secret token(rejected_license_token);
        CHECK(status.value().registration_failure.reveal().find(rejected_license_token) != std::string::npos);
        CHECK(status.value().registration_failure.redacted(token).find(rejected_license_token) == std::string::npos);

        auto malformed = co_await register_token(f.client, endpoint, "not a token!");
        CHECK(malformed.error() == errc::invalid_token);
    };
    run_served(f.context, f.server, body());
    check_no_secrets_logged(f.logs);
}

TEST_CASE("cml client maps 409 conflicts", "[integration]")
{
    testing::manual_clock clock;
    auto options = test_cml_options();
    options.registration_delay = std::chrono::seconds(30);
    options.clock = clock.function();
    served_fake_cml f(std::move(options));
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto first = co_await register_token(f.client, endpoint, license_token);
        REQUIRE(first);

        // A registration in progress rejects another one, even with reregister.
        auto during = co_await register_token(f.client, endpoint, license_token, true);
        CHECK(during.error() == errc::operation_in_progress);
        auto deregistration = co_await f.client.deregister_license(endpoint);
        CHECK(deregistration.error() == errc::operation_in_progress);

        clock.advance(std::chrono::seconds(31));
        auto again = co_await register_token(f.client, endpoint, license_token);
        CHECK(again.error() == errc::operation_in_progress);
        auto replaced = co_await register_token(f.client, endpoint, license_token, true);
        CHECK(replaced);
        CHECK(f.cml.instance("lab-1").counters().accepted_registrations == 2);
    };
    run_served(f.context, f.server, body());
    // The conflicts are logged with CML's text, and the token stays out of it.
    CHECK(f.logs.lines_with("CML call failed").size() == 3);
    check_no_secrets_logged(f.logs);
}

TEST_CASE("cml client deregisters a license", "[integration]")
{
    served_fake_cml f;
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        // 400 without a body: the host has no registration.
        auto unregistered = co_await f.client.deregister_license(endpoint);
        REQUIRE(unregistered);
        CHECK(unregistered.value() == cml_deregistration_outcome::already_deregistered);

        auto registered = co_await register_token(f.client, endpoint, license_token);
        REQUIRE(registered);
        auto status = co_await f.client.get_licensing_status(endpoint);
        REQUIRE(status);
        REQUIRE(status.value().registration_status == cml_registration_status::completed);
        auto deregistered = co_await f.client.deregister_license(endpoint);
        REQUIRE(deregistered);
        CHECK(deregistered.value() == cml_deregistration_outcome::deregistered);

        // 202: deregistered locally while the Cisco licensing service is unreachable.
        registered = co_await register_token(f.client, endpoint, license_token);
        REQUIRE(registered);
        status = co_await f.client.get_licensing_status(endpoint);
        REQUIRE(status);
        f.cml.instance("lab-1").set_licensing_service_reachable(false);
        auto local = co_await f.client.deregister_license(endpoint);
        REQUIRE(local);
        CHECK(local.value() == cml_deregistration_outcome::deregistered_locally);
        CHECK(f.cml.instance("lab-1").counters().deregistrations == 2);
    };
    run_served(f.context, f.server, body());
    CHECK(f.logs.lines_with("could not reach the Cisco licensing service").size() == 1);
    check_no_secrets_logged(f.logs);
}

TEST_CASE("cml client accepts bodies on success", "[integration]")
{
    // CML 2.11 and later respond to mutations with 200 or 202 and a LicensingStatus body.
    asio::io_context context;
    log_capture logs;
    scripted_cml cml;
    cml.respond = [](const http_request& request) {
        const auto status = request.method() == http::verb::post ? http::status::accepted : http::status::ok;
        return json_response(status, R"({"registration": {"status": "IN_PROGRESS"}})");
    };
    running_server server(context, {}, cml.make(), logs.make_logger());
    cml_http_client client(context.get_executor(), test_client_options(), logs.make_logger());
    const cml_endpoint endpoint{"http://127.0.0.1:" + std::to_string(server.port())};

    auto body = [&]() -> asio::awaitable<void> {
        auto registered = co_await register_token(client, endpoint, license_token);
        CHECK(registered);
        auto deregistered = co_await client.deregister_license(endpoint);
        REQUIRE(deregistered);
        CHECK(deregistered.value() == cml_deregistration_outcome::deregistered);
    };
    run_served(context, server, body());
    CHECK(cml.logins == 1);
}

TEST_CASE("cml client logs in again after 401", "[integration]")
{
    served_fake_cml f;
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        REQUIRE(login);
        // A logout or password change on the host revokes the cached token.
        f.cml.instance("lab-1").revoke_tokens();
        auto status = co_await f.client.get_licensing_status(endpoint);
        CHECK(status);
        const auto counters = f.cml.instance("lab-1").counters();
        CHECK(counters.received_calls(cml_call::authenticate) == 2);
        CHECK(counters.received_calls(cml_call::get_licensing_status) == 2);
    };
    run_served(f.context, f.server, body());
    CHECK(f.logs.lines_with("logging in again").size() == 1);
    check_no_secrets_logged(f.logs);
}

TEST_CASE("cml client fails on second 401", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    scripted_cml cml;
    cml.respond = [](const http_request&) {
        return json_response(http::status::unauthorized, R"({"code": 401, "description": "token expired"})");
    };
    running_server server(context, {}, cml.make(), logs.make_logger());
    cml_http_client client(context.get_executor(), test_client_options(), logs.make_logger());
    const cml_endpoint endpoint{"http://127.0.0.1:" + std::to_string(server.port())};

    auto body = [&]() -> asio::awaitable<void> {
        auto status = co_await client.get_licensing_status(endpoint);
        CHECK(status.error() == errc::unauthorized);
    };
    run_served(context, server, body());
    CHECK(cml.logins == 2);
    CHECK(cml.requests == 2);
    CHECK(logs.lines_with("CML rejected a new bearer token").size() == 1);
    check_no_secrets_logged(logs);
}

TEST_CASE("cml client rejects wrong password", "[integration]")
{
    auto client_options = test_client_options();
    client_options.credentials.password = secret("wrong-Passw0rd-77");
    served_fake_cml f(test_cml_options(), {}, client_options);
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        CHECK(login.error() == errc::unauthorized);
        auto status = co_await f.client.get_licensing_status(endpoint);
        CHECK(status.error() == errc::unauthorized);
    };
    run_served(f.context, f.server, body());
    CHECK(f.logs.lines_with("CML login failed").size() == 2);
    CHECK(f.logs.lines_with("wrong-Passw0rd-77").empty());
    check_no_secrets_logged(f.logs);
}

TEST_CASE("cml client maps user without admin", "[integration]")
{
    auto client_options = test_client_options();
    client_options.credentials.username = "viewer";
    served_fake_cml f(test_cml_options(), {}, client_options);
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto status = co_await f.client.get_licensing_status(endpoint);
        CHECK(status.error() == errc::forbidden);
    };
    run_served(f.context, f.server, body());
}

TEST_CASE("cml client maps 5xx to unavailable", "[integration]")
{
    served_fake_cml f;
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        REQUIRE(login);
        http_request faults{http::verb::put, "/_fake/faults", 11};
        faults.set(http::field::content_type, "application/json");
        faults.body() = R"({"error_rate": 1.0})";
        auto changed = co_await send(f.server_port(), std::move(faults));
        REQUIRE(changed.result() == http::status::no_content);

        auto status = co_await f.client.get_licensing_status(endpoint);
        CHECK(status.error() == errc::unavailable);
        auto registered = co_await register_token(f.client, endpoint, license_token);
        CHECK(registered.error() == errc::unavailable);
        CHECK(f.cml.instance("lab-1").counters().accepted_registrations == 0);
    };
    run_served(f.context, f.server, body());
    CHECK(f.logs.lines_with("CML call failed").size() == 2);
}

TEST_CASE("cml client reports dropped connection", "[integration]")
{
    served_fake_cml f;
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        REQUIRE(login);
        testing::fake_cml_faults faults;
        faults.drop_after_apply_rate = 1.0;
        f.cml.instance("lab-1").set_faults(faults);
        auto registered = co_await register_token(f.client, endpoint, license_token);
        CHECK(registered.error() == errc::unavailable);
        // The instance applied the request even though its response was lost.
        CHECK(f.cml.instance("lab-1").counters().accepted_registrations == 1);
    };
    run_served(f.context, f.server, body());
}

TEST_CASE("cml client reads both timestamp forms", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    scripted_cml cml;
    cml.respond = [](const http_request&) {
        return json_response(http::status::ok, R"({
            "registration": {"status": "COMPLETED", "smart_account": "example.com", "virtual_account": null,
                             "expires": "2026-08-20 17:25:30", "new_field": [1, 2],
                             "register_time": {"succeeded": "2026-08-20T17:25:30Z", "attempted": null,
                                               "scheduled": null, "status": "SUCCEEDED", "failure": null,
                                               "success": "SUCCEEDED"}},
            "authorization": {"status": "IN_COMPLIANCE", "expires": "2026-08-20T17:25:30+00:00"},
            "features": [],
            "product_license": {"active": "CML_Enterprise", "is_enterprise": true},
            "unknown_section": {"anything": true}
        })");
    };
    running_server server(context, {}, cml.make(), logs.make_logger());
    cml_http_client client(context.get_executor(), test_client_options(), logs.make_logger());
    const cml_endpoint endpoint{"http://127.0.0.1:" + std::to_string(server.port()) + "/"};

    auto body = [&]() -> asio::awaitable<void> {
        auto status = co_await client.get_licensing_status(endpoint);
        REQUIRE(status);
        const auto& value = status.value();
        CHECK(value.registration_status == cml_registration_status::completed);
        REQUIRE(value.registration_expires.has_value());
        REQUIRE(value.registration_succeeded.has_value());
        REQUIRE(value.authorization_expires.has_value());
        CHECK(*value.registration_expires == *value.registration_succeeded);
        CHECK(*value.registration_expires == *value.authorization_expires);
        CHECK_FALSE(value.registration_attempted.has_value());
        CHECK(value.smart_account == std::optional<std::string>("example.com"));
        CHECK_FALSE(value.virtual_account.has_value());
    };
    run_served(context, server, body());
}

TEST_CASE("cml client limits response size", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    scripted_cml cml;
    cml.respond = [](const http_request&) {
        return json_response(http::status::ok, "{\"padding\": \"" + std::string(200 * 1024, 'x') + "\"}");
    };
    running_server server(context, {}, cml.make(), logs.make_logger());
    auto options = test_client_options();
    options.max_response_size = 64 * 1024;
    cml_http_client client(context.get_executor(), options, logs.make_logger());
    const cml_endpoint endpoint{"http://127.0.0.1:" + std::to_string(server.port())};

    auto body = [&]() -> asio::awaitable<void> {
        auto status = co_await client.get_licensing_status(endpoint);
        CHECK(status.error() == errc::protocol_error);
    };
    run_served(context, server, body());
}

TEST_CASE("cml client rejects invalid base URLs", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    cml_http_client client(context.get_executor(), test_client_options(), logs.make_logger());

    auto body = [&]() -> asio::awaitable<void> {
        for (const auto* url : {"ftp://127.0.0.1/", "http://admin:secret@127.0.0.1/", "http://127.0.0.1/?token=1",
                                "127.0.0.1:8080", "http://127.0.0.1:0/"}) {
            INFO(url);
            const cml_endpoint endpoint{url};
            auto status = co_await client.get_licensing_status(endpoint);
            CHECK(status.error() == errc::invalid_argument);
        }
    };
    testing::run_with_timeout(context, body());
}

TEST_CASE("cml client reports refused connection", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    // Bind a port and close it again, so nothing listens there.
    unsigned short port = 0;
    {
        asio::ip::tcp::acceptor probe(context, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
        port = probe.local_endpoint().port();
    }
    cml_http_client client(context.get_executor(), test_client_options(), logs.make_logger());
    const cml_endpoint endpoint{"http://127.0.0.1:" + std::to_string(port)};

    auto body = [&]() -> asio::awaitable<void> {
        auto status = co_await client.get_licensing_status(endpoint);
        CHECK(status.error() == errc::unavailable);
    };
    testing::run_with_timeout(context, body());
    CHECK(logs.lines_with("CML login failed").size() == 1);
}

TEST_CASE("cml client request times out", "[integration]")
{
    auto options = test_client_options();
    options.request_timeout = std::chrono::milliseconds(200);
    const auto outcome = call_silent_server(options, "http");
    CHECK(outcome.error == errc::timeout);
    CHECK(outcome.elapsed < std::chrono::seconds(3));
    CHECK(outcome.accepted == 1);
}

TEST_CASE("cml client connect times out", "[integration]")
{
    // The TLS handshake is part of connecting, so a server that never responds stalls it.
    auto options = test_client_options();
    options.connect_timeout = std::chrono::milliseconds(200);
    const auto outcome = call_silent_server(options, "https");
    CHECK(outcome.error == errc::timeout);
    CHECK(outcome.elapsed < std::chrono::seconds(3));
    CHECK(outcome.accepted == 1);
}

TEST_CASE("cml client total timeout bounds a call", "[integration]")
{
    auto options = test_client_options();
    options.total_timeout = std::chrono::milliseconds(200);
    const auto outcome = call_silent_server(options, "http");
    CHECK(outcome.error == errc::timeout);
    CHECK(outcome.elapsed < std::chrono::seconds(3));
}

TEST_CASE("cml client call is cancellable", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    event arrived(context.get_executor());
    event never(context.get_executor());
    auto stalled = [&](http_request request) -> asio::awaitable<http_response> {
        if (request.target().ends_with("/authenticate")) {
            http_response response{http::status::ok, 11};
            response.body() = "\"eyJhbGciOiJIUzI1NiJ9.e30.c3RhbGxlZA\"";
            co_return response;
        }
        arrived.set();
        co_await never.wait();
        co_return http_response{};
    };
    transport::http_server_options server_options;
    server_options.shutdown_timeout = std::chrono::milliseconds(50);
    running_server server(context, server_options, stalled, logs.make_logger());
    cml_http_client client(context.get_executor(), test_client_options(), logs.make_logger());
    const cml_endpoint endpoint{"http://127.0.0.1:" + std::to_string(server.port())};

    auto body = [&]() -> asio::awaitable<void> {
        asio::cancellation_signal signal;
        std::optional<result<cml_licensing_status>> outcome;
        event done(co_await asio::this_coro::executor);
        auto call = [&]() -> asio::awaitable<void> {
            outcome = co_await client.get_licensing_status(endpoint);
            done.set();
        };
        asio::co_spawn(co_await asio::this_coro::executor, call(),
                       asio::bind_cancellation_slot(signal.slot(), asio::detached));

        co_await arrived.wait();
        const auto cancelled_at = std::chrono::steady_clock::now();
        signal.emit(asio::cancellation_type::terminal);
        co_await done.wait();

        REQUIRE(outcome);
        CHECK(outcome->error() == errc::cancelled);
        CHECK(std::chrono::steady_clock::now() - cancelled_at < std::chrono::seconds(1));
    };
    run_served(context, server, body(), std::chrono::seconds(10));
}

TEST_CASE("cml client reuses connections", "[integration]")
{
    served_fake_cml f;
    const auto first = f.endpoint("lab-1");
    const auto second = f.endpoint("lab-2");

    auto body = [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 5; ++i) {
            auto one = co_await f.client.get_licensing_status(first);
            REQUIRE(one);
            auto two = co_await f.client.get_licensing_status(second);
            REQUIRE(two);
        }
        // Both instances share the server's origin, so one connection carries every call.
        CHECK(f.server.server().accepted_connections() == 1);
        CHECK(f.cml.total_counters().received_calls(cml_call::authenticate) == 2);

        // Without idle connections the next call opens a new one.
        f.client.close_idle_connections();
        auto again = co_await f.client.get_licensing_status(first);
        CHECK(again);
        CHECK(f.server.server().accepted_connections() == 2);
    };
    run_served(f.context, f.server, body());
}
