#include "control_plane_fixture.hpp"

#include <lcm/domain/json.hpp>

#include <boost/json/serialize.hpp>
#include <boost/json/value_from.hpp>

#include <catch2/catch.hpp>

#include <string>
#include <string_view>
#include <vector>

namespace {

using lcm::errc;
using lcm::application::operation_accepted;
using lcm::domain::license_operation;
using lcm::domain::license_status;
using lcm::domain::worker_status;
using lcm::test::control_plane_fixture;

const std::string token = "Tk9UQS1SRUFMLVRPS0VO-4c9f";
const std::string other_token = "T1RIRVItVE9LRU4=-7b21";

std::vector<std::string_view> event_types(const std::vector<lcm::domain::domain_event>& events)
{
    std::vector<std::string_view> types;
    for (const auto& event : events) {
        types.push_back(lcm::domain::event_type(event));
    }
    return types;
}

/// The stored version and the number of published events, which a rejected or repeated
/// command must leave as they were.
struct footprint {
    std::uint64_t version = 0;
    std::size_t event_count = 0;

    friend bool operator==(const footprint&, const footprint&) = default;
};

footprint footprint_of(control_plane_fixture& fixture, const std::string& worker_id)
{
    return {fixture.commands.get(worker_id).value().version(), fixture.sink.events().size()};
}

lcm::domain::registration_details sample_details()
{
    lcm::domain::registration_details details;
    details.registration_status = "COMPLETED";
    details.smart_account = "lab-account";
    details.virtual_account = "default";
    details.expiry_date = lcm::timestamp{std::chrono::seconds{1'800'000'000}};
    details.authorization_status = "AUTHORIZED";
    details.features = {{"node-license", "CML - Node License", "1.0", "IN_USE", 20}};
    return details;
}

} // namespace

TEST_CASE("add worker stores and publishes", "[application]")
{
    control_plane_fixture fixture;

    auto added = fixture.commands.add("w-1");

    REQUIRE(added);
    CHECK(added.value().id() == "w-1");
    CHECK(added.value().version() == 1);
    CHECK(added.value().events().empty());
    auto stored = fixture.commands.get("w-1");
    REQUIRE(stored);
    CHECK(stored.value() == added.value());
    const auto events = fixture.sink.events();
    REQUIRE(events.size() == 1);
    CHECK(lcm::domain::event_type(events[0]) == lcm::domain::worker_created::type);
    CHECK(lcm::domain::header_of(events[0]).worker_id == "w-1");
    CHECK(lcm::domain::header_of(events[0]).initiated_by == "admin");
    CHECK(fixture.logs.count("msg=\"worker added\" worker_id=w-1") == 1);
}

TEST_CASE("add worker generates a missing id", "[application]")
{
    control_plane_fixture fixture;

    auto first = fixture.commands.add("");
    auto second = fixture.commands.add("");

    REQUIRE(first);
    REQUIRE(second);
    CHECK(first.value().id().size() == 36);
    CHECK(lcm::domain::is_valid_worker_id(first.value().id()));
    CHECK(first.value().id() != second.value().id());
    CHECK(fixture.repository.size() == 2);
}

TEST_CASE("add worker rejects invalid fields", "[application]")
{
    control_plane_fixture fixture;
    auto with = [](std::string id, std::string name, std::string url) {
        return lcm::application::add_worker_request{std::move(id), std::move(name), std::move(url),
                                                    worker_status::running, "admin"};
    };
    const std::vector<lcm::application::add_worker_request> requests{
        with("bad id", "lab", "https://cml.example.test"),
        with("w-1", "", "https://cml.example.test"),
        with("w-1", "lab", "ftp://cml.example.test"),
        with("w-1", "lab", "https://cml.example.test/?query=1"),
    };

    for (const auto& request : requests) {
        INFO("id '" << request.id << "', name '" << request.name << "', url '" << request.cml_url << "'");
        auto copy = request;
        auto added = lcm::testing::run_with_timeout(fixture.context, fixture.plane.add_worker(std::move(copy)));
        CHECK(added.error() == errc::invalid_argument);
    }
    CHECK(fixture.repository.size() == 0);
    CHECK(fixture.sink.events().empty());
}

TEST_CASE("add worker rejects a duplicate id", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));

