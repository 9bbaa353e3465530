// The control-plane HTTP client against the real server and against failing servers:
// the task lifecycle, claims, the change feed, connection reuse, retries, timeouts and
// cancellation.
#include "http_test_support.hpp"

#include <lcm/testing/fake_cml.hpp>
#include <lcm/transport/control_plane_http_client.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/detached.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <set>
#include <string>
#include <string_view>

using namespace lcm;
using namespace lcm::test;
using namespace std::chrono_literals;
using http::verb;
using transport::control_plane_http_client;
using transport::control_plane_http_client_options;

namespace {

control_plane_http_client_options client_options(unsigned short port)
{
    control_plane_http_client_options options;
    options.port = port;
    options.api_key = secret(api_key);
    options.initial_backoff = std::chrono::milliseconds(5);
    options.max_backoff = std::chrono::milliseconds(20);
    options.total_timeout = std::chrono::seconds(5);
    return options;
}

/// A handler that responds 503 to the first `failures` requests and then `{"sequence": 7}`.
struct flaky_handler {
    int failures = 0;
    int calls = 0;

    transport::request_handler make()
    {
        return [this](http_request) -> asio::awaitable<http_response> {
            ++calls;
            if (calls <= failures) {
                co_return transport::make_error_response(errc::unavailable);
            }
            boost::json::object body{{"sequence", 7}};
            co_return transport::make_json_response(http::status::ok, body);
        };
    }
};

/// Requests registration of `license_token` on worker w1 through the control plane. The
/// arguments are named locals because g++ 12 mishandles temporaries inside co_await.
asio::awaitable<result<application::operation_accepted>> request_registration(plane_type& plane)
{
    std::string worker_id = "w1";
    secret token(license_token);
    std::string caller = "test";
    co_return co_await plane.request_registration(std::move(worker_id), std::move(token), false, std::move(caller));
}

application::control_plane_options claim_clock(testing::manual_clock& clock)
{
    application::control_plane_options options;
    options.clock = clock.function();
    return options;
}

/// Posts a claim. The parameters are views of literals, because g++ 12 mishandles
/// temporaries with destructors, such as strings built from literals, inside co_await.
asio::awaitable<http_response> post_claim(unsigned short port, std::string_view worker_id, std::string_view body)
{
    auto request = make_request(verb::post, "/api/internal/workers/" + std::string(worker_id) + "/license/claim",
                                credentials::internal, std::string(body));
    co_return co_await send(port, std::move(request));
}

} // namespace

TEST_CASE("client runs registration lifecycle", "[integration]")
{
    served_control_plane f;
    control_plane_http_client client(f.context.get_executor(), client_options(f.server.port()), f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        co_await f.add_worker("w1");
        auto accepted = co_await request_registration(f.plane);
        REQUIRE(accepted);

        auto tasks = co_await client.list_pending(10);
        REQUIRE(tasks);
        REQUIRE(tasks.value().size() == 1);
        const auto& task = tasks.value().front();
        CHECK(task.worker_id == "w1");
        CHECK(task.cml_url == "https://127.0.0.1:9443");
        CHECK(task.operation == domain::license_operation::registration);
        CHECK(task.operation_id == 1);
        CHECK(!task.started);
        REQUIRE(task.token);
        CHECK(task.token->reveal() == license_token);
        CHECK(task.requested_at.has_value());

        auto one = co_await client.get_task("w1");
        REQUIRE(one);
        REQUIRE(one.value());
        CHECK(one.value()->operation_id == 1);

        auto unknown = co_await client.get_task("missing");
        CHECK(unknown.error() == errc::not_found);

        auto stale = co_await client.start("w1", 9);
        CHECK(stale.error() == errc::stale_operation);

        domain::registration_details empty_details;
        auto not_started = co_await client.complete_registration("w1", 1, std::move(empty_details));
        CHECK(not_started.error() == errc::operation_not_started);

        auto started = co_await client.start("w1", 1);
        CHECK(started);
        auto repeated = co_await client.start("w1", 1);
        CHECK(repeated);

        domain::registration_details details;
        details.registration_status = "COMPLETED";
        details.expiry_date = parse_timestamp("2027-05-06T07:08:09Z");
        details.features.push_back({"f1", "CML - Enterprise", "1.0", "IN_USE", 3});
        auto completed = co_await client.complete_registration("w1", 1, std::move(details));
        CHECK(completed);

        auto none = co_await client.get_task("w1");
        REQUIRE(none);
        CHECK(!none.value());

        auto worker = co_await f.plane.get_worker("w1");
        REQUIRE(worker);
        const auto& license = worker.value().license();
        CHECK(license.status() == domain::license_status::registered);
        CHECK(license.expiry_date() == parse_timestamp("2027-05-06T07:08:09Z"));
        REQUIRE(license.features().size() == 1);
        CHECK(license.features().front().in_use == 3);
        co_await f.server.stop();
    }());
}

