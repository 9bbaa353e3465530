#include <lcm/metrics.hpp>

#include <catch2/catch.hpp>

#include <cmath>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

TEST_CASE("counter renders in text format", "[metrics]")
{
    lcm::metrics::prometheus_registry registry;
    auto counter = registry.get_counter("requests_total", "Requests handled", {{"route", "/health"}});
    counter->increment();
    counter->increment(2.5);
    counter->increment(-1);
    counter->increment(std::nan(""));

    CHECK(registry.text() == "# HELP requests_total Requests handled\n"
                             "# TYPE requests_total counter\n"
                             "requests_total{route=\"/health\"} 3.5\n");
}

TEST_CASE("gauge sets and adds", "[metrics]")
{
    lcm::metrics::prometheus_registry registry;
    auto gauge = registry.get_gauge("queue_depth", "Depth", {});
    gauge->set(5);
    gauge->add(-2);

    CHECK(registry.text() == "# HELP queue_depth Depth\n# TYPE queue_depth gauge\nqueue_depth 3\n");
}

TEST_CASE("histogram renders cumulative buckets", "[metrics]")
{
    lcm::metrics::prometheus_registry registry;
    const double bounds[] = {0.1, 1};
    auto histogram = registry.get_histogram("latency_seconds", "Latency", {{"op", "get"}}, bounds);
    histogram->observe(0.05);
    histogram->observe(0.1);
    histogram->observe(0.5);
    histogram->observe(7);

    CHECK(registry.text() == "# HELP latency_seconds Latency\n"
                             "# TYPE latency_seconds histogram\n"
                             "latency_seconds_bucket{op=\"get\",le=\"0.1\"} 2\n"
                             "latency_seconds_bucket{op=\"get\",le=\"1\"} 3\n"
                             "latency_seconds_bucket{op=\"get\",le=\"+Inf\"} 4\n"
                             "latency_seconds_sum{op=\"get\"} 7.65\n"
                             "latency_seconds_count{op=\"get\"} 4\n");
}

TEST_CASE("label values and help are escaped", "[metrics]")
{
    lcm::metrics::prometheus_registry registry;
    registry.get_counter("odd_total", "Line one\nback\\slash", {{"value", "a\"b\\c\nd"}})->increment();

    CHECK(registry.text() == "# HELP odd_total Line one\\nback\\\\slash\n"
                             "# TYPE odd_total counter\n"
                             "odd_total{value=\"a\\\"b\\\\c\\nd\"} 1\n");
}

TEST_CASE("same series is shared", "[metrics]")
{
    lcm::metrics::prometheus_registry registry;
    auto first = registry.get_counter("shared_total", "Shared", {{"controller", "license"}});
    auto second = registry.get_counter("shared_total", "Shared", {{"controller", "license"}});
    auto other = registry.get_counter("shared_total", "Shared", {{"controller", "instance"}});
    first->increment();
    second->increment();
    other->increment();

    CHECK(registry.text() == "# HELP shared_total Shared\n"
                             "# TYPE shared_total counter\n"
                             "shared_total{controller=\"instance\"} 1\n"
                             "shared_total{controller=\"license\"} 2\n");
}

TEST_CASE("invalid metric definitions are rejected", "[metrics]")
{
    lcm::metrics::prometheus_registry registry;
    registry.get_counter("taken_total", "Taken", {{"a", "1"}});
    const double unsorted[] = {2, 1};

    CHECK_THROWS_AS(registry.get_gauge("taken_total", "Taken", {{"a", "1"}}), std::invalid_argument);
    CHECK_THROWS_AS(registry.get_counter("taken_total", "Taken", {{"b", "1"}}), std::invalid_argument);
    CHECK_THROWS_AS(registry.get_counter("1bad", "Bad", {}), std::invalid_argument);
    CHECK_THROWS_AS(registry.get_counter("bad-name", "Bad", {}), std::invalid_argument);
    CHECK_THROWS_AS(registry.get_counter("ok_total", "Ok", {{"__reserved", "1"}}), std::invalid_argument);
    CHECK_THROWS_AS(registry.get_histogram("h", "H", {}, unsorted), std::invalid_argument);
    CHECK_THROWS_AS(registry.get_histogram("h2", "H", {{"le", "1"}}, {}), std::invalid_argument);
}

TEST_CASE("counter is safe across threads", "[metrics][threads]")
{
    lcm::metrics::prometheus_registry registry;
    auto counter = registry.get_counter("parallel_total", "Parallel", {});
    std::vector<std::thread> threads;
    for (int t = 0; t < 4; ++t) {
        threads.emplace_back([&] {
            for (int i = 0; i < 10000; ++i) {
                counter->increment();
                static_cast<void>(registry.text().size());
            }
        });
    }
    for (auto& thread : threads) {
        thread.join();
    }
    CHECK(registry.text() == "# HELP parallel_total Parallel\n# TYPE parallel_total counter\nparallel_total 40000\n");
}

TEST_CASE("null registry discards updates", "[metrics]")
{
    lcm::metrics::null_registry registry;
    registry.get_counter("x_total", "X", {})->increment();
    registry.get_gauge("x", "X", {})->set(1);
    registry.get_histogram("x_seconds", "X", {}, {})->observe(1);
    SUCCEED("no effect and no exception");
}
