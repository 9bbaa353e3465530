#include <lcm/error.hpp>
#include <lcm/reconcile/work_queue.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using lcm::reconcile::action;
using lcm::reconcile::duration;
using lcm::reconcile::finish_result;
using lcm::reconcile::time_point;
using queue_type = lcm::reconcile::work_queue<std::string>;

namespace {

const time_point start = time_point(1h);

lcm::reconcile::work_queue_options fixed_options()
{
    lcm::reconcile::work_queue_options options;
    options.backoff = {100ms, 10s};
    options.jitter_seed = 42;
    return options;
}

std::vector<std::string> pop_all(queue_type& queue, time_point now, std::vector<queue_type::lease>& leases)
{
    std::vector<std::string> keys;
    while (auto item = queue.pop(now)) {
        keys.push_back(item->key());
        leases.push_back(*item);
    }
    return keys;
}

boost::system::error_code unavailable() { return lcm::errc::unavailable; }

} // namespace

TEST_CASE("work queue deduplicates queued keys", "[reconcile]")
{
    queue_type queue(fixed_options());

    CHECK(queue.add("a", start));
    CHECK_FALSE(queue.add("a", start));
    CHECK(queue.add("b", start));
    CHECK(queue.stats().ready == 2);

    std::vector<queue_type::lease> leases;
    CHECK(pop_all(queue, start, leases) == std::vector<std::string>{"a", "b"});
}

TEST_CASE("work queue reruns key added while running", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    auto first = queue.pop(start);
    REQUIRE(first);

    // A running key is never handed out twice, however often it is added.
    CHECK(queue.add("a", start));
    CHECK_FALSE(queue.add("a", start));
    CHECK_FALSE(queue.pop(start));
    CHECK(queue.stats().running == 1);

    const finish_result result = queue.finish(*first, action::done(), start + 1s);
    CHECK(result.next == finish_result::placement::ready);
    auto second = queue.pop(start + 1s);
    REQUIRE(second);
    CHECK(second->key() == "a");
    queue.finish(*second, action::done(), start + 2s);
    CHECK(queue.stats().tracked == 0);
}

TEST_CASE("work queue keeps earliest requested time", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add_after("a", 10s, start);
    CHECK_FALSE(queue.add_after("a", 20s, start));
    CHECK(queue.next_due() == start + 10s);
    CHECK(queue.add_after("a", 5s, start));
    CHECK(queue.next_due() == start + 5s);
    CHECK(queue.stats().delayed == 1);

    CHECK_FALSE(queue.pop(start + 4s));
    auto item = queue.pop(start + 5s);
    REQUIRE(item);
    CHECK(item->key() == "a");
    CHECK(queue.stats().delayed == 0);

    // An immediate add of a delayed key wins over its delay.
    queue.finish(*item, action::requeue_after(1h), start + 5s);
    CHECK(queue.stats().delayed == 1);
    CHECK(queue.add("a", start + 6s));
    CHECK(queue.stats().delayed == 0);
    CHECK(queue.stats().ready == 1);
    CHECK_FALSE(queue.next_due());
}

TEST_CASE("work queue merges rerun into requeue", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    auto item = queue.pop(start);
    REQUIRE(item);
    queue.add_after("a", 3s, start);

    // The reconcile asks for 10 s, the request made while it ran for 3 s: 3 s wins.
    const finish_result result = queue.finish(*item, action::requeue_after(10s), start);
    CHECK(result.next == finish_result::placement::delayed);
    CHECK(result.due == start + 3s);
}

TEST_CASE("work queue requeues after delay", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    auto item = queue.pop(start);
    REQUIRE(item);

    const finish_result result = queue.finish(*item, action::requeue_after(30s), start);
    CHECK(result.next == finish_result::placement::delayed);
    CHECK(result.due == start + 30s);
    CHECK_FALSE(result.retry_scheduled);
    CHECK(queue.stats().running == 0);
    CHECK_FALSE(queue.pop(start + 29s));

    auto again = queue.pop(start + 31s);
    REQUIRE(again);
    // The queue time counts from the due time, not from the requeue.
    CHECK(again->queue_time() == 1s);
}