    auto duplicate = fixture.commands.add("w-1", worker_status::stopped);

    CHECK(duplicate.error() == errc::already_exists);
    CHECK(fixture.sink.events().size() == 1);
    CHECK(fixture.commands.get("w-1").value().status() == worker_status::running);
}

TEST_CASE("get worker reports unknown ids", "[application]")
{
    control_plane_fixture fixture;

    CHECK(fixture.commands.get("w-1").error() == errc::not_found);
    CHECK(fixture.commands.change_status("w-1", worker_status::stopped).error() == errc::not_found);
    CHECK(fixture.commands.request_registration("w-1", token).error() == errc::not_found);
    CHECK(fixture.commands.request_deregistration("w-1").error() == errc::not_found);
    CHECK(fixture.commands.start("w-1", 1).error() == errc::not_found);
    CHECK(fixture.commands.complete_registration("w-1", 1).error() == errc::not_found);
    CHECK(fixture.commands.complete_deregistration("w-1", 1).error() == errc::not_found);
    CHECK(fixture.commands.fail("w-1", 1).error() == errc::not_found);
    CHECK(fixture.sink.events().empty());
}

TEST_CASE("status change saves and publishes", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));

    auto changed = fixture.commands.change_status("w-1", worker_status::draining);

    REQUIRE(changed);
    CHECK(changed.value().status() == worker_status::draining);
    CHECK(changed.value().version() == 2);
    CHECK(changed.value().events().empty());
    CHECK(fixture.commands.get("w-1").value() == changed.value());
    const auto events = fixture.sink.events();
    REQUIRE(events.size() == 2);
    const auto* published = std::get_if<lcm::domain::worker_status_changed>(&events[1]);
    REQUIRE(published != nullptr);
    CHECK(published->previous_status == worker_status::running);
    CHECK(published->status == worker_status::draining);
    CHECK(published->header.initiated_by == "infrastructure");

    SECTION("the same status again changes nothing")
    {
        const auto before = footprint_of(fixture, "w-1");
        auto repeated = fixture.commands.change_status("w-1", worker_status::draining);
        REQUIRE(repeated);
        CHECK(repeated.value().version() == 2);
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("registration request returns the operation", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));

    auto accepted = fixture.commands.request_registration("w-1", token);

    REQUIRE(accepted);
    CHECK(accepted.value() == operation_accepted{"w-1", 1, license_operation::registration});
    const auto stored = fixture.commands.get("w-1").value();
    CHECK(stored.version() == 2);
    CHECK(stored.license().pending_operation() == license_operation::registration);
    CHECK(stored.license().operation_id() == 1);
    REQUIRE(stored.license().pending_token().has_value());
    CHECK(stored.license().pending_token()->reveal() == token);
    CHECK(fixture.repository.pending_count() == 1);
    const auto events = fixture.sink.events();
    REQUIRE(events.size() == 2);
    CHECK(lcm::domain::event_type(events[1]) == lcm::domain::license_registration_requested::type);
    CHECK(lcm::domain::header_of(events[1]).operation_id == 1);
    CHECK(fixture.logs.count("msg=\"license registration requested\" worker_id=w-1 operation_id=1") == 1);

    SECTION("a repeated request returns the same operation")
    {
        const auto before = footprint_of(fixture, "w-1");
        auto repeated = fixture.commands.request_registration("w-1", token);
        REQUIRE(repeated);
        CHECK(repeated.value() == accepted.value());
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("registration request rejects each error", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));

    SECTION("invalid token")
    {
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.request_registration("w-1", "not a token!").error() == errc::invalid_token);
        CHECK(fixture.commands.request_registration("w-1", "").error() == errc::invalid_token);
        CHECK(footprint_of(fixture, "w-1") == before);
        CHECK(fixture.logs.count("msg=\"license request rejected\" worker_id=w-1") == 2);
    }

    SECTION("worker not running")
    {
        REQUIRE(fixture.commands.change_status("w-1", worker_status::stopped));
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.request_registration("w-1", token).error() == errc::worker_not_running);
        CHECK(footprint_of(fixture, "w-1") == before);
    }

    SECTION("another operation pending")
    {
        REQUIRE(fixture.commands.request_registration("w-1", token));
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.request_registration("w-1", other_token).error() == errc::operation_in_progress);
        CHECK(fixture.commands.request_registration("w-1", token, true).error() == errc::operation_in_progress);
        CHECK(fixture.commands.request_deregistration("w-1").error() == errc::operation_in_progress);
        CHECK(footprint_of(fixture, "w-1") == before);
    }

    SECTION("already registered")
    {
        fixture.commands.register_license("w-1", token);
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.request_registration("w-1", other_token).error() == errc::already_registered);
        CHECK(footprint_of(fixture, "w-1") == before);

        auto reregistration = fixture.commands.request_registration("w-1", other_token, true);
        REQUIRE(reregistration);
        CHECK(reregistration.value() == operation_accepted{"w-1", 2, license_operation::registration});
    }
}

