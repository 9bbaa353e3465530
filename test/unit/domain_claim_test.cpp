// Tests of leased, fenced claims on the worker aggregate: taking, renewing and taking over a
// claim, and the fence check of start, completion and failure.
#include "domain_test_support.hpp"

#include <lcm/domain/json.hpp>
#include <lcm/domain/worker.hpp>

#include <boost/json.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <string>

using namespace lcm::domain;
using namespace lcm::domain::testing;
using namespace std::chrono_literals;
using lcm::errc;
using lcm::secret;

namespace {

constexpr std::chrono::microseconds lease = 30s;

/// Returns a running worker with a registration requested at `at(10)` and no claim.
cml_worker requested_worker()
{
    auto worker = running_worker();
    worker.request_license_registration(secret(first_token), false, "alice", at(10)).value();
    worker.take_events();
    return worker;
}

} // namespace

TEST_CASE("claim takes unclaimed operation", "[domain][claim]")
{
    auto worker = requested_worker();

    const auto fence = worker.claim_license_operation("controller-a", lease, at(20));

    REQUIRE(fence);
    CHECK(fence.value() == 1);
    CHECK(worker.license().claim_holder() == "controller-a");
    CHECK(worker.license().claim_expires_at() == at(50));
    CHECK(worker.license().fence() == 1);
    CHECK(worker.updated_at() == at(20));
    const auto& event = single_event<license_operation_claimed>(worker);
    CHECK(event.holder == "controller-a");
    CHECK(event.fence == 1);
    CHECK(event.expires_at == at(50));
    CHECK(event.header.operation_id == 1);
    CHECK(serialize_events(worker.events()).find(first_token) == std::string::npos);
}

TEST_CASE("claim renewal keeps fence", "[domain][claim]")
{
    auto worker = requested_worker();
    worker.claim_license_operation("controller-a", lease, at(20)).value();
    worker.take_events();

    SECTION("more than half the lease left: nothing changes")
    {
        check_idempotent(worker, [](cml_worker& w) { return w.claim_license_operation("controller-a", lease, at(34)); });
        CHECK(worker.claim_license_operation("controller-a", lease, at(34)).value() == 1);
    }

    SECTION("less than half the lease left: the expiry moves, without an event")
    {
        const auto fence = worker.claim_license_operation("controller-a", lease, at(40));

        REQUIRE(fence);
        CHECK(fence.value() == 1);
        CHECK(worker.license().fence() == 1);
        CHECK(worker.license().claim_expires_at() == at(70));
        CHECK(worker.events().empty());
    }

    SECTION("an expired claim not taken over is renewed with its fence")
    {
        const auto fence = worker.claim_license_operation("controller-a", lease, at(90));

        REQUIRE(fence);
        CHECK(fence.value() == 1);
        CHECK(worker.license().claim_expires_at() == at(120));
        CHECK(worker.events().empty());
    }
}

TEST_CASE("claim rejected while another holds it", "[domain][claim]")
{
    auto worker = requested_worker();
    worker.claim_license_operation("controller-a", lease, at(20)).value();
    worker.take_events();

    check_rejected(worker, errc::claimed, [](cml_worker& w) { return w.claim_license_operation("controller-b", lease, at(20)); });
    check_rejected(worker, errc::claimed, [](cml_worker& w) { return w.claim_license_operation("controller-b", lease, at(49)); });
    CHECK(worker.license().claim_holder() == "controller-a");
    CHECK(worker.license().claim_expires_at() == at(50));
}

