// The license controller under random faults, restarts and requests, and on several threads.
#include "license_test_support.hpp"

#include <lcm/testing/run.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <map>
#include <random>
#include <set>
#include <string>
#include <vector>

using namespace license_test;
using lcm::cml_registration_status;
using lcm::domain::license_operation;
using lcm::domain::license_status;
using lcm::domain::operation_outcome;
using lcm::testing::run_with_timeout;

namespace {

/// What the random test requested on one worker.
struct worker_plan {
    std::string id;
    std::vector<std::string> tokens;
    std::set<std::uint64_t> operations;
    bool deregistration_planned = false;
    bool second_registration_planned = false;
};

/// Counts the registration POSTs that CML accepted, per token. Every registration request
/// of the test uses a new token, so a token names one operation.
class accepted_posts {
public:
    void watch(license_fixture& fixture)
    {
        fixture.scripted.before = [this, &fixture](lcm::cml_call call, const lcm::cml_endpoint& endpoint) {
            if (call == lcm::cml_call::register_license) {
                before_ = fixture.cml.instance(endpoint).counters().accepted_registrations;
            }
        };
        fixture.scripted.after_register = [this, &fixture](const lcm::cml_endpoint& endpoint, const lcm::secret& token,
                                                           const lcm::result<void>&) {
            const auto after = fixture.cml.instance(endpoint).counters().accepted_registrations;
            per_token_[token.reveal()] += after - before_;
        };
    }

    std::uint64_t count(const std::string& token) const
    {
        const auto found = per_token_.find(token);
        return found == per_token_.end() ? 0 : found->second;
    }

    std::uint64_t total() const
    {
        std::uint64_t sum = 0;
        for (const auto& entry : per_token_) {
            sum += entry.second;
        }
        return sum;
    }

private:
    // The test runs one controller on one thread at a time, so one call is in flight per
    // POST and a single "before" value suffices.
    std::uint64_t before_ = 0;
    std::map<std::string, std::uint64_t> per_token_;
};

} // namespace

TEST_CASE("random faults and restarts settle", "[license][random]")
{
    const std::uint64_t seed = GENERATE(1, 2, 3, 4, 5);
    INFO("seed " << seed);
    std::mt19937_64 random(seed);
    auto chance = [&random](double rate) { return std::uniform_real_distribution<double>(0, 1)(random) < rate; };
    auto pick = [&random](int low, int high) { return std::uniform_int_distribution<int>(low, high)(random); };
    constexpr int worker_count = 200;

    lcm::testing::fake_cml_options cml_options;
    cml_options.registration_delay = std::chrono::seconds(pick(0, 20));
    cml_options.token_rejected = [](const lcm::secret& token) { return token.reveal().starts_with("BAD"); };
    lcm::testing::fake_cml_faults faults;
    faults.server_error_rate = 0.1 * pick(0, 2);
    faults.conflict_rate = 0.1 * pick(0, 2);
    faults.drop_before_apply_rate = 0.05 * pick(0, 2);
    faults.drop_after_apply_rate = 0.05 * pick(0, 2);
    // A real timer: each CML call then suspends, so a stop can interrupt it.
    faults.latency = chance(0.5) ? std::chrono::microseconds(1) : std::chrono::microseconds(0);
    faults.seed = seed;
    cml_options.faults = faults;
    INFO("delay " << cml_options.registration_delay.count() << " us, 503 rate " << faults.server_error_rate
                  << ", 409 rate " << faults.conflict_rate << ", drop rates " << faults.drop_before_apply_rate << " "
                  << faults.drop_after_apply_rate << ", latency " << faults.latency.count() << " ns");

    license_fixture fixture(cml_options);
    accepted_posts posts;
    posts.watch(fixture);
    auto options = fixture.controller_options(8);
    // The control plane stamps requests with the real clock while the test advances the
    // controller's wall clock, so a deadline also counts the time advanced before a request.
    // These tests advance far less than a day.
    options.license.decision.operation_deadline = 24h;

    std::vector<worker_plan> plans(worker_count);
    int token_serial = 0;
    auto next_token = [&](bool bad) {
        return std::string(bad ? "BAD-" : "TOKEN-") + std::to_string(seed) + "-" + std::to_string(++token_serial);
    };
    for (int i = 0; i < worker_count; ++i) {
        plans[i].id = "worker-" + std::to_string(i);
        plans[i].deregistration_planned = chance(0.4);
        plans[i].second_registration_planned = plans[i].deregistration_planned && chance(0.5);
    }

    run_with_timeout(fixture.context, [&]() -> awaitable<void> {
        for (auto& plan : plans) {
            co_await fixture.add_worker(plan.id);
            const std::string token = next_token(chance(0.1));
            auto accepted = co_await fixture.request_registration(plan.id, token);
            REQUIRE(accepted);
            plan.tokens.push_back(token);
            plan.operations.insert(accepted.value().operation_id);
        }
    }());

    // Sends the next planned request of each worker whose operation has finished.
    auto request_next = [&]() -> awaitable<bool> {
        bool all_sent = true;
        for (auto& plan : plans) {
            if (!plan.deregistration_planned && !plan.second_registration_planned) {
                continue;
            }
            all_sent = false;
            auto stored = co_await fixture.worker(plan.id);
            const auto& license = stored.license();
            if (license.has_pending_operation() || !chance(0.2)) {
                continue;
            }
            if (plan.deregistration_planned) {
                plan.deregistration_planned = false;
                if (license.status() != license_status::registered) {
                    plan.second_registration_planned = false;
                    continue;
                }
                auto accepted = co_await fixture.request_deregistration(plan.id);
                REQUIRE(accepted);
                plan.operations.insert(accepted.value().operation_id);
                continue;
            }
            plan.second_registration_planned = false;
            const std::string token = next_token(false);
            auto accepted = co_await fixture.request_registration(plan.id, token);
            REQUIRE(accepted);
            plan.tokens.push_back(token);
            plan.operations.insert(accepted.value().operation_id);
        }
        co_return all_sent;
    };

    // Each generation runs one controller for a random number of steps, then stops it, which
    // cancels the reconciles in flight, and starts a new one.
    bool settled = false;
    int generations = 0;
    while (!settled) {
        REQUIRE(generations < 2000);
        ++generations;
        auto controller = fixture.make_controller(options);
        run_with_timeout(fixture.context, run_controller(*controller, [&]() -> awaitable<void> {
            const int steps = pick(0, 8);
            for (int step = 0; step < steps; ++step) {
                const bool all_sent = co_await request_next();
                if (all_sent && fixture.repository.pending_count() == 0) {
                    settled = true;
                    co_return;
                }
                fixture.advance(std::chrono::milliseconds(pick(0, 2000)));
                co_await settle(pick(1, 30));
            }
        }()));
    }
    INFO("settled after " << generations << " controllers");

    const auto lines = fixture.log.lines();
    for (const auto& plan : plans) {
        INFO(plan.id);
        auto stored = run_with_timeout(fixture.context, fixture.worker(plan.id));
        const auto& license = stored.license();
        CHECK_FALSE(license.has_pending_operation());
        CHECK(plan.operations.count(license.operation_id()) == 1);
        CHECK(license.last_outcome() != operation_outcome::none);
        if (license.last_outcome() == operation_outcome::failed) {
            REQUIRE(license.last_error());
            CHECK_FALSE(license.last_error()->code.empty());
            CHECK_FALSE(license.last_error()->message.empty());
        }
        else if (license.last_operation() == license_operation::registration) {
            CHECK(license.status() == license_status::registered);
            CHECK(fixture.instance(plan.id).licensing_status().registration_status ==
                  cml_registration_status::completed);
        }
        else {
            CHECK(license.status() == license_status::unregistered);
            CHECK(fixture.instance(plan.id).licensing_status().registration_status ==
                  cml_registration_status::not_registered);
        }

        std::uint64_t accepted_for_worker = 0;
        for (const auto& token : plan.tokens) {
            INFO(token);
            CHECK(posts.count(token) <= 1);
            accepted_for_worker += posts.count(token);
            for (const auto& line : lines) {
                if (line.find(token) != std::string::npos) {
                    FAIL_CHECK("token in log line: " << line);
                }
            }
            if (license.last_error()) {
                CHECK(license.last_error()->message.find(token) == std::string::npos);
            }
        }
        CHECK(fixture.instance(plan.id).counters().accepted_registrations == accepted_for_worker);
    }
    CHECK(fixture.cml.total_counters().accepted_registrations == posts.total());
}

