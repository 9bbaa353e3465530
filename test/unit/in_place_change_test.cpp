// Tests of the in-process fast path: the memory repository's loans, license fields changed in
// place while unshared, projections of the report commands, sinks that publish at once, and
// listing pending keys without copying workers.
#include "control_plane_fixture.hpp"

#include <lcm/controller/control_plane_client.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <new>
#include <optional>
#include <string>
#include <variant>
#include <vector>

using lcm::errc;
using lcm::test::control_plane_fixture;
using lcm::test::faulty_control_plane_fixture;
using namespace std::chrono_literals;

namespace {

const std::string token = "InPlaceToken+/%=-0123456789";

lcm::domain::cml_worker sample_worker()
{
    auto worker = lcm::domain::cml_worker::create("w-1", "lab", "https://cml.example.test",
                                                  lcm::domain::worker_status::running, "admin")
                      .value();
    worker.take_events();
    return worker;
}

/// A sink that does no I/O, so `publish` returns void and the control plane calls it directly.
struct counting_sink {
    std::vector<std::string> types;

    void publish(std::vector<lcm::domain::domain_event> events)
    {
        for (const auto& event : events) {
            types.emplace_back(lcm::domain::event_type(event));
        }
    }
};

static_assert(lcm::application::event_sink<counting_sink>);
static_assert(lcm::application::publishes_at_once<counting_sink>);
static_assert(!lcm::application::publishes_at_once<lcm::application::memory_event_sink>);
static_assert(lcm::application::lending_worker_repository<lcm::storage::memory_repository>);
static_assert(!lcm::application::lending_worker_repository<lcm::test::faulty_repository>);

} // namespace

TEST_CASE("transition changes unshared license in place", "[domain][in_place]")
{
    auto worker = sample_worker();
    REQUIRE(worker.request_license_registration(lcm::secret(token), false, "admin"));
    const auto* fields_before = &worker.license().state();
    const auto revision_before = worker.revision();

    REQUIRE(worker.claim_license_operation("controller-a", 30s, lcm::now_utc()));

    if (lcm::domain::cml_worker::edits_in_place) {
        CHECK(&worker.license().state() == fields_before);
    }
    CHECK(worker.revision() == revision_before + 1);
    CHECK(worker.license().claim_holder() == "controller-a");
}

TEST_CASE("transition leaves copies of the worker unchanged", "[domain][in_place]")
{
    auto worker = sample_worker();
    const auto operation_id = worker.request_license_registration(lcm::secret(token), false, "admin").value();
    const auto snapshot = worker;
    const auto* shared_fields = &snapshot.license().state();

    const auto fence = worker.claim_license_operation("controller-a", 30s, lcm::now_utc()).value();
    REQUIRE(worker.start_license_operation({operation_id, fence}));

    CHECK(&snapshot.license().state() == shared_fields);
    CHECK(snapshot.license().claim_holder().empty());
    CHECK_FALSE(snapshot.license().operation_in_progress());
    CHECK(&worker.license().state() != shared_fields);
    CHECK(worker.license().operation_in_progress());
}

TEST_CASE("failed transition changes nothing", "[domain][in_place]")
{
    auto worker = sample_worker();
    REQUIRE(worker.request_license_registration(lcm::secret(token), false, "admin"));
    worker.take_events();
    const auto before = worker;
    const auto revision_before = worker.revision();

    CHECK(worker.start_license_operation({99, lcm::domain::no_fence}).error() == errc::stale_operation);
    CHECK(worker.claim_license_operation("", 30s, lcm::now_utc()).error() == errc::invalid_argument);

    CHECK(worker == before);
    CHECK(worker.revision() == revision_before);
    CHECK(worker.events().empty());
}