TEST_CASE("claim taken over after expiry", "[domain][claim]")
{
    auto worker = requested_worker();
    worker.claim_license_operation("controller-a", lease, at(20)).value();
    worker.start_license_operation({1, 1}, at(21)).value();
    worker.take_events();

    // The claim expires at at(50); from then on another controller may take it.
    const auto fence = worker.claim_license_operation("controller-b", lease, at(50));

    REQUIRE(fence);
    CHECK(fence.value() == 2);
    CHECK(worker.license().claim_holder() == "controller-b");
    CHECK(worker.license().claim_expires_at() == at(80));
    CHECK(worker.license().operation_in_progress());
    CHECK(single_event<license_operation_claimed>(worker).fence == 2);

    SECTION("the old holder's reports are rejected")
    {
        check_rejected(worker, errc::claim_lost, [](cml_worker& w) {
            return w.complete_license_registration({1, 1}, sample_details(), at(51));
        });
        check_rejected(worker, errc::claim_lost,
                       [](cml_worker& w) { return w.fail_license_registration({1, 1}, "code", "late", at(51)); });
        check_rejected(worker, errc::claim_lost, [](cml_worker& w) { return w.start_license_operation({1, 1}, at(51)); });
    }

    SECTION("the old holder cannot claim back an unexpired takeover")
    {
        check_rejected(worker, errc::claimed,
                       [](cml_worker& w) { return w.claim_license_operation("controller-a", lease, at(60)); });
    }

    SECTION("the new holder completes")
    {
        REQUIRE(worker.complete_license_registration({1, 2}, sample_details(), at(52)));
        CHECK(worker.license().status() == license_status::registered);
        CHECK(worker.license().claim_holder().empty());
        CHECK_FALSE(worker.license().claim_expires_at());
        CHECK(worker.license().fence() == 2);
    }
}

TEST_CASE("fence check of start and reports", "[domain][claim]")
{
    auto worker = requested_worker();
    worker.claim_license_operation("controller-a", lease, at(20)).value();
    worker.take_events();

    SECTION("no fence and wrong fences are rejected once claimed")
    {
        for (const std::uint64_t fence : {no_fence, std::uint64_t{2}, std::uint64_t{99}}) {
            CAPTURE(fence);
            check_rejected(worker, errc::claim_lost,
                           [&](cml_worker& w) { return w.start_license_operation({1, fence}, at(21)); });
            check_rejected(worker, errc::claim_lost,
                           [&](cml_worker& w) { return w.fail_license_registration({1, fence}, "code", "m", at(21)); });
        }
    }

    SECTION("a wrong operation id is stale before the fence is checked")
    {
        check_rejected(worker, errc::stale_operation,
                       [](cml_worker& w) { return w.start_license_operation({2, 1}, at(21)); });
    }

    SECTION("the current fence is accepted, also after the claim expired")
    {
        REQUIRE(worker.start_license_operation({1, 1}, at(21)));
        // The claim expired at at(50), but no controller took it over, so its fence is still current.
        REQUIRE(worker.complete_license_registration({1, 1}, sample_details(), at(90)));
        CHECK(worker.license().status() == license_status::registered);
        CHECK(worker.license().claim_holder().empty());
    }

    SECTION("a failure ends the claim, and a repeat with the fence is accepted")
    {
        REQUIRE(worker.fail_license_registration({1, 1}, "invalid_token", "rejected", at(22)));
        CHECK(worker.license().claim_holder().empty());
        CHECK_FALSE(worker.license().claim_expires_at());
        worker.take_events();

        check_idempotent(worker, [](cml_worker& w) { return w.fail_license_registration({1, 1}, "x", "y", at(23)); });
        check_rejected(worker, errc::claim_lost,
                       [](cml_worker& w) { return w.fail_license_registration({1, 7}, "x", "y", at(23)); });
    }
}

TEST_CASE("unclaimed operation accepts no fence", "[domain][claim]")
{
    auto worker = requested_worker();

    REQUIRE(worker.start_license_operation(1, at(11)));
    check_rejected(worker, errc::claim_lost, [](cml_worker& w) { return w.start_license_operation({1, 1}, at(12)); });
    REQUIRE(worker.complete_license_registration(1, sample_details(), at(12)));
}

