#include <lcm/application/control_plane.hpp>
#include <lcm/storage/memory_repository.hpp>
#include <lcm/testing/run.hpp>

#include <catch2/catch.hpp>

TEST_CASE("control plane accepts a registration", "[application]")
{
    boost::asio::io_context context;
    lcm::storage::memory_repository repository;
    lcm::application::memory_event_sink sink;
    lcm::application::control_plane plane(repository, sink);

    auto accepted = lcm::testing::run_with_timeout(context, [&]() -> boost::asio::awaitable<lcm::result<lcm::application::operation_accepted>> {
        lcm::application::add_worker_request request{"", "lab", "https://cml.test", lcm::domain::worker_status::running, "admin"};
        auto worker = co_await plane.add_worker(std::move(request));
        co_return co_await plane.request_registration(worker.value().id(), lcm::secret("TOKEN"), false, "admin");
    }());
    REQUIRE(accepted);
    CHECK(accepted.value().operation_id == 1);
    CHECK(sink.events().size() == 2);
    CHECK(repository.pending_count() == 1);
}
