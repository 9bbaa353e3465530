// Tests of the cml_worker aggregate: creation, lifecycle status, every license operation
// step with its guards, fencing by operation id, and the events each step records.
#include "domain_test_support.hpp"

#include <lcm/domain/events.hpp>
#include <lcm/domain/worker.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

using namespace lcm::domain;
using namespace lcm::domain::testing;
using lcm::errc;
using lcm::secret;

namespace {

cml_worker worker_with_status(worker_status status)
{
    auto worker = cml_worker::create("worker-1", "lab one", "https://cml.example.test", status, "admin", at(0)).value();
    worker.take_events();
    return worker;
}

/// Returns a running worker whose stored license has `status` and, when it holds one, `first_token`.
cml_worker worker_with_license_status(license_status status)
{
    auto state = running_worker().state();
    cml_license::fields license;
    license.status = status;
    if (status != license_status::unregistered) {
        license.token = secret(first_token);
    }
    license.operation_id = 3;
    state.license = cml_license(license);
    return cml_worker::restore(state).value();
}

/// Returns a running worker with a registration of `first_token` requested and, when
/// `started`, in progress. The operation id is 1 and the events are dropped.
cml_worker worker_registering(bool started)
{
    auto worker = running_worker();
    worker.request_license_registration(secret(first_token), false, "alice", at(10)).value();
    if (started) {
        worker.start_license_operation(1, at(11)).value();
    }
    worker.take_events();
    return worker;
}

/// Returns a registered worker with a deregistration requested and, when `started`, in
/// progress. The operation id is 2 and the events are dropped.
cml_worker worker_deregistering(bool started)
{
    auto worker = registered_worker();
    worker.request_license_deregistration("bob", at(20)).value();
    if (started) {
        worker.start_license_operation(2, at(21)).value();
    }
    worker.take_events();
    return worker;
}

const std::vector<worker_status> not_running_statuses = {
    worker_status::pending,  worker_status::provisioning, worker_status::starting,    worker_status::draining,
    worker_status::stopping, worker_status::stopped,      worker_status::terminating, worker_status::terminated,
    worker_status::failed,   worker_status::unknown,
};

void check_header(const event_header& header, std::uint64_t operation_id, lcm::timestamp occurred_at,
                  const std::string& initiated_by)
{
    CHECK(header.worker_id == "worker-1");
    CHECK(header.operation_id == operation_id);
    CHECK(header.occurred_at == occurred_at);
    CHECK(header.initiated_by == initiated_by);
}

/// Checks the fields that every new request sets or resets.
void check_new_request(const cml_worker& worker, std::uint64_t operation_id, const std::string& requested_by,
                       lcm::timestamp requested_at)
{
    const auto& license = worker.license();
    CHECK(license.operation_id() == operation_id);
    CHECK_FALSE(license.operation_in_progress());
    CHECK(license.requested_by() == requested_by);
    CHECK(license.requested_at() == requested_at);
    CHECK_FALSE(license.started_at());
    CHECK_FALSE(license.finished_at());
    CHECK(license.attempts() == 0);
    CHECK_FALSE(license.last_error());
    CHECK_FALSE(license.last_warning());
    CHECK(worker.updated_at() == requested_at);
}

/// Checks the state and the single `Event` of an operation that has just started.
template <class Event>
void check_started(const cml_worker& worker, license_operation kind, std::uint64_t operation_id,
                   lcm::timestamp started_at, const std::string& requested_by)
{
    const auto& license = worker.license();
    CHECK(license.operation_in_progress());
    CHECK(license.pending_operation() == kind);
    CHECK(license.operation_id() == operation_id);
    CHECK(license.started_at() == started_at);
    CHECK(license.attempts() == 1);
    CHECK(worker.updated_at() == started_at);

    const auto& event = single_event<Event>(worker);
    check_header(event.header, operation_id, started_at, requested_by);
    CHECK(event.attempt == 1);
}

/// Checks the fields that every finished operation sets or clears.
void check_finished(const cml_worker& worker, license_operation kind, operation_outcome outcome,
                    lcm::timestamp finished_at)
{
    const auto& license = worker.license();
    CHECK(license.pending_operation() == license_operation::none);
    CHECK_FALSE(license.pending_token());
    CHECK_FALSE(license.operation_in_progress());
    CHECK_FALSE(license.reregister());
    CHECK(license.last_operation() == kind);
    CHECK(license.last_outcome() == outcome);
    CHECK(license.finished_at() == finished_at);
    CHECK(worker.updated_at() == finished_at);
}

} // namespace

// Creation and lifecycle status.

TEST_CASE("create records worker_created", "[domain]")
{
    auto created =
        cml_worker::create("worker-1", "lab one", "https://cml.example.test", worker_status::provisioning, "admin", at(5));
    REQUIRE(created);
    const auto& worker = created.value();

    CHECK(worker.id() == "worker-1");
    CHECK(worker.name() == "lab one");
    CHECK(worker.cml_url() == "https://cml.example.test");
    CHECK(worker.status() == worker_status::provisioning);
    CHECK(worker.desired_status() == worker_status::running);
    CHECK(worker.version() == 0);
    CHECK(worker.created_at() == at(5));
    CHECK(worker.updated_at() == at(5));
    CHECK(worker.license() == cml_license());

    const auto& event = single_event<worker_created>(worker);
    check_header(event.header, 0, at(5), "admin");
    CHECK(event.name == "lab one");
    CHECK(event.cml_url == "https://cml.example.test");
    CHECK(event.status == worker_status::provisioning);
}

