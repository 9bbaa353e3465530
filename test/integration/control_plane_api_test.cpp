// The control plane's HTTP routes over real sockets: credentials, every route, errors,
// the change feed, the OpenAPI document and the absence of secrets in logs.
#include "http_test_support.hpp"

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/json/parse.hpp>

#include <catch2/catch.hpp>

#include <fstream>
#include <set>
#include <sstream>

using namespace lcm;
using namespace lcm::test;
using http::verb;

namespace {

std::string registration_body(std::string_view token, bool reregister = false)
{
    return boost::json::serialize(boost::json::object{{"token", token}, {"reregister", reregister}});
}

} // namespace

TEST_CASE("api health and metrics are open", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        auto health_request = make_request(verb::get, "/health", credentials::none);
        auto health = co_await send(f.server.port(), std::move(health_request));
        CHECK(health.result_int() == 200);
        CHECK(json_of(health).at("status") == "ok");

        auto metrics_request = make_request(verb::get, "/metrics", credentials::none);
        auto metrics = co_await send(f.server.port(), std::move(metrics_request));
        CHECK(metrics.result_int() == 200);
        CHECK(metrics[http::field::content_type].starts_with("text/plain"));
        CHECK(metrics.body() == "# TYPE lcm_test_total counter\nlcm_test_total 3\n");

        co_await f.server.stop();
    }());
}

TEST_CASE("api public routes need admin token", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();

        auto missing_request = make_request(verb::get, "/api/workers", credentials::none);
        auto missing = co_await send(port, std::move(missing_request));
        CHECK(missing.result_int() == 401);
        CHECK(code_of(missing) == "unauthorized");
        CHECK(missing[http::field::www_authenticate] == "Bearer");

        auto wrong = make_request(verb::get, "/api/workers", credentials::none);
        wrong.set(http::field::authorization, "Bearer admin-Tok3n-5e3f0c2e");
        auto wrong_response = co_await send(port, std::move(wrong));
        CHECK(wrong_response.result_int() == 401);

        auto wrong_scheme = make_request(verb::get, "/api/workers", credentials::none);
        wrong_scheme.set(http::field::authorization, "Basic " + admin_token);
        auto wrong_scheme_response = co_await send(port, std::move(wrong_scheme));
        CHECK(wrong_scheme_response.result_int() == 401);

        auto api_key_only = make_request(verb::get, "/api/workers", credentials::internal);
        auto api_key_only_response = co_await send(port, std::move(api_key_only));
        CHECK(api_key_only_response.result_int() == 401);

        auto lowercase_scheme = make_request(verb::get, "/api/workers", credentials::none);
        lowercase_scheme.set(http::field::authorization, "bearer " + admin_token);
        auto lowercase_scheme_response = co_await send(port, std::move(lowercase_scheme));
        CHECK(lowercase_scheme_response.result_int() == 200);

        auto list_request = make_request(verb::get, "/api/workers");
        auto list_response = co_await send(port, std::move(list_request));
        CHECK(list_response.result_int() == 200);
        co_await f.server.stop();
    }());
}

TEST_CASE("api internal routes need API key", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        const std::vector<std::pair<verb, std::string>> routes{
            {verb::get, "/api/internal/license-tasks"},
            {verb::get, "/api/internal/workers/w1/license-task"},
            {verb::post, "/api/internal/workers/w1/operations/1/start"},
            {verb::post, "/api/internal/workers/w1/operations/1/complete-registration"},
            {verb::post, "/api/internal/workers/w1/operations/1/complete-deregistration"},
            {verb::post, "/api/internal/workers/w1/operations/1/fail"},
            {verb::get, "/api/internal/changes"},
        };
        for (const auto& [method, target] : routes) {
            INFO(target);
            auto missing_request = make_request(method, target, credentials::none);
            auto missing = co_await send(port, std::move(missing_request));
            CHECK(missing.result_int() == 401);

            auto wrong = make_request(method, target, credentials::none);
            wrong.set("X-API-Key", "internal-K3y-9a7b1e45");
            auto wrong_response = co_await send(port, std::move(wrong));
            CHECK(wrong_response.result_int() == 401);

            auto admin = make_request(method, target, credentials::admin);
            auto admin_response = co_await send(port, std::move(admin));
            CHECK(admin_response.result_int() == 401);
        }
        auto allowed_request = make_request(verb::get, "/api/internal/changes", credentials::internal);
        auto allowed = co_await send(port, std::move(allowed_request));
        CHECK(allowed.result_int() == 200);
        co_await f.server.stop();
    }());
}