TEST_CASE("client reports failure and deregistration", "[integration]")
{
    served_control_plane f;
    control_plane_http_client client(f.context.get_executor(), client_options(f.server.port()), f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        co_await f.add_worker("w1");
        auto accepted = co_await request_registration(f.plane);
        REQUIRE(accepted);

        std::string code = "invalid_token";
        std::string message = "CML rejected " + license_token;
        auto failed = co_await client.fail("w1", 1, std::move(code), std::move(message));
        CHECK(failed);
        std::string late_code = "late";
        std::string late_message = "too late";
        auto stale = co_await client.fail("w1", 0, std::move(late_code), std::move(late_message));
        CHECK(stale.error() == errc::stale_operation);

        auto worker = co_await f.plane.get_worker("w1");
        REQUIRE(worker);
        REQUIRE(worker.value().license().last_error());
        CHECK(worker.value().license().last_error()->code == "invalid_token");
        CHECK(worker.value().license().last_error()->message.find(license_token) == std::string::npos);

        // Register for real, then deregister with a warning.
        auto again = co_await request_registration(f.plane);
        REQUIRE(again);
        const auto registration = again.value().operation_id;
        auto registration_started = co_await client.start("w1", registration);
        REQUIRE(registration_started);
        domain::registration_details details;
        auto registered = co_await client.complete_registration("w1", registration, std::move(details));
        REQUIRE(registered);

        std::string worker_id = "w1";
        std::string caller = "test";
        auto deregistration = co_await f.plane.request_deregistration(std::move(worker_id), std::move(caller));
        REQUIRE(deregistration);
        const auto operation_id = deregistration.value().operation_id;
        auto task = co_await client.get_task("w1");
        REQUIRE(task);
        REQUIRE(task.value());
        CHECK(task.value()->operation == domain::license_operation::deregistration);
        CHECK(!task.value()->token);

        auto deregistration_started = co_await client.start("w1", operation_id);
        REQUIRE(deregistration_started);
        std::optional<std::string> warning = "licensing service unreachable";
        auto completed = co_await client.complete_deregistration("w1", operation_id, std::move(warning));
        CHECK(completed);
        auto after = co_await f.plane.get_worker("w1");
        REQUIRE(after);
        CHECK(after.value().license().status() == domain::license_status::unregistered);
        CHECK(after.value().license().last_warning() == "licensing service unreachable");
        co_await f.server.stop();
    }());

    for (const auto& line : f.logs.lines()) {
        INFO(line);
        CHECK(line.find(api_key) == std::string::npos);
        CHECK(line.find(license_token) == std::string::npos);
    }
}

TEST_CASE("client reuses one connection", "[integration]")
{
    served_control_plane f;
    control_plane_http_client client(f.context.get_executor(), client_options(f.server.port()), f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        for (int i = 0; i < 5; ++i) {
            auto sequence = co_await client.change_sequence();
            CHECK(sequence);
        }
        auto tasks = co_await client.list_pending(5);
        CHECK(tasks);
        co_await f.server.stop();
    }());

    std::set<std::string> connections;
    for (const auto& line : f.logs.lines_with("msg=request ")) {
        const auto start = line.find("connection_id=");
        REQUIRE(start != std::string::npos);
        connections.insert(line.substr(start, line.find(' ', start) - start));
    }
    CHECK(f.logs.lines_with("msg=request ").size() == 6);
    CHECK(connections.size() == 1);
}