TEST_CASE("create validates worker id", "[domain]")
{
    const std::vector<std::string> valid = {"a", "worker-1", "Worker_1.lab-2", "0", std::string(64, 'w')};
    const std::vector<std::string> invalid = {
        "", std::string(65, 'w'), "worker 1", "worker/1", "worker:1", "worker@1", "w\xc3\xb6rker", "worker\n1",
    };

    for (const auto& id : valid) {
        CAPTURE(id);
        CHECK(is_valid_worker_id(id));
        CHECK(cml_worker::create(id, "lab", "https://cml.example.test", worker_status::running, "admin", at(0)));
    }
    for (const auto& id : invalid) {
        CAPTURE(id);
        CHECK_FALSE(is_valid_worker_id(id));
        const auto created = cml_worker::create(id, "lab", "https://cml.example.test", worker_status::running, "admin", at(0));
        REQUIRE_FALSE(created);
        CHECK(created.error() == errc::invalid_argument);
    }
}

TEST_CASE("create validates worker name", "[domain]")
{
    const std::vector<std::string> valid = {"a", "lab one", "Labor Z\xc3\xbcrich", std::string(128, 'n')};
    const std::vector<std::string> invalid = {"", std::string(129, 'n'), "lab\none", "lab\tone", "lab\x7f", "lab\r"};

    for (const auto& name : valid) {
        CAPTURE(name);
        CHECK(cml_worker::create("worker-1", name, "https://cml.example.test", worker_status::running, "admin", at(0)));
    }
    for (const auto& name : invalid) {
        CAPTURE(name);
        const auto created = cml_worker::create("worker-1", name, "https://cml.example.test", worker_status::running,
                                                "admin", at(0));
        REQUIRE_FALSE(created);
        CHECK(created.error() == errc::invalid_argument);
    }
}

TEST_CASE("create validates CML URL", "[domain]")
{
    const std::vector<std::string> valid = {
        "https://cml.example.test", "http://10.0.0.5",     "https://cml.example.test:8443/api/v0",
        "https://[::1]/",           "HTTPS://CML.example.test/",
    };
    const std::vector<std::string> invalid = {
        "",
        "cml.example.test",
        "//cml.example.test",
        "/api/v0",
        "ftp://cml.example.test",
        "file:///etc/passwd",
        "mailto:admin@example.test",
        "https://",
        "https:///api",
        "https://:8443",
        "https://cml.example.test?debug=1",
        "https://cml.example.test/?",
        "https://cml.example.test#labs",
        "https://cml example.test",
        "https://admin:secret@cml.example.test",
        "https://admin@cml.example.test",
    };

    for (const auto& url : valid) {
        CAPTURE(url);
        CHECK(is_valid_cml_url(url));
        CHECK(cml_worker::create("worker-1", "lab", url, worker_status::running, "admin", at(0)));
    }
    for (const auto& url : invalid) {
        CAPTURE(url);
        CHECK_FALSE(is_valid_cml_url(url));
        const auto created = cml_worker::create("worker-1", "lab", url, worker_status::running, "admin", at(0));
        REQUIRE_FALSE(created);
        CHECK(created.error() == errc::invalid_argument);
    }
}

TEST_CASE("change_status records status change", "[domain]")
{
    auto worker = worker_with_status(worker_status::starting);

    worker.change_status(worker_status::running, "infrastructure", at(30));

    CHECK(worker.status() == worker_status::running);
    CHECK(worker.updated_at() == at(30));
    CHECK(worker.created_at() == at(0));
    const auto& event = single_event<worker_status_changed>(worker);
    check_header(event.header, 0, at(30), "infrastructure");
    CHECK(event.previous_status == worker_status::starting);
    CHECK(event.status == worker_status::running);
}

TEST_CASE("change_status to same status is no-op", "[domain]")
{
    auto worker = running_worker();
    const auto before = worker.state();

    worker.change_status(worker_status::running, "infrastructure", at(30));

    CHECK(worker.state() == before);
    CHECK(worker.updated_at() == at(0));
    CHECK(worker.events().empty());
}

TEST_CASE("change_status keeps pending operation", "[domain]")
{
    auto worker = worker_registering(true);
    const auto license_before = worker.license();

    worker.change_status(worker_status::stopping, "infrastructure", at(30));

    CHECK(worker.license() == license_before);
    const auto& event = single_event<worker_status_changed>(worker);
    CHECK(event.header.operation_id == 0);
}

// Registration requests.

TEST_CASE("registration request records intent", "[domain]")
{
    auto worker = running_worker();

    const auto operation_id = worker.request_license_registration(secret(first_token), false, "alice", at(10));

    REQUIRE(operation_id);
    CHECK(operation_id.value() == 1);
    const auto& license = worker.license();
    CHECK(license.status() == license_status::unregistered);
    CHECK(license.pending_operation() == license_operation::registration);
    REQUIRE(license.pending_token());
    CHECK(license.pending_token()->reveal() == first_token);
    CHECK_FALSE(license.token());
    CHECK_FALSE(license.reregister());
    check_new_request(worker, 1, "alice", at(10));

    const auto& event = single_event<license_registration_requested>(worker);
    check_header(event.header, 1, at(10), "alice");
    CHECK_FALSE(event.reregister);
}

TEST_CASE("registration request rejects bad tokens", "[domain]")
{
    const std::vector<std::string> invalid = {
        "",         std::string(257, 'x'), "abc def", "abc_def", "abc.def",   "caf\xc3\xa9",
        "abc\ndef", "<redacted>",          " abc",    "abc\t",   "abc*def",
    };
    for (const auto& token : invalid) {
        CAPTURE(token);
        auto worker = running_worker();
        check_rejected(worker, errc::invalid_token, [&](cml_worker& w) {
            return w.request_license_registration(secret(token), false, "alice", at(10));
        });
    }
}