TEST_CASE("api empty credentials reject everyone", "[integration]")
{
    served_control_plane f({}, transport::control_plane_api_options{});
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        auto empty_bearer = make_request(verb::get, "/api/workers", credentials::none);
        empty_bearer.set(http::field::authorization, "Bearer ");
        auto empty_bearer_response = co_await send(f.server.port(), std::move(empty_bearer));
        CHECK(empty_bearer_response.result_int() == 401);

        auto empty_key = make_request(verb::get, "/api/internal/changes", credentials::none);
        empty_key.set("X-API-Key", "");
        auto empty_key_response = co_await send(f.server.port(), std::move(empty_key));
        CHECK(empty_key_response.result_int() == 401);
        co_await f.server.stop();
    }());
}

TEST_CASE("api add worker returns 201", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        auto created_request = make_request(verb::post, "/api/workers", credentials::admin,
                               R"({"id":"w1","name":"lab one","cml_url":"https://127.0.0.1:9443","status":"running"})");
        auto created = co_await send(
            port, std::move(created_request));
        CHECK(created.result_int() == 201);
        CHECK(created[http::field::location] == "/api/workers/w1");
        CHECK(json_of(created).at("id") == "w1");
        CHECK(json_of(created).at("status") == "running");

        auto generated_request = make_request(verb::post, "/api/workers", credentials::admin,
                               R"({"name":"lab two","cml_url":"http://127.0.0.1:9080"})");
        auto generated = co_await send(
            port, std::move(generated_request));
        CHECK(generated.result_int() == 201);
        CHECK(json_of(generated).at("id").as_string().size() == 36);

        auto duplicate_request = make_request(verb::post, "/api/workers", credentials::admin,
                               R"({"id":"w1","name":"again","cml_url":"https://127.0.0.1:9443"})");
        auto duplicate = co_await send(
            port, std::move(duplicate_request));
        CHECK(duplicate.result_int() == 409);
        CHECK(code_of(duplicate) == "already_exists");

        auto bad_url_request = make_request(verb::post, "/api/workers", credentials::admin,
                                                        R"({"name":"lab","cml_url":"ftp://host"})");
        auto bad_url = co_await send(port, std::move(bad_url_request));
        CHECK(bad_url.result_int() == 400);
        CHECK(code_of(bad_url) == "invalid_argument");

        auto missing_name_request = make_request(verb::post, "/api/workers", credentials::admin, R"({"cml_url":"https://h"})");
        auto missing_name = co_await send(port, std::move(missing_name_request));
        CHECK(missing_name.result_int() == 400);
        CHECK(json_of(missing_name).at("message").as_string().find("'name'") != boost::json::string::npos);

        auto bad_status_request = make_request(verb::post, "/api/workers", credentials::admin,
                               R"({"name":"lab","cml_url":"https://h","status":"sleeping"})");
        auto bad_status = co_await send(
            port, std::move(bad_status_request));
        CHECK(bad_status.result_int() == 400);
        co_await f.server.stop();
    }());
}

TEST_CASE("api get and list workers", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("a");
        co_await f.add_worker("b");
        co_await f.add_worker("c");

        auto one_request = make_request(verb::get, "/api/workers/b");
        auto one = co_await send(port, std::move(one_request));
        CHECK(one.result_int() == 200);
        const auto worker = json_of(one);
        CHECK(worker.at("id") == "b");
        const auto& license = worker.at("license").as_object();
        for (auto field : {"status", "pending_operation", "operation_in_progress", "operation_id", "last_error",
                           "expiry_date", "features"}) {
            INFO(field);
            CHECK(license.contains(field));
        }

        auto unknown_request = make_request(verb::get, "/api/workers/zzz");
        auto unknown = co_await send(port, std::move(unknown_request));
        CHECK(unknown.result_int() == 404);
        CHECK(code_of(unknown) == "not_found");

        auto first_request = make_request(verb::get, "/api/workers?limit=2");
        auto first = co_await send(port, std::move(first_request));
        CHECK(first.result_int() == 200);
        CHECK(json_of(first).at("workers").as_array().size() == 2);
        CHECK(json_of(first).at("next_after") == "b");

        auto second_request = make_request(verb::get, "/api/workers?limit=2&after=b");
        auto second = co_await send(port, std::move(second_request));
        CHECK(json_of(second).at("workers").as_array().size() == 1);
        CHECK(json_of(second).at("workers").as_array()[0].at("id") == "c");
        CHECK(json_of(second).at("next_after").is_null());

        for (auto target : {"/api/workers?limit=0", "/api/workers?limit=abc", "/api/workers?limit=501"}) {
            INFO(target);
            auto rejected_request = make_request(verb::get, target);
            auto rejected = co_await send(port, std::move(rejected_request));
            CHECK(rejected.result_int() == 400);
        }
        co_await f.server.stop();
    }());
}

TEST_CASE("api license requests return 202", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("w1");

        auto accepted_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                                         registration_body(license_token));
        auto accepted = co_await send(port, std::move(accepted_request));
        CHECK(accepted.result_int() == 202);
        CHECK(json_of(accepted).at("operation_id") == 1);
        CHECK(json_of(accepted).at("operation") == "register");
        CHECK(accepted.body().find(license_token) == std::string::npos);

        auto repeated_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                                         registration_body(license_token));
        auto repeated = co_await send(port, std::move(repeated_request));
        CHECK(repeated.result_int() == 202);
        CHECK(json_of(repeated).at("operation_id") == 1);

        auto worker_request = make_request(verb::get, "/api/workers/w1");
        auto worker = co_await send(port, std::move(worker_request));
        CHECK(worker.body().find(license_token) == std::string::npos);
        const auto license = json_of(worker).at("license").as_object();
        CHECK(license.at("pending_operation") == "register");
        CHECK(license.at("operation_id") == 1);
        CHECK(license.at("operation_in_progress") == false);

        auto listed_request = make_request(verb::get, "/api/workers");
        auto listed = co_await send(port, std::move(listed_request));
        CHECK(listed.body().find(license_token) == std::string::npos);

        auto conflict_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                                         registration_body("OTHER-token"));
        auto conflict = co_await send(port, std::move(conflict_request));
        CHECK(conflict.result_int() == 409);
        CHECK(code_of(conflict) == "operation_in_progress");

        auto deregister_conflict_request = make_request(verb::delete_, "/api/workers/w1/license");
        auto deregister_conflict = co_await send(port, std::move(deregister_conflict_request));
        CHECK(deregister_conflict.result_int() == 409);

        auto unknown_request = make_request(verb::post, "/api/workers/nope/license", credentials::admin,
                                                        registration_body(license_token));
        auto unknown = co_await send(port, std::move(unknown_request));
        CHECK(unknown.result_int() == 404);
        co_await f.server.stop();
    }());
}

