// The license controller against the in-process control plane and the fake CML, with time
// driven by manual clocks.
#include "concurrent_tasks.hpp"
#include "license_test_support.hpp"

#include <lcm/testing/run.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <map>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

using namespace license_test;
using lcm::cml_call;
using lcm::cml_registration_status;
using lcm::domain::license_operation;
using lcm::domain::license_status;
using lcm::domain::operation_outcome;
using lcm::testing::run_with_timeout;

namespace {

const std::string worker_1 = "worker-1";
const std::string worker_2 = "worker-2";
const std::string token_1 = "TOKEN-1111aaaa+/=";
const std::string token_2 = "TOKEN-2222bbbb%-";

awaitable<void> require_accepted(awaitable<lcm::result<lcm::application::operation_accepted>> request)
{
    auto accepted = co_await std::move(request);
    if (!accepted) {
        throw std::runtime_error("request rejected: " + accepted.error().message());
    }
}

awaitable<void> register_and_settle(license_fixture& fixture, const std::string& worker_id, const std::string& token)
{
    co_await require_accepted(fixture.request_registration(worker_id, token));
    co_await advance_until_settled(fixture);
}

std::uint64_t received(license_fixture& fixture, const std::string& worker_id, cml_call call)
{
    return fixture.instance(worker_id).counters().received_calls(call);
}

} // namespace

TEST_CASE("registration completes on COMPLETED", "[license]")
{
    lcm::testing::fake_cml_options cml_options;
    cml_options.registration_delay = 45s;
    license_fixture fixture(cml_options);
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await settle();

        // CML accepted the registration and works on it; the operation stays pending.
        auto during = co_await fixture.worker(worker_1);
        CHECK(during.license().has_pending_operation());
        CHECK(during.license().operation_in_progress());
        CHECK(fixture.instance(worker_1).licensing_status().registration_status == cml_registration_status::in_progress);

        // While CML reports IN_PROGRESS, the status is read again after each poll interval.
        const auto reads = received(fixture, worker_1, cml_call::get_licensing_status);
        fixture.advance(1400ms);
        co_await settle();
        CHECK(received(fixture, worker_1, cml_call::get_licensing_status) == reads);
        fixture.advance(100ms);
        co_await settle();
        CHECK(received(fixture, worker_1, cml_call::get_licensing_status) == reads + 1);

        co_await advance_until_settled(fixture, 1500ms);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.status() == license_status::registered);
    CHECK(license.last_outcome() == operation_outcome::completed);
    CHECK(license.smart_account() == "example.com");
    CHECK(license.virtual_account() == "Default");
    CHECK(license.authorization_status() == "IN_COMPLIANCE");
    REQUIRE(license.expiry_date());
    const auto cml_status = fixture.instance(worker_1).licensing_status();
    CHECK(license.expiry_date() == cml_status.registration_expires);
    REQUIRE(license.features().size() == 2);
    CHECK(license.features()[0].id == "CML_ENTERPRISE");
    CHECK(license.features()[0].status == "IN_COMPLIANCE");
    CHECK(license.features()[1].name == "CML Nodes");
    REQUIRE(license.token());
    CHECK(license.token()->reveal() == token_1);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);
    CHECK_FALSE(fixture.log.find(token_1));
}

TEST_CASE("polling registration frees its slot", "[license]")
{
    lcm::testing::fake_cml_options cml_options;
    cml_options.registration_delay = 10s;
    license_fixture fixture(cml_options);
    auto controller = fixture.make_controller(1);

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await fixture.add_worker(worker_2);
        // Worker 1's host cannot reach the licensing service, so its registration keeps
        // RETRY_IN_PROGRESS and the controller polls it for as long as the test wants.
        fixture.instance(worker_1).set_licensing_service_reachable(false);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await settle();
        co_await require_accepted(fixture.request_registration(worker_2, token_2));

        co_await advance_until(
            fixture,
            [&] { return fixture.repository.pending_count() == 1; }, "worker 2 registered while worker 1 polls",
            1500ms, 20);
        auto first = co_await fixture.worker(worker_1);
        auto second = co_await fixture.worker(worker_2);
        CHECK(first.license().has_pending_operation());
        CHECK(second.license().status() == license_status::registered);
        CHECK(fixture.instance(worker_1).licensing_status().registration_status ==
              cml_registration_status::retry_in_progress);

        fixture.instance(worker_1).set_licensing_service_reachable(true);
        co_await advance_until_settled(fixture, 1500ms, 20);
    }()));

    auto first = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(first.license().status() == license_status::registered);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);
    CHECK(fixture.instance(worker_2).counters().accepted_registrations == 1);
}

