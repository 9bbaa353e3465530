#include "concurrent_tasks.hpp"
#include "control_plane_fixture.hpp"

#include <catch2/catch.hpp>

#include <algorithm>
#include <map>
#include <mutex>
#include <random>
#include <string>
#include <vector>

namespace {

using lcm::errc;
using lcm::domain::cml_worker;
using lcm::domain::domain_event;
using lcm::domain::license_operation;
using lcm::domain::license_status;

/// Position of an event inside its operation: request, start, then completion or failure.
int phase_of(const domain_event& event)
{
    // Alternatives in the order of `domain_event`: created, status changed, then four
    // registration and four deregistration events.
    constexpr int phases[] = {0, 0, 1, 2, 3, 3, 1, 2, 3, 3};
    return phases[event.index()];
}

license_operation kind_of(const domain_event& event)
{
    if (event.index() >= 2 && event.index() <= 5) {
        return license_operation::registration;
    }
    if (event.index() >= 6) {
        return license_operation::deregistration;
    }
    return license_operation::none;
}

/// Checks that the events of one worker form a valid history that ends in the stored state.
/// Returns a description of the first problem, or an empty string.
///
/// Events are ordered by operation id and phase first, because the sink may receive the
/// events of two saves in the other order when two threads publish at the same moment.
std::string check_history(std::vector<domain_event> events, const cml_worker& stored)
{
    std::stable_sort(events.begin(), events.end(), [](const domain_event& lhs, const domain_event& rhs) {
        const auto lhs_id = lcm::domain::header_of(lhs).operation_id;
        const auto rhs_id = lcm::domain::header_of(rhs).operation_id;
        return lhs_id != rhs_id ? lhs_id < rhs_id : phase_of(lhs) < phase_of(rhs);
    });
    if (events.empty() || !std::holds_alternative<lcm::domain::worker_created>(events.front())) {
        return "the first event is not worker_created";
    }

    auto status = license_status::unregistered;
    std::uint64_t operation_id = 0;
    auto kind = license_operation::none;
    bool started = false;
    bool finished = true;
    for (std::size_t i = 1; i < events.size(); ++i) {
        const auto& event = events[i];
        const auto id = lcm::domain::header_of(event).operation_id;
        const auto where = " at operation " + std::to_string(id) + ", event " + std::string(event_type(event));
        if (phase_of(event) == 1) {
            if (id != operation_id + 1) {
                return "operation ids are not consecutive" + where;
            }
            if (!finished) {
                return "a request while operation " + std::to_string(operation_id) + " was pending" + where;
            }
            const auto* registration = std::get_if<lcm::domain::license_registration_requested>(&event);
            if (registration != nullptr && status == license_status::registered && !registration->reregister) {
                return "a registration of a registered worker without reregister" + where;
            }
            if (registration == nullptr && status != license_status::registered) {
                return "a deregistration of a worker without license" + where;
            }
            operation_id = id;
            kind = kind_of(event);
            started = false;
            finished = false;
            continue;
        }
        if (id != operation_id || kind_of(event) != kind || finished) {
            return "an event outside the pending operation" + where;
        }
        if (phase_of(event) == 2) {
            if (started) {
                return "a second start" + where;
            }
            started = true;
            continue;
        }
        const bool completed = std::holds_alternative<lcm::domain::license_registration_completed>(event) ||
                               std::holds_alternative<lcm::domain::license_deregistration_completed>(event);
        if (completed && !started) {
            return "a completion before the start" + where;
        }
        if (completed) {
            status = kind == license_operation::registration ? license_status::registered
                                                             : license_status::unregistered;
        }
        finished = true;
    }

    const auto& license = stored.license();
    if (license.operation_id() != operation_id) {
        return "the stored operation id is " + std::to_string(license.operation_id()) + ", the events end at " +
               std::to_string(operation_id);
    }
    if (license.status() != status) {
        return "the stored license status differs from the events";
    }
    if (license.has_pending_operation() == finished || (!finished && license.pending_operation() != kind)) {
        return "the stored pending operation differs from the events";
    }
    if (license.operation_in_progress() != (started && !finished)) {
        return "the stored in-progress flag differs from the events";
    }
    return {};
}

/// Runs clients on several threads that read workers and send the commands that fit, then
/// checks that every worker's events form a valid history that ends in its stored state. Each
/// client also checks that the worker it read did not change under it, because the stored
/// worker may change in place while copies of it are out.
template <class Fixture>
void check_concurrent_commands(Fixture& fixture, bool expect_conflicts)
{
    constexpr int thread_count = 4;
    constexpr int client_count = 16;
    constexpr int commands_per_client = 60;
    const std::vector<std::string> worker_ids{"w-0", "w-1", "w-2"};
    const std::vector<std::string> tokens{"VE9LRU4tQQ==", "VE9LRU4tQg==", "VE9LRU4tQw=="};

    for (const auto& id : worker_ids) {
        REQUIRE(fixture.commands.add(id));
    }

    std::mutex outcomes_mutex;
    std::map<std::string, int> outcomes;
    int changed_copies = 0;
    auto record = [&](const auto& result) {
        const std::string name = result ? "success" : lcm::error_name(result.error());
        std::lock_guard lock(outcomes_mutex);
        ++outcomes[name];
    };

    // Each client reads a worker and sends the command that fits what it read. Other clients
    // change the worker in between, so commands also meet stale ids, pending operations and
    // version conflicts. Sometimes a client reports on the previous operation on purpose.
    auto client = [&](int seed) -> boost::asio::awaitable<void> {
        std::mt19937 random(static_cast<unsigned>(seed));
        auto& plane = fixture.plane;
        for (int i = 0; i < commands_per_client; ++i) {
            const auto& id = worker_ids[random() % worker_ids.size()];
            auto read = plane.get_worker(id);
            auto loaded = co_await std::move(read);
            if (!loaded) {
                record(loaded);
                continue;
            }
            const auto& license = loaded.value().license();
            // A deep copy of the license fields, because comparing two workers that share the
            // fields would not notice a change made in place.
            const auto read_license = license.state();
            const auto operation_id = license.operation_id() - (random() % 8 == 0 ? 1 : 0);
            const auto choice = random() % 4;

            if (!license.has_pending_operation()) {
                if (license.status() == license_status::registered && choice < 2) {
                    auto task = plane.request_deregistration(id, "client");
                    auto outcome = co_await std::move(task);
                record(outcome);
                }
                else {
                    lcm::secret token(tokens[random() % tokens.size()]);
                    auto task = plane.request_registration(id, std::move(token), choice == 3, "client");
                    auto outcome = co_await std::move(task);
                record(outcome);
                }
            }
            else if (!license.operation_in_progress() && choice < 3) {
                auto task = plane.start_operation(id, operation_id);
                auto outcome = co_await std::move(task);
                record(outcome);
            }
            else if (choice == 0) {
                auto task = plane.fail_operation(id, operation_id, "cml_error", "CML answered 500");
                auto outcome = co_await std::move(task);
                record(outcome);
            }
            else if (license.pending_operation() == license_operation::registration) {
                lcm::domain::registration_details details;
                auto task = plane.complete_registration(id, operation_id, std::move(details));
                auto outcome = co_await std::move(task);
                record(outcome);
            }
            else {
                std::optional<std::string> warning;
                auto task = plane.complete_deregistration(id, operation_id, std::move(warning));
                auto outcome = co_await std::move(task);
                record(outcome);
            }
            if (!(loaded.value().license().state() == read_license)) {
                std::lock_guard lock(outcomes_mutex);
                ++changed_copies;
            }
        }
    };

    std::vector<boost::asio::awaitable<void>> clients;
    for (int seed = 0; seed < client_count; ++seed) {
        clients.push_back(client(seed));
    }
    lcm::testing::run_with_timeout(fixture.context, lcm::test::run_concurrently(std::move(clients)),
                                   std::chrono::seconds(60), thread_count);

    INFO("outcomes: " << [&] {
        std::string text;
        for (const auto& [name, count] : outcomes) {
            text += name + "=" + std::to_string(count) + " ";
        }
        return text;
    }());
    int expected_errors = 0;
    for (const char* name : {"success", "operation_in_progress", "already_registered", "not_registered",
                             "stale_operation", "operation_not_started", "version_conflict"}) {
        expected_errors += outcomes[name];
    }
    CHECK(expected_errors == client_count * commands_per_client);
    CHECK(outcomes["success"] > client_count * commands_per_client / 4);
    CHECK(changed_copies == 0);

    const auto events = fixture.sink.events();
    for (const auto& id : worker_ids) {
        INFO("worker " << id);
        const auto stored = fixture.commands.get(id).value();
        std::vector<domain_event> history;
        std::copy_if(events.begin(), events.end(), std::back_inserter(history),
                     [&](const domain_event& event) { return lcm::domain::header_of(event).worker_id == id; });

        const auto problem = check_history(history, stored);
        CHECK(problem == "");
        // Each saved change raises exactly one event, so the version counts the published events.
        CHECK(stored.version() == history.size());
        CHECK(stored.license().operation_id() > 0);
    }
    CHECK(fixture.pending_count() <= worker_ids.size());
    if (expect_conflicts) {
        CHECK(fixture.logs.count("msg=\"version conflict, retrying\"") > 0);
    }
}

} // namespace

TEST_CASE("concurrent commands keep workers consistent", "[application][threads]")
{
    // No injected failures, but every update yields first, so commands on one worker
    // interleave between their read and their write and run into version conflicts.
    lcm::test::faulty_control_plane_fixture fixture(0, errc::version_conflict, {}, true);
    check_concurrent_commands(fixture, true);
}

TEST_CASE("concurrent in-place commands keep workers consistent", "[application][threads][in_place]")
{
    // The memory repository lends its workers, so commands change them in place under its
    // lock and never conflict.
    lcm::test::control_plane_fixture fixture;
    check_concurrent_commands(fixture, false);
}