TEST_CASE("client reconnects after server closes", "[integration]")
{
    transport::http_server_options options;
    options.idle_timeout = std::chrono::milliseconds(100);
    served_control_plane f(options);
    control_plane_http_client client(f.context.get_executor(), client_options(f.server.port()), f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        auto first = co_await client.change_sequence();
        CHECK(first);

        // Wait until the server has closed the kept-alive connection for being idle.
        auto observer = co_await connect_to(f.server.port());
        auto closed = co_await read_until_closed(observer);
        CHECK(closed != asio::error::timed_out);

        auto second = co_await client.change_sequence();
        CHECK(second);
        co_await f.server.stop();
    }());
    CHECK(f.logs.lines_with("retrying").empty());
}

TEST_CASE("client wait_for_change wakes", "[integration]")
{
    served_control_plane f;
    control_plane_http_client client(f.context.get_executor(), client_options(f.server.port()), f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
            co_await f.add_worker("w1");
            auto current = co_await client.change_sequence();
            REQUIRE(current);
            CHECK(current.value() == f.api.change_sequence_base() + f.repository.change_sequence());

            std::optional<result<std::uint64_t>> woken;
            event done(co_await asio::this_coro::executor);
            asio::co_spawn(
                co_await asio::this_coro::executor,
                [&]() -> asio::awaitable<void> {
                    woken = co_await client.wait_for_change(current.value());
                    done.set();
                },
                asio::detached);

            auto accepted = co_await request_registration(f.plane);
            REQUIRE(accepted);
            co_await done.wait();
            REQUIRE(woken);
            REQUIRE(woken->has_value());
            CHECK(woken->value() > current.value());
            co_await f.server.stop();
        }(),
        std::chrono::seconds(10));
}

TEST_CASE("client retries 503 responses", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    flaky_handler flaky{2};
    running_server server(context, {}, flaky.make(), logs.make_logger());
    control_plane_http_client client(context.get_executor(), client_options(server.port()), logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
        auto sequence = co_await client.change_sequence();
        REQUIRE(sequence);
        CHECK(sequence.value() == 7);
        co_await server.stop();
    }());
    CHECK(flaky.calls == 3);
    CHECK(logs.lines_with("retrying").size() == 2);
}

TEST_CASE("client gives up after max attempts", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    flaky_handler flaky{100};
    running_server server(context, {}, flaky.make(), logs.make_logger());
    auto options = client_options(server.port());
    options.max_attempts = 3;
    control_plane_http_client client(context.get_executor(), options, logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
        auto sequence = co_await client.change_sequence();
        CHECK(sequence.error() == errc::unavailable);
        co_await server.stop();
    }());
    CHECK(flaky.calls == 3);
}

TEST_CASE("client does not retry wrong key", "[integration]")
{
    served_control_plane f;
    auto options = client_options(f.server.port());
    options.api_key = secret("wrong-key");
    control_plane_http_client client(f.context.get_executor(), options, f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        auto sequence = co_await client.change_sequence();
        CHECK(sequence.error() == errc::unauthorized);
        co_await f.server.stop();
    }());
    CHECK(f.logs.lines_with("msg=request ").size() == 1);
}

TEST_CASE("client reports refused connection", "[integration]")
{
    asio::io_context context;
    // Bind a port and close it again, so nothing listens there.
    asio::ip::tcp::acceptor probe(context, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0));
    const auto port = probe.local_endpoint().port();
    probe.close();

    auto options = client_options(port);
    options.max_attempts = 2;
    control_plane_http_client client(context.get_executor(), options);
    auto sequence = testing::run_with_timeout(context, client.change_sequence());
    CHECK(sequence.error() == errc::unavailable);
}

TEST_CASE("client request times out", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    event never(context.get_executor());
    auto silent = [&](http_request) -> asio::awaitable<http_response> {
        co_await never.wait();
        co_return http_response{};
    };
    transport::http_server_options server_options;
    server_options.shutdown_timeout = std::chrono::milliseconds(10);
    running_server server(context, server_options, silent, logs.make_logger());
    auto options = client_options(server.port());
    options.request_timeout = std::chrono::milliseconds(100);
    options.max_attempts = 2;
    control_plane_http_client client(context.get_executor(), options, logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
            const auto started = std::chrono::steady_clock::now();
            auto sequence = co_await client.change_sequence();
            const auto elapsed = std::chrono::steady_clock::now() - started;
            CHECK(sequence.error() == errc::timeout);
            CHECK(elapsed < std::chrono::seconds(3));
            co_await server.stop();
        }(),
        std::chrono::seconds(10));
}

