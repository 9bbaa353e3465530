// Tests of the JSON codecs: the record form that storage uses, the redacted public form,
// and the event codec, including rejection of malformed input.
#include "domain_test_support.hpp"

#include <lcm/domain/json.hpp>

#include <boost/json.hpp>
#include <boost/system/system_error.hpp>
#include <catch2/catch.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

using namespace lcm::domain;
using namespace lcm::domain::testing;
using lcm::errc;
using lcm::secret;

namespace {

struct named_worker {
    std::string name;
    cml_worker worker;
};

/// Returns workers in every license state that a record must carry, events dropped.
std::vector<named_worker> workers_in_every_state()
{
    std::vector<named_worker> workers;
    workers.push_back({"new", running_worker()});

    auto requested = running_worker();
    requested.request_license_registration(secret(first_token), false, "alice", at(10)).value();
    workers.push_back({"registration requested", requested});

    auto started = requested;
    started.start_license_operation(1, at(11)).value();
    workers.push_back({"registration started", started});

    auto registered = registered_worker(first_token);
    registered.set_version(42);
    workers.push_back({"registered", registered});

    auto reregistering = registered;
    reregistering.request_license_registration(secret(second_token), true, "carol", at(40)).value();
    reregistering.start_license_operation(2, at(41)).value();
    workers.push_back({"reregistration started", reregistering});

    auto failed = reregistering;
    failed.fail_license_registration(2, "invalid_token", "CML rejected " + second_token, at(42)).value();
    workers.push_back({"reregistration failed", failed});

    auto claimed = requested;
    claimed.claim_license_operation("controller-a", std::chrono::seconds(30), at(11)).value();
    claimed.start_license_operation({1, 1}, at(12)).value();
    workers.push_back({"registration claimed and started", claimed});

    auto deregistered = registered;
    deregistered.request_license_deregistration("bob", at(50)).value();
    deregistered.start_license_operation(2, at(51)).value();
    deregistered.complete_license_deregistration(2, "Smart Licensing not told about " + first_token, at(52)).value();
    deregistered.change_status(worker_status::stopped, "infrastructure", at(53));
    workers.push_back({"deregistered and stopped", deregistered});

    for (auto& entry : workers) {
        entry.worker.take_events();
    }
    return workers;
}

/// Returns `document` with the field at the dotted `path` set to `value`, or removed when
/// `value` is empty.
boost::json::value with_field(boost::json::value document, std::string_view path,
                              const std::optional<boost::json::value>& value)
{
    auto* object = &document.as_object();
    for (auto dot = path.find('.'); dot != std::string_view::npos; dot = path.find('.')) {
        object = &(*object)[path.substr(0, dot)].as_object();
        path.remove_prefix(dot + 1);
    }
    if (value) {
        (*object)[path] = *value;
    }
    else {
        object->erase(path);
    }
    return document;
}

struct field_edit {
    std::string_view path;
    std::optional<boost::json::value> value;
};

struct malformed_case {
    std::vector<field_edit> edits;
    std::string expected_field;
};

/// Returns a record edited by every entry of `edits`, starting from `base`.
boost::json::value edited(const boost::json::value& base, const std::vector<field_edit>& edits)
{
    auto document = base;
    for (const auto& edit : edits) {
        document = with_field(std::move(document), edit.path, edit.value);
    }
    return document;
}

std::string describe(const std::vector<field_edit>& edits)
{
    std::string text;
    for (const auto& edit : edits) {
        text += std::string(edit.path) + "=" + (edit.value ? boost::json::serialize(*edit.value) : "(removed)") + " ";
    }
    return text;
}

/// Returns events of every type, with optional fields both set and empty.
std::vector<domain_event> events_of_every_type()
{
    const event_header header{"worker-1", 7, at(3), "alice"};
    return {
        worker_created{{"worker-1", 0, at(0), "admin"}, "lab one", "https://cml.example.test", worker_status::pending},
        worker_status_changed{{"worker-1", 0, at(1), "infrastructure"}, worker_status::pending, worker_status::running},
        license_registration_requested{header, true},
        license_registration_requested{header, false},
        license_registration_started{header, 3},
        license_registration_completed{header, at(999), "Example Labs", "Training", "AUTHORIZED", {"Nodes", "Users"}},
        license_registration_completed{header, std::nullopt, "", "", "", {}},
        license_registration_failed{header, {"invalid_token", "CML rejected <redacted>"}},
        license_deregistration_requested{header},
        license_deregistration_started{header, 4294967295U},
        license_deregistration_completed{header, std::string("Smart Licensing not told")},
        license_deregistration_completed{header, std::nullopt},
        license_deregistration_failed{header, {"unavailable", "CML is unreachable"}},
        license_operation_claimed{header, "controller-a", 18446744073709551615ULL, at(33)},
    };
}

} // namespace