TEST_CASE("registration request accepts token boundaries", "[domain]")
{
    const std::vector<std::string> valid = {"a", std::string(256, 'x'), "+", "/", "%", "=", "-", "aB3+/%=-", first_token};
    for (const auto& token : valid) {
        CAPTURE(token);
        auto worker = running_worker();
        const auto operation_id = worker.request_license_registration(secret(token), false, "alice", at(10));
        REQUIRE(operation_id);
        REQUIRE(worker.license().pending_token());
        CHECK(worker.license().pending_token()->reveal() == token);
    }
}

TEST_CASE("registration request needs running worker", "[domain]")
{
    for (const auto status : not_running_statuses) {
        CAPTURE(to_string(status));
        auto worker = worker_with_status(status);
        check_rejected(worker, errc::worker_not_running, [](cml_worker& w) {
            return w.request_license_registration(secret(first_token), false, "alice", at(10));
        });
    }
}

TEST_CASE("registration request conflicts with pending", "[domain]")
{
    struct conflict_case {
        const char* name;
        bool started;
        std::string token;
        bool reregister;
    };
    const std::vector<conflict_case> cases = {
        {"other token", false, second_token, false},
        {"other reregister flag", false, first_token, true},
        {"other token while started", true, second_token, false},
        {"other reregister flag while started", true, first_token, true},
    };
    for (const auto& test : cases) {
        CAPTURE(test.name);
        auto worker = worker_registering(test.started);
        check_rejected(worker, errc::operation_in_progress, [&](cml_worker& w) {
            return w.request_license_registration(secret(test.token), test.reregister, "carol", at(40));
        });
    }

    for (const bool started : {false, true}) {
        CAPTURE(started);
        auto worker = worker_deregistering(started);
        check_rejected(worker, errc::operation_in_progress, [](cml_worker& w) {
            return w.request_license_registration(secret(second_token), true, "carol", at(40));
        });
    }
}

TEST_CASE("registration of registered needs reregister", "[domain]")
{
    auto worker = registered_worker(first_token);
    check_rejected(worker, errc::already_registered, [](cml_worker& w) {
        return w.request_license_registration(secret(second_token), false, "carol", at(40));
    });
    check_rejected(worker, errc::already_registered, [](cml_worker& w) {
        return w.request_license_registration(secret(first_token), false, "carol", at(40));
    });

    const auto operation_id = worker.request_license_registration(secret(second_token), true, "carol", at(40));

    REQUIRE(operation_id);
    CHECK(operation_id.value() == 2);
    CHECK(worker.license().status() == license_status::registered);
    CHECK(worker.license().reregister());
    REQUIRE(worker.license().token());
    CHECK(worker.license().token()->reveal() == first_token);
    REQUIRE(worker.license().pending_token());
    CHECK(worker.license().pending_token()->reveal() == second_token);
    const auto& event = single_event<license_registration_requested>(worker);
    check_header(event.header, 2, at(40), "carol");
    CHECK(event.reregister);
}

TEST_CASE("registration allowed for lapsed license", "[domain]")
{
    for (const auto status : {license_status::unregistered, license_status::expired, license_status::invalid}) {
        CAPTURE(to_string(status));
        auto worker = worker_with_license_status(status);

        const auto operation_id = worker.request_license_registration(secret(second_token), false, "alice", at(10));

        REQUIRE(operation_id);
        CHECK(operation_id.value() == 4);
        CHECK(worker.license().status() == status);
    }
}

// Deregistration requests.

TEST_CASE("deregistration request records intent", "[domain]")
{
    auto worker = registered_worker();

    const auto operation_id = worker.request_license_deregistration("bob", at(20));

    REQUIRE(operation_id);
    CHECK(operation_id.value() == 2);
    const auto& license = worker.license();
    CHECK(license.status() == license_status::registered);
    CHECK(license.pending_operation() == license_operation::deregistration);
    CHECK_FALSE(license.pending_token());
    REQUIRE(license.token());
    CHECK(license.token()->reveal() == first_token);
    check_new_request(worker, 2, "bob", at(20));

    const auto& event = single_event<license_deregistration_requested>(worker);
    check_header(event.header, 2, at(20), "bob");
}

TEST_CASE("deregistration request needs license", "[domain]")
{
    for (const auto status : {license_status::unregistered, license_status::expired, license_status::invalid}) {
        CAPTURE(to_string(status));
        auto worker = worker_with_license_status(status);
        check_rejected(worker, errc::not_registered,
                       [](cml_worker& w) { return w.request_license_deregistration("bob", at(20)); });
    }

    for (const auto status : {license_status::registered, license_status::evaluation}) {
        CAPTURE(to_string(status));
        auto worker = worker_with_license_status(status);
        const auto operation_id = worker.request_license_deregistration("bob", at(20));
        REQUIRE(operation_id);
        CHECK(operation_id.value() == 4);
    }
}

TEST_CASE("deregistration request needs running worker", "[domain]")
{
    for (const auto status : not_running_statuses) {
        CAPTURE(to_string(status));
        auto worker = registered_worker();
        worker.change_status(status, "infrastructure", at(15));
        worker.take_events();
        check_rejected(worker, errc::worker_not_running,
                       [](cml_worker& w) { return w.request_license_deregistration("bob", at(20)); });
    }
}