TEST_CASE("fence never repeats across operations", "[domain][claim]")
{
    auto worker = requested_worker();
    worker.claim_license_operation("controller-a", lease, at(20)).value();
    worker.start_license_operation({1, 1}, at(21)).value();
    worker.complete_license_registration({1, 1}, sample_details(), at(22)).value();

    worker.request_license_deregistration("alice", at(30)).value();
    CHECK(worker.license().claim_holder().empty());

    const auto fence = worker.claim_license_operation("controller-a", lease, at(31));

    REQUIRE(fence);
    CHECK(fence.value() == 2);
    check_rejected(worker, errc::claim_lost, [](cml_worker& w) { return w.start_license_operation({2, 1}, at(32)); });
    REQUIRE(worker.start_license_operation({2, 2}, at(32)));
}

TEST_CASE("claim guards", "[domain][claim]")
{
    auto idle = running_worker();
    check_rejected(idle, errc::not_found, [](cml_worker& w) { return w.claim_license_operation("controller-a", lease, at(1)); });

    auto worker = requested_worker();
    check_rejected(worker, errc::invalid_argument, [](cml_worker& w) { return w.claim_license_operation("", lease, at(1)); });
    check_rejected(worker, errc::invalid_argument,
                   [](cml_worker& w) { return w.claim_license_operation(std::string(129, 'c'), lease, at(1)); });
    check_rejected(worker, errc::invalid_argument,
                   [](cml_worker& w) { return w.claim_license_operation("controller-a", 0us, at(1)); });
    check_rejected(worker, errc::invalid_argument,
                   [](cml_worker& w) { return w.claim_license_operation("controller-a", -5s, at(1)); });
}

TEST_CASE("record round-trips claim fields", "[domain][claim]")
{
    auto worker = requested_worker();
    worker.claim_license_operation("controller-a", lease, at(20)).value();
    worker.start_license_operation({1, 1}, at(21)).value();
    worker.take_events();

    const auto record = to_record(worker);

    CHECK(record.at("license").at("claim_holder") == "controller-a");
    CHECK(record.at("license").at("claim_expires_at") == "2026-08-20T09:00:50.123456Z");
    CHECK(record.at("license").at("fence") == 1);
    const auto decoded = from_record(boost::json::parse(boost::json::serialize(record)));
    REQUIRE(decoded);
    CHECK(decoded.value() == worker);
    CHECK(to_record(decoded.value()) == record);

    SECTION("the public form shows the claim")
    {
        const auto shown = to_public_json(worker);
        CHECK(shown.at("license").at("claim_holder") == "controller-a");
        CHECK(shown.at("license").at("fence") == 1);
    }
}

TEST_CASE("record without claim fields decodes", "[domain][claim]")
{
    auto record = to_record(requested_worker());
    auto& license = record.at("license").as_object();
    license.erase("claim_holder");
    license.erase("claim_expires_at");
    license.erase("fence");

    const auto decoded = from_record(record);

    REQUIRE(decoded);
    CHECK(decoded.value().license().claim_holder().empty());
    CHECK_FALSE(decoded.value().license().claim_expires_at());
    CHECK(decoded.value().license().fence() == no_fence);
    CHECK(decoded.value() == requested_worker());
}

TEST_CASE("record with broken claim is rejected", "[domain][claim]")
{
    auto claimed = requested_worker();
    claimed.claim_license_operation("controller-a", lease, at(20)).value();
    const auto base = to_record(claimed);

    struct broken_case {
        const char* field;
        boost::json::value value;
        std::string expected_field;
    };
    const std::vector<broken_case> cases = {
        {"fence", boost::json::parse("-1"), "license.fence"},
        {"fence", boost::json::parse("0"), "license.claim_holder"},
        {"claim_expires_at", boost::json::parse(R"("soon")"), "license.claim_expires_at"},
        {"claim_expires_at", nullptr, "license.claim_expires_at"},
        {"claim_holder", boost::json::parse("7"), "license.claim_holder"},
        {"claim_holder", boost::json::parse(R"("")"), "license.claim_expires_at"},
    };
    for (const auto& test : cases) {
        CAPTURE(test.field, test.value);
        auto record = base;
        record.at("license").as_object()[test.field] = test.value;
        std::string field;

        const auto decoded = from_record(record, &field);

        REQUIRE_FALSE(decoded);
        CHECK(field == test.expected_field);
    }
}