// Record form.

TEST_CASE("record round-trips every state", "[domain]")
{
    for (const auto& [name, worker] : workers_in_every_state()) {
        CAPTURE(name);
        const auto record = to_record(worker);

        const auto decoded = from_record(record);
        REQUIRE(decoded);
        CHECK(decoded.value() == worker);
        CHECK(decoded.value().events().empty());
        CHECK(to_record(decoded.value()) == record);

        const auto reparsed = from_record(boost::json::parse(boost::json::serialize(record)));
        REQUIRE(reparsed);
        CHECK(reparsed.value() == worker);
    }
}

TEST_CASE("record keeps tokens and microseconds", "[domain]")
{
    auto worker = registered_worker(first_token);
    worker.request_license_registration(secret(second_token), true, "carol", at(40)).value();

    const auto record = to_record(worker);

    CHECK(record.at("license").at("token").as_string() == first_token);
    CHECK(record.at("license").at("pending_token").as_string() == second_token);
    CHECK(record.at("created_at") == "2026-08-20T09:00:00.123456Z");
    CHECK(record.at("license").at("requested_at") == "2026-08-20T09:00:40.123456Z");
    CHECK(record.at("license").at("expiry_date") == "2027-08-20T09:00:00.123456Z");
    CHECK(record.at("license").at("features").as_array().size() == 2);
    CHECK(record.at("license").at("cml_info").at("ratio") == 0.75);
}

TEST_CASE("record drops failed pending token", "[domain]")
{
    auto worker = registered_worker(first_token);
    worker.request_license_registration(secret(second_token), true, "carol", at(40)).value();
    worker.start_license_operation(2, at(41)).value();
    worker.fail_license_registration(2, "invalid_token", "CML rejected " + second_token, at(42)).value();

    const auto text = boost::json::serialize(to_record(worker));

    CHECK(text.find(second_token) == std::string::npos);
    CHECK(text.find(first_token) != std::string::npos);
    CHECK(text.find("CML rejected <redacted>") != std::string::npos);
}

TEST_CASE("record decoding ignores enum case", "[domain]")
{
    const auto record = to_record(registered_worker());
    const auto edits = std::vector<field_edit>{
        {"status", boost::json::value("RUNNING")},
        {"license.status", boost::json::value("Registered")},
        {"license.last_operation", boost::json::value("REGISTER")},
        {"license.last_outcome", boost::json::value("Completed")},
    };

    const auto decoded = from_record(edited(record, edits));

    REQUIRE(decoded);
    CHECK(decoded.value() == registered_worker());
}

