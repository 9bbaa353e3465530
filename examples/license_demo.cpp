// Runs the whole license flow in one process: the control plane (in memory), a license
// worker-controller, and a fake CML host per worker. It registers licenses on three workers,
// one of them with a token that CML rejects, deregisters the licenses that registered, and
// prints each worker's timeline of domain events.
#include <lcm/application/control_plane.hpp>
#include <lcm/controller/control_plane_client.hpp>
#include <lcm/controller/license_reconciler.hpp>
#include <lcm/domain/json.hpp>
#include <lcm/storage/memory_repository.hpp>
#include <lcm/testing/fake_cml.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/program_options.hpp>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <exception>
#include <iostream>
#include <map>
#include <string>
#include <vector>

namespace {

namespace asio = boost::asio;
using lcm::application::memory_event_sink;
using lcm::storage::memory_repository;
using control_plane_type = lcm::application::control_plane<memory_repository, memory_event_sink>;
using client_type = lcm::controller::in_process_control_plane_client<memory_repository, memory_event_sink>;
using controller_type = lcm::controller::license_controller<lcm::testing::fake_cml_client, client_type>;

struct demo_worker {
    std::string id;
    std::string token;
};

/// Ends the program with a message when a step of the demo fails; the demo has no recovery.
template <class T>
T require(lcm::result<T> outcome, const std::string& step)
{
    if (!outcome) {
        throw std::runtime_error(step + " failed: " + outcome.error().message());
    }
    return std::move(outcome).value();
}

/// Waits until no worker has a pending license operation.
asio::awaitable<void> wait_until_settled(memory_repository& repository)
{
    auto seen = repository.change_sequence();
    while (repository.pending_count() > 0) {
        seen = require(co_await repository.wait_for_change(seen), "waiting for the controller");
    }
}

asio::awaitable<void> run_flow(control_plane_type& plane, controller_type& controller,
                               const std::vector<demo_worker>& workers)
{
    for (const auto& worker : workers) {
        lcm::application::add_worker_request request{worker.id, "demo " + worker.id,
                                                     "http://127.0.0.1:9/instances/" + worker.id,
                                                     lcm::domain::worker_status::running, "demo-admin"};
        require(co_await plane.add_worker(std::move(request)), "adding " + worker.id);
    }

    std::cout << "requesting license registrations (the control plane answers at once)\n";
    for (const auto& worker : workers) {
        auto accepted =
            require(co_await plane.request_registration(worker.id, lcm::secret(worker.token), false, "demo-admin"),
                    "requesting registration on " + worker.id);
        std::cout << "  " << worker.id << ": accepted as operation " << accepted.operation_id << "\n";
    }
    co_await wait_until_settled(plane.repository());

    std::cout << "requesting deregistration of the registered licenses\n";
    for (const auto& worker : workers) {
        auto stored = require(co_await plane.get_worker(worker.id), "reading " + worker.id);
        if (stored.license().status() != lcm::domain::license_status::registered) {
            continue;
        }
        auto accepted = require(co_await plane.request_deregistration(worker.id, "demo-admin"),
                                "requesting deregistration on " + worker.id);
        std::cout << "  " << worker.id << ": accepted as operation " << accepted.operation_id << "\n";
    }
    co_await wait_until_settled(plane.repository());
    controller.request_stop();
}

void print_timelines(const memory_event_sink& sink, const std::vector<demo_worker>& workers)
{
    std::map<std::string, std::vector<lcm::domain::domain_event>> by_worker;
    for (auto& event : sink.events()) {
        by_worker[lcm::domain::header_of(event).worker_id].push_back(event);
    }
    for (const auto& worker : workers) {
        std::cout << "\ntimeline of " << worker.id << ":\n";
        const auto first = lcm::domain::header_of(by_worker[worker.id].front()).occurred_at;
        for (const auto& event : by_worker[worker.id]) {
            const auto& header = lcm::domain::header_of(event);
            const auto offset = std::chrono::duration_cast<std::chrono::milliseconds>(header.occurred_at - first);
            std::cout << "  +" << offset.count() << " ms  op " << header.operation_id << "  "
                      << lcm::domain::event_type(event);
            if (const auto* failed = std::get_if<lcm::domain::license_registration_failed>(&event)) {
                std::cout << "  (" << failed->error.code << ": " << failed->error.message << ")";
            }
            std::cout << "\n";
        }
    }
}

} // namespace

