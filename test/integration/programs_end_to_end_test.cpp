// The license flow across the three programs as processes on 127.0.0.1: lcm-fake-cml,
// lcm-control-plane and lcm-worker-controller. The worker-controller is killed with SIGKILL
// while registrations run and started again, and every operation must still end exactly once.
#if defined(LCM_FAKE_CML_PROGRAM) && defined(LCM_CONTROL_PLANE_PROGRAM) && defined(LCM_WORKER_CONTROLLER_PROGRAM)

#include "cml_http_test_support.hpp"
#include "program_test_support.hpp"

#include <catch2/catch.hpp>

#include <boost/json/array.hpp>
#include <boost/json/object.hpp>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

using namespace lcm;
using namespace lcm::test;

namespace {

constexpr std::size_t worker_count = 40;
/// Operations the control plane must have seen started before the worker-controller is killed.
constexpr std::size_t started_before_kill = 12;
/// Every eighth worker gets a token that the fake CML's licensing service rejects.
constexpr std::size_t rejected_every = 8;
/// Every fourth registered worker is deregistered afterwards.
constexpr std::size_t deregistered_every = 4;
/// The hard limit on the whole flow, below ctest's timeout of the test.
constexpr auto flow_timeout = std::chrono::seconds(90);

/// A token in CML's format, different for each worker so the output check finds any of them.
std::string token_of(std::size_t index)
{
    const auto number = std::to_string(100 + index);
    return index % rejected_every == 0 ? "REJECT-e2e-" + number + "-7b2d" : "E2E-token-" + number + "-a9c3f1";
}

std::string worker_id_of(std::size_t index) { return "e2e-" + std::to_string(100 + index); }

bool is_rejected(std::size_t index) { return index % rejected_every == 0; }

/// The flags of the three programs and the files they read.
struct program_setup {
    secret_files files;
    std::string password_file = files.write("cml-password", cml_password + "\n");
    std::string api_key_file = files.write("api-key", api_key + "\n");
    std::string admin_token_file = files.write("admin-token", admin_token + "\n");

    std::unique_ptr<child_process> start_fake_cml() const
    {
        // The registration delay keeps each registration running for several status reads,
        // so the kill lands while some of them are in progress at CML.
        const std::vector<std::string> arguments{"--listen", "127.0.0.1:0", "--password-file", password_file,
                                                 "--registration-delay", "400", "--reject-token-prefix", "REJECT"};
        return std::make_unique<child_process>(LCM_FAKE_CML_PROGRAM, arguments);
    }

    std::unique_ptr<child_process> start_control_plane() const
    {
        const std::vector<std::string> arguments{"--listen",         "127.0.0.1:0",    "--api-key-file",
                                                 api_key_file,       "--admin-token-file", admin_token_file,
                                                 "--db",             "sqlite:" + files.path("control-plane.db")};
        return std::make_unique<child_process>(LCM_CONTROL_PLANE_PROGRAM, arguments);
    }