TEST_CASE("record decoding rejects malformed fields", "[domain]")
{
    // The base record is a reregistration in progress, so it carries both tokens.
    auto base_worker = registered_worker(first_token);
    base_worker.request_license_registration(secret(second_token), true, "carol", at(40)).value();
    base_worker.start_license_operation(2, at(41)).value();
    const boost::json::value base = to_record(base_worker);
    REQUIRE(from_record(base));

    const auto json = [](std::string_view text) { return boost::json::parse(text); };
    const std::vector<malformed_case> cases = {
        {{{"id", json("42")}}, "id"},
        {{{"id", std::nullopt}}, "id"},
        {{{"name", json("null")}}, "name"},
        {{{"cml_url", json("[]")}}, "cml_url"},
        {{{"status", json(R"("sleeping")")}}, "status"},
        {{{"status", json("3")}}, "status"},
        {{{"desired_status", json(R"("")")}}, "desired_status"},
        {{{"version", json("-1")}}, "version"},
        {{{"version", json("1.5")}}, "version"},
        {{{"version", json(R"("1")")}}, "version"},
        {{{"created_at", json(R"("yesterday")")}}, "created_at"},
        {{{"created_at", json(R"("2026-02-30T00:00:00Z")")}}, "created_at"},
        {{{"created_at", json("null")}}, "created_at"},
        {{{"updated_at", std::nullopt}}, "updated_at"},
        {{{"updated_at", json("1766000000")}}, "updated_at"},
        {{{"license", std::nullopt}}, "license"},
        {{{"license", json(R"("registered")")}}, "license.(root)"},
        {{{"license.status", json(R"("bogus")")}}, "license.status"},
        {{{"license.status", json("null")}}, "license.status"},
        {{{"license.token", json("42")}}, "license.token"},
        {{{"license.pending_token", json("{}")}}, "license.pending_token"},
        {{{"license.token", json(R"("<redacted>")")}}, "license.token"},
        {{{"license.token", json(R"("")")}}, "license.token"},
        {{{"license.pending_token", json(R"("<redacted>")")}}, "license.pending_token"},
        {{{"license.pending_token", json(R"("second token")")}}, "license.pending_token"},
        {{{"license.pending_operation", json(R"("renew")")}}, "license.pending_operation"},
        {{{"license.pending_operation", json(R"("registration")")}}, "license.pending_operation"},
        {{{"license.reregister", json(R"("true")")}}, "license.reregister"},
        {{{"license.reregister", json("1")}}, "license.reregister"},
        {{{"license.operation_in_progress", std::nullopt}}, "license.operation_in_progress"},
        {{{"license.operation_id", json("-1")}}, "license.operation_id"},
        {{{"license.operation_id", json("2.0")}}, "license.operation_id"},
        {{{"license.operation_id", json("18446744073709551616")}}, "license.operation_id"},
        {{{"license.requested_by", json("null")}}, "license.requested_by"},
        {{{"license.requested_at", json(R"("2026-08-20")")}}, "license.requested_at"},
        {{{"license.started_at", json("5")}}, "license.started_at"},
        {{{"license.finished_at", json(R"("2026-08-20T09:00:00+24:00")")}}, "license.finished_at"},
        {{{"license.attempts", json("-1")}}, "license.attempts"},
        {{{"license.attempts", json("4294967296")}}, "license.attempts"},
        {{{"license.last_operation", json(R"("renew")")}}, "license.last_operation"},
        {{{"license.last_outcome", json(R"("maybe")")}}, "license.last_outcome"},
        {{{"license.last_error", json(R"("oops")")}}, "license.last_error"},
        {{{"license.last_error", json(R"({"code":"invalid_token"})")}}, "license.last_error"},
        {{{"license.last_error", json(R"({"code":1,"message":"m"})")}}, "license.last_error"},
        {{{"license.last_warning", json("5")}}, "license.last_warning"},
        {{{"license.expiry_date", json(R"("soon")")}}, "license.expiry_date"},
        {{{"license.smart_account", json("5")}}, "license.smart_account"},
        {{{"license.virtual_account", json("null")}}, "license.virtual_account"},
        {{{"license.authorization_status", std::nullopt}}, "license.authorization_status"},
        {{{"license.features", json(R"("none")")}}, "license.features"},
        {{{"license.features", std::nullopt}}, "license.features"},
        {{{"license.features", json("[1]")}}, "license.features"},
        {{{"license.features", json(R"([{"id":"a"}])")}}, "license.features"},
        {{{"license.features", json(R"([{"id":"a","name":"n","version":"v","status":"s","in_use":"1"}])")}},
         "license.features"},
        {{{"license.features", json(R"([{"id":"a","name":"n","version":"v","status":"s","in_use":1.5}])")}},
         "license.features"},
        {{{"id", json(R"("worker 1")")}}, "id"},
        {{{"license.pending_operation", json(R"("none")")}}, "license.operation_in_progress"},
        {{{"license.pending_token", json("null")}}, "license.pending_token"},
        {{{"license.pending_operation", json(R"("deregister")")}}, "license.pending_token"},
        {{{"license.pending_operation", json(R"("none")")}, {"license.operation_in_progress", json("false")}},
         "license.pending_token"},
        {{{"license.operation_id", json("0")}}, "license.operation_id"},
    };

    for (const auto& test : cases) {
        CAPTURE(describe(test.edits));
        std::string field;

        const auto decoded = from_record(edited(base, test.edits), &field);

        REQUIRE_FALSE(decoded);
        CHECK(decoded.error() == errc::invalid_argument);
        CHECK(field == test.expected_field);
    }

    SECTION("root that is not an object")
    {
        for (const auto* text : {"[]", "null", "\"worker\"", "42"}) {
            CAPTURE(text);
            std::string field;
            const auto decoded = from_record(boost::json::parse(text), &field);
            REQUIRE_FALSE(decoded);
            CHECK(decoded.error() == errc::invalid_argument);
            CHECK(field == "(root)");
        }
    }
}