TEST_CASE("deregistration request conflicts with pending", "[domain]")
{
    for (const bool started : {false, true}) {
        CAPTURE(started);
        auto worker = registered_worker();
        worker.request_license_registration(secret(second_token), true, "alice", at(20)).value();
        if (started) {
            worker.start_license_operation(2, at(21)).value();
        }
        worker.take_events();
        check_rejected(worker, errc::operation_in_progress,
                       [](cml_worker& w) { return w.request_license_deregistration("bob", at(30)); });
    }
}

TEST_CASE("request repeat is idempotent", "[domain]")
{
    const auto repeat_registration = [](cml_worker& w) {
        return w.request_license_registration(secret(first_token), false, "carol", at(40));
    };
    const auto repeat_deregistration = [](cml_worker& w) { return w.request_license_deregistration("carol", at(40)); };
    struct repeat_case {
        const char* name;
        cml_worker worker;
        std::function<lcm::result<std::uint64_t>(cml_worker&)> request;
        std::uint64_t operation_id;
    };
    std::vector<repeat_case> cases = {
        {"registration requested", worker_registering(false), repeat_registration, 1},
        {"registration started", worker_registering(true), repeat_registration, 1},
        {"deregistration requested", worker_deregistering(false), repeat_deregistration, 2},
        {"deregistration started", worker_deregistering(true), repeat_deregistration, 2},
    };

    for (auto& test : cases) {
        CAPTURE(test.name);
        const auto state_before = test.worker.state();

        const auto operation_id = test.request(test.worker);

        REQUIRE(operation_id);
        CHECK(operation_id.value() == test.operation_id);
        CHECK(test.worker.state() == state_before);
        CHECK(test.worker.events().empty());
    }
}

// Starting an operation.

TEST_CASE("start marks operation in progress", "[domain]")
{
    SECTION("registration")
    {
        auto worker = worker_registering(false);
        REQUIRE(worker.start_license_operation(1, at(11)));
        check_started<license_registration_started>(worker, license_operation::registration, 1, at(11), "alice");
    }
    SECTION("deregistration")
    {
        auto worker = worker_deregistering(false);
        REQUIRE(worker.start_license_operation(2, at(21)));
        check_started<license_deregistration_started>(worker, license_operation::deregistration, 2, at(21), "bob");
    }
}

TEST_CASE("start repeat is idempotent", "[domain]")
{
    auto registering = worker_registering(true);
    check_idempotent(registering, [](cml_worker& w) { return w.start_license_operation(1, at(50)); });
    CHECK(registering.license().attempts() == 1);

    auto deregistering = worker_deregistering(true);
    check_idempotent(deregistering, [](cml_worker& w) { return w.start_license_operation(2, at(50)); });
    CHECK(deregistering.license().attempts() == 1);
}

TEST_CASE("start rejects other operations", "[domain]")
{
    SECTION("no operation yet")
    {
        auto worker = running_worker();
        for (const std::uint64_t id : std::initializer_list<std::uint64_t>{0, 1}) {
            CAPTURE(id);
            check_rejected(worker, errc::stale_operation, [&](cml_worker& w) { return w.start_license_operation(id, at(50)); });
        }
    }
    SECTION("wrong id")
    {
        auto worker = worker_registering(false);
        for (const std::uint64_t id : std::initializer_list<std::uint64_t>{0, 2, 3, UINT64_MAX}) {
            CAPTURE(id);
            check_rejected(worker, errc::stale_operation, [&](cml_worker& w) { return w.start_license_operation(id, at(50)); });
        }
    }
    SECTION("finished operation")
    {
        auto worker = registered_worker();
        check_rejected(worker, errc::stale_operation, [](cml_worker& w) { return w.start_license_operation(1, at(50)); });
    }
}

TEST_CASE("start needs running worker", "[domain]")
{
    for (const auto status : not_running_statuses) {
        CAPTURE(to_string(status));
        auto worker = worker_registering(false);
        worker.change_status(status, "infrastructure", at(15));
        worker.take_events();
        check_rejected(worker, errc::worker_not_running, [](cml_worker& w) { return w.start_license_operation(1, at(20)); });
    }
}

// Completing and failing a registration.

TEST_CASE("registration completion stores details", "[domain]")
{
    auto worker = worker_registering(true);

    REQUIRE(worker.complete_license_registration(1, sample_details(), at(12)));

    const auto& license = worker.license();
    const auto details = sample_details();
    CHECK(license.status() == license_status::registered);
    REQUIRE(license.token());
    CHECK(license.token()->reveal() == first_token);
    check_finished(worker, license_operation::registration, operation_outcome::completed, at(12));
    CHECK(license.operation_id() == 1);
    CHECK_FALSE(license.last_error());
    CHECK(license.started_at() == at(11));
    CHECK(license.attempts() == 1);
    CHECK(license.expiry_date() == details.expiry_date);
    CHECK(license.smart_account() == "Example Labs");
    CHECK(license.virtual_account() == "Training");
    CHECK(license.authorization_status() == "AUTHORIZED");
    CHECK(license.features() == details.features);
    CHECK(license.cml_info() == details.cml_info);

    const auto& event = single_event<license_registration_completed>(worker);
    check_header(event.header, 1, at(12), "alice");
    CHECK(event.expiry_date == details.expiry_date);
    CHECK(event.smart_account == "Example Labs");
    CHECK(event.virtual_account == "Training");
    CHECK(event.authorization_status == "AUTHORIZED");
    CHECK(event.features == std::vector<std::string>{"CML - Additional Nodes", "CML - Users"});
}