TEST_CASE("operation deadline fails with timeout", "[license]")
{
    license_fixture fixture;
    auto options = fixture.controller_options();
    options.license.decision.operation_deadline = 120s;
    auto controller = fixture.make_controller(options);

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        fixture.instance(worker_1).set_licensing_service_reachable(false);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));

        co_await advance_until(
            fixture, [&] { return fixture.cml_clock.now() > lcm::now_utc() + 100s; }, "100 s passed", 1500ms);
        auto before_deadline = co_await fixture.worker(worker_1);
        CHECK(before_deadline.license().has_pending_operation());

        co_await advance_until_settled(fixture, 1500ms);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.last_outcome() == operation_outcome::failed);
    REQUIRE(license.last_error());
    CHECK(license.last_error()->code == "timeout");
    CHECK(license.last_error()->message == "license operation did not finish within 120 s");
    CHECK(license.status() == license_status::unregistered);
    CHECK(fixture.log.find("code=timeout"));
}

TEST_CASE("deregistration completes on 204", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await register_and_settle(fixture, worker_1, token_1);
        co_await require_accepted(fixture.request_deregistration(worker_1));
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.status() == license_status::unregistered);
    CHECK(license.last_operation() == license_operation::deregistration);
    CHECK(license.last_outcome() == operation_outcome::completed);
    CHECK_FALSE(license.last_warning());
    CHECK_FALSE(license.token());
    CHECK(license.features().empty());
    CHECK(fixture.instance(worker_1).counters().deregistrations == 1);
    CHECK(fixture.instance(worker_1).licensing_status().registration_status == cml_registration_status::not_registered);
}

TEST_CASE("deregistration 202 records warning", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await register_and_settle(fixture, worker_1, token_1);
        fixture.instance(worker_1).set_licensing_service_reachable(false);
        co_await require_accepted(fixture.request_deregistration(worker_1));
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.status() == license_status::unregistered);
    CHECK(license.last_outcome() == operation_outcome::completed);
    REQUIRE(license.last_warning());
    CHECK(license.last_warning()->find("could not reach the Cisco licensing service") != std::string::npos);
    CHECK(fixture.instance(worker_1).counters().deregistrations == 1);
}

TEST_CASE("deregistration of deregistered host completes", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller();
    lcm::testing::fake_cml_client operator_client(fixture.cml, {"admin", lcm::secret("fake-cml-password")});
    const lcm::cml_endpoint endpoint{cml_url_of(worker_1)};

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await register_and_settle(fixture, worker_1, token_1);
        // Someone deregisters the host directly, so the controller's DELETE gets 400.
        auto direct = co_await operator_client.deregister_license(endpoint);
        REQUIRE(direct);
        co_await require_accepted(fixture.request_deregistration(worker_1));
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::unregistered);
    CHECK(stored.license().last_outcome() == operation_outcome::completed);
    CHECK_FALSE(stored.license().last_warning());
    CHECK(received(fixture, worker_1, cml_call::deregister_license) == 2);
    CHECK(fixture.instance(worker_1).counters().deregistrations == 1);
}

TEST_CASE("deregistration retries after 409", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await register_and_settle(fixture, worker_1, token_1);

        lcm::testing::fake_cml_faults busy;
        busy.conflict_rate = 1.0;
        fixture.instance(worker_1).set_faults(busy);
        co_await require_accepted(fixture.request_deregistration(worker_1));
        co_await advance_until(
            fixture, [&] { return received(fixture, worker_1, cml_call::deregister_license) >= 4; },
            "four DELETEs answered 409", 100ms);
        auto during = co_await fixture.worker(worker_1);
        CHECK(during.license().has_pending_operation());

        fixture.instance(worker_1).set_faults({});
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::unregistered);
    CHECK(stored.license().last_outcome() == operation_outcome::completed);
    CHECK(fixture.instance(worker_1).counters().deregistrations == 1);
    CHECK(fixture.log.count("msg=\"reconcile failed; retrying\"") >= 3);
    CHECK(fixture.log.find("error=\"another license operation is pending or in progress\""));
}