TEST_CASE("backoff grows within jitter bounds", "[reconcile]")
{
    const lcm::reconcile::backoff_policy policy{100ms, 10s};
    CHECK(policy.window(0) == 0ms);
    CHECK(policy.window(1) == 100ms);
    CHECK(policy.window(2) == 200ms);
    CHECK(policy.window(5) == 1600ms);
    CHECK(policy.window(8) == 10s);
    CHECK(policy.window(1000) == 10s);
    CHECK(policy.window(UINT32_MAX) == 10s);

    // Each retry delay lies in [0, window(failures)], and across many keys the delays fill the
    // window instead of sitting at its top: that is the full jitter.
    queue_type queue(fixed_options());
    constexpr int keys = 200;
    for (int failures = 1; failures <= 9; ++failures) {
        duration longest{};
        duration shortest = duration::max();
        for (int i = 0; i < keys; ++i) {
            const std::string key = "k" + std::to_string(i);
            if (failures == 1) {
                queue.add(key, start);
            }
        }
        const time_point now = start + std::chrono::hours(failures);
        std::vector<queue_type::lease> leases;
        pop_all(queue, now, leases);
        REQUIRE(leases.size() == keys);
        for (const auto& item : leases) {
            CHECK(item.previous_failures() == static_cast<std::uint32_t>(failures - 1));
            const finish_result result = queue.finish(item, action::retry(unavailable()), now);
            CHECK(result.retry_scheduled);
            CHECK(result.failures == static_cast<std::uint32_t>(failures));
            const duration delay = result.due - now;
            CHECK(delay >= 0ms);
            CHECK(delay <= policy.window(static_cast<std::uint32_t>(failures)));
            longest = std::max(longest, delay);
            shortest = std::min(shortest, delay);
        }
        CHECK(longest > policy.window(static_cast<std::uint32_t>(failures)) * 3 / 4);
        CHECK(shortest < policy.window(static_cast<std::uint32_t>(failures)) / 4);
    }
}

TEST_CASE("backoff resets after success", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    time_point now = start;
    for (int i = 0; i < 5; ++i) {
        auto item = queue.pop(now);
        REQUIRE(item);
        now = queue.finish(*item, action::retry(unavailable()), now).due;
    }
    auto item = queue.pop(now);
    REQUIRE(item);
    CHECK(item->previous_failures() == 5);

    // A requeue is a success too: the next failure starts the backoff again at its first window.
    queue.finish(*item, action::requeue_after(1s), now);
    CHECK(queue.stats().tracked == 1);
    item = queue.pop(now + 1s);
    REQUIRE(item);
    CHECK(item->previous_failures() == 0);
    const finish_result result = queue.finish(*item, action::retry(unavailable()), now + 1s);
    CHECK(result.failures == 1);
    CHECK(result.due - (now + 1s) <= 100ms);

    // Success forgets the key, so no failure count outlives it.
    item = queue.pop(result.due);
    REQUIRE(item);
    queue.finish(*item, action::done(), result.due);
    CHECK(queue.stats().tracked == 0);
}

TEST_CASE("backoff counts only attempts that ran", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    auto item = queue.pop(start);
    REQUIRE(item);
    const finish_result failed = queue.finish(*item, action::retry(unavailable()), start);
    REQUIRE(failed.next == finish_result::placement::delayed);

    // Adds while the key waits for its retry are merged; they are not failures.
    for (int i = 0; i < 10; ++i) {
        queue.add_after("a", 1h, start);
    }
    item = queue.pop(failed.due);
    REQUIRE(item);
    CHECK(item->previous_failures() == 1);
    CHECK(queue.finish(*item, action::retry(unavailable()), failed.due).failures == 2);
}

TEST_CASE("retry-after hint replaces backoff", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    auto item = queue.pop(start);
    REQUIRE(item);

    const finish_result result = queue.finish(*item, action::retry(unavailable(), 42s), start);
    CHECK(result.retry_scheduled);
    CHECK(result.due == start + 42s);
    CHECK(result.failures == 1);
}