namespace {

// The number of allocations left before `operator new` of this thread fails. A negative number
// never fails.
thread_local int allocations_until_failure = -1;

// Runs `transition` with its allocation number `failing` (from 0) failing. Returns whether it
// threw `std::bad_alloc`, and stores in `succeeded` whether it returned true otherwise.
template <class Transition>
bool throws_at_allocation(int failing, Transition& transition, bool& succeeded)
{
    allocations_until_failure = failing;
    try {
        succeeded = transition();
    }
    catch (const std::bad_alloc&) {
        allocations_until_failure = -1;
        return true;
    }
    allocations_until_failure = -1;
    return false;
}

// Fails each allocation of `transition` in turn, on `worker` whose license fields are shared
// with a copy when `shared`, and checks that each failure left the worker as it was. Returns the
// number of failures. At the end the transition succeeds.
template <class Transition>
int fail_each_allocation(lcm::domain::cml_worker& worker, bool shared, Transition transition)
{
    int failures = 0;
    for (int failing = 0; failing < 100; ++failing) {
        // A copy shares the license fields, so that the transition must change a copy of them.
        const auto copy = shared ? std::optional<lcm::domain::cml_worker>(worker) : std::nullopt;
        const lcm::domain::cml_license::fields license_before = worker.license().state();
        const auto events_before = worker.events().size();
        const auto revision_before = worker.revision();
        bool succeeded = false;
        if (!throws_at_allocation(failing, transition, succeeded)) {
            REQUIRE(succeeded);
            break;
        }
        ++failures;
        CHECK(worker.license().state() == license_before);
        CHECK(worker.events().size() == events_before);
        CHECK(worker.revision() == revision_before);
    }
    return failures;
}

} // namespace

namespace {

void* allocate(std::size_t size)
{
    if (allocations_until_failure == 0) {
        throw std::bad_alloc();
    }
    if (allocations_until_failure > 0) {
        --allocations_until_failure;
    }
    if (void* memory = std::malloc(size == 0 ? 1 : size)) {
        return memory;
    }
    throw std::bad_alloc();
}

void* allocate_or_null(std::size_t size) noexcept
{
    try {
        return allocate(size);
    }
    catch (const std::bad_alloc&) {
        return nullptr;
    }
}

} // namespace

// Every global allocation function without an alignment, replaced so that a test can make an
// allocation fail. Otherwise they behave as the standard ones. Replacing only some would let a
// sanitizer's `new` meet this `delete`. Not inlined, so that g++ does not warn about free on memory
// from `new`.
__attribute__((noinline)) void* operator new(std::size_t size) { return allocate(size); }

__attribute__((noinline)) void* operator new[](std::size_t size) { return allocate(size); }

__attribute__((noinline)) void* operator new(std::size_t size, const std::nothrow_t&) noexcept
{
    return allocate_or_null(size);
}

__attribute__((noinline)) void* operator new[](std::size_t size, const std::nothrow_t&) noexcept
{
    return allocate_or_null(size);
}

__attribute__((noinline)) void operator delete(void* memory) noexcept { std::free(memory); }

__attribute__((noinline)) void operator delete[](void* memory) noexcept { std::free(memory); }

__attribute__((noinline)) void operator delete(void* memory, std::size_t) noexcept { std::free(memory); }

__attribute__((noinline)) void operator delete[](void* memory, std::size_t) noexcept { std::free(memory); }

__attribute__((noinline)) void operator delete(void* memory, const std::nothrow_t&) noexcept { std::free(memory); }

__attribute__((noinline)) void operator delete[](void* memory, const std::nothrow_t&) noexcept { std::free(memory); }