TEST_CASE("client call is cancellable", "[integration]")
{
    // The server keeps waiting on the abandoned long-poll until its shutdown timeout.
    transport::http_server_options options;
    options.shutdown_timeout = std::chrono::milliseconds(100);
    served_control_plane f(options);
    control_plane_http_client client(f.context.get_executor(), client_options(f.server.port()), f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
            auto current = co_await client.change_sequence();
            REQUIRE(current);

            asio::cancellation_signal signal;
            std::optional<result<std::uint64_t>> outcome;
            event done(co_await asio::this_coro::executor);
            auto wait = [&]() -> asio::awaitable<void> {
                outcome = co_await client.wait_for_change(current.value());
                done.set();
            };
            asio::co_spawn(co_await asio::this_coro::executor, wait(),
                           asio::bind_cancellation_slot(signal.slot(), asio::detached));

            // Let the long-poll reach the server, then cancel it.
            asio::steady_timer delay(co_await asio::this_coro::executor, std::chrono::milliseconds(50));
            co_await delay.async_wait(asio::use_awaitable);
            const auto cancelled_at = std::chrono::steady_clock::now();
            signal.emit(asio::cancellation_type::terminal);
            co_await done.wait();

            REQUIRE(outcome);
            CHECK(outcome->error() == errc::cancelled);
            CHECK(std::chrono::steady_clock::now() - cancelled_at < std::chrono::seconds(1));
            co_await f.server.stop();
        }(),
        std::chrono::seconds(10));
}

TEST_CASE("client enforces response size limit", "[integration]")
{
    served_control_plane f;
    auto options = client_options(f.server.port());
    options.max_response_size = 64;
    control_plane_http_client client(f.context.get_executor(), options, f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        co_await f.add_worker("w1");
        auto accepted = co_await request_registration(f.plane);
        REQUIRE(accepted);
        auto tasks = co_await client.list_pending(10);
        CHECK(tasks.error() == errc::protocol_error);
        co_await f.server.stop();
    }());
}

// Claims over HTTP: claim, 409 while another controller holds the claim, takeover after
// expiry, and step reports with a stale fence. Claims are timed with a manual clock.

TEST_CASE("claim route grants and rejects", "[integration][claim]")
{
    testing::manual_clock clock;
    served_control_plane f({}, test_api_options(), claim_clock(clock));

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("w1");

        auto idle = co_await post_claim(port, "w1", R"({"holder":"controller-a","lease_seconds":30})");
        CHECK(idle.result_int() == 404);
        auto unknown = co_await post_claim(port, "w9", R"({"holder":"controller-a","lease_seconds":30})");
        CHECK(unknown.result_int() == 404);

        auto accepted = co_await request_registration(f.plane);
        REQUIRE(accepted);

        auto granted = co_await post_claim(port, "w1", R"({"holder":"controller-a","lease_seconds":30})");
        REQUIRE(granted.result_int() == 200);
        const auto answer = json_of(granted);
        const auto& task = answer.at("task").as_object();
        CHECK(task.at("fence") == 1);
        CHECK(task.at("claim_holder") == "controller-a");
        CHECK(task.at("claim_expires_at").as_string() == format_timestamp(clock.now() + 30s));
        CHECK(task.at("token").as_string() == license_token);
        CHECK(answer.at("claim_remaining_ms") == 30000);

        auto held = co_await post_claim(port, "w1", R"({"holder":"controller-b","lease_seconds":30})");
        CHECK(held.result_int() == 409);
        const auto refusal = json_of(held);
        CHECK(refusal.at("code") == "claimed");
        CHECK(refusal.at("holder") == "controller-a");
        CHECK(refusal.at("claim_expires_at").as_string() == format_timestamp(clock.now() + 30s));
        CHECK(refusal.at("claim_remaining_ms") == 30000);
        CHECK(held.body().find(license_token) == std::string::npos);

        for (const auto* body : {R"({"lease_seconds":30})", R"({"holder":"","lease_seconds":30})",
                                 R"({"holder":"controller-a","lease_seconds":0})",
                                 R"({"holder":"controller-a","lease_seconds":"30"})",
                                 R"({"holder":"controller-a","lease_seconds":7200})", R"({"holder":5})"}) {
            INFO(body);
            auto rejected = co_await post_claim(port, "w1", body);
            CHECK(rejected.result_int() == 400);
            CHECK(code_of(rejected) == "invalid_argument");
        }

        auto no_key = make_request(verb::post, "/api/internal/workers/w1/license/claim", credentials::none,
                                   R"({"holder":"controller-a","lease_seconds":30})");
        auto unauthorized = co_await send(port, std::move(no_key));
        CHECK(unauthorized.result_int() == 401);

        auto worker = co_await f.plane.get_worker("w1");
        REQUIRE(worker);
        CHECK(worker.value().license().claim_holder() == "controller-a");
        CHECK(worker.value().license().fence() == 1);
    }());
}