TEST_CASE("api license request errors", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("w1");

        auto invalid_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                                        registration_body("not a token!"));
        auto invalid = co_await send(port, std::move(invalid_request));
        CHECK(invalid.result_int() == 422);
        CHECK(code_of(invalid) == "invalid_token");
        CHECK(invalid.body().find("not a token!") == std::string::npos);

        auto not_registered_request = make_request(verb::delete_, "/api/workers/w1/license");
        auto not_registered = co_await send(port, std::move(not_registered_request));
        CHECK(not_registered.result_int() == 409);
        CHECK(code_of(not_registered) == "not_registered");

        application::add_worker_request stopped{"w2", "lab", "https://127.0.0.1:9443", domain::worker_status::stopped,
                                                "test"};
        auto added = co_await f.plane.add_worker(std::move(stopped));
        REQUIRE(added);
        auto not_running_request = make_request(verb::post, "/api/workers/w2/license", credentials::admin,
                                                            registration_body(license_token));
        auto not_running = co_await send(port, std::move(not_running_request));
        CHECK(not_running.result_int() == 409);
        CHECK(code_of(not_running) == "worker_not_running");

        auto token_not_string_request = make_request(verb::post, "/api/workers/w1/license",
                                                                 credentials::admin, R"({"token":42})");
        auto token_not_string = co_await send(port, std::move(token_not_string_request));
        CHECK(token_not_string.result_int() == 400);

        auto flag_not_bool_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                                              R"({"token":"abc","reregister":"yes"})");
        auto flag_not_bool = co_await send(port, std::move(flag_not_bool_request));
        CHECK(flag_not_bool.result_int() == 400);
        co_await f.server.stop();
    }());
}

