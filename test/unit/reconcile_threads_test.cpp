#include "reconcile_test_support.hpp"

#include <lcm/metrics.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <string>
#include <thread>
#include <vector>

using namespace std::chrono_literals;
using namespace reconcile_test;
using boost::asio::awaitable;

namespace {

constexpr int key_count = 2000;

// Keys end in one of three ways, so that done, requeue and retry paths all run concurrently.
awaitable<action> mixed_outcome(const std::string& key, int attempt)
{
    // Suspending lets the other thread run reconciles in between.
    co_await boost::asio::post(co_await boost::asio::this_coro::executor, boost::asio::use_awaitable);
    const int kind = std::stoi(key.substr(1)) % 3;
    if (kind == 1 && attempt == 1) {
        co_return action::requeue_after(0s);
    }
    if (kind == 2 && attempt == 1) {
        co_return action::retry(lcm::errc::unavailable, 0s);
    }
    co_return action::done();
}

} // namespace

TEST_CASE("reconciler on two threads is race free", "[reconcile][threads]")
{
    boost::asio::io_context context;
    auto state = std::make_shared<handler_state>();
    state->behaviour = mixed_outcome;
    auto registry = std::make_shared<lcm::metrics::prometheus_registry>();

    auto options = test_options(8);
    options.metrics = registry;
    options.reconcile_timeout = 1h;
    options.stop_grace_period = 1h;
    lcm::reconcile::reconciler<std::string, std::string> reconciler(context.get_executor(), scripted_handler{state},
                                                                    options);

    std::atomic<bool> producers_done{false};
    auto scenario = [&]() -> awaitable<lcm::reconcile::stop_report<std::string>> {
        using namespace boost::asio::experimental::awaitable_operators;
        auto feed_and_stop = [&]() -> awaitable<void> {
            // Two producer threads outside the io_context enqueue every key, racing the workers.
            std::thread producers[2];
            for (auto& producer : producers) {
                producer = std::thread([&] {
                    for (int i = 0; i < key_count; ++i) {
                        reconciler.enqueue("k" + std::to_string(i));
                    }
                });
            }
            for (auto& producer : producers) {
                producer.join();
            }
            producers_done = true;
            co_await wait_until(
                [&] {
                    static_cast<void>(registry->text());
                    return reconciler.stats().tracked == 0;
                },
                "queue drained", 10'000'000);
        };
        auto result = co_await (reconciler.run() && [&]() -> awaitable<void> {
            co_await feed_and_stop();
            reconciler.request_stop();
        }());
        co_return result;
    };
    auto report = lcm::testing::run_with_timeout(context, scenario(), std::chrono::seconds(120), 2);

    CHECK(producers_done);
    CHECK(report.pending.empty());
    CHECK(report.cancelled == 0);
    std::lock_guard lock(state->mutex);
    CHECK_FALSE(state->same_key_overlap);
    CHECK(state->max_running <= 8);
    CHECK(state->attempts.size() == static_cast<std::size_t>(key_count));
    for (const auto& [key, attempts] : state->attempts) {
        const int kind = std::stoi(key.substr(1)) % 3;
        CHECK(attempts >= (kind == 0 ? 1 : 2));
    }
}
