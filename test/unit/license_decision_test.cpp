// The license reconciler's pure decision functions: every CML status against the task's
// state, without an io_context.
#include <lcm/controller/license_decision.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using lcm::cml_licensing_status;
using lcm::cml_registration_status;
using lcm::controller::license_action;
using lcm::controller::license_decision_options;
using lcm::controller::license_task;
using lcm::domain::license_operation;
using lcm::domain::worker_status;

namespace {

const lcm::timestamp requested_at{std::chrono::sys_days{std::chrono::year{2026} / 3 / 1} + 12h};
const lcm::timestamp started_at = requested_at + 2s;
const std::string token_text = "TOKEN-abc123+/%=";

license_task registration_task(bool started, bool reregister)
{
    license_task task;
    task.worker_id = "worker-1";
    task.cml_url = "http://127.0.0.1:8080/instances/worker-1";
    task.worker_status = worker_status::running;
    task.operation = license_operation::registration;
    task.operation_id = 3;
    task.started = started;
    task.reregister = reregister;
    task.token = lcm::secret(token_text);
    task.requested_at = requested_at;
    if (started) {
        task.started_at = started_at;
    }
    return task;
}

license_task deregistration_task(bool started)
{
    auto task = registration_task(started, false);
    task.operation = license_operation::deregistration;
    task.token.reset();
    return task;
}

cml_licensing_status status_of(cml_registration_status registration, std::optional<lcm::timestamp> attempted)
{
    cml_licensing_status status;
    status.registration_status = registration;
    status.registration_attempted = attempted;
    return status;
}

/// When CML stamped its last registration attempt, relative to the operation's start, and
/// whether a started operation takes that attempt for its own with the default 5 s skew.
struct attempt_case {
    const char* name;
    std::optional<std::chrono::seconds> offset;
    bool ours_when_started;
};

const std::vector<attempt_case> attempt_cases = {
    {"no attempt recorded", std::nullopt, true},
    {"an hour before the start", -3600s, false},
    {"6 s before the start, outside the skew", -6s, false},
    {"5 s before the start, at the skew", -5s, true},
    {"4 s before the start, within the skew", -4s, true},
    {"10 s after the start", 10s, true},
};

std::optional<lcm::timestamp> attempt_time(const attempt_case& attempt)
{
    if (!attempt.offset) {
        return std::nullopt;
    }
    return started_at + *attempt.offset;
}

} // namespace

TEST_CASE("registration waits while CML works", "[license]")
{
    const auto registration = GENERATE(cml_registration_status::in_progress, cml_registration_status::retry_in_progress,
                                       cml_registration_status::reservation_in_progress,
                                       cml_registration_status::unknown);
    const bool started = GENERATE(false, true);
    const bool reregister = GENERATE(false, true);

    for (const auto& attempt : attempt_cases) {
        INFO("status " << static_cast<int>(registration) << ", started " << started << ", reregister " << reregister
                       << ", attempt " << attempt.name);
        const auto decision = lcm::controller::decide_registration(
            registration_task(started, reregister), status_of(registration, attempt_time(attempt)), {});
        CHECK(decision.action == license_action::wait);
        CHECK(decision.error_code.empty());
    }
}

TEST_CASE("registration decision for COMPLETED", "[license]")
{
    const bool started = GENERATE(false, true);
    const bool reregister = GENERATE(false, true);

    for (const auto& attempt : attempt_cases) {
        INFO("started " << started << ", reregister " << reregister << ", attempt " << attempt.name);
        const bool ours = started && attempt.ours_when_started;
        const auto decision = lcm::controller::decide_registration(
            registration_task(started, reregister),
            status_of(cml_registration_status::completed, attempt_time(attempt)), {});

        if (ours) {
            CHECK(decision.action == license_action::complete_registration);
        }
        else if (reregister) {
            CHECK(decision.action == license_action::post_registration);
        }
        else {
            CHECK(decision.action == license_action::fail);
            CHECK(decision.error_code == "already_registered");
            CHECK(decision.message.find("reregister") != std::string::npos);
        }
    }
}

TEST_CASE("registration decision for FAILED", "[license]")
{
    const bool started = GENERATE(false, true);
    const bool reregister = GENERATE(false, true);

    for (const auto& attempt : attempt_cases) {
        INFO("started " << started << ", reregister " << reregister << ", attempt " << attempt.name);
        const bool ours = started && attempt.ours_when_started;
        const auto decision = lcm::controller::decide_registration(
            registration_task(started, reregister), status_of(cml_registration_status::failed, attempt_time(attempt)),
            {});

        if (ours) {
            CHECK(decision.action == license_action::fail);
            CHECK(decision.error_code == "registration_failed");
        }
        else {
            // A failure of an older request is no reason to fail this one.
            CHECK(decision.action == license_action::post_registration);
        }
    }
}