TEST_CASE("reregistration replaces token", "[domain]")
{
    auto worker = registered_worker(first_token);
    worker.request_license_registration(secret(second_token), true, "carol", at(40)).value();
    worker.start_license_operation(2, at(41)).value();

    REQUIRE(worker.complete_license_registration(2, sample_details(), at(42)));

    REQUIRE(worker.license().token());
    CHECK(worker.license().token()->reveal() == second_token);
    CHECK_FALSE(worker.license().pending_token());
    CHECK_FALSE(worker.license().reregister());
    CHECK(worker.license().status() == license_status::registered);
}

TEST_CASE("completion needs started operation", "[domain]")
{
    auto registering = worker_registering(false);
    check_rejected(registering, errc::operation_not_started, [](cml_worker& w) {
        return w.complete_license_registration(1, sample_details(), at(12));
    });

    auto deregistering = worker_deregistering(false);
    check_rejected(deregistering, errc::operation_not_started,
                   [](cml_worker& w) { return w.complete_license_deregistration(2, std::nullopt, at(22)); });
}

TEST_CASE("registration completion repeat is idempotent", "[domain]")
{
    auto worker = worker_registering(true);
    REQUIRE(worker.complete_license_registration(1, sample_details(), at(12)));
    worker.take_events();

    registration_details other;
    other.smart_account = "Other Account";
    check_idempotent(worker, [&](cml_worker& w) { return w.complete_license_registration(1, other, at(60)); });
    CHECK(worker.license().smart_account() == "Example Labs");
}

TEST_CASE("registration failure keeps license", "[domain]")
{
    SECTION("first registration")
    {
        auto worker = worker_registering(true);
        REQUIRE(worker.fail_license_registration(1, "invalid_token", "CML rejected the token", at(12)));

        const auto& license = worker.license();
        CHECK(license.status() == license_status::unregistered);
        CHECK_FALSE(license.token());
        check_finished(worker, license_operation::registration, operation_outcome::failed, at(12));
        CHECK(license.last_error() == operation_error{"invalid_token", "CML rejected the token"});

        const auto& event = single_event<license_registration_failed>(worker);
        check_header(event.header, 1, at(12), "alice");
        CHECK(event.error == operation_error{"invalid_token", "CML rejected the token"});
    }
    SECTION("reregistration")
    {
        auto worker = registered_worker(first_token);
        worker.request_license_registration(secret(second_token), true, "carol", at(40)).value();
        worker.start_license_operation(2, at(41)).value();
        REQUIRE(worker.fail_license_registration(2, "unavailable", "CML timed out", at(42)));

        const auto& license = worker.license();
        CHECK(license.status() == license_status::registered);
        REQUIRE(license.token());
        CHECK(license.token()->reveal() == first_token);
        check_finished(worker, license_operation::registration, operation_outcome::failed, at(42));
        CHECK(license.smart_account() == "Example Labs");
        CHECK(license.features() == sample_details().features);
    }
}

TEST_CASE("registration failure allowed before start", "[domain]")
{
    auto worker = worker_registering(false);
    worker.change_status(worker_status::stopped, "infrastructure", at(11));
    worker.take_events();

    REQUIRE(worker.fail_license_registration(1, "worker_not_running", "the worker stopped", at(12)));

    check_finished(worker, license_operation::registration, operation_outcome::failed, at(12));
    CHECK(worker.license().attempts() == 0);
    CHECK_FALSE(worker.license().started_at());
    const auto& event = single_event<license_registration_failed>(worker);
    check_header(event.header, 1, at(12), "alice");
}

TEST_CASE("registration failure repeat is idempotent", "[domain]")
{
    auto worker = worker_registering(true);
    REQUIRE(worker.fail_license_registration(1, "invalid_token", "rejected", at(12)));
    worker.take_events();

    check_idempotent(worker, [](cml_worker& w) { return w.fail_license_registration(1, "other", "other text", at(60)); });
    CHECK(worker.license().last_error() == operation_error{"invalid_token", "rejected"});
}

// Completing and failing a deregistration.

TEST_CASE("deregistration completion clears license", "[domain]")
{
    for (const auto& warning : {std::optional<std::string>{}, std::optional<std::string>{"Smart Licensing not told"}}) {
        CAPTURE(warning.value_or("(none)"));
        auto worker = worker_deregistering(true);

        REQUIRE(worker.complete_license_deregistration(2, warning, at(22)));

        const auto& license = worker.license();
        CHECK(license.status() == license_status::unregistered);
        CHECK_FALSE(license.token());
        check_finished(worker, license_operation::deregistration, operation_outcome::completed, at(22));
        CHECK(license.last_warning() == warning);
        CHECK_FALSE(license.last_error());
        CHECK_FALSE(license.expiry_date());
        CHECK(license.smart_account().empty());
        CHECK(license.virtual_account().empty());
        CHECK(license.authorization_status().empty());
        CHECK(license.features().empty());
        CHECK(license.cml_info().is_null());
        CHECK_FALSE(license.holds_license());

        const auto& event = single_event<license_deregistration_completed>(worker);
        check_header(event.header, 2, at(22), "bob");
        CHECK(event.warning == warning);
    }
}

TEST_CASE("deregistration completion repeat is idempotent", "[domain]")
{
    auto worker = worker_deregistering(true);
    REQUIRE(worker.complete_license_deregistration(2, std::string("first warning"), at(22)));
    worker.take_events();

    check_idempotent(worker, [](cml_worker& w) { return w.complete_license_deregistration(2, std::nullopt, at(60)); });
    CHECK(worker.license().last_warning() == "first warning");
}

