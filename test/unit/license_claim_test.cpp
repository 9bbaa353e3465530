// Two license controllers on one control plane and one fake CML fleet: they share the work
// through leased, fenced claims, and one takes over the claims of the other after it stopped.
// Time is driven by the manual clocks of the fixture, which also time the claims.
#include "license_test_support.hpp"

#include <lcm/testing/run.hpp>

#include <boost/asio/experimental/awaitable_operators.hpp>

#include <catch2/catch.hpp>

#include <stdexcept>
#include <string>
#include <variant>
#include <vector>

using namespace license_test;
using lcm::cml_call;
using lcm::domain::license_status;
using lcm::domain::operation_outcome;
using lcm::testing::run_with_timeout;

namespace {

constexpr int worker_count = 24;
constexpr auto lease = 10s;

std::string worker_id_of(int index)
{
    return "worker-" + std::to_string(index);
}

std::string token_of(int index)
{
    return "TOKEN-claim-" + std::to_string(index);
}

lcm::controller::license_controller_options options_for(const license_fixture& fixture, const std::string& id)
{
    auto options = fixture.controller_options(4);
    options.license.controller_id = id;
    options.license.lease = lease;
    // The control plane stamps requests with the real clock while the test advances the
    // controller's wall clock, but the test advances far less than a day.
    options.license.decision.operation_deadline = 24h;
    return options;
}

/// Returns the workers with a pending operation whose claim `holder` holds.
awaitable<std::vector<std::string>> claims_of(license_fixture& fixture, const std::string& holder)
{
    std::vector<std::string> held;
    for (int i = 0; i < worker_count; ++i) {
        const auto id = worker_id_of(i);
        const auto worker = co_await fixture.worker(id);
        if (worker.license().has_pending_operation() && worker.license().claim_holder() == holder) {
            held.push_back(id);
        }
    }
    co_return held;
}

/// Returns how many claims `holder` took, as the published events record them.
std::size_t claims_by(license_fixture& fixture, const std::string& holder)
{
    std::size_t count = 0;
    for (const auto& event : fixture.sink.events()) {
        const auto* claimed = std::get_if<lcm::domain::license_operation_claimed>(&event);
        count += claimed && claimed->holder == holder ? 1 : 0;
    }
    return count;
}

/// Returns how many of `ids` have a pending operation still claimed by `holder`.
awaitable<std::size_t> still_claimed(license_fixture& fixture, const std::vector<std::string>& ids,
                                     const std::string& holder)
{
    std::size_t count = 0;
    for (const auto& id : ids) {
        const auto worker = co_await fixture.worker(id);
        if (worker.license().has_pending_operation() && worker.license().claim_holder() == holder) {
            ++count;
        }
    }
    co_return count;
}

} // namespace

TEST_CASE("controllers share claims and take over", "[license][claim]")
{
    lcm::testing::fake_cml_options cml_options;
    // Registrations stay IN_PROGRESS at CML across several polls, so a stopped controller
    // leaves started operations behind.
    cml_options.registration_delay = 4s;
    // Each CML call waits on a real timer, so a controller's reconciles suspend after they
    // claimed, and the other controller claims the workers that wait in the queue meanwhile.
    cml_options.faults.latency = std::chrono::microseconds(1);
    license_fixture fixture(cml_options);
    auto first = fixture.make_controller(options_for(fixture, "controller-a"));
    auto second = fixture.make_controller(options_for(fixture, "controller-b"));

    std::vector<std::string> left_by_first;
    std::size_t claimed_by_second_before_stop = 0;
    lcm::timestamp first_stopped_at{};
    lcm::timestamp taken_over_at{};

    auto body = [&]() -> awaitable<void> {
        for (int i = 0; i < worker_count; ++i) {
            co_await fixture.add_worker(worker_id_of(i));
            auto accepted = co_await fixture.request_registration(worker_id_of(i), token_of(i));
            if (!accepted) {
                throw std::runtime_error("registration request rejected: " + accepted.error().message());
            }
        }

        // Let both controllers claim and start operations, then stop the first one while it
        // holds claims on operations that CML is still working on.
        for (int step = 0; step < 400; ++step) {
            co_await settle();
            const auto held = co_await claims_of(fixture, "controller-a");
            std::size_t started = 0;
            for (const auto& id : held) {
                const auto worker = co_await fixture.worker(id);
                started += worker.license().operation_in_progress() ? 1 : 0;
            }
            if (started >= 2) {
                break;
            }
            fixture.advance(100ms);
        }
        claimed_by_second_before_stop = claims_by(fixture, "controller-b");
        first->request_stop();
        co_await settle();
        left_by_first = co_await claims_of(fixture, "controller-a");
        first_stopped_at = fixture.cml_clock.now();
        if (left_by_first.size() < 2) {
            throw std::runtime_error("the first controller held fewer than two claims when it stopped");
        }

        // The second controller takes over every claim left behind once it expires.
        for (int step = 0; step < 1000; ++step) {
            co_await settle();
            if (co_await still_claimed(fixture, left_by_first, "controller-a") == 0) {
                taken_over_at = fixture.cml_clock.now();
                break;
            }
            fixture.advance(100ms);
        }
        co_await advance_until_settled(fixture, 500ms);
        second->request_stop();
    };

    run_with_timeout(fixture.context, [&]() -> awaitable<void> {
        using namespace boost::asio::experimental::awaitable_operators;
        // Named locals, because g++ 12 mishandles temporaries inside a co_await expression.
        // Boost 1.81 cannot chain three operands when one of them is void, so they nest.
        auto second_with_body = second->run() && body();
        auto all = first->run() && std::move(second_with_body);
        co_await std::move(all);
    }());

    INFO("claims left by the first controller: " << left_by_first.size());
    CHECK(claimed_by_second_before_stop > 0);
    CHECK(left_by_first.size() < static_cast<std::size_t>(worker_count));
    CHECK(taken_over_at != lcm::timestamp{});
    // Each claim expires at most one lease after the stop. The second controller retries at
    // the expiry plus its 500 ms margin, and the clock moves in steps of 100 ms.
    CHECK(taken_over_at - first_stopped_at <= lease + 700ms);
    CHECK(fixture.repository.pending_count() == 0);

    run_with_timeout(fixture.context, [&]() -> awaitable<void> {
        for (const auto& id : left_by_first) {
            INFO(id);
            const auto worker = co_await fixture.worker(id);
            CHECK(worker.license().fence() >= 2);
        }
        for (int i = 0; i < worker_count; ++i) {
            INFO(worker_id_of(i));
            const auto worker = co_await fixture.worker(worker_id_of(i));
            CHECK(worker.license().status() == license_status::registered);
            CHECK(worker.license().last_outcome() == operation_outcome::completed);
            CHECK(worker.license().claim_holder().empty());
            CHECK(fixture.instance(worker_id_of(i)).counters().received_calls(cml_call::register_license) == 1);
            CHECK(fixture.instance(worker_id_of(i)).counters().accepted_registrations == 1);
        }
    }());
    CHECK(fixture.cml.total_counters().accepted_registrations == static_cast<std::uint64_t>(worker_count));
    CHECK(fixture.log.count("license operation claimed by another controller") > 0);
}

