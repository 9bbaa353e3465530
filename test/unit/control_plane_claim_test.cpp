// Tests of the claim command: what it saves and publishes, and the fence check of the step
// reports, with the control plane's claim clock under the test's control.
#include "control_plane_fixture.hpp"

#include <lcm/testing/fake_cml.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <variant>

using lcm::errc;
using lcm::test::control_plane_fixture;
using lcm::test::faulty_control_plane_fixture;
using namespace std::chrono_literals;

namespace {

const std::string token = "ClaimToken+/%=-0123456789";

lcm::application::control_plane_options options_with(lcm::testing::manual_clock& clock)
{
    lcm::application::control_plane_options options;
    options.clock = clock.function();
    return options;
}

} // namespace

TEST_CASE("claim command saves and publishes", "[application][claim]")
{
    lcm::testing::manual_clock clock;
    control_plane_fixture fixture(options_with(clock));
    REQUIRE(fixture.commands.add("w-1"));
    const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
    const auto events_before = fixture.sink.events().size();

    auto claimed = fixture.commands.claim("w-1", "controller-a", 30s);

    REQUIRE(claimed);
    CHECK(claimed.value().granted);
    CHECK(claimed.value().decided_at == clock.now());
    const auto& license = claimed.value().worker.license();
    CHECK(license.claim_holder() == "controller-a");
    CHECK(license.claim_expires_at() == clock.now() + 30s);
    CHECK(license.fence() == 1);
    CHECK(license.operation_id() == operation_id);
    const auto stored = fixture.commands.get("w-1").value();
    CHECK(stored == claimed.value().worker);
    const auto events = fixture.sink.events();
    REQUIRE(events.size() == events_before + 1);
    const auto* published = std::get_if<lcm::domain::license_operation_claimed>(&events.back());
    REQUIRE(published != nullptr);
    CHECK(published->holder == "controller-a");
    CHECK(published->fence == 1);
}

TEST_CASE("claim renewal saves only when needed", "[application][claim]")
{
    lcm::testing::manual_clock clock;
    lcm::application::control_plane_options options = options_with(clock);
    faulty_control_plane_fixture fixture(0, errc::version_conflict, options);
    REQUIRE(fixture.commands.add("w-1"));
    REQUIRE(fixture.commands.request_registration("w-1", token));
    REQUIRE(fixture.commands.claim("w-1", "controller-a", 30s));
    const auto updates = fixture.repository.update_calls();
    const auto version = fixture.commands.get("w-1").value().version();
    const auto events = fixture.sink.events().size();

    clock.advance(10s);
    auto early = fixture.commands.claim("w-1", "controller-a", 30s);

    REQUIRE(early);
    CHECK(early.value().granted);
    CHECK(early.value().worker.license().fence() == 1);
    CHECK(fixture.repository.update_calls() == updates);
    CHECK(fixture.commands.get("w-1").value().version() == version);

    clock.advance(10s);
    auto late = fixture.commands.claim("w-1", "controller-a", 30s);

    REQUIRE(late);
    CHECK(late.value().granted);
    CHECK(late.value().worker.license().fence() == 1);
    CHECK(late.value().worker.license().claim_expires_at() == clock.now() + 30s);
    CHECK(fixture.repository.update_calls() == updates + 1);
    CHECK(fixture.commands.get("w-1").value().version() == version + 1);
    CHECK(fixture.sink.events().size() == events);
}

TEST_CASE("claim held by another is not granted", "[application][claim]")
{
    lcm::testing::manual_clock clock;
    control_plane_fixture fixture(options_with(clock));
    REQUIRE(fixture.commands.add("w-1"));
    REQUIRE(fixture.commands.request_registration("w-1", token));
    REQUIRE(fixture.commands.claim("w-1", "controller-a", 30s));
    const auto before = fixture.commands.get("w-1").value();
    const auto events = fixture.sink.events().size();

    clock.advance(20s);
    auto held = fixture.commands.claim("w-1", "controller-b", 30s);

    REQUIRE(held);
    CHECK_FALSE(held.value().granted);
    CHECK(held.value().worker.license().claim_holder() == "controller-a");
    CHECK(*held.value().worker.license().claim_expires_at() - held.value().decided_at == 10s);
    CHECK(fixture.commands.get("w-1").value() == before);
    CHECK(fixture.sink.events().size() == events);

    SECTION("after the expiry another controller takes it over")
    {
        clock.advance(10s);
        auto taken = fixture.commands.claim("w-1", "controller-b", 30s);

        REQUIRE(taken);
        CHECK(taken.value().granted);
        CHECK(taken.value().worker.license().claim_holder() == "controller-b");
        CHECK(taken.value().worker.license().fence() == 2);
        CHECK(fixture.sink.events().size() == events + 1);
    }
}

TEST_CASE("step reports need current fence", "[application][claim]")
{
    lcm::testing::manual_clock clock;
    control_plane_fixture fixture(options_with(clock));
    REQUIRE(fixture.commands.add("w-1"));
    const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
    REQUIRE(fixture.commands.claim("w-1", "controller-a", 30s));
    clock.advance(30s);
    const auto fence = fixture.commands.claim("w-1", "controller-b", 30s).value().worker.license().fence();
    REQUIRE(fence == 2);
    const auto before = fixture.commands.get("w-1").value();

    CHECK(fixture.commands.start("w-1", {operation_id, 1}).error() == errc::claim_lost);
    CHECK(fixture.commands.start("w-1", operation_id).error() == errc::claim_lost);
    CHECK(fixture.commands.complete_registration("w-1", {operation_id, 1}).error() == errc::claim_lost);
    CHECK(fixture.commands.fail("w-1", {operation_id, 1}).error() == errc::claim_lost);
    CHECK(fixture.commands.get("w-1").value() == before);
    CHECK(fixture.logs.count("license operation report rejected") == 2);

    REQUIRE(fixture.commands.start("w-1", {operation_id, fence}));
    auto completed = fixture.commands.complete_registration("w-1", {operation_id, fence});
    REQUIRE(completed);
    CHECK(completed.value().license().status() == lcm::domain::license_status::registered);
    CHECK(completed.value().license().claim_holder().empty());
}

TEST_CASE("claim command rejects bad input", "[application][claim]")
{
    lcm::testing::manual_clock clock;
    control_plane_fixture fixture(options_with(clock));
    REQUIRE(fixture.commands.add("w-1"));

    CHECK(fixture.commands.claim("w-2", "controller-a", 30s).error() == errc::not_found);
    CHECK(fixture.commands.claim("w-1", "controller-a", 30s).error() == errc::not_found);
    REQUIRE(fixture.commands.request_registration("w-1", token));
    CHECK(fixture.commands.claim("w-1", "", 30s).error() == errc::invalid_argument);
    CHECK(fixture.commands.claim("w-1", "controller-a", 0s).error() == errc::invalid_argument);
    CHECK(fixture.commands.get("w-1").value().license().claim_holder().empty());
}