TEST_CASE("retry deadline gives up on key", "[reconcile]")
{
    auto options = fixed_options();
    options.retry_deadline = 1s;
    options.backoff = {400ms, 400ms};
    queue_type queue(options);
    queue.add("a", start);

    time_point now = start;
    finish_result result;
    int attempts = 0;
    while (auto item = queue.pop(now)) {
        ++attempts;
        result = queue.finish(*item, action::retry(unavailable()), now);
        if (result.gave_up) {
            break;
        }
        CHECK(result.due <= start + 1s);
        now = result.due;
        REQUIRE(attempts < 100);
    }
    CHECK(result.gave_up);
    CHECK(result.deadline_exceeded);
    CHECK(now == start + 1s);
    CHECK(result.failures == static_cast<std::uint32_t>(attempts));
    CHECK(result.next == finish_result::placement::forgotten);
    CHECK(queue.stats().tracked == 0);
}

TEST_CASE("terminal error forgets key", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    auto item = queue.pop(start);
    REQUIRE(item);
    const finish_result result = queue.finish(*item, action::terminal_error(lcm::errc::invalid_token), start);
    CHECK(result.gave_up);
    CHECK_FALSE(result.deadline_exceeded);
    CHECK(result.failures == 1);
    CHECK(queue.stats().tracked == 0);
}

TEST_CASE("huge durations are clamped", "[reconcile]")
{
    auto options = fixed_options();
    options.max_delay = 24h;
    queue_type queue(options);

    CHECK(lcm::reconcile::saturating_duration(std::chrono::hours::max()) == duration::max());
    CHECK(lcm::reconcile::saturating_duration(std::chrono::hours::min()) == duration::min());
    CHECK(lcm::reconcile::saturating_duration(std::chrono::duration<double>(1e300)) == duration::max());
    CHECK(lcm::reconcile::saturating_duration(std::chrono::duration<double>(std::nan(""))) == duration::zero());
    CHECK(lcm::reconcile::saturating_duration(std::chrono::milliseconds(1500)) == 1500ms);

    queue.add("a", start);
    queue.add("b", start);
    queue.add("c", start);
    auto a = queue.pop(start);
    auto b = queue.pop(start);
    auto c = queue.pop(start);
    REQUIRE(a);
    REQUIRE(b);
    REQUIRE(c);
    CHECK(queue.finish(*a, action::requeue_after(std::chrono::years::max()), start).due == start + 24h);
    CHECK(queue.finish(*b, action::retry(unavailable(), std::chrono::hours::max()), start).due == start + 24h);
    // A negative delay means now.
    CHECK(queue.finish(*c, action::requeue_after(-5s), start).next == finish_result::placement::ready);

    queue.add_after("d", duration::max(), time_point::max() - 1s);
    CHECK(queue.next_due() == start + 24h);
}

TEST_CASE("failing key does not starve others", "[reconcile]")
{
    auto options = fixed_options();
    options.backoff = {0ms, 0ms};
    queue_type queue(options);
    queue.add("bad", start);
    for (int i = 0; i < 5; ++i) {
        queue.add("good" + std::to_string(i), start);
    }

    // The failing key retries at once, yet goes to the back each time, so every other key runs
    // before its second attempt.
    std::vector<std::string> order;
    for (int i = 0; i < 7; ++i) {
        auto item = queue.pop(start);
        REQUIRE(item);
        order.push_back(item->key());
        queue.finish(*item, item->key() == "bad" ? action::retry(unavailable()) : action::done(), start);
    }
    CHECK(order == std::vector<std::string>{"bad", "good0", "good1", "good2", "good3", "good4", "bad"});
}

TEST_CASE("resync add skips tracked keys", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("a", start);
    auto item = queue.pop(start);
    REQUIRE(item);
    queue.finish(*item, action::retry(unavailable()), start);

    CHECK_FALSE(queue.add_if_idle("a", start));
    CHECK(queue.stats().delayed == 1);
    CHECK(queue.add_if_idle("b", start));
    CHECK(queue.stats().ready == 1);
}

TEST_CASE("take pending returns every waiting key", "[reconcile]")
{
    queue_type queue(fixed_options());
    queue.add("running", start);
    auto running = queue.pop(start);
    REQUIRE(running);
    queue.add_after("late", 20s, start);
    queue.add_after("soon", 10s, start);
    queue.add("ready", start);

    CHECK(queue.take_pending() == std::vector<std::string>{"ready", "soon", "late"});
    CHECK(queue.stats().tracked == 1);

    queue.add("running", start);
    queue.finish(*running, action::done(), start);
    CHECK(queue.take_pending() == std::vector<std::string>{"running"});
    CHECK(queue.stats().tracked == 0);
}