// Public form.

TEST_CASE("public form never contains tokens", "[domain]")
{
    for (const auto& [name, worker] : workers_in_every_state()) {
        CAPTURE(name);
        const auto public_json = to_public_json(worker);
        const auto texts = {
            boost::json::serialize(public_json),
            boost::json::serialize(boost::json::value_from(worker)),
            boost::json::serialize(boost::json::value_from(worker.license())),
        };

        for (const auto& text : texts) {
            CHECK(text.find(first_token) == std::string::npos);
            CHECK(text.find(second_token) == std::string::npos);
        }
        CHECK(boost::json::value_from(worker) == public_json);

        const auto& license = worker.license();
        const auto& public_license = public_json.at("license");
        CHECK(public_license.at("token") ==
              (license.token() ? boost::json::value("<redacted>") : boost::json::value(nullptr)));
        CHECK(public_license.at("pending_token") ==
              (license.pending_token() ? boost::json::value("<redacted>") : boost::json::value(nullptr)));
    }
}

TEST_CASE("public form is not a record", "[domain]")
{
    // Decoding a public form as a record would replace the stored token with `<redacted>`.
    for (const auto& [name, worker] : workers_in_every_state()) {
        CAPTURE(name);
        const auto& license = worker.license();
        if (!license.token() && !license.pending_token()) {
            continue;
        }
        std::string field;

        const auto decoded = from_record(to_public_json(worker), &field);

        REQUIRE_FALSE(decoded);
        CHECK(decoded.error() == errc::invalid_argument);
        CHECK(field == (license.token() ? "license.token" : "license.pending_token"));
    }
}

TEST_CASE("public form matches record without tokens", "[domain]")
{
    for (const auto& [name, worker] : workers_in_every_state()) {
        CAPTURE(name);
        auto record = to_record(worker);
        auto public_json = to_public_json(worker);

        for (auto* document : {&record, &public_json}) {
            auto& license = document->at("license").as_object();
            license.erase("token");
            license.erase("pending_token");
        }

        CHECK(record == public_json);
    }
}

// Events.

