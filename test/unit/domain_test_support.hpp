// Builders and checks shared by the domain tests: fixed timestamps, tokens, workers in
// known license states, and the check that a rejected call changed nothing.
#pragma once

#include <lcm/domain/json.hpp>
#include <lcm/domain/worker.hpp>

#include <boost/json.hpp>
#include <catch2/catch.hpp>

#include <chrono>
#include <string>
#include <variant>
#include <vector>

namespace lcm::domain::testing {

/// Returns 2026-08-20T09:00:00.123456Z plus `seconds`. The microseconds make a lost
/// fraction visible in round-trip checks.
inline timestamp at(int seconds)
{
    using namespace std::chrono;
    return timestamp{sys_days{year{2026} / 8 / 20}.time_since_epoch() + 9h + std::chrono::seconds{seconds} +
                     123456us};
}

/// Two valid tokens that use every special character of CML's token format.
inline const std::string first_token = "FirstToken+/%=-0123456789abcdefghijklmnopqrstuvwxyz";
inline const std::string second_token = "SecondToken-=%/+ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210";

/// Creates a running worker and drops its `worker_created` event.
inline cml_worker running_worker()
{
    auto worker = cml_worker::create("worker-1", "lab one", "https://cml.example.test", worker_status::running,
                                     "admin", at(0))
                      .value();
    worker.take_events();
    return worker;
}

/// Returns what CML reports for a completed registration, with features, an expiry date and
/// a nested `cml_info` document.
inline registration_details sample_details()
{
    registration_details details;
    details.registration_status = "COMPLETED";
    details.smart_account = "Example Labs";
    details.virtual_account = "Training";
    details.expiry_date = at(86400 * 365);
    details.authorization_status = "AUTHORIZED";
    details.features = {
        {"regid.2019-10.com.cisco.CML_NODE_COUNT", "CML - Additional Nodes", "1.0", "IN_USE", 20},
        {"regid.2019-10.com.cisco.CML_USER", "CML - Users", "1.0", "INIT", 0},
    };
    details.cml_info = boost::json::parse(R"({"registration":{"status":"COMPLETED","expires":"2027-08-20 09:00:00"},)"
                                          R"("authorization":{"status":"IN_COMPLIANCE"},"ratio":0.75,"nodes":[1,2]})");
    return details;
}

/// Drives a running worker through a completed registration of `token` and drops the events.
inline cml_worker registered_worker(const std::string& token = first_token)
{
    auto worker = running_worker();
    const auto operation_id = worker.request_license_registration(secret(token), false, "admin", at(10)).value();
    worker.start_license_operation(operation_id, at(11)).value();
    worker.complete_license_registration(operation_id, sample_details(), at(12)).value();
    worker.take_events();
    return worker;
}

/// Returns the only event the worker recorded, which must be an `Event`.
template <class Event>
const Event& single_event(const cml_worker& worker)
{
    REQUIRE(worker.events().size() == 1);
    const auto* event = std::get_if<Event>(&worker.events().front());
    REQUIRE(event != nullptr);
    return *event;
}

/// Returns every event serialized as JSON text, concatenated.
inline std::string serialize_events(const std::vector<domain_event>& events)
{
    std::string text;
    for (const auto& event : events) {
        text += boost::json::serialize(boost::json::value_from(event));
        text += '\n';
    }
    return text;
}

/// Checks that `call(worker)` fails with `expected` and leaves the state and the recorded
/// events exactly as they were.
template <class Call>
void check_rejected(cml_worker& worker, errc expected, Call call)
{
    const auto state_before = worker.state();
    const auto events_before = worker.events();

    const auto outcome = call(worker);

    REQUIRE_FALSE(outcome);
    CHECK(outcome.error() == make_error_code(expected));
    CHECK(worker.state() == state_before);
    CHECK(worker.events() == events_before);
}

/// Checks that `call(worker)` succeeds and, as a repeated step must, leaves the state and the
/// recorded events unchanged.
template <class Call>
void check_idempotent(cml_worker& worker, Call call)
{
    const auto state_before = worker.state();
    const auto events_before = worker.events();

    const auto outcome = call(worker);

    CHECK(outcome);
    CHECK(worker.state() == state_before);
    CHECK(worker.events() == events_before);
}

} // namespace lcm::domain::testing