TEST_CASE("registration decision for NOT_REGISTERED", "[license]")
{
    const bool started = GENERATE(false, true);
    const bool reregister = GENERATE(false, true);

    for (const auto& attempt : attempt_cases) {
        INFO("started " << started << ", reregister " << reregister << ", attempt " << attempt.name);
        const bool lost = started && attempt.ours_when_started && attempt.offset.has_value();
        const auto decision = lcm::controller::decide_registration(
            registration_task(started, reregister),
            status_of(cml_registration_status::not_registered, attempt_time(attempt)), {});

        if (lost) {
            CHECK(decision.action == license_action::fail);
            CHECK(decision.error_code == "registration_lost");
        }
        else {
            CHECK(decision.action == license_action::post_registration);
        }
    }
}

TEST_CASE("started task without start time", "[license]")
{
    // A task restored from an older record may be started without a start time: then
    // any attempt counts as this operation's, because posting twice is worse than waiting.
    auto task = registration_task(true, false);
    task.started_at.reset();
    const auto attempted = started_at - 3600s;

    const auto completed =
        lcm::controller::decide_registration(task, status_of(cml_registration_status::completed, attempted), {});
    const auto not_registered =
        lcm::controller::decide_registration(task, status_of(cml_registration_status::not_registered, std::nullopt), {});

    CHECK(completed.action == license_action::complete_registration);
    CHECK(not_registered.action == license_action::post_registration);
}

TEST_CASE("clock skew option moves the boundary", "[license]")
{
    license_decision_options options;
    options.clock_skew = 30s;
    const auto task = registration_task(true, false);

    const auto inside = lcm::controller::decide_registration(
        task, status_of(cml_registration_status::completed, started_at - 29s), options);
    const auto outside = lcm::controller::decide_registration(
        task, status_of(cml_registration_status::completed, started_at - 31s), options);

    CHECK(inside.action == license_action::complete_registration);
    CHECK(outside.action == license_action::fail);
    CHECK(outside.error_code == "already_registered");
}

TEST_CASE("FAILED reason omits the token", "[license]")
{
    auto status = status_of(cml_registration_status::failed, started_at + 1s);
    status.registration_failure =
        lcm::cml_failure_reason("Failed to register with ID token " + token_text + ": the token is revoked");

    const auto decision = lcm::controller::decide_registration(registration_task(true, false), status, {});

    REQUIRE(decision.action == license_action::fail);
    CHECK(decision.error_code == "registration_failed");
    CHECK(decision.message.find(token_text) == std::string::npos);
    CHECK(decision.message.find("<redacted>") != std::string::npos);
    CHECK(decision.message.find("the token is revoked") != std::string::npos);
    CHECK(decision.message.find("FAILED") != std::string::npos);
}

TEST_CASE("FAILED in skew window hides reason", "[license]")
{
    // An attempt stamped just before the start may be an older operation's, whose failure
    // text quotes a token this task does not know, so the text is left out.
    const std::string older_token = "OLDER-TOKEN-777";
    auto status = status_of(cml_registration_status::failed, started_at - 2s);
    status.registration_failure =
        lcm::cml_failure_reason("Failed to register with ID token " + older_token + ": the token is revoked");

    const auto decision = lcm::controller::decide_registration(registration_task(true, false), status, {});

    REQUIRE(decision.action == license_action::fail);
    CHECK(decision.error_code == "registration_failed");
    CHECK(decision.message.find(older_token) == std::string::npos);
    CHECK(decision.message == "CML reported the registration as FAILED");
}

TEST_CASE("FAILED without reason has a message", "[license]")
{
    const auto decision = lcm::controller::decide_registration(
        registration_task(true, false), status_of(cml_registration_status::failed, started_at + 1s), {});

    REQUIRE(decision.action == license_action::fail);
    CHECK(decision.error_code == "registration_failed");
    CHECK(decision.message == "CML reported the registration as FAILED");
}

