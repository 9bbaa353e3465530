// The license flow across the three programs as processes on 127.0.0.1: lcm-fake-cml,
// lcm-control-plane and lcm-worker-controller. The worker-controller, or in another test the
// control plane on its SQLite file, is killed with SIGKILL while registrations run and started
// again, and every operation must still end exactly once.
#if defined(LCM_FAKE_CML_PROGRAM) && defined(LCM_CONTROL_PLANE_PROGRAM) && defined(LCM_WORKER_CONTROLLER_PROGRAM)

#include "cml_http_test_support.hpp"
#include "program_test_support.hpp"

#include <catch2/catch.hpp>

#include <boost/json/array.hpp>
#include <boost/json/object.hpp>

#include <lcm/domain/time.hpp>

#include <chrono>
#include <csignal>
#include <cstdint>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

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
/// Workers whose registration the control-plane restart test requests and finishes before
/// the run that the kill interrupts. The run deregisters those that were registered.
constexpr std::size_t registered_before_run = 10;
/// Operations of the run that must have started before the control plane is killed.
constexpr std::size_t run_started_before_kill = 8;
/// The delay of each fake CML response during the run, in ms. A reconcile that starts a
/// registration occupies one of four slots for three CML calls, so the delay bounds the start
/// rate to about 50 per second, and the test observes the run before every operation started.
constexpr int run_cml_latency_ms = 25;
/// Times the control-plane restart test tries another port when its first start fails.
constexpr int max_port_attempts = 20;
/// The worker-controller's log message when a change-feed read failed after all its attempts.
constexpr std::string_view change_feed_failed = "reading the control plane's change feed failed";
/// The maximum wait for that message after the kill. The worker-controller's client gives up
/// after four attempts and about 350 ms of backoff.
constexpr auto outage_timeout = std::chrono::seconds(10);