    std::unique_ptr<child_process> start_worker_controller(unsigned short control_plane_port) const
    {
        const std::vector<std::string> arguments{
            "--control-plane", "http://127.0.0.1:" + std::to_string(control_plane_port),
            "--api-key-file", api_key_file, "--cml-password-file", password_file, "--concurrency", "4",
            "--poll-interval", "50", "--metrics-listen", "127.0.0.1:0"};
        return std::make_unique<child_process>(LCM_WORKER_CONTROLLER_PROGRAM, arguments);
    }
};

/// Returns the awaitable response to one request. This is no coroutine, and it takes views,
/// so call sites create no temporary with a destructor inside their co_await expression,
/// which g++ 12 may destroy twice.
asio::awaitable<http_response> call(unsigned short port, http::verb method, std::string_view target, credentials who,
                                    std::string_view body = {})
{
    return send(port, make_request(method, target, who, std::string(body)));
}

/// Returns the control plane's change sequence.
asio::awaitable<std::uint64_t> read_sequence(unsigned short port)
{
    auto response = co_await call(port, http::verb::get, "/api/internal/changes", credentials::internal);
    REQUIRE(response.result() == http::status::ok);
    co_return json_of(response).at("sequence").to_number<std::uint64_t>();
}

/// Returns every worker in the control plane's public form, by id.
asio::awaitable<std::map<std::string, boost::json::object>> read_workers(unsigned short port)
{
    auto response = co_await call(port, http::verb::get, "/api/workers?limit=500", credentials::admin);
    REQUIRE(response.result() == http::status::ok);
    std::map<std::string, boost::json::object> workers;
    const auto page = json_of(response);
    for (const auto& worker : page.at("workers").as_array()) {
        workers.emplace(std::string(worker.at("id").as_string()), worker.as_object());
    }
    co_return workers;
}

using worker_map = std::map<std::string, boost::json::object>;

/// Reads the workers until `done` returns true for them and returns them. Between two reads
/// it waits on the control plane's change feed, so it reads again as soon as anything changed.
template <class Predicate>
asio::awaitable<worker_map> wait_for_workers(unsigned short port, Predicate done,
                                             std::chrono::steady_clock::time_point deadline, std::string_view what)
{
    for (;;) {
        // The sequence is read before the workers, so a change between the two wakes the wait.
        const auto sequence = co_await read_sequence(port);
        auto workers = co_await read_workers(port);
        if (done(workers)) {
            co_return workers;
        }
        INFO("waiting until " << what);
        REQUIRE(std::chrono::steady_clock::now() < deadline);
        const auto target = "/api/internal/changes?after=" + std::to_string(sequence) + "&timeout_ms=1000";
        auto changed = co_await call(port, http::verb::get, target, credentials::internal);
        REQUIRE(changed.result() == http::status::ok);
    }
}

const boost::json::object& license_of(const boost::json::object& worker) { return worker.at("license").as_object(); }

std::string_view field(const boost::json::object& object, std::string_view name)
{
    return object.at(name).as_string();
}

bool has_pending_operation(const boost::json::object& worker)
{
    return field(license_of(worker), "pending_operation") != "none";
}

bool all_settled(const worker_map& workers)
{
    for (const auto& [id, worker] : workers) {
        if (has_pending_operation(worker)) {
            return false;
        }
    }
    return true;
}

/// Counts the workers whose current operation a worker-controller has started: those
/// running now and those already finished. Sets `in_progress` to the running ones.
std::size_t count_started(const worker_map& workers, std::size_t& in_progress)
{
    std::size_t started = 0;
    in_progress = 0;
    for (const auto& [id, worker] : workers) {
        const auto& license = license_of(worker);
        if (license.at("operation_in_progress").as_bool()) {
            ++in_progress;
            ++started;
        }
        else if (!has_pending_operation(worker)) {
            ++started;
        }
    }
    return started;
}

/// Checks that the worker's last operation is `operation` with the accepted id, and that it
/// ended completed, or failed with a code and a message.
void check_finished(const boost::json::object& worker, std::string_view operation, std::uint64_t operation_id)
{
    const auto& license = license_of(worker);
    INFO("worker " << field(worker, "id") << ": " << boost::json::serialize(license));
    CHECK(field(license, "pending_operation") == "none");
    CHECK(field(license, "last_operation") == operation);
    CHECK(license.at("operation_id").to_number<std::uint64_t>() == operation_id);
    const auto outcome = field(license, "last_outcome");
    CHECK((outcome == "completed" || outcome == "failed"));
    if (outcome == "failed") {
        REQUIRE(license.at("last_error").is_object());
        const auto& error = license.at("last_error").as_object();
        CHECK_FALSE(field(error, "code").empty());
        CHECK_FALSE(field(error, "message").empty());
    }
}

/// Returns the counters of one fake CML instance.
asio::awaitable<boost::json::object> read_instance_counters(unsigned short port, const std::string& instance)
{
    const auto target = "/_fake/instances/" + instance + "/counters";
    auto response = co_await call(port, http::verb::get, target, credentials::none);
    REQUIRE(response.result() == http::status::ok);
    co_return json_of(response);
}

asio::awaitable<std::string> read_metrics(unsigned short port)
{
    auto response = co_await call(port, http::verb::get, "/metrics", credentials::none);
    REQUIRE(response.result() == http::status::ok);
    co_return response.body();
}

/// Checks that the exposition has a line that starts with `prefix`.
void check_has_sample(const std::string& exposition, const std::string& prefix)
{
    INFO("metrics:\n" << exposition);
    INFO("expected a line starting with " << prefix);
    CHECK((exposition.starts_with(prefix) || exposition.find("\n" + prefix) != std::string::npos));
}

/// Checks that the exposition has the whole line `line`, value included.
void check_has_line(const std::string& exposition, const std::string& line)
{
    check_has_sample(exposition, line + "\n");
}

std::vector<std::string> all_secrets()
{
    std::vector<std::string> secrets{cml_password, api_key, admin_token, std::string(bearer_prefix)};
    for (std::size_t i = 0; i < worker_count; ++i) {
        secrets.push_back(token_of(i));
    }
    return secrets;
}

std::size_t count_occurrences(const std::string& text, std::string_view needle)
{
    std::size_t count = 0;
    auto position = text.find(needle);
    while (position != std::string::npos) {
        ++count;
        position = text.find(needle, position + 1);
    }
    return count;
}

} // namespace