TEST_CASE("deregistration request returns the operation", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    fixture.commands.register_license("w-1", token);

    auto accepted = fixture.commands.request_deregistration("w-1");

    REQUIRE(accepted);
    CHECK(accepted.value() == operation_accepted{"w-1", 2, license_operation::deregistration});
    const auto stored = fixture.commands.get("w-1").value();
    CHECK(stored.license().pending_operation() == license_operation::deregistration);
    CHECK(stored.license().status() == license_status::registered);
    CHECK(fixture.repository.pending_count() == 1);
    const auto events = fixture.sink.events();
    REQUIRE_FALSE(events.empty());
    CHECK(lcm::domain::event_type(events.back()) == lcm::domain::license_deregistration_requested::type);
    CHECK(fixture.logs.count("msg=\"license deregistration requested\" worker_id=w-1 operation_id=2") == 1);

    SECTION("a repeated request returns the same operation")
    {
        const auto before = footprint_of(fixture, "w-1");
        auto repeated = fixture.commands.request_deregistration("w-1");
        REQUIRE(repeated);
        CHECK(repeated.value() == accepted.value());
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("deregistration request rejects each error", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));

    SECTION("not registered")
    {
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.request_deregistration("w-1").error() == errc::not_registered);
        CHECK(footprint_of(fixture, "w-1") == before);
    }

    SECTION("worker not running")
    {
        fixture.commands.register_license("w-1", token);
        REQUIRE(fixture.commands.change_status("w-1", worker_status::draining));
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.request_deregistration("w-1").error() == errc::worker_not_running);
        CHECK(footprint_of(fixture, "w-1") == before);
    }

    SECTION("registration pending")
    {
        REQUIRE(fixture.commands.request_registration("w-1", token));
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.request_deregistration("w-1").error() == errc::operation_in_progress);
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("operation start records the attempt", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;

    auto started = fixture.commands.start("w-1", operation_id);

    REQUIRE(started);
    CHECK(started.value().license().operation_in_progress());
    CHECK(started.value().license().attempts() == 1);
    CHECK(started.value().version() == 3);
    CHECK(started.value().events().empty());
    CHECK(fixture.commands.get("w-1").value() == started.value());
    const auto events = fixture.sink.events();
    REQUIRE(events.size() == 3);
    const auto* published = std::get_if<lcm::domain::license_registration_started>(&events[2]);
    REQUIRE(published != nullptr);
    CHECK(published->attempt == 1);
    CHECK(published->header.operation_id == operation_id);

    SECTION("a repeated start changes nothing")
    {
        const auto before = footprint_of(fixture, "w-1");
        auto repeated = fixture.commands.start("w-1", operation_id);
        REQUIRE(repeated);
        CHECK(repeated.value().license().attempts() == 1);
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("operation start rejects each error", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));

    SECTION("no operation pending")
    {
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.start("w-1", 0).error() == errc::stale_operation);
        CHECK(fixture.commands.start("w-1", 1).error() == errc::stale_operation);
        CHECK(footprint_of(fixture, "w-1") == before);
    }

    SECTION("another operation id")
    {
        const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.start("w-1", operation_id + 1).error() == errc::stale_operation);
        CHECK(fixture.commands.start("w-1", operation_id - 1).error() == errc::stale_operation);
        CHECK(footprint_of(fixture, "w-1") == before);
    }

    SECTION("worker not running")
    {
        const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
        REQUIRE(fixture.commands.change_status("w-1", worker_status::stopping));
        const auto before = footprint_of(fixture, "w-1");
        CHECK(fixture.commands.start("w-1", operation_id).error() == errc::worker_not_running);
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("registration completion stores the license", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
    REQUIRE(fixture.commands.start("w-1", operation_id));

    auto completed = fixture.commands.complete_registration("w-1", operation_id, sample_details());

    REQUIRE(completed);
    const auto& license = completed.value().license();
    CHECK(license.status() == license_status::registered);
    CHECK_FALSE(license.has_pending_operation());
    CHECK_FALSE(license.pending_token().has_value());
    REQUIRE(license.token().has_value());
    CHECK(license.token()->reveal() == token);
    CHECK(license.smart_account() == "lab-account");
    CHECK(license.features().size() == 1);
    CHECK(license.last_outcome() == lcm::domain::operation_outcome::completed);
    CHECK(completed.value().version() == 4);
    CHECK(fixture.commands.get("w-1").value() == completed.value());
    CHECK(fixture.repository.pending_count() == 0);
    const auto events = fixture.sink.events();
    REQUIRE(events.size() == 4);
    const auto* published = std::get_if<lcm::domain::license_registration_completed>(&events[3]);
    REQUIRE(published != nullptr);
    CHECK(published->smart_account == "lab-account");
    CHECK(published->features == std::vector<std::string>{"CML - Node License"});
    CHECK(fixture.logs.count("msg=\"license registration completed\" worker_id=w-1 operation_id=1") == 1);

    SECTION("a repeated completion changes nothing")
    {
        const auto before = footprint_of(fixture, "w-1");
        auto repeated = fixture.commands.complete_registration("w-1", operation_id, sample_details());
        REQUIRE(repeated);
        CHECK(repeated.value() == completed.value());
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("completion rejects unstarted or stale operations", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
    const auto before = footprint_of(fixture, "w-1");

    CHECK(fixture.commands.complete_registration("w-1", operation_id).error() == errc::operation_not_started);
    CHECK(fixture.commands.complete_registration("w-1", operation_id + 1).error() == errc::stale_operation);
    // The pending operation is a registration, so a deregistration completion names no current operation.
    CHECK(fixture.commands.complete_deregistration("w-1", operation_id).error() == errc::stale_operation);
    CHECK(footprint_of(fixture, "w-1") == before);
    CHECK(fixture.logs.count("msg=\"license operation report rejected\" worker_id=w-1") == 3);
    CHECK(fixture.commands.get("w-1").value().license().has_pending_operation());
}

TEST_CASE("deregistration completion clears the license", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    fixture.commands.register_license("w-1", token);
    const auto operation_id = fixture.commands.request_deregistration("w-1").value().operation_id;
    REQUIRE(fixture.commands.start("w-1", operation_id));

    auto completed = fixture.commands.complete_deregistration("w-1", operation_id, "Cisco was not told");

    REQUIRE(completed);
    const auto& license = completed.value().license();
    CHECK(license.status() == license_status::unregistered);
    CHECK_FALSE(license.token().has_value());
    CHECK(license.smart_account().empty());
    CHECK(license.last_warning() == std::optional<std::string>("Cisco was not told"));
    CHECK(fixture.repository.pending_count() == 0);
    const auto events = fixture.sink.events();
    const auto* published = std::get_if<lcm::domain::license_deregistration_completed>(&events.back());
    REQUIRE(published != nullptr);
    CHECK(published->warning == std::optional<std::string>("Cisco was not told"));
    CHECK(fixture.logs.count("msg=\"license deregistration completed\" worker_id=w-1 operation_id=2") == 1);

    SECTION("a repeated completion changes nothing")
    {
        const auto before = footprint_of(fixture, "w-1");
        REQUIRE(fixture.commands.complete_deregistration("w-1", operation_id, "Cisco was not told"));
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("operation failure stores a redacted message", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    const auto operation_id = fixture.commands.request_registration("w-1", token).value().operation_id;
    const std::string quoting = "CML rejected token " + token + " (" + token + ")";

    // A pending operation may fail before it started, for example when CML is unreachable.
    auto failed = fixture.commands.fail("w-1", operation_id, "invalid_token", quoting);

    REQUIRE(failed);
    const auto& license = failed.value().license();
    CHECK_FALSE(license.has_pending_operation());
    CHECK_FALSE(license.pending_token().has_value());
    CHECK(license.status() == license_status::unregistered);
    CHECK(license.last_outcome() == lcm::domain::operation_outcome::failed);
    REQUIRE(license.last_error().has_value());
    CHECK(license.last_error()->code == "invalid_token");
    CHECK(license.last_error()->message == "CML rejected token <redacted> (<redacted>)");
    CHECK(fixture.repository.pending_count() == 0);
    const auto events = fixture.sink.events();
    const auto* published = std::get_if<lcm::domain::license_registration_failed>(&events.back());
    REQUIRE(published != nullptr);
    CHECK(published->error.message == "CML rejected token <redacted> (<redacted>)");
    CHECK(fixture.logs.count("msg=\"license operation failed\" worker_id=w-1 operation_id=1") == 1);

    SECTION("a repeated failure changes nothing")
    {
        const auto before = footprint_of(fixture, "w-1");
        REQUIRE(fixture.commands.fail("w-1", operation_id, "invalid_token", quoting));
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("deregistration failure keeps the license", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    fixture.commands.register_license("w-1", token);
    const auto operation_id = fixture.commands.request_deregistration("w-1").value().operation_id;
    REQUIRE(fixture.commands.start("w-1", operation_id));

    auto failed = fixture.commands.fail("w-1", operation_id, "cml_error", "deregistering " + token + " failed");

    REQUIRE(failed);
    const auto& license = failed.value().license();
    CHECK(license.status() == license_status::registered);
    REQUIRE(license.token().has_value());
    CHECK(license.token()->reveal() == token);
    CHECK(license.last_operation() == license_operation::deregistration);
    REQUIRE(license.last_error().has_value());
    CHECK(license.last_error()->message == "deregistering <redacted> failed");
    const auto events = fixture.sink.events();
    CHECK(std::holds_alternative<lcm::domain::license_deregistration_failed>(events.back()));

    SECTION("a repeated failure changes nothing")
    {
        const auto before = footprint_of(fixture, "w-1");
        REQUIRE(fixture.commands.fail("w-1", operation_id, "cml_error", "again"));
        CHECK(footprint_of(fixture, "w-1") == before);
    }
}

TEST_CASE("operation failure rejects finished operations", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    const auto before_any = footprint_of(fixture, "w-1");
    CHECK(fixture.commands.fail("w-1", 0).error() == errc::stale_operation);
    CHECK(fixture.commands.fail("w-1", 1).error() == errc::stale_operation);
    CHECK(footprint_of(fixture, "w-1") == before_any);

    const auto operation_id = fixture.commands.register_license("w-1", token);
    const auto before = footprint_of(fixture, "w-1");

    // The operation completed, so a late failure report must not undo it.
    CHECK(fixture.commands.fail("w-1", operation_id).error() == errc::stale_operation);
    CHECK(fixture.commands.fail("w-1", operation_id + 1).error() == errc::stale_operation);
    CHECK(footprint_of(fixture, "w-1") == before);
    CHECK(fixture.commands.get("w-1").value().license().status() == license_status::registered);
}

TEST_CASE("stale reports after a new request", "[application]")
{
    control_plane_fixture fixture;
    REQUIRE(fixture.commands.add("w-1"));
    const auto old_operation = fixture.commands.request_registration("w-1", token).value().operation_id;
    REQUIRE(fixture.commands.start("w-1", old_operation));
    REQUIRE(fixture.commands.fail("w-1", old_operation, "timeout", "no answer from CML"));
    const auto new_operation = fixture.commands.request_registration("w-1", other_token).value().operation_id;
    REQUIRE(new_operation == old_operation + 1);
    const auto before = footprint_of(fixture, "w-1");
    const auto stored_before = fixture.commands.get("w-1").value();

    // A controller that still works on the old operation reports late.
    CHECK(fixture.commands.complete_registration("w-1", old_operation, sample_details()).error() ==
          errc::stale_operation);
    CHECK(fixture.commands.start("w-1", old_operation).error() == errc::stale_operation);
    CHECK(fixture.commands.fail("w-1", old_operation).error() == errc::stale_operation);

    CHECK(footprint_of(fixture, "w-1") == before);
    const auto stored = fixture.commands.get("w-1").value();
    CHECK(stored == stored_before);
    CHECK(stored.license().status() == license_status::unregistered);
    CHECK(stored.license().operation_id() == new_operation);
    CHECK(stored.license().pending_token()->reveal() == other_token);
}

TEST_CASE("tokens stay out of logs and events", "[application]")
{
    lcm::application::control_plane_options options;
    options.max_attempts = 2;
    // Two conflicts on a budget of two attempts make one command fail, so the retry and
    // failure log lines are part of the capture too.
    lcm::test::faulty_control_plane_fixture fixture(2, errc::version_conflict, options);
    auto& commands = fixture.commands;
    REQUIRE(commands.add("w-1"));

    CHECK(commands.request_registration("w-1", token).error() == errc::version_conflict);
    CHECK(commands.request_registration("w-1", "bad token " + token).error() == errc::invalid_token);
    const auto first = commands.request_registration("w-1", token).value().operation_id;
    REQUIRE(commands.fail("w-1", first, "invalid_token", "token " + token + " was rejected"));
    commands.register_license("w-1", token);
    const auto replace = commands.request_registration("w-1", other_token, true).value().operation_id;
    REQUIRE(commands.start("w-1", replace));
    REQUIRE(commands.fail("w-1", replace, "cml_error", token + " is still active, " + other_token + " refused"));
    const auto deregister = commands.request_deregistration("w-1").value().operation_id;
    REQUIRE(commands.start("w-1", deregister));
    REQUIRE(commands.complete_deregistration("w-1", deregister, "could not release " + token));

    const auto lines = fixture.logs.lines();
    REQUIRE(lines.size() > 10);
    CHECK(fixture.logs.count("msg=\"version conflict, retrying\"") == 1);
    CHECK(fixture.logs.count("msg=\"saving worker failed\"") == 1);
    for (const auto& line : lines) {
        INFO(line);
        CHECK(line.find(token) == std::string::npos);
        CHECK(line.find(other_token) == std::string::npos);
    }

    const auto events = fixture.sink.events();
    REQUIRE(events.size() == 12);
    for (const auto& event : events) {
        const auto json = boost::json::serialize(boost::json::value_from(event));
        INFO(json);
        CHECK(json.find(token) == std::string::npos);
        CHECK(json.find(other_token) == std::string::npos);
    }

    const auto stored = commands.get("w-1").value();
    REQUIRE(stored.license().last_warning().has_value());
    CHECK(*stored.license().last_warning() == "could not release <redacted>");
}

TEST_CASE("conflicts are retried then saved", "[application]")
{
    lcm::application::control_plane_options options;
    options.max_attempts = 3;
    lcm::test::faulty_control_plane_fixture fixture(2, errc::version_conflict, options);
    REQUIRE(fixture.commands.add("w-1"));

    auto accepted = fixture.commands.request_registration("w-1", token);

    REQUIRE(accepted);
    CHECK(accepted.value().operation_id == 1);
    CHECK(fixture.repository.update_calls() == 3);
    CHECK(fixture.logs.count("msg=\"version conflict, retrying\" worker_id=w-1") == 2);
    const auto events = fixture.sink.events();
    CHECK(event_types(events) == std::vector<std::string_view>{lcm::domain::worker_created::type,
                                                               lcm::domain::license_registration_requested::type});
    const auto stored = fixture.commands.get("w-1").value();
    CHECK(stored.version() == 2);
    CHECK(stored.license().operation_id() == 1);
}

TEST_CASE("conflict retries stop at max attempts", "[application]")
{
    lcm::application::control_plane_options options;
    options.max_attempts = 3;
    lcm::test::faulty_control_plane_fixture fixture(3, errc::version_conflict, options);
    REQUIRE(fixture.commands.add("w-1"));

    auto rejected = fixture.commands.request_registration("w-1", token);

    CHECK(rejected.error() == errc::version_conflict);
    CHECK(fixture.repository.update_calls() == 3);
    CHECK(fixture.sink.events().size() == 1);
    CHECK(fixture.logs.count("msg=\"saving worker failed\" worker_id=w-1") == 1);
    CHECK(fixture.logs.count("attempts=3") == 1);
    const auto stored = fixture.commands.get("w-1").value();
    CHECK(stored.version() == 1);
    CHECK_FALSE(stored.license().has_pending_operation());

    SECTION("the next command succeeds")
    {
        auto accepted = fixture.commands.request_registration("w-1", token);
        REQUIRE(accepted);
        CHECK(accepted.value().operation_id == 1);
        CHECK(fixture.repository.update_calls() == 4);
        CHECK(fixture.sink.events().size() == 2);
    }
}

TEST_CASE("one attempt means no retry", "[application]")
{
    lcm::application::control_plane_options options;
    options.max_attempts = 1;
    lcm::test::faulty_control_plane_fixture fixture(1, errc::version_conflict, options);
    REQUIRE(fixture.commands.add("w-1"));

    CHECK(fixture.commands.change_status("w-1", worker_status::stopped).error() == errc::version_conflict);
    CHECK(fixture.repository.update_calls() == 1);
    CHECK(fixture.sink.events().size() == 1);
}

TEST_CASE("other save errors are not retried", "[application]")
{
    lcm::application::control_plane_options options;
    options.max_attempts = 5;
    lcm::test::faulty_control_plane_fixture fixture(1, errc::unavailable, options);
    REQUIRE(fixture.commands.add("w-1"));
    const auto rejected = fixture.commands.request_registration("w-1", token);
    REQUIRE(rejected.error() == errc::unavailable);

    CHECK(fixture.repository.update_calls() == 1);
    CHECK(fixture.sink.events().size() == 1);
    CHECK(fixture.logs.count("msg=\"saving worker failed\" worker_id=w-1") == 1);
    CHECK(fixture.logs.count("version conflict, retrying") == 0);
    CHECK_FALSE(fixture.commands.get("w-1").value().license().has_pending_operation());
}