TEST_CASE("api rejects bad bodies", "[integration]")
{
    transport::http_server_options options;
    options.max_body_size = 1024;
    served_control_plane f(options);
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("w1");
        const auto target = "/api/workers/w1/license";

        auto wrong_type_request = make_request(verb::post, target, credentials::admin, registration_body(license_token), "text/plain");
        auto wrong_type = co_await send(
            port, std::move(wrong_type_request));
        CHECK(wrong_type.result_int() == 415);
        CHECK(code_of(wrong_type) == "unsupported_media_type");

        auto no_type_request = make_request(verb::post, target, credentials::admin, registration_body(license_token), "");
        auto no_type = co_await send(port, std::move(no_type_request));
        CHECK(no_type.result_int() == 415);

        auto with_charset_request = make_request(verb::post, target, credentials::admin,
                                                             registration_body(license_token),
                                                             "Application/JSON; charset=utf-8");
        auto with_charset = co_await send(port, std::move(with_charset_request));
        CHECK(with_charset.result_int() == 202);

        auto malformed_request = make_request(verb::post, target, credentials::admin, R"({"token":)");
        auto malformed = co_await send(port, std::move(malformed_request));
        CHECK(malformed.result_int() == 400);
        CHECK(code_of(malformed) == "invalid_argument");

        auto array_request = make_request(verb::post, target, credentials::admin, "[1,2]");
        auto array = co_await send(port, std::move(array_request));
        CHECK(array.result_int() == 400);

        auto oversized_request = make_request(verb::post, target, credentials::admin,
                                                          R"({"token":")" + std::string(2000, 'A') + R"("})");
        auto oversized = co_await send(port, std::move(oversized_request));
        CHECK(oversized.result_int() == 413);
        CHECK(code_of(oversized) == "payload_too_large");
        co_await f.server.stop();
    }());
}

TEST_CASE("api unknown routes return 404", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        auto unknown_request = make_request(verb::get, "/api/nothing");
        auto unknown = co_await send(f.server.port(), std::move(unknown_request));
        CHECK(unknown.result_int() == 404);
        CHECK(code_of(unknown) == "not_found");

        auto wrong_method_request = make_request(verb::put, "/api/workers");
        auto wrong_method = co_await send(f.server.port(), std::move(wrong_method_request));
        CHECK(wrong_method.result_int() == 404);

        auto trailing_slash_request = make_request(verb::get, "/api/workers/");
        auto trailing_slash = co_await send(f.server.port(), std::move(trailing_slash_request));
        CHECK(trailing_slash.result_int() == 404);
        co_await f.server.stop();
    }());
}