TEST_CASE("license flow survives controller kill", "[integration][programs]")
{
    program_setup setup;
    auto fake_cml = setup.start_fake_cml();
    const auto cml_port = read_port(*fake_cml);
    auto control_plane = setup.start_control_plane();
    const auto plane_port = read_port(*control_plane);
    auto first_controller = setup.start_worker_controller(plane_port);
    read_port(*first_controller);
    std::unique_ptr<child_process> second_controller;
    unsigned short second_metrics_port = 0;

    const std::string invalid_token = "INVALID#token-5c1d9e";
    std::map<std::string, std::uint64_t> registrations;
    std::map<std::string, std::uint64_t> deregistrations;

    asio::io_context context;
    auto flow = [&]() -> asio::awaitable<void> {
        const auto deadline = std::chrono::steady_clock::now() + flow_timeout - std::chrono::seconds(5);

        // Each worker points at its own fake CML instance.
        for (std::size_t i = 0; i < worker_count; ++i) {
            const auto id = worker_id_of(i);
            const auto cml_url = "http://127.0.0.1:" + std::to_string(cml_port) + "/instances/" + id;
            boost::json::object worker{
                {"id", id}, {"name", "e2e worker " + std::to_string(i)}, {"cml_url", cml_url}, {"status", "running"}};
            const auto body = boost::json::serialize(worker);
            auto added = co_await call(plane_port, http::verb::post, "/api/workers", credentials::admin, body);
            REQUIRE(added.result() == http::status::created);
        }

        // A token outside CML's format is rejected at once and starts no operation.
        const std::string invalid_body = R"({"token": ")" + invalid_token + R"("})";
        const auto invalid_target = "/api/workers/" + worker_id_of(1) + "/license";
        auto invalid = co_await call(plane_port, http::verb::post, invalid_target, credentials::admin, invalid_body);
        CHECK(invalid.result() == http::status::unprocessable_entity);
        CHECK(code_of(invalid) == "invalid_token");
        CHECK(invalid.body().find(invalid_token) == std::string::npos);

        for (std::size_t i = 0; i < worker_count; ++i) {
            const auto id = worker_id_of(i);
            const std::string body = R"({"token": ")" + token_of(i) + R"("})";
            const auto target = "/api/workers/" + id + "/license";
            auto accepted = co_await call(plane_port, http::verb::post, target, credentials::admin, body);
            REQUIRE(accepted.result() == http::status::accepted);
            CHECK(accepted.body().find(token_of(i)) == std::string::npos);
            registrations[id] = json_of(accepted).at("operation_id").to_number<std::uint64_t>();
        }

        // Kill the worker-controller once enough operations started and some still run.
        auto kill_point = [](const worker_map& workers) {
            std::size_t in_progress = 0;
            const auto started = count_started(workers, in_progress);
            return started >= started_before_kill && in_progress > 0 && started < worker_count;
        };
        const auto before_kill =
            co_await wait_for_workers(plane_port, kill_point, deadline, "enough registrations started");
        first_controller->send_signal(SIGKILL);
        const auto killed = first_controller->wait_for_exit(exit_timeout);
        REQUIRE(killed);
        CHECK(*killed == 128 + SIGKILL);

        // Nothing changes the workers while no controller runs, so this state is the one the
        // kill left: some registrations started but unfinished, some never started.
        auto interrupted = co_await read_workers(plane_port);
        std::size_t in_progress = 0;
        const auto started = count_started(interrupted, in_progress);
        CHECK(in_progress > 0);
        CHECK(started < worker_count);
        std::size_t in_progress_before_kill = 0;
        CHECK(started >= count_started(before_kill, in_progress_before_kill));

        // The kill landed mid-registration at CML: it accepted the POST of an operation that
        // the control plane still shows as running.
        std::size_t accepted_but_unreported = 0;
        for (const auto& [id, worker] : interrupted) {
            if (!license_of(worker).at("operation_in_progress").as_bool()) {
                continue;
            }
            auto counters = co_await read_instance_counters(cml_port, id);
            if (counters.at("accepted_registrations").to_number<std::uint64_t>() == 1) {
                ++accepted_but_unreported;
            }
        }
        CHECK(accepted_but_unreported > 0);

        second_controller = setup.start_worker_controller(plane_port);
        second_metrics_port = read_port(*second_controller);
        auto settled = co_await wait_for_workers(plane_port, all_settled, deadline, "every registration finished");
        for (std::size_t i = 0; i < worker_count; ++i) {
            const auto& worker = settled.at(worker_id_of(i));
            check_finished(worker, "register", registrations.at(worker_id_of(i)));
            const auto& license = license_of(worker);
            if (is_rejected(i)) {
                CHECK(field(license, "last_outcome") == "failed");
                CHECK(field(license.at("last_error").as_object(), "code") == "registration_failed");
            }
            else {
                CHECK(field(license, "last_outcome") == "completed");
                CHECK(field(license, "status") == "registered");
            }
        }

        for (std::size_t i = 1; i < worker_count; i += deregistered_every) {
            REQUIRE_FALSE(is_rejected(i));
            const auto id = worker_id_of(i);
            const auto target = "/api/workers/" + id + "/license";
            auto accepted = co_await call(plane_port, http::verb::delete_, target, credentials::admin);
            REQUIRE(accepted.result() == http::status::accepted);
            deregistrations[id] = json_of(accepted).at("operation_id").to_number<std::uint64_t>();
        }
        settled = co_await wait_for_workers(plane_port, all_settled, deadline, "every deregistration finished");
        for (const auto& [id, operation_id] : deregistrations) {
            const auto& worker = settled.at(id);
            check_finished(worker, "deregister", operation_id);
            CHECK(field(license_of(worker), "last_outcome") == "completed");
            CHECK(field(license_of(worker), "status") == "unregistered");
        }

        // CML accepted exactly one registration POST per operation, despite the kill.
        for (std::size_t i = 0; i < worker_count; ++i) {
            const auto id = worker_id_of(i);
            INFO("instance " << id);
            auto counters = co_await read_instance_counters(cml_port, id);
            CHECK(counters.at("accepted_registrations").to_number<std::uint64_t>() == 1);
            // The controller did not even try a second POST, which CML would reject with 409.
            CHECK(counters.at("received").at("register_license").to_number<std::uint64_t>() == 1);
            CHECK(counters.at("deregistrations").to_number<std::uint64_t>() == deregistrations.count(id));
        }
        auto totals = co_await call(cml_port, http::verb::get, "/_fake/counters", credentials::none);
        REQUIRE(totals.result() == http::status::ok);
        CHECK(json_of(totals).at("accepted_registrations").to_number<std::uint64_t>() == worker_count);
        CHECK(json_of(totals).at("instances").to_number<std::uint64_t>() == worker_count);

        const auto plane_metrics = co_await read_metrics(plane_port);
        const std::string license_route = R"(method="POST",route="/api/workers/{worker_id}/license")";
        check_has_line(plane_metrics, "http_server_requests_total{" + license_route + R"(,status="202"} 40)");
        check_has_line(plane_metrics, "http_server_requests_total{" + license_route + R"(,status="422"} 1)");
        check_has_sample(plane_metrics,
                         R"(http_server_request_duration_seconds_bucket{method="GET",route="/api/workers",le=")");
        check_has_line(plane_metrics,
                       R"(lcm_domain_events_total{type="cml_worker.license.registration.requested.v1"} 40)");

        const auto controller_metrics = co_await read_metrics(second_metrics_port);
        check_has_sample(controller_metrics,
                         R"(controller_runtime_reconcile_total{controller="license",result="success"} )");
        check_has_sample(controller_metrics,
                         R"(controller_runtime_reconcile_time_seconds_bucket{controller="license",le=")");
        check_has_line(controller_metrics, R"(controller_runtime_max_concurrent_reconciles{controller="license"} 4)");
        check_has_sample(controller_metrics, R"(workqueue_depth{controller="license",name="license"} )");
        check_has_sample(controller_metrics, R"(workqueue_adds_total{controller="license",name="license"} )");
    };
    testing::run_with_timeout(context, flow(), flow_timeout);

    REQUIRE(second_controller);
    stop_cleanly(*second_controller);
    stop_cleanly(*control_plane);
    stop_cleanly(*fake_cml);

    // The control plane logs every domain event, so its log contains each worker's timeline.
    const auto plane_log = control_plane->standard_error();
    CHECK(count_occurrences(plane_log, "event=cml_worker.license.registration.requested.v1") == worker_count);
    CHECK(count_occurrences(plane_log, "event=cml_worker.license.deregistration.completed.v1") ==
          deregistrations.size());
    CHECK(count_occurrences(plane_log, "event=cml_worker.license.registration.failed.v1") ==
          (worker_count + rejected_every - 1) / rejected_every);

    auto secrets = all_secrets();
    secrets.push_back(invalid_token);
    for (const auto* process :
         {fake_cml.get(), control_plane.get(), first_controller.get(), second_controller.get()}) {
        check_output_free_of(*process, secrets);
    }
}

