// Walks one worker through a license registration and a deregistration with the in-memory
// control plane, playing the worker-controller's part by hand, and prints the timeline of
// domain events.
#include <lcm/application/control_plane.hpp>
#include <lcm/domain/json.hpp>
#include <lcm/storage/memory_repository.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/json/serialize.hpp>

#include <cstdlib>
#include <exception>
#include <iostream>

namespace {

using lcm::application::control_plane;
using lcm::application::memory_event_sink;
using lcm::storage::memory_repository;

/// Prints an error and ends the program when a step fails; the demo has no recovery.
template <class T>
T require(lcm::result<T> outcome, const char* step)
{
    if (!outcome) {
        std::cerr << "lcm-demo: " << step << " failed: " << outcome.error().message() << '\n';
        std::exit(EXIT_FAILURE);
    }
    return std::move(outcome).value();
}

boost::asio::awaitable<void> run(control_plane<memory_repository, memory_event_sink>& plane)
{
    lcm::application::add_worker_request request{"worker-1", "lab worker 1", "https://127.0.0.1:8443",
                                                 lcm::domain::worker_status::running, "admin"};
    const auto worker = require(co_await plane.add_worker(std::move(request)), "adding the worker");

    // The control plane only records intent and answers "accepted".
    const auto registration =
        require(co_await plane.request_registration(worker.id(), lcm::secret("DEMO-TOKEN-0123456789"), false, "admin"),
                "requesting registration");

    // A worker-controller would now call CML; here the demo reports its steps directly.
    require(co_await plane.start_operation(worker.id(), registration.operation_id), "starting registration");
    lcm::domain::registration_details details;
    details.registration_status = "COMPLETED";
    details.smart_account = "demo-smart-account";
    details.virtual_account = "demo-virtual-account";
    details.authorization_status = "IN_COMPLIANCE";
    details.expiry_date = lcm::now_utc() + std::chrono::days{365};
    details.features.push_back({"regid.2019-10.com.cisco.CML_NODE_COUNT", "CML - Node Count", "1.0", "IN_USE", 5});
    require(co_await plane.complete_registration(worker.id(), registration.operation_id, std::move(details)),
            "completing registration");

    const auto deregistration =
        require(co_await plane.request_deregistration(worker.id(), "admin"), "requesting deregistration");
    require(co_await plane.start_operation(worker.id(), deregistration.operation_id), "starting deregistration");
    require(co_await plane.complete_deregistration(worker.id(), deregistration.operation_id, std::nullopt),
            "completing deregistration");

    const auto final_state = require(co_await plane.get_worker(worker.id()), "reading the worker");
    std::cout << "final state (public view, tokens redacted):\n"
              << boost::json::serialize(lcm::domain::to_public_json(final_state)) << "\n";
}

} // namespace

int main()
{
    try {
        boost::asio::io_context context;
        memory_repository repository;
        memory_event_sink sink;
        control_plane plane(repository, sink);

        boost::asio::co_spawn(context, run(plane), [](std::exception_ptr error) {
            if (error) {
                std::rethrow_exception(error);
            }
        });
        context.run();

        std::cout << "timeline of worker-1:\n";
        for (const auto& event : sink.events()) {
            const auto& header = lcm::domain::header_of(event);
            std::cout << "  " << lcm::format_timestamp(header.occurred_at) << "  op " << header.operation_id << "  "
                      << lcm::domain::event_type(event) << "\n";
        }
        return EXIT_SUCCESS;
    }
    catch (const std::exception& error) {
        std::cerr << "lcm-demo: " << error.what() << '\n';
        return EXIT_FAILURE;
    }
}
