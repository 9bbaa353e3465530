#include <lcm/domain/json.hpp>
#include <lcm/domain/worker.hpp>

#include <catch2/catch.hpp>

TEST_CASE("worker walks through a registration", "[domain]")
{
    auto worker = lcm::domain::cml_worker::create("w-1", "lab one", "https://cml.example.test", lcm::domain::worker_status::running, "admin").value();
    auto operation = worker.request_license_registration(lcm::secret("TOKEN123"), false, "admin");
    REQUIRE(operation);
    REQUIRE(worker.start_license_operation(operation.value()));
    REQUIRE(worker.complete_license_registration(operation.value(), {}));
    CHECK(worker.license().status() == lcm::domain::license_status::registered);
    auto record = lcm::domain::to_record(worker);
    auto back = lcm::domain::from_record(record);
    REQUIRE(back);
    CHECK(back.value() == worker);
    for (const auto& event : worker.events()) {
        auto json = boost::json::value_from(event);
        CHECK(boost::json::value_to<lcm::domain::domain_event>(json) == event);
    }
}