TEST_CASE("client claims and reports fence", "[integration][claim]")
{
    testing::manual_clock clock;
    served_control_plane f({}, test_api_options(), claim_clock(clock));
    control_plane_http_client first(f.context.get_executor(), client_options(f.server.port()),
                                    f.logs.make_logger());
    control_plane_http_client second(f.context.get_executor(), client_options(f.server.port()),
                                     f.logs.make_logger());

    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        co_await f.add_worker("w1");
        auto accepted = co_await request_registration(f.plane);
        REQUIRE(accepted);

        auto claim_a = co_await first.claim("w1", "controller-a", 30s);
        REQUIRE(claim_a);
        REQUIRE(claim_a.value().task);
        const auto task_a = *claim_a.value().task;
        CHECK(task_a.fence == 1);
        CHECK(task_a.claim_holder == "controller-a");
        CHECK(task_a.claim_remaining == 30s);
        REQUIRE(task_a.token);
        CHECK(task_a.token->reveal() == license_token);
        auto started = co_await first.start("w1", task_a.key());
        CHECK(started);

        auto refused = co_await second.claim("w1", "controller-b", 30s);
        REQUIRE(refused);
        CHECK_FALSE(refused.value().task);
        CHECK(refused.value().holder == "controller-a");
        CHECK(refused.value().remaining == 30s);
        CHECK(refused.value().expires_at == clock.now() + 30s);

        // The first controller stops renewing, so its claim expires and the second takes over.
        clock.advance(30s);
        auto claim_b = co_await second.claim("w1", "controller-b", 30s);
        REQUIRE(claim_b);
        REQUIRE(claim_b.value().task);
        const auto task_b = *claim_b.value().task;
        CHECK(task_b.fence == 2);
        CHECK(task_b.started);

        domain::registration_details late_details;
        auto late = co_await first.complete_registration("w1", task_a.key(), std::move(late_details));
        CHECK(late.error() == errc::claim_lost);
        std::string code = "late";
        std::string message = "late failure";
        auto late_failure = co_await first.fail("w1", task_a.key(), std::move(code), std::move(message));
        CHECK(late_failure.error() == errc::claim_lost);
        auto unfenced = co_await first.start("w1", task_a.operation_id);
        CHECK(unfenced.error() == errc::claim_lost);

        auto raw_stale = make_request(verb::post, "/api/internal/workers/w1/operations/1/start", credentials::internal,
                                      R"({"fence":1})");
        auto stale_response = co_await send(f.server.port(), std::move(raw_stale));
        CHECK(stale_response.result_int() == 409);
        CHECK(code_of(stale_response) == "claim_lost");
        auto raw_malformed = make_request(verb::post, "/api/internal/workers/w1/operations/1/start",
                                          credentials::internal, R"({"fence":"1"})");
        auto malformed_response = co_await send(f.server.port(), std::move(raw_malformed));
        CHECK(malformed_response.result_int() == 400);

        domain::registration_details details;
        details.registration_status = "COMPLETED";
        auto completed = co_await second.complete_registration("w1", task_b.key(), std::move(details));
        CHECK(completed);

        auto worker = co_await f.plane.get_worker("w1");
        REQUIRE(worker);
        CHECK(worker.value().license().status() == domain::license_status::registered);
        CHECK(worker.value().license().claim_holder().empty());
        CHECK(worker.value().license().fence() == 2);
    }());
}