TEST_CASE("transient CML failures are retried", "[license]")
{
    struct fault_case {
        const char* name;
        lcm::testing::fake_cml_faults faults;
    };
    lcm::testing::fake_cml_faults server_errors;
    server_errors.server_error_rate = 1.0;
    lcm::testing::fake_cml_faults dropped;
    dropped.drop_before_apply_rate = 1.0;
    lcm::testing::fake_cml_faults busy;
    busy.conflict_rate = 1.0;
    const auto faulty = GENERATE_COPY(fault_case{"503 on every call", server_errors},
                                      fault_case{"connection dropped before CML", dropped},
                                      fault_case{"409 on every mutation", busy});
    INFO(faulty.name);

    license_fixture fixture;
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        fixture.cml.set_faults(faulty.faults);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await advance_until(
            fixture, [&] { return fixture.log.count("msg=\"reconcile failed; retrying\"") >= 3; },
            "three retries", 100ms);
        auto during = co_await fixture.worker(worker_1);
        CHECK(during.license().has_pending_operation());

        fixture.cml.set_faults({});
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::registered);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);
}

TEST_CASE("invalid token from CML fails at once", "[license]")
{
    license_fixture fixture;
    fixture.scripted.replace = [](cml_call call, const lcm::cml_endpoint&) -> std::optional<boost::system::error_code> {
        if (call == cml_call::register_license) {
            return make_error_code(lcm::errc::invalid_token);
        }
        return std::nullopt;
    };
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await settle();
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.last_outcome() == operation_outcome::failed);
    REQUIRE(license.last_error());
    CHECK(license.last_error()->code == "invalid_token");
    CHECK(license.last_error()->message == "CML rejected the license token as invalid (HTTP 400)");
    CHECK_FALSE(fixture.log.find("reconcile failed; retrying"));
}

TEST_CASE("non-admin CML user fails at once", "[license]")
{
    lcm::testing::fake_cml_options cml_options;
    cml_options.users = {{"admin", lcm::secret("fake-cml-password"), false}};
    license_fixture fixture(cml_options);
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await settle();
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.last_outcome() == operation_outcome::failed);
    REQUIRE(license.last_error());
    CHECK(license.last_error()->code == "forbidden");
    CHECK(license.last_error()->message.find("admin rights (HTTP 403)") != std::string::npos);
    CHECK(received(fixture, worker_1, cml_call::register_license) == 0);
    CHECK_FALSE(fixture.log.find("reconcile failed; retrying"));
}

TEST_CASE("rejected token fails with CML reason", "[license]")
{
    lcm::testing::fake_cml_options cml_options;
    cml_options.token_rejected = [](const lcm::secret& token) { return token.reveal() == token_2; };
    license_fixture fixture(cml_options);
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await require_accepted(fixture.request_registration(worker_1, token_2));
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.last_outcome() == operation_outcome::failed);
    CHECK(license.status() == license_status::unregistered);
    REQUIRE(license.last_error());
    CHECK(license.last_error()->code == "registration_failed");
    CHECK(license.last_error()->message.find("the token is invalid, expired or revoked") != std::string::npos);
    CHECK(license.last_error()->message.find(token_2) == std::string::npos);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);
    const auto line = fixture.log.find("code=registration_failed");
    REQUIRE(line);
    CHECK(line->find(token_2) == std::string::npos);
    CHECK_FALSE(fixture.log.find(token_2));
}

TEST_CASE("revoked bearer token logs in again", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await register_and_settle(fixture, worker_1, token_1);
        CHECK(received(fixture, worker_1, cml_call::authenticate) == 1);

        fixture.instance(worker_1).revoke_tokens();
        co_await require_accepted(fixture.request_deregistration(worker_1));
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::unregistered);
    CHECK(stored.license().last_outcome() == operation_outcome::completed);
    CHECK(received(fixture, worker_1, cml_call::authenticate) == 2);
    CHECK_FALSE(fixture.log.find("reconcile failed; retrying"));
}