TEST_CASE("api internal task lifecycle", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("w1");
        auto accepted_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                                         registration_body(license_token));
        auto accepted = co_await send(port, std::move(accepted_request));
        REQUIRE(accepted.result_int() == 202);

        auto tasks_request = make_request(verb::get, "/api/internal/license-tasks", credentials::internal);
        auto tasks = co_await send(port, std::move(tasks_request));
        CHECK(tasks.result_int() == 200);
        const auto tasks_body = json_of(tasks);
        const auto& list = tasks_body.at("tasks").as_array();
        REQUIRE(list.size() == 1);
        CHECK(list[0].at("worker_id") == "w1");
        CHECK(list[0].at("operation") == "register");
        CHECK(list[0].at("token") == license_token.c_str());

        auto task_request = make_request(verb::get, "/api/internal/workers/w1/license-task",
                                                     credentials::internal);
        auto task = co_await send(port, std::move(task_request));
        CHECK(json_of(task).at("task").at("operation_id") == 1);

        auto not_started_request = make_request(verb::post,
                                                            "/api/internal/workers/w1/operations/1/complete-registration",
                                                            credentials::internal, "{}");
        auto not_started = co_await send(port, std::move(not_started_request));
        CHECK(not_started.result_int() == 409);
        CHECK(code_of(not_started) == "operation_not_started");

        auto stale_request = make_request(verb::post, "/api/internal/workers/w1/operations/7/start",
                                                      credentials::internal);
        auto stale = co_await send(port, std::move(stale_request));
        CHECK(stale.result_int() == 409);
        CHECK(code_of(stale) == "stale_operation");

        auto bad_id_request = make_request(verb::post, "/api/internal/workers/w1/operations/x1/start",
                                                       credentials::internal);
        auto bad_id = co_await send(port, std::move(bad_id_request));
        CHECK(bad_id.result_int() == 400);

        auto started_request = make_request(verb::post, "/api/internal/workers/w1/operations/1/start",
                                                        credentials::internal);
        auto started = co_await send(port, std::move(started_request));
        CHECK(started.result_int() == 200);
        CHECK(started.body().find(license_token) == std::string::npos);

        auto completed_request = make_request(verb::post, "/api/internal/workers/w1/operations/1/complete-registration",
                               credentials::internal,
                               R"({"registration_status":"COMPLETED","expiry_date":"2027-01-02T03:04:05Z",)"
                               R"("features":[{"id":"f1","name":"CML - Enterprise","in_use":2}]})");
        auto completed = co_await send(
            port, std::move(completed_request));
        CHECK(completed.result_int() == 200);

        auto worker_request = make_request(verb::get, "/api/workers/w1");
        auto worker_response = co_await send(port, std::move(worker_request));
        auto worker = json_of(worker_response);
        const auto& license = worker.at("license").as_object();
        CHECK(license.at("status") == "registered");
        CHECK(license.at("pending_operation") == "none");
        CHECK(license.at("expiry_date") == "2027-01-02T03:04:05.000000Z");
        CHECK(license.at("features").as_array().size() == 1);

        auto no_task_request = make_request(verb::get, "/api/internal/workers/w1/license-task",
                                                        credentials::internal);
        auto no_task = co_await send(port, std::move(no_task_request));
        CHECK(json_of(no_task).at("task").is_null());

        auto deregister_request = make_request(verb::delete_, "/api/workers/w1/license");
        auto deregister = co_await send(port, std::move(deregister_request));
        CHECK(deregister.result_int() == 202);
        CHECK(json_of(deregister).at("operation_id") == 2);

        auto bad_failure_request = make_request(verb::post, "/api/internal/workers/w1/operations/2/fail",
                                                            credentials::internal, R"({"message":"no code"})");
        auto bad_failure = co_await send(port, std::move(bad_failure_request));
        CHECK(bad_failure.result_int() == 400);

        auto failed_request = make_request(verb::post, "/api/internal/workers/w1/operations/2/fail",
                                                       credentials::internal,
                                                       R"({"code":"cml_unreachable","message":"connect failed"})");
        auto failed = co_await send(port, std::move(failed_request));
        CHECK(failed.result_int() == 200);
        const auto after_failure = json_of(failed).at("license").as_object();
        CHECK(after_failure.at("status") == "registered");
        CHECK(after_failure.at("last_error").at("code") == "cml_unreachable");

        auto again_request = make_request(verb::delete_, "/api/workers/w1/license");
        auto again = co_await send(port, std::move(again_request));
        CHECK(json_of(again).at("operation_id") == 3);
        auto start_request = make_request(verb::post, "/api/internal/workers/w1/operations/3/start",
                                                credentials::internal);
        auto start_response = co_await send(port, std::move(start_request));
        CHECK(start_response.result_int() == 200);
        auto deregistered_request = make_request(verb::post, "/api/internal/workers/w1/operations/3/complete-deregistration",
                               credentials::internal, R"({"warning":"licensing service unreachable"})");
        auto deregistered = co_await send(
            port, std::move(deregistered_request));
        CHECK(deregistered.result_int() == 200);
        CHECK(json_of(deregistered).at("license").at("status") == "unregistered");
        CHECK(json_of(deregistered).at("license").at("last_warning") == "licensing service unreachable");
        co_await f.server.stop();
    }());
}

