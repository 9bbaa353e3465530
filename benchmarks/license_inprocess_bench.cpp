// Measures license operations per second through the whole in-process flow: the control plane
// on the in-memory repository, the license controller, and the fake CML with zero registration
// delay. Prints one JSON object; see docs/benchmarks.md.
#include <lcm/application/control_plane.hpp>
#include <lcm/controller/control_plane_client.hpp>
#include <lcm/controller/license_reconciler.hpp>
#include <lcm/storage/memory_repository.hpp>
#include <lcm/testing/fake_cml.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>
#include <boost/program_options.hpp>

#include "bench_support.hpp"

// Under `valgrind --tool=callgrind --instr-atstart=no` only the measured phase is counted.
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#else
#define CALLGRIND_START_INSTRUMENTATION
#define CALLGRIND_STOP_INSTRUMENTATION
#endif

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <string>
#include <thread>
#include <variant>
#include <vector>

namespace {

namespace asio = boost::asio;
using lcm::bench::sample_memory;
using lcm::storage::memory_repository;

/// Counts finished operations and stops the controller when all of them have finished.
struct finish_counter {
    std::atomic<std::size_t> completed{0};
    std::atomic<std::size_t> failed{0};
    std::size_t expected = 0;
    std::function<void()> on_all_finished;

    // Returns void: the sink does no I/O, so the control plane calls it without a coroutine frame.
    void publish(std::vector<lcm::domain::domain_event> events)
    {
        for (const auto& event : events) {
            const bool done = std::holds_alternative<lcm::domain::license_registration_completed>(event);
            const bool fail = std::holds_alternative<lcm::domain::license_registration_failed>(event);
            if (!done && !fail) {
                continue;
            }
            (done ? completed : failed).fetch_add(1, std::memory_order_relaxed);
            if (completed.load(std::memory_order_relaxed) + failed.load(std::memory_order_relaxed) == expected &&
                on_all_finished) {
                on_all_finished();
            }
        }
    }
};

using control_plane_type = lcm::application::control_plane<memory_repository, finish_counter>;
using client_type = lcm::controller::in_process_control_plane_client<memory_repository, finish_counter>;
using controller_type = lcm::controller::license_controller<lcm::testing::fake_cml_client, client_type>;

struct run_result {
    std::size_t workers = 0;
    std::size_t concurrency = 0;
    double seconds = 0;
    std::size_t completed = 0;
    std::size_t failed = 0;
    std::uint64_t accepted_registrations = 0;
    std::size_t rss_before_workers = 0;
    std::size_t rss_with_workers = 0;
    std::size_t heap_before_workers = 0;
    std::size_t heap_with_workers = 0;
};

run_result run_once(std::size_t worker_count, std::size_t concurrency)
{
    run_result result;
    result.workers = worker_count;
    result.concurrency = concurrency;

    asio::io_context context(1);
    memory_repository repository;
    finish_counter counter;
    counter.expected = worker_count;
    control_plane_type plane(repository, counter);
    client_type client(plane);

    lcm::testing::fake_cml cml;
    lcm::testing::fake_cml_client cml_client(cml, {"admin", lcm::secret("fake-cml-password")});

    const auto before = sample_memory();
    result.rss_before_workers = before.rss;
    result.heap_before_workers = before.heap_in_use;

    // Adding workers and requests is setup, not measured.
    asio::co_spawn(
        context,
        [&]() -> asio::awaitable<void> {
            for (std::size_t i = 0; i < worker_count; ++i) {
                const std::string id = "worker-" + std::to_string(i);
                lcm::application::add_worker_request request{id, id, "http://127.0.0.1:9/instances/" + id,
                                                             lcm::domain::worker_status::running, "bench"};
                auto added = co_await plane.add_worker(std::move(request));
                if (!added) {
                    throw std::runtime_error("adding a worker failed: " + added.error().message());
                }
                auto accepted = co_await plane.request_registration(id, lcm::secret("BENCH-TOKEN-" + std::to_string(i)),
                                                                    false, "bench");
                if (!accepted) {
                    throw std::runtime_error("requesting a registration failed: " + accepted.error().message());
                }
            }
        },
        asio::detached);
    context.run();
    context.restart();

    const auto with_workers = sample_memory();
    result.rss_with_workers = with_workers.rss;
    result.heap_with_workers = with_workers.heap_in_use;

    // The fake CML hosts exist before the controller calls them, as real ones do. They are
    // created after the memory sample, which counts lcm's memory per worker only.
    for (std::size_t i = 0; i < worker_count; ++i) {
        cml.instance("worker-" + std::to_string(i));
    }

    lcm::controller::license_controller_options options;
    options.watch_changes = false;
    options.license.list_limit = worker_count;
    options.reconciler.max_concurrent_reconciles = concurrency;
    options.reconciler.resync_period = std::chrono::hours(1);
    controller_type controller(context.get_executor(), cml_client, client, options);
    counter.on_all_finished = [&] { controller.request_stop(); };

    const auto started = std::chrono::steady_clock::now();
    asio::co_spawn(context, controller.run(), asio::detached);
    CALLGRIND_START_INSTRUMENTATION;
    context.run();
    CALLGRIND_STOP_INSTRUMENTATION;
    result.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();

    result.completed = counter.completed.load();
    result.failed = counter.failed.load();
    result.accepted_registrations = cml.total_counters().accepted_registrations;
    return result;
}

double operations_of(const run_result& result) { return static_cast<double>(result.completed + result.failed); }

double per_worker(std::size_t before, std::size_t after, std::size_t workers)
{
    return (static_cast<double>(after) - static_cast<double>(before)) / static_cast<double>(workers);
}

// The median of the repetitions of one configuration, with the fastest and slowest of them.
boost::json::object to_json(std::vector<run_result> samples)
{
    std::sort(samples.begin(), samples.end(),
              [](const run_result& a, const run_result& b) { return a.seconds < b.seconds; });
    const run_result& median = samples[samples.size() / 2];
    const double operations = operations_of(median);
    return {{"workers", median.workers},
            {"concurrency", median.concurrency},
            {"threads", 1},
            {"repetitions", samples.size()},
            {"seconds", median.seconds},
            {"operations_completed", median.completed},
            {"operations_failed", median.failed},
            {"cml_accepted_registrations", median.accepted_registrations},
            {"operations_per_second", operations / median.seconds},
            {"microseconds_per_operation", median.seconds * 1e6 / operations},
            {"fastest_operations_per_second", operations_of(samples.front()) / samples.front().seconds},
            {"slowest_operations_per_second", operations_of(samples.back()) / samples.back().seconds},
            {"heap_bytes_per_worker",
             per_worker(median.heap_before_workers, median.heap_with_workers, median.workers)}};
}

} // namespace