TEST_CASE("worker controller serves metrics", "[integration][programs]")
{
    program_setup setup;
    auto control_plane = setup.start_control_plane();
    const auto plane_port = read_port(*control_plane);
    auto controller = setup.start_worker_controller(plane_port);
    const auto metrics_port = read_port(*controller);

    asio::io_context context;
    auto body = [&]() -> asio::awaitable<void> {
        auto health = co_await call(metrics_port, http::verb::get, "/health", credentials::none);
        CHECK(health.result() == http::status::ok);
        CHECK(json_of(health).at("status").as_string() == "ok");

        auto metrics = co_await call(metrics_port, http::verb::get, "/metrics", credentials::none);
        REQUIRE(metrics.result() == http::status::ok);
        CHECK(metrics[http::field::content_type].starts_with("text/plain; version=0.0.4"));
        check_has_line(metrics.body(), R"(controller_runtime_max_concurrent_reconciles{controller="license"} 4)");
        check_has_sample(metrics.body(), R"(controller_runtime_active_workers{controller="license"} )");
        check_has_line(metrics.body(), R"(http_server_requests_total{method="GET",route="/health",status="200"} 1)");

        auto missing = co_await call(metrics_port, http::verb::get, "/api/workers", credentials::none);
        CHECK(missing.result() == http::status::not_found);
    };
    testing::run_with_timeout(context, body());

    stop_cleanly(*controller);
    CHECK(controller->standard_error().find("worker-controller stopped") != std::string::npos);
    stop_cleanly(*control_plane);
    check_output_free_of(*controller, {api_key, cml_password});
}

TEST_CASE("worker controller rejects taken metrics port", "[integration][programs]")
{
    program_setup setup;
    auto control_plane = setup.start_control_plane();
    const auto plane_port = read_port(*control_plane);

    // The control plane's own port is taken, so the worker-controller cannot listen on it.
    child_process controller(LCM_WORKER_CONTROLLER_PROGRAM,
                             {"--control-plane", "http://127.0.0.1:" + std::to_string(plane_port), "--api-key-file",
                              setup.api_key_file, "--cml-password-file", setup.password_file, "--metrics-listen",
                              "127.0.0.1:" + std::to_string(plane_port)});
    const auto status = controller.wait_for_exit(exit_timeout);
    REQUIRE(status);
    CHECK(*status == 1);
    CHECK(controller.standard_error().find("cannot listen on 127.0.0.1:" + std::to_string(plane_port)) !=
          std::string::npos);
    CHECK(controller.standard_output().empty());
    stop_cleanly(*control_plane);
}

#endif