TEST_CASE("registration post ends within claim", "[license][claim]")
{
    license_fixture fixture;
    auto options = fixture.controller_options(1);
    options.license.poll_interval = 100ms;
    options.license.lease = 1s;
    int registrations = 0;
    fixture.scripted.hang_registration = [&registrations](const lcm::cml_endpoint&) {
        return registrations++ == 0;
    };
    std::optional<lcm::timestamp> cancelled_at;
    fixture.scripted.on_hang_cancelled = [&] { cancelled_at = fixture.cml_clock.now(); };
    const auto worker_id = worker_id_of(0);
    std::optional<lcm::timestamp> claim_expiry;
    auto controller = fixture.make_controller(options);

    auto body = [&]() -> awaitable<void> {
        co_await fixture.add_worker(worker_id);
        auto accepted = co_await fixture.request_registration(worker_id, token_of(0));
        if (!accepted) {
            throw std::runtime_error("registration request rejected: " + accepted.error().message());
        }

        co_await advance_until(
            fixture, [&] { return registrations == 1; }, "the registration POST started", 50ms, 100);
        const auto posting = co_await fixture.worker(worker_id);
        claim_expiry = posting.license().claim_expires_at();

        // The first POST hangs until the reconcile timeout, half of the lease, cancels it.
        co_await advance_until(
            fixture, [&] { return cancelled_at.has_value(); }, "the hung registration was cancelled", 50ms, 100);
        co_await advance_until_settled(fixture, 100ms);
    };
    run_with_timeout(fixture.context, run_controller(*controller, body()));

    // The cancellation came before the claim expired, so no other controller could have
    // taken the operation over and posted too.
    REQUIRE(claim_expiry);
    REQUIRE(cancelled_at);
    CHECK(*cancelled_at < *claim_expiry);
    CHECK(registrations == 2);
    CHECK(fixture.instance(worker_id).counters().accepted_registrations == 1);
    auto stored = run_with_timeout(fixture.context, fixture.worker(worker_id));
    CHECK(stored.license().status() == license_status::registered);
    const auto retry = fixture.log.find("reconcile failed; retrying");
    REQUIRE(retry);
    CHECK(retry->find("error=\"timed out\"") != std::string::npos);
}

TEST_CASE("controller rejects short lease", "[license][claim]")
{
    license_fixture fixture;
    auto options = fixture.controller_options();
    options.license.lease = 3000ms;

    CHECK_THROWS_AS(fixture.make_controller(options), std::invalid_argument);

    options.license.lease = 3001ms;
    CHECK_NOTHROW(fixture.make_controller(options));
    options.license.controller_id = std::string(129, 'c');
    CHECK_THROWS_AS(fixture.make_controller(options), std::invalid_argument);
}

TEST_CASE("default controller id is unique", "[license][claim]")
{
    const auto first = lcm::controller::default_controller_id();
    const auto second = lcm::controller::default_controller_id();

    CHECK_FALSE(first.empty());
    CHECK(first != second);
    CHECK(first.size() <= lcm::domain::max_claim_holder_length);
    CHECK(first.find(std::to_string(::getpid())) != std::string::npos);
}