/// Workers of the scale-out test, whose operations three worker-controllers share.
constexpr std::size_t scale_out_worker_count = 90;
/// The claim lease of the scale-out test's worker-controllers, in ms. It is short so that
/// the takeover after the kill fits in the test's time, and more than twice the poll
/// interval of 50 ms, as the worker-controller requires.
constexpr int scale_out_lease_ms = 3000;
/// The worker-controller's wait after another controller's claim expired before it takes
/// the claim over (`license_reconciler_options::takeover_margin`).
constexpr auto takeover_margin = std::chrono::milliseconds(500);
/// The allowance for scheduling and for the test's own reads on top of the lease and the
/// margin, because a loaded 2-core machine runs six processes, a PostgreSQL server and the test.
constexpr auto takeover_allowance = std::chrono::milliseconds(2500);
/// How long after the kill a claim renewal of the killed controller may still be applied,
/// because its request reached the control plane before the kill.
constexpr auto in_flight_allowance = std::chrono::milliseconds(1000);
/// Claims that the controller to be killed must hold on started operations before the kill.
/// Up to `--concurrency` (4) of them may still end through reports that were in flight at
/// the kill, so at least two are left for the other controllers to take over.
constexpr std::size_t claims_before_kill = 6;
/// Claims of the killed controller that the others must at least take over.
constexpr std::size_t min_takeovers = 2;

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
    /// The control plane's store: an SQLite file unless a test sets another.
    std::vector<std::string> database_flags{"--db", "sqlite:" + files.path("control-plane.db")};

    std::unique_ptr<child_process> start_fake_cml() const
    {
        // The registration delay keeps each registration running for several status reads,
        // so the kill lands while some of them are in progress at CML.
        const std::vector<std::string> arguments{"--listen", "127.0.0.1:0", "--password-file", password_file,
                                                 "--registration-delay", "400", "--reject-token-prefix", "REJECT"};
        return std::make_unique<child_process>(LCM_FAKE_CML_PROGRAM, arguments);
    }

    std::unique_ptr<child_process> start_control_plane(const std::string& listen = "127.0.0.1:0") const
    {
        std::vector<std::string> arguments{"--listen",         listen, "--api-key-file", api_key_file,
                                           "--admin-token-file", admin_token_file};
        arguments.insert(arguments.end(), database_flags.begin(), database_flags.end());
        return std::make_unique<child_process>(LCM_CONTROL_PLANE_PROGRAM, arguments);
    }

    std::unique_ptr<child_process> start_worker_controller(unsigned short control_plane_port,
                                                           const std::vector<std::string>& more_flags = {}) const
    {
        std::vector<std::string> arguments{
            "--control-plane", "http://127.0.0.1:" + std::to_string(control_plane_port),
            "--api-key-file", api_key_file, "--cml-password-file", password_file, "--concurrency", "4",
            "--poll-interval", "50", "--metrics-listen", "127.0.0.1:0"};
        arguments.insert(arguments.end(), more_flags.begin(), more_flags.end());
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

/// Counts the operations of `operations` (worker id to operation id) that a worker-controller
/// has started: those running now and those already finished. Sets `in_progress` to the
/// running ones. A worker whose current operation is another one does not count.
std::size_t count_started(const worker_map& workers, const std::map<std::string, std::uint64_t>& operations,
                          std::size_t& in_progress)
{
    std::size_t started = 0;
    in_progress = 0;
    for (const auto& [id, operation_id] : operations) {
        const auto& worker = workers.at(id);
        const auto& license = license_of(worker);
        if (license.at("operation_id").to_number<std::uint64_t>() != operation_id) {
            continue;
        }
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

/// Checks the outcome of worker `index`'s registration `operation_id`: failed with
/// `registration_failed` for a token that the fake CML rejects, else completed.
void check_registration_outcome(const worker_map& workers, std::size_t index, std::uint64_t operation_id)
{
    const auto& worker = workers.at(worker_id_of(index));
    check_finished(worker, "register", operation_id);
    const auto& license = license_of(worker);
    if (is_rejected(index)) {
        CHECK(field(license, "last_outcome") == "failed");
        CHECK(field(license.at("last_error").as_object(), "code") == "registration_failed");
    }
    else {
        CHECK(field(license, "last_outcome") == "completed");
        CHECK(field(license, "status") == "registered");
    }
}

/// Checks that every deregistration of `deregistrations` (worker id to operation id) completed.
void check_deregistrations_completed(const worker_map& workers,
                                     const std::map<std::string, std::uint64_t>& deregistrations)
{
    for (const auto& [id, operation_id] : deregistrations) {
        const auto& worker = workers.at(id);
        check_finished(worker, "deregister", operation_id);
        CHECK(field(license_of(worker), "last_outcome") == "completed");
        CHECK(field(license_of(worker), "status") == "unregistered");
    }
}

/// Checks that each worker still records its accepted operation of `operations` (worker id
/// to operation id), as the pending one or, once it finished, as the last one.
void check_intents_kept(const worker_map& workers, const std::map<std::string, std::uint64_t>& operations,
                        std::string_view operation)
{
    for (const auto& [id, operation_id] : operations) {
        INFO("worker " << id << ", accepted " << operation << " operation " << operation_id);
        REQUIRE(workers.contains(id));
        const auto& license = license_of(workers.at(id));
        INFO("license: " << boost::json::serialize(license));
        CHECK(license.at("operation_id").to_number<std::uint64_t>() == operation_id);
        const bool pending = field(license, "pending_operation") == operation;
        const bool finished =
            field(license, "pending_operation") == "none" && field(license, "last_operation") == operation;
        CHECK((pending || finished));
    }
}

/// Checks that `after` kept every step that `before` showed: a finished operation is still
/// finished with the same outcome, and a started one is still started or has finished.
void check_no_step_lost(const worker_map& before, const worker_map& after)
{
    for (const auto& [id, worker] : before) {
        const auto& old_license = license_of(worker);
        REQUIRE(after.contains(id));
        const auto& new_license = license_of(after.at(id));
        INFO("worker " << id << " before: " << boost::json::serialize(old_license)
                       << "\nafter: " << boost::json::serialize(new_license));
        CHECK(new_license.at("operation_id") == old_license.at("operation_id"));
        if (!has_pending_operation(worker)) {
            CHECK_FALSE(has_pending_operation(after.at(id)));
            CHECK(field(new_license, "last_outcome") == field(old_license, "last_outcome"));
        }
        else if (old_license.at("operation_in_progress").as_bool()) {
            const bool started = new_license.at("operation_in_progress").as_bool();
            CHECK((started || !has_pending_operation(after.at(id))));
        }
    }
}

/// Returns the claim holder that the worker's license names; empty while unclaimed.
std::string_view claim_holder_of(const boost::json::object& worker)
{
    return field(license_of(worker), "claim_holder");
}

/// Counts the workers with a pending operation that `holder` has claimed and started.
std::size_t count_started_claims(const worker_map& workers, std::string_view holder)
{
    std::size_t count = 0;
    for (const auto& [id, worker] : workers) {
        const auto& license = license_of(worker);
        if (has_pending_operation(worker) && claim_holder_of(worker) == holder &&
            license.at("operation_in_progress").as_bool()) {
            ++count;
        }
    }
    return count;
}

/// A claim that a killed worker-controller left behind, and what became of it.
struct orphaned_claim {
    std::uint64_t operation_id = 0;
    std::uint64_t fence = 0;
    timestamp expires_at;
    /// When the test first saw another controller's claim on the operation, on the system
    /// clock.
    std::optional<timestamp> taken_over_at;
    /// Set when the operation ended under this claim, through a report that the killed
    /// controller sent before it died and the control plane received after.
    bool ended_by_holder = false;
};

/// Returns the claims of `holder` on pending operations, by worker id.
std::map<std::string, orphaned_claim> claims_of(const worker_map& workers, std::string_view holder)
{
    std::map<std::string, orphaned_claim> claims;
    for (const auto& [id, worker] : workers) {
        if (!has_pending_operation(worker) || claim_holder_of(worker) != holder) {
            continue;
        }
        const auto& license = license_of(worker);
        orphaned_claim claim;
        claim.operation_id = license.at("operation_id").to_number<std::uint64_t>();
        claim.fence = license.at("fence").to_number<std::uint64_t>();
        const auto expires_at = parse_timestamp(field(license, "claim_expires_at"));
        REQUIRE(expires_at);
        claim.expires_at = *expires_at;
        claims.emplace(id, claim);
    }
    return claims;
}

/// Records in `claims` the time at which `workers` first shows each claim taken over, with a
/// newer fence, or that its operation ended under the old fence. Returns true once every
/// claim was taken over or ended.
bool record_takeovers(std::map<std::string, orphaned_claim>& claims, const worker_map& workers, timestamp seen_at)
{
    bool all_resolved = true;
    for (auto& [id, claim] : claims) {
        if (claim.taken_over_at || claim.ended_by_holder) {
            continue;
        }
        const auto& worker = workers.at(id);
        const auto fence = license_of(worker).at("fence").to_number<std::uint64_t>();
        if (fence > claim.fence) {
            claim.taken_over_at = seen_at;
        }
        else if (!has_pending_operation(worker)) {
            claim.ended_by_holder = true;
        }
        else {
            all_resolved = false;
        }
    }
    return all_resolved;
}

/// Returns the counters of one fake CML instance.
asio::awaitable<boost::json::object> read_instance_counters(unsigned short port, const std::string& instance)
{
    const auto target = "/_fake/instances/" + instance + "/counters";
    auto response = co_await call(port, http::verb::get, target, credentials::none);
    REQUIRE(response.result() == http::status::ok);
    co_return json_of(response);
}

/// Adds `count` workers, each pointing at its own instance of the fake CML on `cml_port`.
asio::awaitable<void> add_workers(unsigned short plane_port, unsigned short cml_port,
                                  std::size_t count = worker_count)
{
    for (std::size_t i = 0; i < count; ++i) {
        const auto id = worker_id_of(i);
        const auto cml_url = "http://127.0.0.1:" + std::to_string(cml_port) + "/instances/" + id;
        boost::json::object worker{
            {"id", id}, {"name", "e2e worker " + std::to_string(i)}, {"cml_url", cml_url}, {"status", "running"}};
        const auto body = boost::json::serialize(worker);
        auto added = co_await call(plane_port, http::verb::post, "/api/workers", credentials::admin, body);
        REQUIRE(added.result() == http::status::created);
    }
}

/// Requests the registration of worker `index`'s token and returns the accepted operation id.
asio::awaitable<std::uint64_t> request_registration(unsigned short plane_port, std::size_t index)
{
    const std::string body = R"({"token": ")" + token_of(index) + R"("})";
    const auto target = "/api/workers/" + worker_id_of(index) + "/license";
    auto accepted = co_await call(plane_port, http::verb::post, target, credentials::admin, body);
    REQUIRE(accepted.result() == http::status::accepted);
    CHECK(accepted.body().find(token_of(index)) == std::string::npos);
    co_return json_of(accepted).at("operation_id").to_number<std::uint64_t>();
}

/// Requests the deregistration of the worker's license and returns the accepted operation id.
asio::awaitable<std::uint64_t> request_deregistration(unsigned short plane_port, const std::string& worker_id)
{
    const auto target = "/api/workers/" + worker_id + "/license";
    auto accepted = co_await call(plane_port, http::verb::delete_, target, credentials::admin);
    REQUIRE(accepted.result() == http::status::accepted);
    co_return json_of(accepted).at("operation_id").to_number<std::uint64_t>();
}

/// Requests the deregistration of every `deregistered_every`-th worker from index `first` on,
/// and returns the accepted operation ids by worker id.
asio::awaitable<std::map<std::string, std::uint64_t>> request_deregistrations_from(unsigned short plane_port,
                                                                                   std::size_t first)
{
    std::map<std::string, std::uint64_t> accepted;
    for (std::size_t i = first; i < worker_count; i += deregistered_every) {
        REQUIRE_FALSE(is_rejected(i));
        const auto id = worker_id_of(i);
        const auto operation_id = co_await request_deregistration(plane_port, id);
        accepted[id] = operation_id;
    }
    co_return accepted;
}

/// Checks that the fake CML instance of each of the first `count` workers received and
/// accepted exactly one registration POST, and one deregistration for each worker in
/// `deregistrations`.
asio::awaitable<void> check_one_registration_post_each(unsigned short cml_port,
                                                       const std::map<std::string, std::uint64_t>& deregistrations,
                                                       std::size_t count = worker_count)
{
    for (std::size_t i = 0; i < count; ++i) {
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
    CHECK(json_of(totals).at("accepted_registrations").to_number<std::uint64_t>() == count);
    CHECK(json_of(totals).at("instances").to_number<std::uint64_t>() == count);
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

std::vector<std::string> all_secrets(std::size_t count = worker_count)
{
    std::vector<std::string> secrets{cml_password, api_key, admin_token, std::string(bearer_prefix)};
    for (std::size_t i = 0; i < count; ++i) {
        secrets.push_back(token_of(i));
    }
    return secrets;
}

/// Starts the control plane on a port outside the ephemeral range and sets `port` to it.
/// Tries another port when the control plane does not start, because the port may be taken.
std::unique_ptr<child_process> start_control_plane_on_fixed_port(const program_setup& setup, unsigned short& port)
{
    std::string last_error;
    for (int attempt = 0; attempt < max_port_attempts; ++attempt) {
        port = pick_port_outside_ephemeral_range();
        auto control_plane = setup.start_control_plane("127.0.0.1:" + std::to_string(port));
        if (control_plane->read_first_line(start_timeout)) {
            CHECK(read_port(*control_plane) == port);
            return control_plane;
        }
        control_plane->wait_for_exit(exit_timeout);
        last_error = control_plane->standard_error();
    }
    FAIL("the control plane did not start on any of " << max_port_attempts << " ports; last stderr: " << last_error);
    return nullptr;
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

/// Counts the control plane's log lines of the license event `type`, such as
/// `registration.requested`.
std::size_t count_license_events(const std::string& log, std::string_view type)
{
    return count_occurrences(log, "event=cml_worker.license." + std::string(type) + ".v1");
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
        co_await add_workers(plane_port, cml_port);

        // A token outside CML's format is rejected at once and starts no operation.
        const std::string invalid_body = R"({"token": ")" + invalid_token + R"("})";
        const auto invalid_target = "/api/workers/" + worker_id_of(1) + "/license";
        auto invalid = co_await call(plane_port, http::verb::post, invalid_target, credentials::admin, invalid_body);
        CHECK(invalid.result() == http::status::unprocessable_entity);
        CHECK(code_of(invalid) == "invalid_token");
        CHECK(invalid.body().find(invalid_token) == std::string::npos);

        for (std::size_t i = 0; i < worker_count; ++i) {
            const auto operation_id = co_await request_registration(plane_port, i);
            registrations[worker_id_of(i)] = operation_id;
        }

        // Kill the worker-controller once enough operations started and some still run.
        auto kill_point = [&registrations](const worker_map& workers) {
            std::size_t in_progress = 0;
            const auto started = count_started(workers, registrations, in_progress);
            return started >= started_before_kill && in_progress > 0 && started < worker_count;
        };
        const auto before_kill =
            co_await wait_for_workers(plane_port, kill_point, deadline, "enough registrations started");
        kill_program(*first_controller);

        // Nothing changes the workers while no controller runs, so this state is the one the
        // kill left: some registrations started but unfinished, some never started.
        auto interrupted = co_await read_workers(plane_port);
        std::size_t in_progress = 0;
        const auto started = count_started(interrupted, registrations, in_progress);
        CHECK(in_progress > 0);
        CHECK(started < worker_count);
        std::size_t in_progress_before_kill = 0;
        CHECK(started >= count_started(before_kill, registrations, in_progress_before_kill));

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
            check_registration_outcome(settled, i, registrations.at(worker_id_of(i)));
        }

        deregistrations = co_await request_deregistrations_from(plane_port, 1);
        settled = co_await wait_for_workers(plane_port, all_settled, deadline, "every deregistration finished");
        check_deregistrations_completed(settled, deregistrations);

        // CML accepted exactly one registration POST per operation, despite the kill.
        co_await check_one_registration_post_each(cml_port, deregistrations);

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
    CHECK(count_license_events(plane_log, "registration.requested") == worker_count);
    CHECK(count_license_events(plane_log, "deregistration.completed") == deregistrations.size());
    CHECK(count_license_events(plane_log, "registration.failed") ==
          (worker_count + rejected_every - 1) / rejected_every);

    auto secrets = all_secrets();
    secrets.push_back(invalid_token);
    for (const auto* process :
         {fake_cml.get(), control_plane.get(), first_controller.get(), second_controller.get()}) {
        check_output_free_of(*process, secrets);
    }
}

TEST_CASE("intents survive control plane kill", "[integration][programs]")
{
    program_setup setup;
    auto fake_cml = setup.start_fake_cml();
    const auto cml_port = read_port(*fake_cml);
    // The run's worker-controller keeps running through the restart with a fixed
    // --control-plane URL, as it would in a deployment, so the control plane must come back on
    // the same port. That port lies outside the ephemeral range, so none of the connections
    // made while the control plane is down can take it as their local port.
    unsigned short plane_port = 0;
    auto first_plane = start_control_plane_on_fixed_port(setup, plane_port);
    const auto plane_listen = "127.0.0.1:" + std::to_string(plane_port);
    // This worker-controller registers the licenses that the run deregisters, and stops
    // before the run.
    auto setup_controller = setup.start_worker_controller(plane_port);
    read_port(*setup_controller);
    std::unique_ptr<child_process> controller;
    unsigned short metrics_port = 0;
    std::unique_ptr<child_process> second_plane;

    asio::io_context context;
    // Operation ids of the 202 responses, by worker id.
    std::map<std::string, std::uint64_t> registrations;
    std::map<std::string, std::uint64_t> run_registrations;
    std::map<std::string, std::uint64_t> run_deregistrations;
    std::map<std::string, std::uint64_t> later_deregistrations;
    auto flow = [&]() -> asio::awaitable<void> {
        const auto deadline = std::chrono::steady_clock::now() + flow_timeout - std::chrono::seconds(5);
        co_await add_workers(plane_port, cml_port);
        // The first workers get registered before the run, so the run can deregister them.
        for (std::size_t i = 0; i < registered_before_run; ++i) {
            const auto operation_id = co_await request_registration(plane_port, i);
            registrations[worker_id_of(i)] = operation_id;
        }
        co_await wait_for_workers(plane_port, all_settled, deadline, "the first registrations finished");
        stop_cleanly(*setup_controller);

        const std::string faults = R"({"latency_ms": )" + std::to_string(run_cml_latency_ms) + "}";
        auto slowed = co_await call(cml_port, http::verb::put, "/_fake/faults", credentials::none, faults);
        REQUIRE(slowed.result() == http::status::no_content);

        // The run: registrations of all other workers, then deregistrations of the first ones.
        // All of them are accepted before the run's worker-controller starts, so the kill can
        // land while some of them have not started.
        for (std::size_t i = registered_before_run; i < worker_count; ++i) {
            const auto operation_id = co_await request_registration(plane_port, i);
            registrations[worker_id_of(i)] = operation_id;
            run_registrations[worker_id_of(i)] = operation_id;
        }
        for (std::size_t i = 0; i < registered_before_run; ++i) {
            if (is_rejected(i)) {
                continue;
            }
            const auto id = worker_id_of(i);
            const auto operation_id = co_await request_deregistration(plane_port, id);
            run_deregistrations[id] = operation_id;
        }
        auto run_operations = run_registrations;
        run_operations.insert(run_deregistrations.begin(), run_deregistrations.end());
        controller = setup.start_worker_controller(plane_port);
        metrics_port = read_port(*controller);

        // Kill the control plane once enough operations of the run started, some of them are
        // still running and others have not started yet.
        auto kill_point = [&run_operations](const worker_map& workers) {
            std::size_t in_progress = 0;
            const auto started = count_started(workers, run_operations, in_progress);
            return started >= run_started_before_kill && in_progress > 0 && started < run_operations.size();
        };
        const auto before_kill =
            co_await wait_for_workers(plane_port, kill_point, deadline, "enough operations started");
        kill_program(*first_plane);

        // The control plane stays down until the worker-controller gave up a change-feed read
        // after all its attempts, so its reconciles also fail against the missing control plane.
        if (!controller->wait_for_standard_error(change_feed_failed, outage_timeout)) {
            FAIL("the worker-controller logged no failed change-feed read; stderr: " << controller->standard_error());
        }
        second_plane = setup.start_control_plane(plane_listen);
        REQUIRE(read_port(*second_plane) == plane_port);

        // Every intent accepted before the kill is still there, and so is every step that the
        // control plane showed before it.
        const auto restarted = co_await read_workers(plane_port);
        CHECK(restarted.size() == worker_count);
        check_intents_kept(restarted, run_registrations, "register");
        check_intents_kept(restarted, run_deregistrations, "deregister");
        check_no_step_lost(before_kill, restarted);

        // The worker-controller that ran through the restart finishes every operation.
        auto settled =
            co_await wait_for_workers(plane_port, all_settled, deadline, "every operation of the run finished");
        for (std::size_t i = 0; i < worker_count; ++i) {
            const auto id = worker_id_of(i);
            if (!run_deregistrations.contains(id)) {
                check_registration_outcome(settled, i, registrations.at(id));
            }
        }
        check_deregistrations_completed(settled, run_deregistrations);

        // Intents accepted after the restart reach the worker-controller only through its
        // change feed, because its next resync is 600 s away.
        later_deregistrations = co_await request_deregistrations_from(plane_port, registered_before_run + 1);
        settled = co_await wait_for_workers(plane_port, all_settled, deadline, "every later deregistration finished");
        check_deregistrations_completed(settled, later_deregistrations);

        auto health = co_await call(metrics_port, http::verb::get, "/health", credentials::none);
        CHECK(health.result() == http::status::ok);

        // CML accepted exactly one registration POST per operation, despite the restart.
        auto deregistrations = run_deregistrations;
        deregistrations.insert(later_deregistrations.begin(), later_deregistrations.end());
        co_await check_one_registration_post_each(cml_port, deregistrations);
    };
    testing::run_with_timeout(context, flow(), flow_timeout);

    REQUIRE(controller);
    REQUIRE(second_plane);
    for (auto* program : {controller.get(), second_plane.get(), fake_cml.get()}) {
        stop_cleanly(*program);
    }

    // The killed control plane logged every accepted request before it sent the response.
    const auto first_log = first_plane->standard_error();
    CHECK(count_license_events(first_log, "registration.requested") == worker_count);
    CHECK(count_license_events(first_log, "deregistration.requested") == run_deregistrations.size());

    for (const auto* process :
         {fake_cml.get(), first_plane.get(), second_plane.get(), setup_controller.get(), controller.get()}) {
        check_output_free_of(*process, all_secrets());
    }
}

TEST_CASE("license flow scales out on postgres", "[integration][programs][postgres]")
{
    if (!postgres_available()) {
        return;
    }
    const auto url = postgres_test_url();
    const auto database_password = postgres_test_password();

    // The test database is shared with other tests and runs, so this run's tables live in a
    // schema of their own. The schema is left on the throwaway test server afterwards.
    const auto schema = "lcm_scale_" + std::to_string(::getpid()) + "_" +
                        std::to_string(std::chrono::system_clock::now().time_since_epoch().count());
    program_setup setup;
    setup.database_flags = {"--db", "postgres:" + url, "--db-schema", schema};
    auto fake_cml = setup.start_fake_cml();
    const auto cml_port = read_port(*fake_cml);
    auto first_plane = setup.start_control_plane();
    const auto first_plane_port = read_port(*first_plane);
    auto second_plane = setup.start_control_plane();
    const auto second_plane_port = read_port(*second_plane);

    std::unique_ptr<child_process> killed_controller;
    std::unique_ptr<child_process> second_controller;
    std::unique_ptr<child_process> third_controller;

    std::map<std::string, std::uint64_t> registrations;
    std::map<std::string, orphaned_claim> orphans;
    timestamp killed_at;

    asio::io_context context;
    auto flow = [&]() -> asio::awaitable<void> {
        const auto deadline = std::chrono::steady_clock::now() + flow_timeout - std::chrono::seconds(5);
        co_await add_workers(first_plane_port, cml_port, scale_out_worker_count);

        // Both replicas accept intents; the controllers of either replica see all of them,
        // because every replica's change feed listens to PostgreSQL's notifications.
        for (std::size_t i = 0; i < scale_out_worker_count; ++i) {
            const auto port = i % 2 == 0 ? first_plane_port : second_plane_port;
            const auto operation_id = co_await request_registration(port, i);
            registrations[worker_id_of(i)] = operation_id;
        }

        // Three worker-controllers, two on the first replica and one on the second, all with a
        // short lease. They start once every intent is accepted, so the kill can land before
        // all operations started.
        const auto lease_flags = [](std::string id) {
            return std::vector<std::string>{"--controller-id", std::move(id), "--lease",
                                            std::to_string(scale_out_lease_ms)};
        };
        killed_controller = setup.start_worker_controller(first_plane_port, lease_flags("controller-a"));
        read_port(*killed_controller);
        second_controller = setup.start_worker_controller(second_plane_port, lease_flags("controller-b"));
        read_port(*second_controller);
        third_controller = setup.start_worker_controller(first_plane_port, lease_flags("controller-c"));
        read_port(*third_controller);

        // Kill the first controller while it owns claims on started operations. The kill does
        // not wait for operations that have not started yet as well: the controllers may start
        // all of them before the test reads the workers, and the wait would then never end.
        auto kill_point = [](const worker_map& workers) {
            return count_started_claims(workers, "controller-a") >= claims_before_kill;
        };
        co_await wait_for_workers(second_plane_port, kill_point, deadline, "controller-a started operations");
        kill_program(*killed_controller);
        killed_at = now_utc();

        // Its claims stay until they expire, then the other controllers take them over.
        auto interrupted = co_await read_workers(second_plane_port);
        orphans = claims_of(interrupted, "controller-a");
        // Reports that were in flight at the kill may have ended some of its claims already.
        REQUIRE(orphans.size() >= min_takeovers);
        for (const auto& [id, claim] : orphans) {
            INFO("worker " << id);
            CHECK(claim.expires_at <= killed_at + std::chrono::milliseconds(scale_out_lease_ms) + in_flight_allowance);
        }
        auto taken_over = [&orphans](const worker_map& workers) {
            return record_takeovers(orphans, workers, now_utc());
        };
        co_await wait_for_workers(first_plane_port, taken_over, deadline, "the killed controller's claims were taken");

        auto settled = co_await wait_for_workers(first_plane_port, all_settled, deadline, "every registration ended");
        for (std::size_t i = 0; i < scale_out_worker_count; ++i) {
            check_registration_outcome(settled, i, registrations.at(worker_id_of(i)));
        }

        // Both replicas read the same state.
        const auto seen_by_second = co_await read_workers(second_plane_port);
        CHECK(seen_by_second == settled);

        // CML accepted exactly one registration POST per operation, despite the kill.
        co_await check_one_registration_post_each(cml_port, {}, scale_out_worker_count);
    };
    testing::run_with_timeout(context, flow(), flow_timeout);
    REQUIRE(third_controller);

    // Each claim was taken over after it expired, and within the lease plus the takeover
    // margin after the kill, because the killed controller last renewed each claim before it
    // died.
    const auto takeover_limit = std::chrono::milliseconds(scale_out_lease_ms) + takeover_margin + takeover_allowance;
    std::size_t takeovers = 0;
    for (const auto& [id, claim] : orphans) {
        if (claim.ended_by_holder) {
            continue;
        }
        ++takeovers;
        INFO("worker " << id << ": claim expired at " << format_timestamp(claim.expires_at) << ", controller killed at "
                       << format_timestamp(killed_at));
        REQUIRE(claim.taken_over_at);
        INFO("taken over at " << format_timestamp(*claim.taken_over_at));
        CHECK(*claim.taken_over_at >= claim.expires_at);
        CHECK(*claim.taken_over_at - killed_at <= takeover_limit);
    }
    CHECK(takeovers >= min_takeovers);

    for (auto* program : {second_controller.get(), third_controller.get(), first_plane.get(), second_plane.get(),
                          fake_cml.get()}) {
        stop_cleanly(*program);
    }
    // The controllers that lived on both claimed operations, so the work was shared.
    for (const auto* controller : {second_controller.get(), third_controller.get()}) {
        CHECK(controller->standard_error().find("license registration completed") != std::string::npos);
    }

    auto secrets = all_secrets(scale_out_worker_count);
    secrets.push_back(database_password);
    for (const auto* process : {fake_cml.get(), first_plane.get(), second_plane.get(), killed_controller.get(),
                                second_controller.get(), third_controller.get()}) {
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