TEST_CASE("api change feed returns sequence", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("w1");
        const auto base = f.api.change_sequence_base();
        CHECK(base >= std::uint64_t{1} << 32);
        const auto current = base + f.repository.change_sequence();

        auto now_request = make_request(verb::get, "/api/internal/changes", credentials::internal);
        auto now = co_await send(port, std::move(now_request));
        CHECK(json_of(now).at("sequence") == current);

        auto passed_request = make_request(verb::get, "/api/internal/changes?after=0&timeout_ms=10000",
                                                       credentials::internal);
        auto passed = co_await send(port, std::move(passed_request));
        CHECK(json_of(passed).at("sequence") == current);

        const auto target = "/api/internal/changes?after=" + std::to_string(current) + "&timeout_ms=50";
        auto timed_out_request = make_request(verb::get, target, credentials::internal);
        auto timed_out = co_await send(port, std::move(timed_out_request));
        CHECK(json_of(timed_out).at("sequence") == current);

        auto ahead_request = make_request(verb::get, "/api/internal/changes?after=999&timeout_ms=10000",
                                                      credentials::internal);
        auto ahead = co_await send(port, std::move(ahead_request));
        CHECK(json_of(ahead).at("sequence") == current);

        // The feed returns the current sequence at once for the repository's own sequence,
        // which an earlier process without a base would have returned.
        const auto raw_target =
            "/api/internal/changes?after=" + std::to_string(f.repository.change_sequence()) + "&timeout_ms=10000";
        auto raw_request = make_request(verb::get, raw_target, credentials::internal);
        auto raw = co_await send(port, std::move(raw_request));
        CHECK(json_of(raw).at("sequence") == current);

        for (auto bad : {"/api/internal/changes?after=x", "/api/internal/changes?after=1&timeout_ms=-1",
                         "/api/internal/changes?after=1&timeout_ms=600000"}) {
            INFO(bad);
            auto bad_request = make_request(verb::get, bad, credentials::internal);
            auto bad_response = co_await send(port, std::move(bad_request));
            CHECK(bad_response.result_int() == 400);
        }
        co_await f.server.stop();
    }());
}

TEST_CASE("api change sequence differs per process", "[integration]")
{
    // A restarted control plane is a new api object on the same store. Its feed must not
    // return the sequence that a controller still keeps from the earlier process.
    storage::memory_repository repository;
    sink_type sink;
    application::control_plane<storage::memory_repository, sink_type> plane(repository, sink);
    transport::control_plane_api<storage::memory_repository, sink_type> first(plane, test_api_options());
    transport::control_plane_api<storage::memory_repository, sink_type> second(plane, test_api_options());
    CHECK(first.change_sequence_base() != second.change_sequence_base());

    auto fixed_options = test_api_options();
    fixed_options.change_sequence_base = 7;
    transport::control_plane_api<storage::memory_repository, sink_type> fixed(plane, fixed_options);
    CHECK(fixed.change_sequence_base() == 7);
}

namespace {

/// A memory repository that reports when a coroutine starts waiting for a change, so a test
/// knows that the long-poll is held before it makes the change.
class observed_repository : public storage::memory_repository {
public:
    asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        if (on_wait) {
            on_wait();
        }
        return storage::memory_repository::wait_for_change(after);
    }

    std::function<void()> on_wait;
};

} // namespace

TEST_CASE("api change feed wakes on request", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    observed_repository repository;
    sink_type sink;
    application::control_plane<observed_repository, sink_type> plane(repository, sink, logs.make_logger());
    transport::control_plane_api<observed_repository, sink_type> api(plane, test_api_options(), logs.make_logger());
    running_server server(context, {}, api.handler(), logs.make_logger());
    event waiting(context.get_executor());
    repository.on_wait = [&] { waiting.set(); };

    run_served(context, server, [&]() -> asio::awaitable<void> {
            const auto port = server.port();
            application::add_worker_request request{"w1", "lab", "https://127.0.0.1:9443",
                                                    domain::worker_status::running, "test"};
            auto added = co_await plane.add_worker(std::move(request));
            REQUIRE(added);
            const auto before = api.change_sequence_base() + repository.change_sequence();

            // The long-poll may wait 20 s, beyond the test's 10 s limit, unless the
            // registration below wakes it.
            const auto target = "/api/internal/changes?after=" + std::to_string(before) + "&timeout_ms=20000";
            std::optional<http_response> woken;
            event done(co_await asio::this_coro::executor);
            asio::co_spawn(
                co_await asio::this_coro::executor,
                [&]() -> asio::awaitable<void> {
                    auto wait_request = make_request(verb::get, target, credentials::internal);
                    woken = co_await send(port, std::move(wait_request));
                    done.set();
                },
                asio::detached);
            co_await waiting.wait();

            const auto started = std::chrono::steady_clock::now();
            auto accepted_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                                             registration_body(license_token));
            auto accepted = co_await send(port, std::move(accepted_request));
            REQUIRE(accepted.result_int() == 202);
            co_await done.wait();
            const auto elapsed = std::chrono::steady_clock::now() - started;

            REQUIRE(woken);
            CHECK(woken->result_int() == 200);
            CHECK(json_of(*woken).at("sequence") == before + 1);
            CHECK(elapsed < std::chrono::seconds(2));
            co_await server.stop();
        }(),
        std::chrono::seconds(10));
}

