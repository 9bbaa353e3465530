// Measures the reconciler's cost per key against a plain loop that awaits the same coroutines, and
// prints one JSON object. Run it on an otherwise idle machine; see docs/benchmarks.md.
//
// Usage: lcm-bench-reconciler [--run plain | --run CONCURRENCY,THREADS,METRICS,WINDOW]
// Without arguments it runs the plain loop and every configuration. `--run` runs only the plain
// loop or one configuration (METRICS is 0 or 1), for profilers such as callgrind.
#include <lcm/metrics.hpp>
#include <lcm/reconcile/reconciler.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include "bench_support.hpp"

#include <malloc.h>

#include <algorithm>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

namespace {

using boost::asio::awaitable;
using lcm::reconcile::action;
using clock_type = std::chrono::steady_clock;
using lcm::bench::memory_sample;
using lcm::bench::sample_memory;

constexpr std::size_t key_count = 1'000'000;

std::string make_key(std::size_t index)
{
    // "worker-" and seven digits fit the small-string buffer, like real worker ids of that length.
    char buffer[16] = "worker-";
    const auto end = std::to_chars(buffer + 7, buffer + sizeof buffer, index).ptr;
    return std::string(buffer, end);
}

// A handler whose steps all complete at once, so that the measured time is the framework's.
struct instant_handler {
    std::atomic<std::size_t>* reconciled;
    // Called with the number of reconciles so far, after each one.
    std::function<void(std::size_t)> on_reconciled;

    awaitable<lcm::result<std::vector<std::string>>> list_keys() { co_return std::vector<std::string>{}; }

    awaitable<lcm::result<std::optional<int>>> read_spec(const std::string&) { co_return std::optional<int>(1); }

    awaitable<lcm::result<int>> read_status(const std::string&, const int&) { co_return 2; }

    awaitable<action> reconcile(const std::string&, const int&, const int&)
    {
        const std::size_t count = reconciled->fetch_add(1, std::memory_order_relaxed) + 1;
        if (on_reconciled) {
            on_reconciled(count);
        }
        co_return action::done();
    }
};

double plain_loop_seconds()
{
    boost::asio::io_context context;
    std::atomic<std::size_t> reconciled{0};
    instant_handler handler{&reconciled, {}};
    const auto started = clock_type::now();
    boost::asio::co_spawn(
        context,
        [&]() -> awaitable<void> {
            for (std::size_t i = 0; i < key_count; ++i) {
                const std::string key = make_key(i);
                auto spec = co_await handler.read_spec(key);
                auto status = co_await handler.read_status(key, *spec.value());
                static_cast<void>(co_await handler.reconcile(key, *spec.value(), status.value()));
            }
        },
        boost::asio::detached);
    context.run();
    return std::chrono::duration<double>(clock_type::now() - started).count();
}

struct run_result {
    double enqueue_seconds = 0;
    double total_seconds = 0;
    std::size_t reconciled = 0;
    std::size_t pending = 0;
    memory_sample after;
};

// Enqueues all keys before run(), or, with a window, that many keys at a time: the next window is
// enqueued when the previous one is done, which keeps the queue small enough for the caches.
run_result run_reconciler(std::size_t concurrency, int threads, bool with_metrics, std::size_t window)
{
    run_result result;
    boost::asio::io_context context(threads);
    std::atomic<std::size_t> reconciled{0};
    {
        using reconciler_type = lcm::reconcile::reconciler<int, int>;
        lcm::reconcile::reconciler_options options;
        options.name = "bench";
        options.max_concurrent_reconciles = concurrency;
        options.resync_period = lcm::reconcile::duration::zero();
        if (with_metrics) {
            options.metrics = std::make_shared<lcm::metrics::prometheus_registry>();
        }
        std::unique_ptr<reconciler_type> reconciler;
        auto enqueue_range = [&reconciler](std::size_t first, std::size_t last) {
            for (std::size_t i = first; i < last; ++i) {
                reconciler->enqueue(make_key(i));
            }
        };
        auto on_reconciled = [&](std::size_t count) {
            if (count == key_count) {
                reconciler->request_stop();
            } else if (count % window == 0) {
                enqueue_range(count + window, std::min(count + 2 * window, key_count));
            }
        };
        reconciler = std::make_unique<reconciler_type>(context.get_executor(), instant_handler{&reconciled, on_reconciled},
                                                       options);

        const auto started = clock_type::now();
        // Two windows ahead, so that the next window is queued before the current one runs out.
        enqueue_range(0, std::min(2 * window, key_count));
        result.enqueue_seconds = std::chrono::duration<double>(clock_type::now() - started).count();

        boost::asio::co_spawn(context, reconciler->run(), [&](std::exception_ptr, auto report) {
            result.pending = report.pending.size();
        });
        std::vector<std::thread> helpers;
        for (int i = 1; i < threads; ++i) {
            helpers.emplace_back([&context] { context.run(); });
        }
        context.run();
        for (auto& helper : helpers) {
            helper.join();
        }
        result.total_seconds = std::chrono::duration<double>(clock_type::now() - started).count();
    }
    result.reconciled = reconciled.load();
    result.after = sample_memory();
    return result;
}

struct configuration {
    std::size_t concurrency;
    int threads;
    bool metrics;
    std::size_t window;
};

// Parses "CONCURRENCY,THREADS,METRICS,WINDOW", such as "16,1,1,1000000".
std::optional<configuration> parse_configuration(const char* text)
{
    unsigned long long concurrency = 0;
    int threads = 0;
    int metrics = 0;
    unsigned long long window = 0;
    char end = 0;
    if (std::sscanf(text, "%llu,%d,%d,%llu%c", &concurrency, &threads, &metrics, &window, &end) != 4 ||
        concurrency == 0 || threads < 1 || (metrics != 0 && metrics != 1) || window == 0) {
        return std::nullopt;
    }
    return configuration{concurrency, threads, metrics == 1, window};
}

} // namespace