TEST_CASE("transition that throws records nothing", "[domain][in_place]")
{
    const bool shared = GENERATE(false, true);
    CAPTURE(shared);
    auto worker = sample_worker();
    const auto operation_id = worker.request_license_registration(lcm::secret(token), false, "admin").value();
    const std::string holder = "controller-with-an-id-longer-than-inline-strings";
    std::uint64_t fence = 0;

    CHECK(fail_each_allocation(worker, shared, [&] {
              auto claimed = worker.claim_license_operation(holder, 30s, lcm::now_utc());
              fence = claimed ? claimed.value() : 0;
              return claimed.has_value();
          }) > 0);
    CHECK(fail_each_allocation(worker, shared, [&] {
              return worker.start_license_operation({operation_id, fence}).has_value();
          }) > 0);
    CHECK(fail_each_allocation(worker, shared, [&] {
              lcm::domain::registration_details details;
              details.smart_account = "smart account of the example company";
              details.features.push_back({"CML_ENTERPRISE_FEATURE", "CML Enterprise feature", "1.0", "IN_COMPLIANCE", 1});
              return worker.complete_license_registration({operation_id, fence}, std::move(details)).has_value();
          }) > 0);

    CHECK(worker.license().status() == lcm::domain::license_status::registered);
    CHECK(worker.events().size() == 4);
}

TEST_CASE("repository loan saves when told", "[storage][in_place]")
{
    boost::asio::io_context context;
    lcm::storage::memory_repository repository;
    auto worker = sample_worker();
    REQUIRE(lcm::testing::run_with_timeout(context, repository.add(worker)));
    const auto sequence = repository.change_sequence();

    SECTION("an unknown id is not found")
    {
        CHECK(repository.borrow("w-2").error() == errc::not_found);
    }

    SECTION("a loan without a change keeps the version and wakes nobody")
    {
        {
            auto loan = repository.borrow("w-1");
            REQUIRE(loan);
            CHECK_FALSE(loan.value().changed());
        }
        CHECK(lcm::testing::run_with_timeout(context, repository.get("w-1")).value().version() == 1);
        CHECK(repository.change_sequence() == sequence);
    }

    SECTION("a saved change gets the next version, indexes the operation and wakes waiters")
    {
        std::vector<lcm::domain::domain_event> events;
        {
            auto loan = repository.borrow("w-1");
            REQUIRE(loan);
            REQUIRE(loan.value().worker().request_license_registration(lcm::secret(token), false, "admin"));
            CHECK(loan.value().changed());
            events = loan.value().save();
        }
        REQUIRE(events.size() == 1);
        CHECK(std::holds_alternative<lcm::domain::license_registration_requested>(events.front()));
        const auto stored = lcm::testing::run_with_timeout(context, repository.get("w-1")).value();
        CHECK(stored.version() == 2);
        CHECK(stored.events().empty());
        CHECK(repository.pending_count() == 1);
        CHECK(repository.change_sequence() > sequence);
    }

    SECTION("a worker read before a change keeps its state")
    {
        const auto before = lcm::testing::run_with_timeout(context, repository.get("w-1")).value();
        {
            auto loan = repository.borrow("w-1");
            REQUIRE(loan);
            REQUIRE(loan.value().worker().request_license_registration(lcm::secret(token), false, "admin"));
            loan.value().save();
        }
        CHECK(before.version() == 1);
        CHECK_FALSE(before.license().has_pending_operation());
    }
}

TEST_CASE("report commands project the saved worker", "[application][in_place]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
    auto& context = fixture.context;

    auto granted_and_holder = [](const lcm::application::claim_view& claim) {
        return std::pair<bool, std::string>(claim.granted, claim.worker.license().claim_holder());
    };
    auto first_claim = fixture.plane.claim_operation("w-1", "controller-a", 30s, granted_and_holder);
    const auto granted = lcm::testing::run_with_timeout(context, std::move(first_claim)).value();
    CHECK(granted == std::pair<bool, std::string>(true, "controller-a"));

    auto second_claim = fixture.plane.claim_operation("w-1", "controller-b", 30s, granted_and_holder);
    const auto not_granted = lcm::testing::run_with_timeout(context, std::move(second_claim)).value();
    CHECK(not_granted == std::pair<bool, std::string>(false, "controller-a"));
    // Only the granted claim is logged, after the repository's lock was released.
    CHECK(fixture.logs.count("msg=\"license operation claimed\"") == 1);
    CHECK(fixture.logs.count("holder=controller-a") == 1);

    const auto fence = fixture.commands.get("w-1").value().license().fence();
    auto start = fixture.plane.start_operation("w-1", {operation_id, fence}, lcm::application::discard_worker{});
    static_assert(std::is_same_v<decltype(start), boost::asio::awaitable<lcm::result<void>>>);
    CHECK(lcm::testing::run_with_timeout(context, std::move(start)));
    CHECK(fixture.commands.get("w-1").value().license().operation_in_progress());

    auto stale = fixture.plane.start_operation("w-1", {operation_id + 1, fence}, lcm::application::discard_worker{});
    CHECK(lcm::testing::run_with_timeout(context, std::move(stale)).error() == errc::stale_operation);
}