namespace {

/// Builds a change-feed request that waits up to 60 s for a change after the current sequence.
http_request long_poll_request(std::uint64_t current)
{
    const auto target = "/api/internal/changes?after=" + std::to_string(current) + "&timeout_ms=60000";
    return make_request(verb::get, target, credentials::internal);
}

/// A control plane on an `observed_repository`, served over HTTP on 127.0.0.1, with every
/// log record captured.
struct observed_control_plane {
    /// With `end_waits_on_stop`, the server's `on_stop` calls `api.end_change_waits()`.
    observed_control_plane(transport::http_server_options options, bool end_waits_on_stop)
    {
        if (end_waits_on_stop) {
            options.on_stop = [this] { api.end_change_waits(); };
        }
        server.emplace(context, std::move(options), api.handler(), logs.make_logger());
        repository.on_wait = [this] { waiting.set(); };
    }

    /// Sends a long-poll from a coroutine of its own and returns once the server waits on it.
    /// `poll_done` is set when the long-poll ends, with its response in `poll_response`, or
    /// the client's error in `poll_error` when the connection closed without a response.
    asio::awaitable<void> hold_long_poll()
    {
        const auto current = api.change_sequence_base() + repository.change_sequence();
        asio::co_spawn(
            context,
            [this, current]() -> asio::awaitable<void> {
                try {
                    poll_response = co_await send(server->port(), long_poll_request(current));
                }
                catch (const boost::system::system_error& error) {
                    poll_error = error.what();
                }
                poll_done.set();
            },
            asio::detached);
        co_await waiting.wait();
    }

    asio::io_context context;
    log_capture logs;
    observed_repository repository;
    sink_type sink;
    application::control_plane<observed_repository, sink_type> plane{repository, sink, logs.make_logger()};
    transport::control_plane_api<observed_repository, sink_type> api{plane, test_api_options(), logs.make_logger()};
    std::optional<running_server> server;
    event waiting{context.get_executor()};
    event poll_done{context.get_executor()};
    std::optional<http_response> poll_response;
    std::string poll_error;
};

} // namespace

TEST_CASE("api server stop ends held long-poll", "[integration]")
{
    // Without on_stop, the stop would wait for the held long-poll until the shutdown
    // timeout, beyond the test's 10 s limit.
    transport::http_server_options options;
    options.shutdown_timeout = std::chrono::seconds(60);
    observed_control_plane f(options, true);

    run_served(f.context, *f.server, [&]() -> asio::awaitable<void> {
            const auto current = f.api.change_sequence_base() + f.repository.change_sequence();
            co_await f.hold_long_poll();

            const auto started = std::chrono::steady_clock::now();
            co_await f.server->stop();
            const auto elapsed = std::chrono::steady_clock::now() - started;
            co_await f.poll_done.wait();

            CHECK(elapsed < std::chrono::seconds(2));
            INFO("client error: " << f.poll_error);
            REQUIRE(f.poll_response);
            CHECK(f.poll_response->result_int() == 200);
            CHECK(json_of(*f.poll_response).at("sequence") == current);
            CHECK(!f.poll_response->keep_alive());
        }(),
        std::chrono::seconds(10));
    CHECK(f.logs.lines_with("level=error") == std::vector<std::string>{});
    CHECK(f.logs.lines_with("outlived the shutdown timeout").empty());
}

TEST_CASE("api ended change feed does not wait", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        co_await f.add_worker("w1");
        const auto current = f.api.change_sequence_base() + f.repository.change_sequence();
        f.api.end_change_waits();

        // The client gives up after 5 s, long before the requested 60 s wait.
        const auto started = std::chrono::steady_clock::now();
        auto answered = co_await send(f.server.port(), long_poll_request(current));
        const auto elapsed = std::chrono::steady_clock::now() - started;

        CHECK(answered.result_int() == 200);
        CHECK(json_of(answered).at("sequence") == current);
        CHECK(elapsed < std::chrono::seconds(2));
        co_await f.server.stop();
    }());
}