TEST_CASE("controller on four threads", "[license][threads]")
{
    constexpr int worker_count = 100;
    lcm::testing::fake_cml_options cml_options;
    cml_options.registration_delay = 3s;
    cml_options.faults.server_error_rate = 0.1;
    cml_options.faults.conflict_rate = 0.1;
    cml_options.faults.drop_after_apply_rate = 0.05;
    license_fixture fixture(cml_options);
    auto options = fixture.controller_options(8);
    // The control plane stamps requests with the real clock while the test advances the
    // controller's wall clock, so a deadline also counts the time advanced before a request.
    // These tests advance far less than a day.
    options.license.decision.operation_deadline = 24h;
    auto controller = fixture.make_controller(options);
    std::vector<std::string> workers;
    for (int i = 0; i < worker_count; ++i) {
        workers.push_back("worker-" + std::to_string(i));
    }

    // The lambda is named because the coroutine reads its captures through it after this
    // statement, when run_with_timeout runs the scenario.
    auto body = [&]() -> awaitable<void> {
        for (const auto& worker_id : workers) {
            co_await fixture.add_worker(worker_id);
            const std::string token = "TOKEN-" + worker_id;
            auto accepted = co_await fixture.request_registration(worker_id, token);
            REQUIRE(accepted);
        }
        co_await advance_until_settled(fixture, 500ms, 5000);
        for (const auto& worker_id : workers) {
            auto accepted = co_await fixture.request_deregistration(worker_id);
            REQUIRE(accepted);
        }
        co_await advance_until_settled(fixture, 500ms, 5000);
    };
    auto scenario = run_controller(*controller, body());
    run_with_timeout(fixture.context, std::move(scenario), lcm::testing::default_test_timeout, 4);

    for (const auto& worker_id : workers) {
        INFO(worker_id);
        auto stored = run_with_timeout(fixture.context, fixture.worker(worker_id));
        CHECK(stored.license().status() == license_status::unregistered);
        if (stored.license().last_error()) {
            INFO(stored.license().last_error()->code << ": " << stored.license().last_error()->message);
            CHECK_FALSE(stored.license().last_error());
        }
        CHECK(stored.license().last_operation() == license_operation::deregistration);
        CHECK(stored.license().last_outcome() == operation_outcome::completed);
        CHECK(fixture.instance(worker_id).counters().accepted_registrations == 1);
    }
}