TEST_CASE("deregistration failure keeps license", "[domain]")
{
    for (const bool started : {false, true}) {
        CAPTURE(started);
        auto worker = worker_deregistering(started);

        REQUIRE(worker.fail_license_deregistration(2, "unavailable", "CML is unreachable", at(22)));

        const auto& license = worker.license();
        CHECK(license.status() == license_status::registered);
        REQUIRE(license.token());
        CHECK(license.token()->reveal() == first_token);
        CHECK(license.smart_account() == "Example Labs");
        check_finished(worker, license_operation::deregistration, operation_outcome::failed, at(22));
        CHECK(license.last_error() == operation_error{"unavailable", "CML is unreachable"});
        CHECK(license.holds_license());

        const auto& event = single_event<license_deregistration_failed>(worker);
        check_header(event.header, 2, at(22), "bob");
        CHECK(event.error == operation_error{"unavailable", "CML is unreachable"});

        worker.take_events();
        check_idempotent(worker, [](cml_worker& w) { return w.fail_license_deregistration(2, "other", "other", at(60)); });
    }
}

// Fencing: every step applies only to the current operation.

TEST_CASE("finish steps reject other operations", "[domain]")
{
    using finish_call = std::function<lcm::result<void>(cml_worker&, std::uint64_t)>;
    const std::vector<std::pair<const char*, finish_call>> calls = {
        {"complete registration",
         [](cml_worker& w, std::uint64_t id) { return w.complete_license_registration(id, sample_details(), at(90)); }},
        {"fail registration",
         [](cml_worker& w, std::uint64_t id) { return w.fail_license_registration(id, "code", "message", at(90)); }},
        {"complete deregistration",
         [](cml_worker& w, std::uint64_t id) { return w.complete_license_deregistration(id, std::nullopt, at(90)); }},
        {"fail deregistration",
         [](cml_worker& w, std::uint64_t id) { return w.fail_license_deregistration(id, "code", "message", at(90)); }},
    };
    const std::vector<std::pair<const char*, cml_worker>> workers = {
        {"new worker", running_worker()},
        {"registration requested", worker_registering(false)},
        {"registration started", worker_registering(true)},
        {"deregistration requested", worker_deregistering(false)},
        {"deregistration started", worker_deregistering(true)},
    };

    SECTION("ids other than the current one")
    {
        for (const auto& named_worker : workers) {
            const auto current = named_worker.second.license().operation_id();
            for (const auto& named_call : calls) {
                for (const std::uint64_t id : {current - 1, current + 1, std::uint64_t{0}, std::uint64_t{UINT64_MAX}}) {
                    if (id == current) {
                        continue;
                    }
                    CAPTURE(named_worker.first, named_call.first, id);
                    auto worker = named_worker.second;
                    check_rejected(worker, errc::stale_operation,
                                   [&](cml_worker& w) { return named_call.second(w, id); });
                }
            }
        }
    }
    SECTION("wrong kind for the current operation")
    {
        auto registering = worker_registering(true);
        check_rejected(registering, errc::stale_operation, [&](cml_worker& w) { return calls[2].second(w, 1); });
        check_rejected(registering, errc::stale_operation, [&](cml_worker& w) { return calls[3].second(w, 1); });

        auto deregistering = worker_deregistering(true);
        check_rejected(deregistering, errc::stale_operation, [&](cml_worker& w) { return calls[0].second(w, 2); });
        check_rejected(deregistering, errc::stale_operation, [&](cml_worker& w) { return calls[1].second(w, 2); });
    }
    SECTION("other outcome of a finished operation")
    {
        auto completed = worker_registering(true);
        REQUIRE(completed.complete_license_registration(1, sample_details(), at(12)));
        check_rejected(completed, errc::stale_operation, [&](cml_worker& w) { return calls[1].second(w, 1); });

        auto failed = worker_registering(true);
        REQUIRE(failed.fail_license_registration(1, "code", "message", at(12)));
        check_rejected(failed, errc::stale_operation, [&](cml_worker& w) { return calls[0].second(w, 1); });

        auto deregistered = worker_deregistering(true);
        REQUIRE(deregistered.complete_license_deregistration(2, std::nullopt, at(22)));
        check_rejected(deregistered, errc::stale_operation, [&](cml_worker& w) { return calls[3].second(w, 2); });

        auto not_deregistered = worker_deregistering(true);
        REQUIRE(not_deregistered.fail_license_deregistration(2, "code", "message", at(22)));
        check_rejected(not_deregistered, errc::stale_operation, [&](cml_worker& w) { return calls[2].second(w, 2); });
    }
}

TEST_CASE("late steps of older operation", "[domain]")
{
    // Operation 1 fails before it started because the worker stopped. Once the worker runs
    // again, operation 2 registers another token, and then the steps of operation 1 arrive late.
    auto worker = worker_registering(false);
    worker.change_status(worker_status::stopped, "infrastructure", at(11));
    REQUIRE(worker.fail_license_registration(1, "worker_not_running", "the worker stopped", at(12)));
    worker.change_status(worker_status::running, "infrastructure", at(13));
    const auto newer = worker.request_license_registration(secret(second_token), false, "carol", at(14));
    REQUIRE(newer);
    CHECK(newer.value() == 2);

    check_rejected(worker, errc::stale_operation, [](cml_worker& w) { return w.start_license_operation(1, at(15)); });
    check_rejected(worker, errc::stale_operation,
                   [](cml_worker& w) { return w.complete_license_registration(1, sample_details(), at(15)); });
    check_rejected(worker, errc::stale_operation,
                   [](cml_worker& w) { return w.fail_license_registration(1, "code", "message", at(15)); });

    REQUIRE(worker.start_license_operation(2, at(16)));
    check_rejected(worker, errc::stale_operation,
                   [](cml_worker& w) { return w.complete_license_registration(1, sample_details(), at(17)); });
    REQUIRE(worker.complete_license_registration(2, sample_details(), at(18)));

    REQUIRE(worker.license().token());
    CHECK(worker.license().token()->reveal() == second_token);
    CHECK(worker.license().operation_id() == 2);
    CHECK(worker.license().requested_by() == "carol");
}