TEST_CASE("api cancelled long-poll logs no error", "[integration]")
{
    // Without on_stop, the server cancels the held long-poll when the shutdown timeout passes.
    transport::http_server_options options;
    options.shutdown_timeout = std::chrono::milliseconds(100);
    observed_control_plane f(options, false);

    run_served(f.context, *f.server, [&]() -> asio::awaitable<void> {
            co_await f.hold_long_poll();
            co_await f.server->stop();
            co_await f.poll_done.wait();
            CHECK(!f.poll_response);
        }(),
        std::chrono::seconds(10));
    CHECK(!f.logs.lines_with("outlived the shutdown timeout").empty());
    const auto cancelled = f.logs.lines_with("msg=\"request cancelled\"");
    CHECK(!cancelled.empty());
    for (const auto& line : cancelled) {
        INFO(line);
        CHECK(line.starts_with("level=debug "));
    }
    CHECK(f.logs.lines_with("level=error") == std::vector<std::string>{});
}

TEST_CASE("api openapi document matches routes", "[integration]")
{
    std::ifstream file(LCM_OPENAPI_DOCUMENT);
    REQUIRE(file);
    std::stringstream text;
    text << file.rdbuf();
    const auto document = boost::json::parse(text.str()).as_object();
    CHECK(document.at("openapi").as_string().starts_with("3.1"));

    std::set<std::string> documented;
    for (const auto& [path, item] : document.at("paths").as_object()) {
        for (const auto& [method, operation] : item.as_object()) {
            if (method == "parameters" || method == "summary" || method == "description") {
                continue;
            }
            std::string upper(method);
            for (auto& c : upper) {
                c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
            }
            documented.insert(upper + " " + std::string(path));
            CHECK(operation.as_object().contains("responses"));
        }
    }

    served_control_plane f;
    std::set<std::string> registered;
    for (const auto& route : f.api.routes()) {
        registered.insert(std::string(http::to_string(route.method)) + " " + route.pattern);
    }

    for (const auto& route : registered) {
        INFO("registered but not documented: " << route);
        CHECK(documented.contains(route));
    }
    for (const auto& route : documented) {
        INFO("documented but not registered: " << route);
        CHECK(registered.contains(route));
    }
}

TEST_CASE("api logs contain no secrets", "[integration]")
{
    served_control_plane f;
    run_served(f.context, f.server, [&]() -> asio::awaitable<void> {
        const auto port = f.server.port();
        co_await f.add_worker("w1");
        auto register_request = make_request(verb::post, "/api/workers/w1/license", credentials::admin,
                                         registration_body(license_token));
        co_await send(port, std::move(register_request));
        auto tasks_request = make_request(verb::get, "/api/internal/license-tasks", credentials::internal);
        co_await send(port, std::move(tasks_request));
        auto fail_request = make_request(verb::post, "/api/internal/workers/w1/operations/1/fail",
                                         credentials::internal,
                                         R"({"code":"invalid","message":"CML rejected )" + license_token + R"("})");
        co_await send(port, std::move(fail_request));
        auto list_request = make_request(verb::get, "/api/workers?after=" + license_token);
        co_await send(port, std::move(list_request));

        auto wrong = make_request(verb::get, "/api/workers", credentials::none);
        wrong.set(http::field::authorization, "Bearer " + license_token);
        co_await send(port, std::move(wrong));
        co_await f.server.stop();
    }());

    const auto lines = f.logs.lines();
    CHECK(!f.logs.lines_with("msg=request ").empty());
    CHECK(!f.logs.lines_with("path=/api/workers/w1/license").empty());
    for (const auto& line : lines) {
        INFO(line);
        CHECK(line.find(admin_token) == std::string::npos);
        CHECK(line.find(api_key) == std::string::npos);
        CHECK(line.find(license_token) == std::string::npos);
    }

    // The failure message quoted the token; the stored and public forms are redacted.
    auto worker = testing::run_with_timeout(f.context, f.plane.get_worker("w1"));
    REQUIRE(worker);
    CHECK(worker.value().license().last_error()->message.find(license_token) == std::string::npos);
}
