// The request metrics observer and the logging event sink, in process: the metric lines a
// scrape returns and the log lines each domain event becomes.
#include "http_test_support.hpp"

#include <lcm/application/logging_event_sink.hpp>
#include <lcm/metrics.hpp>
#include <lcm/transport/http_metrics.hpp>
#include <lcm/transport/router.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

using namespace lcm;
using namespace lcm::test;
using http::verb;

namespace {

bool has_line(const std::string& exposition, const std::string& line)
{
    return exposition.starts_with(line + "\n") || exposition.find("\n" + line + "\n") != std::string::npos;
}

domain::event_header header_of_worker(std::string worker_id, std::uint64_t operation_id)
{
    const auto occurred_at = parse_timestamp("2026-03-01T10:00:00Z");
    REQUIRE(occurred_at);
    return domain::event_header{std::move(worker_id), operation_id, *occurred_at, "api"};
}

} // namespace

TEST_CASE("request metrics count by route", "[integration]")
{
    auto registry = std::make_shared<metrics::prometheus_registry>();
    transport::router routes;
    routes.add(verb::get, "/api/workers/{worker_id}", [](transport::request_context&) -> asio::awaitable<http_response> {
        boost::json::object body{{"ok", true}};
        co_return transport::make_json_response(http::status::ok, body);
    });
    routes.set_observer(transport::make_request_metrics_observer(registry));

    struct request_case {
        const char* target;
        unsigned status;
    };
    const request_case cases[] = {
        {"/api/workers/w1", 200}, {"/api/workers/w2", 200}, {"/no/such/path", 404}, {"/other", 404}};
    asio::io_context context;
    auto body = [&]() -> asio::awaitable<void> {
        for (const auto& [target, status] : cases) {
            http_request request{verb::get, target, 11};
            const auto response = co_await routes.dispatch(std::move(request));
            INFO(target);
            CHECK(response.result_int() == status);
        }
    };
    testing::run_with_timeout(context, body());

    const auto text = registry->text();
    INFO(text);
    // Both workers share the pattern's series, and every unknown path shares one series.
    CHECK(has_line(text, R"(http_server_requests_total{method="GET",route="/api/workers/{worker_id}",status="200"} 2)"));
    CHECK(has_line(text, R"(http_server_requests_total{method="GET",route="unmatched",status="404"} 2)"));
    CHECK(has_line(text, R"(http_server_request_duration_seconds_count{method="GET",route="/api/workers/{worker_id}"} 2)"));
    CHECK(has_line(text, R"(http_server_request_duration_seconds_bucket{method="GET",route="unmatched",le="+Inf"} 2)"));
    CHECK(text.find("w1") == std::string::npos);
    CHECK(text.find("/no/such/path") == std::string::npos);
}

TEST_CASE("logging event sink logs events", "[integration]")
{
    log_capture logs;
    auto registry = std::make_shared<metrics::prometheus_registry>();
    application::logging_event_sink sink(logs.make_logger(), registry);

    domain::license_registration_failed failed{header_of_worker("w1", 3),
                                               {"registration_failed", "CML reported the registration as FAILED"}};
    domain::license_operation_claimed claimed{header_of_worker("w1", 3), "controller-a", 5,
                                              header_of_worker("w1", 3).occurred_at + std::chrono::seconds(30)};
    std::vector<domain::domain_event> events{domain::license_registration_requested{header_of_worker("w1", 3), true},
                                             domain::license_registration_started{header_of_worker("w1", 3), 2},
                                             failed, claimed};
    asio::io_context context;
    auto body = [&]() -> asio::awaitable<void> { co_await sink.publish(std::move(events)); };
    testing::run_with_timeout(context, body());

    const auto lines = logs.lines();
    REQUIRE(lines.size() == 4);
    CHECK(lines[0] == "level=info msg=\"domain event\" event=cml_worker.license.registration.requested.v1 "
                      "worker_id=w1 operation_id=3 initiated_by=api occurred_at=2026-03-01T10:00:00.000000Z "
                      "reregister=true");
    CHECK(lines[1].find("event=cml_worker.license.registration.started.v1") != std::string::npos);
    CHECK(lines[1].ends_with(" attempt=2"));
    CHECK(lines[2].find("error_code=registration_failed "
                        "error_message=\"CML reported the registration as FAILED\"") != std::string::npos);
    CHECK(lines[3].ends_with(" holder=controller-a fence=5 expires_at=2026-03-01T10:00:30.000000Z"));

    const auto text = registry->text();
    INFO(text);
    CHECK(has_line(text, R"(lcm_domain_events_total{type="cml_worker.license.registration.requested.v1"} 1)"));
    CHECK(has_line(text, R"(lcm_domain_events_total{type="cml_worker.license.registration.failed.v1"} 1)"));
}

TEST_CASE("logging event sink respects level", "[integration]")
{
    log_capture logs;
    auto quiet = logs.make_logger();
    application::logging_event_sink sink(logger(log_level::warning, [&](const log_record& record) {
        quiet.log(record.level, record.message);
    }));
    std::vector<domain::domain_event> events{domain::license_deregistration_requested{header_of_worker("w2", 4)}};

    asio::io_context context;
    auto body = [&]() -> asio::awaitable<void> { co_await sink.publish(std::move(events)); };
    testing::run_with_timeout(context, body());
    CHECK(logs.lines().empty());
}