TEST_CASE("stopped worker fails pending operation", "[license]")
{
    const bool cml_called = GENERATE(false, true);
    INFO("registration already posted to CML: " << cml_called);
    lcm::testing::fake_cml_options cml_options;
    cml_options.registration_delay = 60s;
    license_fixture fixture(cml_options);
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        if (!cml_called) {
            // The worker stops before the controller reaches it.
            lcm::testing::fake_cml_faults failing;
            failing.server_error_rate = 1.0;
            fixture.cml.set_faults(failing);
        }
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await settle();
        std::string worker = worker_1;
        std::string requester = "test";
        auto stopped = co_await fixture.plane.change_worker_status(std::move(worker), lcm::domain::worker_status::stopped,
                                                                   std::move(requester));
        REQUIRE(stopped);
        co_await advance_until_settled(fixture, 1500ms, 10);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.last_outcome() == operation_outcome::failed);
    REQUIRE(license.last_error());
    CHECK(license.last_error()->code == "worker_not_running");
    CHECK(license.last_error()->message.find("worker is stopped") != std::string::npos);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == (cml_called ? 1U : 0U));
}

TEST_CASE("reregister replaces registration", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await register_and_settle(fixture, worker_1, token_1);

        auto without_flag = co_await fixture.request_registration(worker_1, token_2, false);
        CHECK(without_flag.error() == lcm::errc::already_registered);

        // CML's attempt time tells this operation's attempt from the last one, so time
        // must pass beyond the clock skew between them.
        fixture.advance(10s);
        co_await require_accepted(fixture.request_registration(worker_1, token_2, true));
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::registered);
    CHECK(stored.license().last_outcome() == operation_outcome::completed);
    REQUIRE(stored.license().token());
    CHECK(stored.license().token()->reveal() == token_2);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 2);
}

TEST_CASE("registration on registered host fails", "[license]")
{
    // The fake CML's clock runs an hour behind, so the host's registration looks an hour old
    // to a controller on the real clock.
    license_fixture fixture({}, lcm::now_utc() - 1h);
    auto options = fixture.controller_options();
    options.license.wall_clock = nullptr;
    auto controller = fixture.make_controller(options);
    lcm::testing::fake_cml_client operator_client(fixture.cml, {"admin", lcm::secret("fake-cml-password")});
    const lcm::cml_endpoint endpoint{cml_url_of(worker_1)};
    const lcm::secret other_token("OTHER-TOKEN-0000");

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        // The host was registered directly, outside lcm.
        auto direct = co_await operator_client.register_license(endpoint, other_token, false);
        REQUIRE(direct);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    const auto& license = stored.license();
    CHECK(license.last_outcome() == operation_outcome::failed);
    REQUIRE(license.last_error());
    CHECK(license.last_error()->code == "already_registered");
    CHECK(license.last_error()->message.find("reregister") != std::string::npos);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);
}

TEST_CASE("restarted controller resumes accepted registration", "[license]")
{
    const auto delay = GENERATE(0s, 20s);
    INFO("registration delay " << delay.count() << " s");
    lcm::testing::fake_cml_options cml_options;
    cml_options.registration_delay = delay;
    // The first controller runs on its own io_context, which the crash stops for good.
    boost::asio::io_context crashed_context;
    std::atomic<bool> crashed{false};
    cml_options.hook = [&](lcm::testing::fake_cml_hook_point point, std::string_view) {
        if (point == lcm::testing::fake_cml_hook_point::registration_accepted && !crashed.exchange(true)) {
            // The process dies after CML accepted, before anything reaches the control plane.
            crashed_context.stop();
            throw std::runtime_error("controller crashed");
        }
    };
    license_fixture fixture(cml_options);
    run_with_timeout(fixture.context, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
    }());

    // With latency, every CML call of the first controller suspends on a timer, so nothing
    // of it runs after the crash: the io_context is stopped and never runs again.
    lcm::testing::fake_cml_faults slow;
    slow.latency = 1us;
    fixture.instance(worker_1).set_faults(slow);
    auto first = fixture.make_controller(crashed_context.get_executor(), fixture.controller_options());
    boost::asio::co_spawn(crashed_context, first->run(), boost::asio::detached);
    crashed_context.run_for(std::chrono::seconds(10));
    REQUIRE(crashed);

    auto interrupted = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(interrupted.license().has_pending_operation());
    CHECK(interrupted.license().operation_in_progress());
    REQUIRE(fixture.instance(worker_1).counters().accepted_registrations == 1);

    fixture.instance(worker_1).set_faults({});
    auto second = fixture.make_controller();
    run_with_timeout(fixture.context, run_controller(*second, advance_until_settled(fixture, 1500ms)));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::registered);
    CHECK(stored.license().last_outcome() == operation_outcome::completed);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);
    CHECK(received(fixture, worker_1, cml_call::register_license) == 1);

    // After the checks, the crashed controller stops, so that its suspended coroutines end
    // and free what they hold instead of leaking it.
    first->request_stop();
    crashed_context.restart();
    crashed_context.run_for(std::chrono::seconds(10));
    CHECK(crashed_context.stopped());
}