int main(int argc, char** argv)
{
    namespace po = boost::program_options;
    po::options_description description("lcm-bench-license-inprocess: license operations per second in one process\n"
                                        "Options");
    description.add_options()("help", "print this help and exit")(
        "workers", po::value<long long>()->default_value(100'000), "workers with a pending registration, 1 to 10000000")(
        "concurrency", po::value<std::vector<long long>>()->multitoken()->default_value({16, 256}, "16 256"),
        "reconciler concurrency limits to measure, each 1 to 100000")(
        "repetitions", po::value<long long>()->default_value(5),
        "timed runs of each concurrency limit, 1 to 1000; the output gives their median")(
        "no-warm-up", "skip the untimed first run, for example under a profiler; \"first_run\" then "
                      "reports the first timed run");
    po::variables_map arguments;
    try {
        po::store(po::parse_command_line(argc, argv, description), arguments);
        po::notify(arguments);
    }
    catch (const po::error& error) {
        std::cerr << "lcm-bench-license-inprocess: " << error.what() << "\n" << description;
        return 2;
    }
    if (arguments.count("help")) {
        std::cout << description;
        return 0;
    }

    // Read as signed numbers, because an unsigned option takes "-5" as a huge count.
    // Prints which option is out of range, and returns false for it.
    const auto in_range = [](const char* option, long long value, long long max) {
        if (value >= 1 && value <= max) {
            return true;
        }
        std::cerr << "lcm-bench-license-inprocess: invalid --" << option << " " << value << ": it must be 1 to "
                  << max << "\n";
        return false;
    };
    const auto worker_count = arguments["workers"].as<long long>();
    const auto concurrency_limits = arguments["concurrency"].as<std::vector<long long>>();
    const auto repetition_count = arguments["repetitions"].as<long long>();
    bool valid = in_range("workers", worker_count, 10'000'000) && in_range("repetitions", repetition_count, 1'000);
    for (const auto limit : concurrency_limits) {
        valid = valid && in_range("concurrency", limit, 100'000);
    }
    if (!valid) {
        return 2;
    }
    const auto workers = static_cast<std::size_t>(worker_count);
    const std::vector<std::size_t> concurrencies(concurrency_limits.begin(), concurrency_limits.end());
    const auto repetitions = static_cast<std::size_t>(repetition_count);
    const bool warm_up = !arguments.count("no-warm-up");

    // The first run of a process faults in about 70 MB of fresh pages, which a long-running
    // control plane does once, so an untimed first run keeps that cost out of the medians. Its
    // figures, with the only valid resident memory per worker, are printed as "first_run".
    std::vector<std::vector<run_result>> samples(concurrencies.size());
    std::optional<run_result> first_run;
    if (warm_up) {
        first_run = run_once(workers, concurrencies.front());
    }
    for (std::size_t repetition = 0; repetition < repetitions; ++repetition) {
        for (std::size_t i = 0; i < concurrencies.size(); ++i) {
            samples[i].push_back(run_once(workers, concurrencies[i]));
            if (!first_run) {
                first_run = samples[i].back();
            }
        }
    }

    boost::json::array runs;
    for (auto& configuration : samples) {
        runs.push_back(to_json(std::move(configuration)));
    }
    const run_result& first = *first_run;
    boost::json::object report{
        {"benchmark", "license-inprocess"},
        {"cml_registration_delay_ms", 0},
        {"hardware_threads", std::thread::hardware_concurrency()},
        {"warm_up_run", warm_up},
        {"first_run",
         {{"concurrency", first.concurrency},
          {"seconds", first.seconds},
          {"operations_per_second", operations_of(first) / first.seconds},
          {"heap_bytes_per_worker", per_worker(first.heap_before_workers, first.heap_with_workers, first.workers)},
          {"rss_bytes_per_worker", per_worker(first.rss_before_workers, first.rss_with_workers, first.workers)}}},
        {"runs", std::move(runs)}};
    std::cout << boost::json::serialize(report) << "\n";
    return 0;
}