int main(int argc, char** argv)
{
    std::vector<configuration> configurations = {
        {1, 1, true, key_count},  {16, 1, true, key_count}, {256, 1, true, key_count}, {1, 2, true, key_count},
        {16, 2, true, key_count}, {256, 2, true, key_count}, {16, 1, false, key_count}, {16, 1, true, 1000},
        {16, 2, true, 1000}};
    bool run_plain = true;
    if (argc == 3 && std::strcmp(argv[1], "--run") == 0) {
        if (std::strcmp(argv[2], "plain") == 0) {
            configurations.clear();
        } else if (auto selected = parse_configuration(argv[2])) {
            configurations = {*selected};
            run_plain = false;
        } else {
            std::fprintf(stderr, "invalid configuration '%s': expected CONCURRENCY,THREADS,METRICS,WINDOW "
                                 "with METRICS 0 or 1, such as 16,1,1,1000000\n", argv[2]);
            return 2;
        }
    } else if (argc != 1) {
        std::fprintf(stderr, "usage: %s [--run plain | --run CONCURRENCY,THREADS,METRICS,WINDOW]\n", argv[0]);
        return 2;
    }

    const memory_sample at_start = sample_memory();
    const double plain_seconds = run_plain ? plain_loop_seconds() : 0.0;
    const double plain_ns = plain_seconds * 1e9 / key_count;

    boost::json::array runs;
    std::size_t peak_rss = 0;
    for (const auto& config : configurations) {
        const run_result result = run_reconciler(config.concurrency, config.threads, config.metrics, config.window);
        const double ns_per_key = result.total_seconds * 1e9 / key_count;
        peak_rss = std::max(peak_rss, result.after.peak_rss);
        runs.push_back(boost::json::object{
            {"concurrency", config.concurrency},
            {"threads", config.threads},
            {"metrics", config.metrics},
            {"keys_queued_at_once", std::min(2 * config.window, key_count)},
            {"reconciled", result.reconciled},
            {"pending_at_stop", result.pending},
            {"seconds", result.total_seconds},
            {"enqueue_seconds", result.enqueue_seconds},
            {"reconciles_per_second", key_count / result.total_seconds},
            {"ns_per_key", ns_per_key},
            {"overhead_ns_per_key", run_plain ? boost::json::value(ns_per_key - plain_ns) : nullptr},
            {"ratio_to_plain_loop", run_plain ? boost::json::value(ns_per_key / plain_ns) : nullptr},
            {"heap_in_use_after_bytes", result.after.heap_in_use},
            {"rss_after_bytes", result.after.rss},
        });
    }

    boost::json::value plain_loop = nullptr;
    if (run_plain) {
        plain_loop = boost::json::object{{"seconds", plain_seconds},
                                         {"reconciles_per_second", key_count / plain_seconds},
                                         {"ns_per_key", plain_ns}};
    }
    const memory_sample at_end = sample_memory();
    malloc_trim(0);
    const memory_sample after_trim = sample_memory();
    boost::json::object output{
        {"keys", key_count},
        {"hardware_threads", std::thread::hardware_concurrency()},
        {"plain_loop", std::move(plain_loop)},
        {"runs", std::move(runs)},
        {"memory",
         boost::json::object{{"heap_in_use_at_start_bytes", at_start.heap_in_use},
                             {"heap_in_use_at_end_bytes", at_end.heap_in_use},
                             {"rss_at_start_bytes", at_start.rss},
                             {"rss_at_end_bytes", at_end.rss},
                             {"rss_at_end_after_malloc_trim_bytes", after_trim.rss},
                             {"peak_rss_bytes", peak_rss}}},
    };
    std::printf("%s\n", boost::json::serialize(output).c_str());
    return 0;
}