TEST_CASE("lost POST response is not repeated", "[license]")
{
    license_fixture fixture;
    bool drop_armed = true;
    fixture.scripted.before = [&](cml_call call, const lcm::cml_endpoint& endpoint) {
        if (call == cml_call::register_license && drop_armed) {
            drop_armed = false;
            lcm::testing::fake_cml_faults lost;
            lost.drop_after_apply_rate = 1.0;
            fixture.cml.instance(endpoint).set_faults(lost);
        }
    };
    auto controller = fixture.make_controller();

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await advance_until(
            fixture, [&] { return fixture.instance(worker_1).counters().accepted_registrations == 1; },
            "CML accepted the registration");
        // Every response is lost for a while, including those of the status reads.
        fixture.advance(5s);
        co_await settle();
        auto during = co_await fixture.worker(worker_1);
        CHECK(during.license().has_pending_operation());

        fixture.instance(worker_1).set_faults({});
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::registered);
    CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);
    CHECK(received(fixture, worker_1, cml_call::register_license) == 1);
}

TEST_CASE("stale report is rejected", "[license]")
{
    lcm::testing::fake_cml_options cml_options;
    cml_options.token_rejected = [](const lcm::secret& token) { return token.reveal() == token_2; };
    license_fixture fixture(cml_options);
    const auto options = fixture.controller_options().license;
    handler_type late(fixture.scripted, fixture.plane_client, options);
    handler_type current(fixture.scripted, fixture.plane_client, options);

    // Runs one reconcile of `worker_id` with `handler`, as the reconciler would: on its own copy
    // of the task, which the reconcile may change.
    auto reconcile_once = [](handler_type& handler, const std::string& worker_id,
                             lcm::controller::license_task task) -> awaitable<lcm::reconcile::action> {
        lcm::controller::license_observation observed;
        auto read = co_await handler.read_status(worker_id, task, observed);
        if (!read) {
            throw std::runtime_error("reading CML's status failed: " + read.error().message());
        }
        co_return co_await handler.reconcile(worker_id, task, observed);
    };
    auto read_task = [](handler_type& handler, const std::string& worker_id) -> awaitable<lcm::controller::license_task> {
        auto spec = co_await handler.read_spec(worker_id);
        if (!spec || !spec.value()) {
            throw std::runtime_error("no pending task");
        }
        co_return *spec.value();
    };

    SECTION("operation finished by another controller")
    {
        run_with_timeout(fixture.context, [&]() -> awaitable<void> {
            co_await fixture.add_worker(worker_1);
            co_await require_accepted(fixture.request_registration(worker_1, token_1));
            const auto stale = co_await read_task(late, worker_1);
            const auto fresh = co_await read_task(current, worker_1);
            const auto finished = co_await reconcile_once(current, worker_1, fresh);
            CHECK(finished.type() == lcm::reconcile::action::kind::done);

            const auto before = co_await fixture.worker(worker_1);
            const auto events_before = fixture.sink.events().size();
            const auto outcome = co_await reconcile_once(late, worker_1, stale);
            const auto after = co_await fixture.worker(worker_1);

            CHECK(outcome.type() == lcm::reconcile::action::kind::requeue_after);
            CHECK(outcome.delay() == lcm::reconcile::duration::zero());
            CHECK(after == before);
            CHECK(fixture.sink.events().size() == events_before);
            CHECK(fixture.log.find("error=\"operation id is not the worker's current operation\""));
            auto direct = co_await fixture.plane_client.fail(worker_1, stale.operation_id, "late", "late failure");
            CHECK(direct.error() == lcm::errc::stale_operation);
        }());
    }

    SECTION("operation replaced by a newer request")
    {
        run_with_timeout(fixture.context, [&]() -> awaitable<void> {
            co_await fixture.add_worker(worker_1);
            co_await require_accepted(fixture.request_registration(worker_1, token_2));
            const auto stale = co_await read_task(late, worker_1);
            const auto fresh = co_await read_task(current, worker_1);
            CHECK(fresh.operation_id == stale.operation_id);
            // CML rejects the token, so the current controller fails the operation.
            co_await reconcile_once(current, worker_1, fresh);
            auto failed = co_await fixture.worker(worker_1);
            CHECK(failed.license().last_outcome() == operation_outcome::failed);

            fixture.advance(10s);
            co_await require_accepted(fixture.request_registration(worker_1, token_1));
            const auto before = co_await fixture.worker(worker_1);
            const auto outcome = co_await reconcile_once(late, worker_1, stale);
            const auto after = co_await fixture.worker(worker_1);

            CHECK(outcome.type() == lcm::reconcile::action::kind::requeue_after);
            CHECK(after == before);
            CHECK(after.license().operation_id() == stale.operation_id + 1);
            CHECK_FALSE(after.license().operation_in_progress());
            CHECK(fixture.instance(worker_1).counters().accepted_registrations == 1);

            lcm::domain::registration_details details;
            auto completed = co_await fixture.plane_client.complete_registration(worker_1, stale.operation_id,
                                                                                 std::move(details));
            CHECK(completed.error() == lcm::errc::stale_operation);
            auto started = co_await fixture.plane_client.start(worker_1, stale.operation_id);
            CHECK(started.error() == lcm::errc::stale_operation);
        }());
    }
}