TEST_CASE("operation id increases per request", "[domain]")
{
    auto worker = running_worker();
    std::vector<std::uint64_t> ids;

    ids.push_back(worker.request_license_registration(secret(first_token), false, "alice", at(10)).value());
    REQUIRE(worker.fail_license_registration(ids.back(), "code", "before start", at(11)));
    ids.push_back(worker.request_license_registration(secret(first_token), false, "alice", at(12)).value());
    REQUIRE(worker.start_license_operation(ids.back(), at(13)));
    REQUIRE(worker.complete_license_registration(ids.back(), sample_details(), at(14)));
    ids.push_back(worker.request_license_deregistration("bob", at(15)).value());
    REQUIRE(worker.start_license_operation(ids.back(), at(16)));
    REQUIRE(worker.fail_license_deregistration(ids.back(), "code", "message", at(17)));
    ids.push_back(worker.request_license_deregistration("bob", at(18)).value());
    REQUIRE(worker.start_license_operation(ids.back(), at(19)));
    REQUIRE(worker.complete_license_deregistration(ids.back(), std::nullopt, at(20)));
    ids.push_back(worker.request_license_registration(secret(second_token), false, "carol", at(21)).value());

    CHECK(ids == std::vector<std::uint64_t>{1, 2, 3, 4, 5});
    CHECK(worker.license().operation_id() == 5);
}

// Events and secrets.

TEST_CASE("lifecycle records events in order", "[domain]")
{
    auto worker = cml_worker::create("worker-1", "lab one", "https://cml.example.test", worker_status::starting, "admin",
                                     at(0))
                      .value();
    worker.change_status(worker_status::running, "infrastructure", at(1));
    const auto registration = worker.request_license_registration(secret(first_token), false, "alice", at(2)).value();
    REQUIRE(worker.start_license_operation(registration, at(3)));
    REQUIRE(worker.complete_license_registration(registration, sample_details(), at(4)));
    const auto deregistration = worker.request_license_deregistration("bob", at(5)).value();
    REQUIRE(worker.start_license_operation(deregistration, at(6)));
    REQUIRE(worker.fail_license_deregistration(deregistration, "unavailable", "CML is unreachable", at(7)));
    const auto retry = worker.request_license_deregistration("bob", at(8)).value();
    REQUIRE(worker.start_license_operation(retry, at(9)));
    REQUIRE(worker.complete_license_deregistration(retry, std::nullopt, at(10)));
    const auto second = worker.request_license_registration(secret(second_token), false, "carol", at(11)).value();
    REQUIRE(worker.fail_license_registration(second, "invalid_token", "rejected", at(12)));

    struct expected_event {
        std::string_view type;
        std::uint64_t operation_id;
        std::string initiated_by;
    };
    const std::vector<expected_event> expected = {
        {"cml_worker.created.v1", 0, "admin"},
        {"cml_worker.status.changed.v1", 0, "infrastructure"},
        {"cml_worker.license.registration.requested.v1", 1, "alice"},
        {"cml_worker.license.registration.started.v1", 1, "alice"},
        {"cml_worker.license.registration.completed.v1", 1, "alice"},
        {"cml_worker.license.deregistration.requested.v1", 2, "bob"},
        {"cml_worker.license.deregistration.started.v1", 2, "bob"},
        {"cml_worker.license.deregistration.failed.v1", 2, "bob"},
        {"cml_worker.license.deregistration.requested.v1", 3, "bob"},
        {"cml_worker.license.deregistration.started.v1", 3, "bob"},
        {"cml_worker.license.deregistration.completed.v1", 3, "bob"},
        {"cml_worker.license.registration.requested.v1", 4, "carol"},
        {"cml_worker.license.registration.failed.v1", 4, "carol"},
    };
    REQUIRE(worker.events().size() == expected.size());
    for (std::size_t i = 0; i < expected.size(); ++i) {
        CAPTURE(i);
        const auto& event = worker.events()[i];
        CHECK(event_type(event) == expected[i].type);
        CHECK(header_of(event).worker_id == "worker-1");
        CHECK(header_of(event).operation_id == expected[i].operation_id);
        CHECK(header_of(event).occurred_at == at(static_cast<int>(i)));
        CHECK(header_of(event).initiated_by == expected[i].initiated_by);
    }

    const auto taken_events = worker.take_events();
    CHECK(taken_events.size() == expected.size());
    CHECK(worker.events().empty());
}