TEST_CASE("events round-trip through JSON", "[domain]")
{
    auto events = events_of_every_type();
    auto worker = running_worker();
    const auto operation_id = worker.request_license_registration(secret(first_token), false, "alice", at(1)).value();
    worker.start_license_operation(operation_id, at(2)).value();
    worker.complete_license_registration(operation_id, sample_details(), at(3)).value();
    for (auto& event : worker.take_events()) {
        events.push_back(std::move(event));
    }

    for (const auto& event : events) {
        CAPTURE(event_type(event));
        const auto json = boost::json::value_from(event);

        CHECK(json.at("type").as_string() == event_type(event));
        CHECK(json.at("worker_id").as_string() == header_of(event).worker_id);
        CHECK(json.at("operation_id") == header_of(event).operation_id);
        CHECK(json.at("occurred_at").as_string() == lcm::format_timestamp(header_of(event).occurred_at));
        CHECK(json.at("initiated_by").as_string() == header_of(event).initiated_by);
        CHECK(boost::json::value_to<domain_event>(json) == event);
        CHECK(boost::json::value_to<domain_event>(boost::json::parse(boost::json::serialize(json))) == event);
    }
}

TEST_CASE("event types use CloudEvents names", "[domain]")
{
    const std::vector<std::pair<domain_event, std::string_view>> cases = {
        {worker_created{}, "cml_worker.created.v1"},
        {worker_status_changed{}, "cml_worker.status.changed.v1"},
        {license_registration_requested{}, "cml_worker.license.registration.requested.v1"},
        {license_registration_started{}, "cml_worker.license.registration.started.v1"},
        {license_registration_completed{}, "cml_worker.license.registration.completed.v1"},
        {license_registration_failed{}, "cml_worker.license.registration.failed.v1"},
        {license_deregistration_requested{}, "cml_worker.license.deregistration.requested.v1"},
        {license_deregistration_started{}, "cml_worker.license.deregistration.started.v1"},
        {license_deregistration_completed{}, "cml_worker.license.deregistration.completed.v1"},
        {license_deregistration_failed{}, "cml_worker.license.deregistration.failed.v1"},
        {license_operation_claimed{}, "cml_worker.license.operation.claimed.v1"},
    };
    REQUIRE(cases.size() == std::variant_size_v<domain_event>);
    for (const auto& [event, type] : cases) {
        CHECK(event_type(event) == type);
    }
}

TEST_CASE("event JSON is a flat object", "[domain]")
{
    const domain_event event = license_registration_failed{{"worker-1", 7, at(3), "alice"}, {"invalid_token", "rejected"}};

    const auto json = boost::json::value_from(event);

    CHECK(json == boost::json::parse(R"({
        "type": "cml_worker.license.registration.failed.v1",
        "worker_id": "worker-1",
        "operation_id": 7,
        "occurred_at": "2026-08-20T09:00:03.123456Z",
        "initiated_by": "alice",
        "error": {"code": "invalid_token", "message": "rejected"}
    })"));
}