TEST_CASE("conflicting requests while controller runs", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller(4);
    constexpr int worker_count = 12;
    constexpr int rounds = 4;
    std::vector<std::string> workers;
    for (int i = 0; i < worker_count; ++i) {
        workers.push_back("worker-" + std::to_string(i));
    }
    std::map<std::string, std::vector<std::uint64_t>> accepted;
    std::map<lcm::errc, int> rejections;
    bool clients_done = false;

    // Alternates registration and deregistration requests on one worker, each one
    // repeated until the control plane accepts it.
    auto client = [&](const std::string& worker_id) -> awaitable<void> {
        auto executor = co_await boost::asio::this_coro::executor;
        for (int round = 0; round < rounds; ++round) {
            const bool registration = round % 2 == 0;
            const std::string token = "TOKEN-" + worker_id + "-" + std::to_string(round);
            for (;;) {
                lcm::result<lcm::application::operation_accepted> outcome =
                    make_error_code(lcm::errc::operation_in_progress);
                if (registration) {
                    outcome = co_await fixture.request_registration(worker_id, token);
                }
                else {
                    outcome = co_await fixture.request_deregistration(worker_id);
                }
                if (outcome) {
                    accepted[worker_id].push_back(outcome.value().operation_id);
                    break;
                }
                ++rejections[static_cast<lcm::errc>(outcome.error().value())];
                co_await boost::asio::post(executor, boost::asio::use_awaitable);
            }
        }
    };
    auto drive_time = [&]() -> awaitable<void> {
        while (!clients_done || fixture.repository.pending_count() > 0) {
            fixture.advance(500ms);
            co_await settle(5);
        }
    };
    auto clients = [&]() -> awaitable<void> {
        std::vector<awaitable<void>> tasks;
        for (const auto& worker_id : workers) {
            tasks.push_back(client(worker_id));
        }
        co_await lcm::test::run_concurrently(std::move(tasks));
        clients_done = true;
    };

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        for (const auto& worker_id : workers) {
            co_await fixture.add_worker(worker_id);
        }
        std::vector<awaitable<void>> tasks;
        tasks.push_back(clients());
        tasks.push_back(drive_time());
        co_await lcm::test::run_concurrently(std::move(tasks));
    }()));

    CHECK(rejections[lcm::errc::operation_in_progress] > 0);
    for (const auto& [code, count] : rejections) {
        INFO("rejected with " << lcm::error_name(make_error_code(code)) << " " << count << " times");
        CHECK(code == lcm::errc::operation_in_progress);
    }
    const auto events = fixture.sink.events();
    for (const auto& worker_id : workers) {
        INFO(worker_id);
        const auto& ids = accepted[worker_id];
        REQUIRE(ids.size() == rounds);
        CHECK(std::is_sorted(ids.begin(), ids.end()));
        for (auto operation_id : ids) {
            const auto finished = std::count_if(events.begin(), events.end(), [&](const auto& event) {
                const auto& header = lcm::domain::header_of(event);
                return header.worker_id == worker_id && header.operation_id == operation_id &&
                       (std::holds_alternative<lcm::domain::license_registration_completed>(event) ||
                        std::holds_alternative<lcm::domain::license_deregistration_completed>(event));
            });
            CHECK(finished == 1);
        }
        auto stored = run_with_timeout(fixture.context, fixture.worker(worker_id));
        CHECK_FALSE(stored.license().has_pending_operation());
        CHECK(stored.license().status() == license_status::unregistered);
        CHECK(fixture.instance(worker_id).licensing_status().registration_status ==
              cml_registration_status::not_registered);
        CHECK(fixture.instance(worker_id).counters().accepted_registrations == rounds / 2);
    }
}