TEST_CASE("direct sink receives every event", "[application][in_place]")
{
    boost::asio::io_context context;
    lcm::storage::memory_repository repository;
    counting_sink sink;
    lcm::application::control_plane plane(repository, sink);
    lcm::controller::in_process_control_plane_client client(plane);

    lcm::application::add_worker_request request{"w-1", "lab", "https://cml.example.test",
                                                 lcm::domain::worker_status::running, "admin"};
    REQUIRE(lcm::testing::run_with_timeout(context, plane.add_worker(std::move(request))));
    auto requested = plane.request_registration("w-1", lcm::secret(token), false, "admin");
    const auto operation_id = lcm::testing::run_with_timeout(context, std::move(requested)).value().operation_id;
    auto claimed = client.claim("w-1", "controller-a", 30s);
    const auto task = lcm::testing::run_with_timeout(context, std::move(claimed)).value().task.value();
    REQUIRE(task.operation_id == operation_id);
    auto started = client.start("w-1", task.key());
    REQUIRE(lcm::testing::run_with_timeout(context, std::move(started)));
    auto completed = client.complete_registration("w-1", task.key(), {});
    REQUIRE(lcm::testing::run_with_timeout(context, std::move(completed)));

    CHECK(sink.types == std::vector<std::string>{"cml_worker.created.v1",
                                                 "cml_worker.license.registration.requested.v1",
                                                 "cml_worker.license.operation.claimed.v1",
                                                 "cml_worker.license.registration.started.v1",
                                                 "cml_worker.license.registration.completed.v1"});
}

TEST_CASE("pending keys listing", "[controller][in_place]")
{
    SECTION("a memory repository lists its index")
    {
        control_plane_fixture fixture;
        for (const auto* id : {"w-3", "w-1", "w-2"}) {
            REQUIRE(fixture.commands.add(id));
        }
        REQUIRE(fixture.commands.request_registration("w-2", token));
        REQUIRE(fixture.commands.request_registration("w-3", token));
        lcm::controller::in_process_control_plane_client client(fixture.plane);

        auto listed = lcm::controller::list_pending_keys(client, 10);
        CHECK(lcm::testing::run_with_timeout(fixture.context, std::move(listed)).value() ==
              std::vector<std::string>{"w-2", "w-3"});
        auto first = lcm::controller::list_pending_keys(client, 1);
        CHECK(lcm::testing::run_with_timeout(fixture.context, std::move(first)).value() ==
              std::vector<std::string>{"w-2"});
    }

    SECTION("another repository lists through its workers")
    {
        faulty_control_plane_fixture fixture(0, errc::unavailable, {});
        REQUIRE(fixture.commands.add("w-1"));
        REQUIRE(fixture.commands.add("w-2"));
        REQUIRE(fixture.commands.request_registration("w-2", token));
        lcm::controller::in_process_control_plane_client client(fixture.plane);

        auto listed = lcm::controller::list_pending_keys(client, 10);
        CHECK(lcm::testing::run_with_timeout(fixture.context, std::move(listed)).value() ==
              std::vector<std::string>{"w-2"});
    }
}