int main(int argc, char** argv)
{
    namespace po = boost::program_options;
    po::options_description description("lcm-demo: the license flow in one process\nOptions");
    description.add_options()("help", "print this help and exit")(
        "registration-delay-ms", po::value<int>()->default_value(300),
        "time the fake CML takes to finish a registration, in milliseconds")(
        "poll-interval-ms", po::value<int>()->default_value(100),
        "how often the controller reads CML's status while a registration runs, in milliseconds");

    po::variables_map arguments;
    try {
        po::store(po::parse_command_line(argc, argv, description), arguments);
        po::notify(arguments);
    }
    catch (const po::error& error) {
        std::cerr << "lcm-demo: " << error.what() << "\n" << description;
        return 2;
    }
    if (arguments.count("help")) {
        std::cout << description;
        return EXIT_SUCCESS;
    }
    if (arguments["registration-delay-ms"].as<int>() < 0) {
        std::cerr << "lcm-demo: invalid --registration-delay-ms " << arguments["registration-delay-ms"].as<int>()
                  << ": expected 0 or more\n";
        return 2;
    }
    if (arguments["poll-interval-ms"].as<int>() <= 0) {
        std::cerr << "lcm-demo: invalid --poll-interval-ms " << arguments["poll-interval-ms"].as<int>()
                  << ": expected 1 or more\n";
        return 2;
    }

    try {
        const std::vector<demo_worker> workers = {
            {"worker-1", "DEMO-TOKEN-0123456789"},
            {"worker-2", "DEMO-TOKEN-9876543210"},
            {"worker-3", "REVOKED-TOKEN-55555"},
        };

        asio::io_context context;
        memory_repository repository;
        memory_event_sink sink;
        control_plane_type plane(repository, sink);
        client_type client(plane);

        lcm::testing::fake_cml_options cml_options;
        cml_options.registration_delay = std::chrono::milliseconds(arguments["registration-delay-ms"].as<int>());
        cml_options.token_rejected = [](const lcm::secret& token) { return token.reveal().starts_with("REVOKED"); };
        lcm::testing::fake_cml cml(cml_options);
        lcm::testing::fake_cml_client cml_client(cml, {"admin", lcm::secret("fake-cml-password")});

        lcm::controller::license_controller_options options;
        options.license.poll_interval = std::chrono::milliseconds(arguments["poll-interval-ms"].as<int>());
        // The lease must be more than twice the poll interval, also for long intervals.
        options.license.lease = std::max(options.license.lease, 3 * options.license.poll_interval);
        controller_type controller(context.get_executor(), cml_client, client, options);

        std::exception_ptr failure;
        asio::co_spawn(context, controller.run(), [](std::exception_ptr, auto&&...) {});
        asio::co_spawn(context, run_flow(plane, controller, workers), [&](std::exception_ptr error) {
            failure = error;
            controller.request_stop();
        });
        context.run();
        if (failure) {
            std::rethrow_exception(failure);
        }

        print_timelines(sink, workers);
        std::cout << "\nCML accepted " << cml.total_counters().accepted_registrations << " registration requests for "
                  << workers.size() << " workers. It accepts a request before it checks the token, so a\n"
                  << "rejected token counts too; the timelines above show how each registration ended.\n";
        return EXIT_SUCCESS;
    }
    catch (const std::exception& error) {
        std::cerr << "lcm-demo: " << error.what() << '\n';
        return EXIT_FAILURE;
    }
}