TEST_CASE("deregistration decision per CML status", "[license]")
{
    const bool started = GENERATE(false, true);

    struct row {
        cml_registration_status registration;
        license_action expected;
    };
    const std::vector<row> rows = {
        {cml_registration_status::in_progress, license_action::wait},
        {cml_registration_status::retry_in_progress, license_action::wait},
        {cml_registration_status::reservation_in_progress, license_action::wait},
        {cml_registration_status::completed, license_action::send_deregistration},
        {cml_registration_status::failed, license_action::send_deregistration},
        // DELETE is safe to repeat: CML answers 400 when nothing is registered.
        {cml_registration_status::not_registered, license_action::send_deregistration},
        {cml_registration_status::unknown, license_action::send_deregistration},
    };
    for (const auto& entry : rows) {
        INFO("status " << static_cast<int>(entry.registration) << ", started " << started);
        const auto decision = lcm::controller::decide_deregistration(deregistration_task(started),
                                                                     status_of(entry.registration, started_at));
        CHECK(decision.action == entry.expected);
    }
}

TEST_CASE("stopped worker fails before CML", "[license]")
{
    const auto status = GENERATE(worker_status::pending, worker_status::provisioning, worker_status::starting,
                                 worker_status::draining, worker_status::stopping, worker_status::stopped,
                                 worker_status::terminating, worker_status::terminated, worker_status::failed,
                                 worker_status::unknown);
    auto task = registration_task(GENERATE(false, true), false);
    task.worker_status = status;

    const auto decision = lcm::controller::decide_before_cml(task, requested_at + 1s, {});

    REQUIRE(decision);
    CHECK(decision->action == license_action::fail);
    CHECK(decision->error_code == "worker_not_running");
    CHECK(decision->message.find(std::string(to_string(status))) != std::string::npos);
}

TEST_CASE("running worker goes on to CML", "[license]")
{
    const auto decision = lcm::controller::decide_before_cml(registration_task(true, false), requested_at + 299s, {});

    CHECK_FALSE(decision);
}

TEST_CASE("past deadline decides timeout failure", "[license]")
{
    license_decision_options options;
    options.operation_deadline = 120s;
    const auto task = GENERATE(registration_task(false, false), registration_task(true, true), deregistration_task(true));

    const auto at_deadline = lcm::controller::decide_before_cml(task, requested_at + 120s, options);
    const auto past_deadline = lcm::controller::decide_before_cml(task, requested_at + 120s + 1us, options);

    CHECK_FALSE(at_deadline);
    REQUIRE(past_deadline);
    CHECK(past_deadline->action == license_action::fail);
    CHECK(past_deadline->error_code == "timeout");
    CHECK(past_deadline->message.find("120 s") != std::string::npos);
}

TEST_CASE("deadline ignored without request time", "[license]")
{
    auto task = registration_task(true, false);
    task.requested_at.reset();

    const auto decision = lcm::controller::decide_before_cml(task, requested_at + 24h, {});

    CHECK_FALSE(decision);
}

TEST_CASE("permanent CML errors fail at once", "[license]")
{
    struct row {
        lcm::errc error;
        lcm::cml_call call;
        const char* code;
        const char* phrase;
    };
    const std::vector<row> rows = {
        {lcm::errc::invalid_token, lcm::cml_call::register_license, "invalid_token", "HTTP 400"},
        {lcm::errc::forbidden, lcm::cml_call::register_license, "forbidden", "admin rights (HTTP 403)"},
        {lcm::errc::forbidden, lcm::cml_call::get_licensing_status, "forbidden", "admin rights (HTTP 403)"},
        {lcm::errc::unauthorized, lcm::cml_call::deregister_license, "unauthorized", "credentials"},
        {lcm::errc::protocol_error, lcm::cml_call::deregister_license, "protocol_error",
         "DELETE /licensing/deregistration failed"},
    };
    for (const auto& entry : rows) {
        INFO("code " << entry.code);
        const auto decision = lcm::controller::fail_for_cml_error(make_error_code(entry.error), entry.call);
        CHECK(decision.action == license_action::fail);
        CHECK(decision.error_code == entry.code);
        CHECK(decision.message.find(entry.phrase) != std::string::npos);
    }
}

TEST_CASE("transient CML errors are not permanent", "[license]")
{
    CHECK(lcm::is_transient_cml_error(make_error_code(lcm::errc::operation_in_progress)));
    CHECK(lcm::is_transient_cml_error(make_error_code(lcm::errc::unavailable)));
    CHECK(lcm::is_transient_cml_error(make_error_code(lcm::errc::timeout)));
    CHECK(lcm::is_transient_cml_error(make_error_code(boost::system::errc::connection_reset)));
    CHECK_FALSE(lcm::is_transient_cml_error(make_error_code(lcm::errc::invalid_token)));
    CHECK_FALSE(lcm::is_transient_cml_error(make_error_code(lcm::errc::forbidden)));
}