TEST_CASE("events never contain tokens", "[domain]")
{
    // CML's failure and warning texts can quote the token, so the worker must redact them.
    auto worker = running_worker();
    const auto first = worker.request_license_registration(secret(first_token), false, "alice", at(1)).value();
    REQUIRE(worker.start_license_operation(first, at(2)));
    REQUIRE(worker.fail_license_registration(first, "invalid_token", "token '" + first_token + "' is invalid", at(3)));
    const auto second = worker.request_license_registration(secret(first_token), false, "alice", at(4)).value();
    REQUIRE(worker.start_license_operation(second, at(5)));
    REQUIRE(worker.complete_license_registration(second, sample_details(), at(6)));
    const auto third = worker.request_license_registration(secret(second_token), true, "carol", at(7)).value();
    REQUIRE(worker.start_license_operation(third, at(8)));
    REQUIRE(worker.fail_license_registration(
        third, "invalid_token", "cannot replace " + first_token + " with " + second_token + ": " + second_token, at(9)));
    const auto fourth = worker.request_license_deregistration("bob", at(10)).value();
    REQUIRE(worker.start_license_operation(fourth, at(11)));
    REQUIRE(worker.fail_license_deregistration(fourth, "unavailable", "deregister " + first_token + " failed", at(12)));
    const auto fifth = worker.request_license_deregistration("bob", at(13)).value();
    REQUIRE(worker.start_license_operation(fifth, at(14)));
    REQUIRE(worker.complete_license_deregistration(fifth, "token " + first_token + " released locally", at(15)));

    const auto text = serialize_events(worker.events());
    CHECK(worker.events().size() == 15);
    CHECK(text.find(first_token) == std::string::npos);
    CHECK(text.find(second_token) == std::string::npos);
    CHECK(text.find("<redacted>") != std::string::npos);
}

TEST_CASE("failure message is stored redacted", "[domain]")
{
    SECTION("registration")
    {
        auto worker = registered_worker(first_token);
        worker.request_license_registration(secret(second_token), true, "carol", at(40)).value();
        worker.start_license_operation(2, at(41)).value();
        worker.take_events();

        REQUIRE(worker.fail_license_registration(
            2, "invalid_token", "old " + first_token + ", new " + second_token + ", again " + second_token, at(42)));

        const std::string expected = "old <redacted>, new <redacted>, again <redacted>";
        REQUIRE(worker.license().last_error());
        CHECK(worker.license().last_error()->message == expected);
        CHECK(single_event<license_registration_failed>(worker).error.message == expected);
    }
    SECTION("token that contains the other")
    {
        for (const bool pending_is_longer : {false, true}) {
            CAPTURE(pending_is_longer);
            const std::string inner = "Inner+Token";
            const std::string outer = "Outer-" + inner + "-Token";
            auto worker = registered_worker(pending_is_longer ? inner : outer);
            worker.request_license_registration(secret(pending_is_longer ? outer : inner), true, "carol", at(40)).value();
            worker.take_events();

            REQUIRE(worker.fail_license_registration(2, "invalid_token", "quoted " + outer + " and " + inner, at(42)));

            REQUIRE(worker.license().last_error());
            CHECK(worker.license().last_error()->message == "quoted <redacted> and <redacted>");
        }
    }
    SECTION("deregistration")
    {
        auto worker = worker_deregistering(true);

        REQUIRE(worker.fail_license_deregistration(2, "unavailable", first_token + " is still in use", at(22)));

        REQUIRE(worker.license().last_error());
        CHECK(worker.license().last_error()->message == "<redacted> is still in use");
        CHECK(single_event<license_deregistration_failed>(worker).error.message == "<redacted> is still in use");
    }
    SECTION("deregistration warning")
    {
        auto worker = worker_deregistering(true);

        REQUIRE(worker.complete_license_deregistration(2, "could not release " + first_token, at(22)));

        CHECK(worker.license().last_warning() == "could not release <redacted>");
        CHECK(single_event<license_deregistration_completed>(worker).warning == "could not release <redacted>");
    }
}

// Restoring stored state.

TEST_CASE("restore rebuilds without events", "[domain]")
{
    auto original = worker_registering(true);
    original.set_version(7);

    const auto restored = cml_worker::restore(original.state());

    REQUIRE(restored);
    CHECK(restored.value() == original);
    CHECK(restored.value().version() == 7);
    CHECK(restored.value().events().empty());
}

TEST_CASE("restore rejects broken invariants", "[domain]")
{
    using edit = std::function<void(cml_worker::fields&, cml_license::fields&)>;
    struct invariant_case {
        const char* name;
        edit apply;
        std::string expected_field;
    };
    const std::vector<invariant_case> cases = {
        {"invalid id", [](cml_worker::fields& worker, cml_license::fields&) { worker.id = "worker 1"; }, "id"},
        {"empty id", [](cml_worker::fields& worker, cml_license::fields&) { worker.id.clear(); }, "id"},
        {"in progress without pending operation",
         [](cml_worker::fields&, cml_license::fields& license) {
             license.pending_operation = license_operation::none;
             license.pending_token.reset();
         },
         "license.operation_in_progress"},
        {"pending registration without token",
         [](cml_worker::fields&, cml_license::fields& license) { license.pending_token.reset(); },
         "license.pending_token"},
        {"pending token without pending registration",
         [](cml_worker::fields&, cml_license::fields& license) {
             license.pending_operation = license_operation::deregistration;
         },
         "license.pending_token"},
        {"pending operation without id",
         [](cml_worker::fields&, cml_license::fields& license) { license.operation_id = 0; }, "license.operation_id"},
    };

    for (const auto& test : cases) {
        CAPTURE(test.name);
        auto state = worker_registering(true).state();
        auto license = state.license.state();
        test.apply(state, license);
        state.license = cml_license(license);
        std::string field;

        const auto restored = cml_worker::restore(state, &field);

        REQUIRE_FALSE(restored);
        CHECK(restored.error() == errc::invalid_argument);
        CHECK(field == test.expected_field);
        CHECK_FALSE(cml_worker::restore(state));
    }
}