TEST_CASE("stop keeps interrupted operation pending", "[license]")
{
    license_fixture fixture;
    // The fake client waits this long on a real timer before each call, so the stop
    // cancels the controller's status read.
    lcm::testing::fake_cml_faults slow;
    slow.latency = 1h;
    auto first = fixture.make_controller();

    auto report = run_with_timeout(fixture.context, run_controller(*first, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        fixture.instance(worker_1).set_faults(slow);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await settle();
    }()));

    CHECK(report.cancelled == 1);
    CHECK(report.pending == std::vector<std::string>{worker_1});
    auto interrupted = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(interrupted.license().has_pending_operation());
    CHECK_FALSE(interrupted.license().last_error());

    fixture.instance(worker_1).set_faults({});
    auto second = fixture.make_controller();
    run_with_timeout(fixture.context, run_controller(*second, advance_until_settled(fixture)));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::registered);
}

TEST_CASE("reconcile timeout retries operation", "[license]")
{
    license_fixture fixture;
    lcm::testing::fake_cml_faults slow;
    slow.latency = 1h;
    auto options = fixture.controller_options();
    options.reconciler.reconcile_timeout = 30s;
    auto controller = fixture.make_controller(options);

    run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_1);
        fixture.instance(worker_1).set_faults(slow);
        co_await require_accepted(fixture.request_registration(worker_1, token_1));
        co_await settle();
        fixture.advance(31s);
        co_await settle();
        auto after_timeout = co_await fixture.worker(worker_1);
        CHECK(after_timeout.license().has_pending_operation());
        CHECK_FALSE(after_timeout.license().last_error());

        fixture.instance(worker_1).set_faults({});
        co_await advance_until_settled(fixture);
    }()));

    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_1));
    CHECK(stored.license().status() == license_status::registered);
    const auto retry = fixture.log.find("reconcile failed; retrying");
    REQUIRE(retry);
    CHECK(retry->find("error=\"timed out\"") != std::string::npos);
}

TEST_CASE("cancelled run stops controller gracefully", "[license]")
{
    license_fixture fixture;
    auto controller = fixture.make_controller();
    boost::asio::cancellation_signal cancel;
    std::optional<lcm::reconcile::stop_report<std::string>> report;
    std::exception_ptr failure;
    bool finished = false;

    boost::asio::co_spawn(fixture.context, controller->run(),
                          boost::asio::bind_cancellation_slot(
                              cancel.slot(), [&](std::exception_ptr error, lcm::reconcile::stop_report<std::string> done) {
                                  failure = error;
                                  report = std::move(done);
                                  finished = true;
                              }));
    run_with_timeout(fixture.context, [&]() -> awaitable<void> {
        // Stops the controller if the cancellation does not, so that a failure ends the test.
        struct stop_on_exit {
            controller_type& controller;
            ~stop_on_exit() { controller.request_stop(); }
        } stop_guard{*controller};
        co_await fixture.add_worker(worker_1);
        co_await register_and_settle(fixture, worker_1, token_1);
        cancel.emit(boost::asio::cancellation_type::terminal);
        co_await advance_until(fixture, [&] { return finished; }, "controller stopped", 500ms, 20);
    }());

    REQUIRE(finished);
    CHECK_FALSE(failure);
    REQUIRE(report);
    CHECK(report->pending.empty());
}