TEST_CASE("event decoding rejects malformed fields", "[domain]")
{
    const auto encode = [](const domain_event& event) { return boost::json::value_from(event); };
    const auto json = [](std::string_view text) { return boost::json::parse(text); };
    const event_header header{"worker-1", 7, at(3), "alice"};
    const auto created = encode(worker_created{header, "lab one", "https://cml.example.test", worker_status::running});
    const auto changed = encode(worker_status_changed{header, worker_status::starting, worker_status::running});
    const auto requested = encode(license_registration_requested{header, true});
    const auto started = encode(license_registration_started{header, 1});
    const auto completed = encode(license_registration_completed{header, at(9), "a", "b", "c", {"Nodes"}});
    const auto failed = encode(license_deregistration_failed{header, {"unavailable", "down"}});
    const auto deregistered = encode(license_deregistration_completed{header, std::string("warning")});
    const auto claimed = encode(license_operation_claimed{header, "controller-a", 2, at(40)});

    struct event_case {
        const boost::json::value& base;
        field_edit edit;
        std::string expected_field;
    };
    const std::vector<event_case> cases = {
        {requested, {"type", std::nullopt}, "type"},
        {requested, {"type", json("5")}, "type"},
        {requested, {"type", json(R"("cml_worker.license.renewed.v1")")}, "type"},
        {requested, {"type", json(R"("cml_worker.license.registration.requested.v2")")}, "type"},
        {requested, {"type", json(R"("CML_WORKER.LICENSE.REGISTRATION.REQUESTED.V1")")}, "type"},
        {requested, {"worker_id", json("5")}, "worker_id"},
        {requested, {"operation_id", json("-1")}, "operation_id"},
        {requested, {"operation_id", json(R"("7")")}, "operation_id"},
        {requested, {"occurred_at", json(R"("20260820T090000Z")")}, "occurred_at"},
        {requested, {"occurred_at", json(R"("2026-08-20T09:00:00+25:00")")}, "occurred_at"},
        {requested, {"initiated_by", std::nullopt}, "initiated_by"},
        {requested, {"reregister", json(R"("true")")}, "reregister"},
        {requested, {"reregister", std::nullopt}, "reregister"},
        {created, {"status", json(R"("bogus")")}, "status"},
        {created, {"name", std::nullopt}, "name"},
        {created, {"cml_url", json("1")}, "cml_url"},
        {changed, {"previous_status", json(R"("asleep")")}, "previous_status"},
        {changed, {"status", std::nullopt}, "status"},
        {started, {"attempt", json("-1")}, "attempt"},
        {started, {"attempt", json("1.5")}, "attempt"},
        {started, {"attempt", json("4294967296")}, "attempt"},
        {completed, {"features", json(R"("Nodes")")}, "features"},
        {completed, {"features", json("[1]")}, "features"},
        {completed, {"features", std::nullopt}, "features"},
        {completed, {"expiry_date", json(R"("next year")")}, "expiry_date"},
        {completed, {"smart_account", json("null")}, "smart_account"},
        {failed, {"error", std::nullopt}, "error"},
        {failed, {"error", json(R"("down")")}, "error"},
        {failed, {"error", json(R"({"code":"unavailable"})")}, "error"},
        {deregistered, {"warning", json("5")}, "warning"},
        {claimed, {"holder", std::nullopt}, "holder"},
        {claimed, {"fence", json("-2")}, "fence"},
        {claimed, {"expires_at", json("null")}, "expires_at"},
    };

    for (const auto& test : cases) {
        const auto input = with_field(test.base, test.edit.path, test.edit.value);
        CAPTURE(boost::json::serialize(input));
        std::string field;

        const auto decoded = decode_event(input, &field);

        REQUIRE_FALSE(decoded);
        CHECK(decoded.error() == errc::invalid_argument);
        CHECK(field == test.expected_field);
    }

    SECTION("root that is not an object")
    {
        std::string field;
        const auto decoded = decode_event(json("[1, 2]"), &field);
        REQUIRE_FALSE(decoded);
        CHECK(decoded.error() == errc::invalid_argument);
        CHECK(field == "(root)");
    }
}

TEST_CASE("value_to throws on malformed event", "[domain]")
{
    const auto input = boost::json::parse(R"({"type":"cml_worker.license.renewed.v1","worker_id":"worker-1",)"
                                          R"("operation_id":1,"occurred_at":"2026-08-20T09:00:00Z","initiated_by":"a"})");
    try {
        (void)boost::json::value_to<domain_event>(input);
        FAIL("value_to accepted an unknown event type");
    }
    catch (const boost::system::system_error& error) {
        CHECK(error.code() == errc::invalid_argument);
        CHECK(std::string(error.what()).find("'type'") != std::string::npos);
    }
}
