#include "reconcile_test_support.hpp"

#include <lcm/metrics.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

using namespace std::chrono_literals;
using namespace reconcile_test;
using boost::asio::awaitable;
using strings = std::vector<std::string>;

namespace {

boost::system::error_code unavailable() { return lcm::errc::unavailable; }

// Each test owns an io_context, a manual clock and a handler state.
struct fixture {
    boost::asio::io_context context;
    manual_clock clock;
    std::shared_ptr<handler_state> state = std::make_shared<handler_state>();

    test_reconciler make(lcm::reconcile::reconciler_options options)
    {
        return test_reconciler(context.get_executor(), scripted_handler{state}, std::move(options), clock);
    }

    void set_behaviour(handler_state::behaviour_type behaviour)
    {
        std::lock_guard lock(state->mutex);
        state->behaviour = std::move(behaviour);
    }

    lcm::reconcile::stop_report<std::string> run(test_reconciler& reconciler, awaitable<void> body)
    {
        return lcm::testing::run_with_timeout(context, run_scenario(reconciler, std::move(body)));
    }
};

} // namespace

TEST_CASE("reconciler deduplicates enqueued keys", "[reconcile]")
{
    fixture f;
    auto reconciler = f.make(test_options());
    CHECK(reconciler.enqueue("a"));
    CHECK(reconciler.enqueue("a"));
    CHECK(reconciler.enqueue("b"));
    CHECK(reconciler.enqueue("a"));

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "two reconciles");
        co_await settle();
    }());

    CHECK(f.state->started_keys() == strings{"a", "b"});
    CHECK(report.pending.empty());
    CHECK(reconciler.stats().tracked == 0);
}

TEST_CASE("reconciler never runs one key twice", "[reconcile]")
{
    fixture f;
    f.set_behaviour([&](const std::string&, int) -> awaitable<action> {
        co_await simulated_work(f.clock, 10s);
        co_return action::done();
    });
    auto reconciler = f.make(test_options(4));
    reconciler.enqueue("a");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->running_count() == 1; }, "first reconcile started");
        // Enqueued while running: it runs once more afterwards, not in parallel, however often it is enqueued.
        reconciler.enqueue("a");
        reconciler.enqueue("a");
        co_await settle();
        CHECK(f.state->running_count() == 1);
        CHECK(reconciler.stats().running == 1);

        f.clock.advance(10s);
        co_await wait_until([&] { return f.state->finished_count() == 1 && f.state->running_count() == 1; },
                            "second reconcile started");
        f.clock.advance(10s);
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "second reconcile finished");
        co_await settle();
    }());

    CHECK(f.state->started_keys() == strings{"a", "a"});
    CHECK_FALSE(f.state->same_key_overlap);
    CHECK(f.state->max_running == 1);
    CHECK(report.pending.empty());
}

TEST_CASE("reconciler respects concurrency limit", "[reconcile]")
{
    fixture f;
    f.set_behaviour([&](const std::string&, int) -> awaitable<action> {
        co_await simulated_work(f.clock, 10s);
        co_return action::done();
    });
    auto reconciler = f.make(test_options(3));
    for (int i = 0; i < 10; ++i) {
        reconciler.enqueue("key" + std::to_string(i));
    }

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        for (std::size_t round = 1; round <= 4; ++round) {
            co_await settle();
            CHECK(f.state->running_count() == std::min<std::size_t>(3, 10 - 3 * (round - 1)));
            CHECK(reconciler.stats().ready == 10 - std::min<std::size_t>(10, 3 * round));
            f.clock.advance(10s);
        }
        co_await wait_until([&] { return f.state->finished_count() == 10; }, "all reconciles finished");
    }());

    CHECK(f.state->max_running == 3);
    CHECK(f.state->started_keys().size() == 10);
    CHECK(report.pending.empty());
}

TEST_CASE("active workers gauge counts busy workers", "[reconcile]")
{
    fixture f;
    f.set_behaviour([&](const std::string&, int) -> awaitable<action> {
        co_await simulated_work(f.clock, 10s);
        co_return action::done();
    });
    auto registry = std::make_shared<lcm::metrics::prometheus_registry>();
    auto options = test_options(3);
    options.metrics = registry;
    auto reconciler = f.make(options);
    for (int i = 0; i < 4; ++i) {
        reconciler.enqueue("key" + std::to_string(i));
    }
    const auto active_is = [&](int count) {
        return registry->text().find("controller_runtime_active_workers{controller=\"test\"} " +
                                     std::to_string(count) + "\n") != std::string::npos;
    };

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await settle();
        CHECK(active_is(3));
        // One worker goes on to the fourth key at once; the other two find no work.
        f.clock.advance(10s);
        co_await wait_until([&] { return f.state->finished_count() == 3; }, "first three reconciles");
        co_await settle();
        CHECK(active_is(1));
        f.clock.advance(10s);
        co_await wait_until([&] { return f.state->finished_count() == 4; }, "fourth reconcile");
        co_await settle();
    }());

    CHECK(active_is(0));
    CHECK(report.pending.empty());
}

TEST_CASE("requeued key frees its slot", "[reconcile]")
{
    fixture f;
    f.set_behaviour([](const std::string& key, int attempt) -> awaitable<action> {
        // The license reconciler's case: poll again while the operation is in progress.
        co_return key == "polling" && attempt == 1 ? action::requeue_after(30s) : action::done();
    });
    auto reconciler = f.make(test_options(1));
    reconciler.enqueue("polling");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "first poll");
        co_await settle();
        CHECK(reconciler.stats().delayed == 1);
        CHECK(reconciler.stats().running == 0);

        // The only worker is free while the first key waits.
        reconciler.enqueue("other");
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "other key reconciled");

        f.clock.advance(29s);
        co_await settle();
        CHECK(f.state->finished_count() == 2);
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 3; }, "second poll");
    }());

    CHECK(f.state->started_keys() == strings{"polling", "other", "polling"});
    CHECK(report.pending.empty());
}

TEST_CASE("retry-after hint delays retry", "[reconcile]")
{
    fixture f;
    f.set_behaviour([](const std::string&, int attempt) -> awaitable<action> {
        co_return attempt == 1 ? action::retry(unavailable(), 7s) : action::done();
    });
    auto reconciler = f.make(test_options());
    reconciler.enqueue("a");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "first attempt");
        f.clock.advance(6s);
        co_await settle();
        CHECK(f.state->finished_count() == 1);
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "retry");
    }());

    CHECK(f.state->started_keys() == strings{"a", "a"});
    CHECK(report.pending.empty());
}

TEST_CASE("failing reconcile is retried and logged", "[reconcile]")
{
    fixture f;
    captured_log log;
    f.set_behaviour([](const std::string&, int attempt) -> awaitable<action> {
        co_return attempt < 3 ? action::retry(unavailable()) : action::done();
    });
    auto options = test_options();
    options.backoff = {1s, 4s};
    options.log = log.make_logger();
    auto registry = std::make_shared<lcm::metrics::prometheus_registry>();
    options.metrics = registry;
    auto reconciler = f.make(options);
    reconciler.enqueue("worker-7");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "first attempt");
        co_await settle();
        CHECK(reconciler.stats().delayed == 1);
        // The first retry waits at most the first window, 1 s; the second at most 2 s.
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "first retry");
        f.clock.advance(2s);
        co_await wait_until([&] { return f.state->finished_count() == 3; }, "second retry");
        co_await settle();
    }());

    const auto retries = log.with_message("reconcile failed; retrying");
    REQUIRE(retries.size() == 2);
    CHECK(retries[0].level == lcm::log_level::warning);
    CHECK(retries[0].fields.at("key") == "worker-7");
    CHECK(retries[0].fields.at("controller") == "test");
    CHECK(retries[0].fields.at("attempt") == "1");
    CHECK(retries[1].fields.at("attempt") == "2");
    CHECK(retries[0].fields.at("error") == make_error_code(lcm::errc::unavailable).message());
    CHECK(std::stoi(retries[0].fields.at("retry_in_ms")) <= 1000);
    CHECK(std::stoi(retries[1].fields.at("retry_in_ms")) <= 2000);

    const std::string text = registry->text();
    CHECK_THAT(text, Catch::Contains("workqueue_retries_total{controller=\"test\",name=\"test\"} 2\n"));
    CHECK_THAT(text, Catch::Contains("controller_runtime_reconcile_errors_total{controller=\"test\"} 2\n"));
    CHECK(report.pending.empty());
}

TEST_CASE("retry deadline calls terminal hook", "[reconcile]")
{
    fixture f;
    captured_log log;
    f.set_behaviour([](const std::string&, int) -> awaitable<action> { co_return action::retry(unavailable()); });
    auto options = test_options();
    options.backoff = {1s, 1s};
    options.retry_deadline = 5s;
    options.log = log.make_logger();
    auto reconciler = f.make(options);
    reconciler.enqueue("a");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        for (int second = 0; second < 8; ++second) {
            co_await settle();
            f.clock.advance(1s);
        }
        co_await wait_until([&] { return reconciler.stats().tracked == 0; }, "key given up");
    }());

    REQUIRE(f.state->terminal_failures.size() == 1);
    const auto& [key, failure] = f.state->terminal_failures.front();
    CHECK(key == "a");
    CHECK(failure.deadline_exceeded);
    CHECK(failure.error == lcm::errc::unavailable);
    CHECK(failure.attempts == static_cast<std::uint32_t>(f.state->finished_count()));
    CHECK(log.with_message("reconcile failed past its retry deadline; giving up").size() == 1);
    CHECK(report.pending.empty());
}

TEST_CASE("terminal error skips retries", "[reconcile]")
{
    fixture f;
    f.set_behaviour([](const std::string&, int) -> awaitable<action> {
        co_return action::terminal_error(lcm::errc::invalid_token);
    });
    auto reconciler = f.make(test_options());
    reconciler.enqueue("a");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "attempt");
        co_await settle();
        f.clock.advance(1h);
        co_await settle();
    }());

    CHECK(f.state->finished_count() == 1);
    REQUIRE(f.state->terminal_failures.size() == 1);
    CHECK_FALSE(f.state->terminal_failures.front().second.deadline_exceeded);
    CHECK(f.state->terminal_failures.front().second.error == lcm::errc::invalid_token);
    CHECK(report.pending.empty());
}

TEST_CASE("reconcile timeout cancels reconcile", "[reconcile]")
{
    fixture f;
    captured_log log;
    f.set_behaviour([&](const std::string&, int attempt) -> awaitable<action> {
        if (attempt == 1) {
            co_await simulated_work(f.clock, 1h);
        }
        co_return action::done();
    });
    auto options = test_options();
    options.reconcile_timeout = 5s;
    options.backoff = {1s, 1s};
    options.log = log.make_logger();
    auto reconciler = f.make(options);
    reconciler.enqueue("slow");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->running_count() == 1; }, "reconcile started");
        f.clock.advance(4s);
        co_await settle();
        CHECK(f.state->running_count() == 1);
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "reconcile cancelled");
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "retry");
        co_await settle();
    }());

    const auto retries = log.with_message("reconcile failed; retrying");
    REQUIRE(retries.size() == 1);
    CHECK(retries[0].fields.at("error") == make_error_code(lcm::errc::timeout).message());
    CHECK(f.state->started_keys() == strings{"slow", "slow"});
    CHECK(report.pending.empty());
}

TEST_CASE("graceful stop finishes work in flight", "[reconcile]")
{
    fixture f;
    f.set_behaviour([&](const std::string&, int) -> awaitable<action> {
        co_await simulated_work(f.clock, 10s);
        co_return action::done();
    });
    auto options = test_options(1);
    options.stop_grace_period = 30s;
    auto reconciler = f.make(options);
    reconciler.enqueue("running");
    reconciler.enqueue("queued");
    reconciler.enqueue_after("delayed", 1h);

    auto report = lcm::testing::run_with_timeout(f.context, [&]() -> awaitable<lcm::reconcile::stop_report<std::string>> {
        using namespace boost::asio::experimental::awaitable_operators;
        auto stop_during_work = [&]() -> awaitable<void> {
            co_await wait_until([&] { return f.state->running_count() == 1; }, "reconcile started");
            reconciler.request_stop();
            co_await settle();
            // Stopping takes no new work, accepts keys for the report, and lets the reconcile finish.
            CHECK(reconciler.enqueue("late"));
            CHECK(f.state->running_count() == 1);
            f.clock.advance(10s);
        };
        co_return co_await (reconciler.run() && stop_during_work());
    }());

    CHECK(f.state->started_keys() == strings{"running"});
    CHECK(f.state->finished_count() == 1);
    CHECK(report.cancelled == 0);
    CHECK(report.pending == strings{"queued", "late", "delayed"});
    CHECK_FALSE(reconciler.enqueue("after stop"));
}

TEST_CASE("stop cancels reconciles after grace", "[reconcile]")
{
    fixture f;
    f.set_behaviour([&](const std::string&, int) -> awaitable<action> {
        co_await simulated_work(f.clock, 1h);
        co_return action::done();
    });
    auto options = test_options(2);
    options.stop_grace_period = 5s;
    auto reconciler = f.make(options);
    reconciler.enqueue("a");
    reconciler.enqueue("b");

    auto report = lcm::testing::run_with_timeout(f.context, [&]() -> awaitable<lcm::reconcile::stop_report<std::string>> {
        using namespace boost::asio::experimental::awaitable_operators;
        auto stop_during_work = [&]() -> awaitable<void> {
            co_await wait_until([&] { return f.state->running_count() == 2; }, "reconciles started");
            reconciler.request_stop();
            co_await settle();
            f.clock.advance(4s);
            co_await settle();
            CHECK(f.state->running_count() == 2);
            f.clock.advance(1s);
        };
        co_return co_await (reconciler.run() && stop_during_work());
    }());

    CHECK(report.cancelled == 2);
    CHECK(f.state->running_count() == 0);
    std::sort(report.pending.begin(), report.pending.end());
    CHECK(report.pending == strings{"a", "b"});
}

TEST_CASE("huge requeue duration is clamped", "[reconcile]")
{
    fixture f;
    f.set_behaviour([](const std::string& key, int attempt) -> awaitable<action> {
        co_return key == "a" && attempt == 1 ? action::requeue_after(std::chrono::hours::max()) : action::done();
    });
    auto options = test_options();
    options.max_delay = 24h;
    auto reconciler = f.make(options);
    reconciler.enqueue("a");
    reconciler.enqueue_after("b", std::chrono::years::max());

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "first attempt");
        f.clock.advance(24h - 1s);
        co_await settle();
        CHECK(f.state->finished_count() == 1);
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 3; }, "both keys after 24 h");
    }());

    std::vector<std::string> started = f.state->started_keys();
    std::sort(started.begin() + 1, started.end());
    CHECK(started == strings{"a", "a", "b"});
    CHECK(report.pending.empty());
}

TEST_CASE("failing key does not starve reconciler", "[reconcile]")
{
    fixture f;
    f.set_behaviour([](const std::string& key, int) -> awaitable<action> {
        if (key == "failing") {
            co_return action::retry(unavailable());
        }
        if (key == "requeueing") {
            co_return action::requeue_after(0s);
        }
        co_return action::done();
    });
    auto options = test_options(1);
    // Zero backoff is the worst case: both bad keys are ready again at once, forever.
    options.backoff = {0s, 0s};
    auto reconciler = f.make(options);
    reconciler.enqueue("failing");
    reconciler.enqueue("requeueing");
    for (int i = 0; i < 20; ++i) {
        reconciler.enqueue("good" + std::to_string(i));
    }

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() >= 30; }, "thirty reconciles");
    }());

    // Every good key ran once, each bad key ran at most once per pass over the queue.
    const strings started = f.state->started_keys();
    for (int i = 0; i < 20; ++i) {
        CHECK(std::count(started.begin(), started.end(), "good" + std::to_string(i)) == 1);
    }
    const auto first_pass_end = std::find(started.begin(), started.end(), "good19");
    REQUIRE(first_pass_end != started.end());
    CHECK(std::count(started.begin(), first_pass_end, "failing") == 1);
    CHECK(std::count(started.begin(), first_pass_end, "requeueing") == 1);
    std::sort(report.pending.begin(), report.pending.end());
    CHECK(report.pending == strings{"failing", "requeueing"});
}

TEST_CASE("startup sweep and resync queue keys", "[reconcile]")
{
    fixture f;
    {
        std::lock_guard lock(f.state->mutex);
        f.state->listed_keys = {"a", "b"};
    }
    auto options = test_options(2);
    options.resync_period = 60s;
    auto reconciler = f.make(options);

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "startup sweep");
        {
            std::lock_guard lock(f.state->mutex);
            f.state->listed_keys = {"a", "b", "c"};
        }
        f.clock.advance(59s);
        co_await settle();
        CHECK(f.state->finished_count() == 2);
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 5; }, "resync");
    }());

    strings started = f.state->started_keys();
    std::sort(started.begin(), started.end());
    CHECK(started == strings{"a", "a", "b", "b", "c"});
    CHECK(f.state->list_calls == 2);
    CHECK(report.pending.empty());
}

TEST_CASE("missing spec skips reconcile", "[reconcile]")
{
    fixture f;
    {
        std::lock_guard lock(f.state->mutex);
        f.state->absent_keys = {"gone"};
    }
    auto registry = std::make_shared<lcm::metrics::prometheus_registry>();
    auto options = test_options();
    options.metrics = registry;
    auto reconciler = f.make(options);
    reconciler.enqueue("gone");
    reconciler.enqueue("present");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "present key reconciled");
        co_await settle();
    }());

    CHECK(f.state->started_keys() == strings{"present"});
    CHECK_THAT(registry->text(),
               Catch::Contains("controller_runtime_reconcile_total{controller=\"test\",result=\"success\"} 2\n"));
    CHECK(report.pending.empty());
}

TEST_CASE("exception in reconcile is retried", "[reconcile]")
{
    fixture f;
    captured_log log;
    f.set_behaviour([](const std::string&, int attempt) -> awaitable<action> {
        if (attempt == 1) {
            throw std::runtime_error("bug in reconcile");
        }
        co_return action::done();
    });
    auto options = test_options();
    options.backoff = {1s, 1s};
    options.log = log.make_logger();
    auto reconciler = f.make(options);
    reconciler.enqueue("a");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 1; }, "first attempt");
        f.clock.advance(1s);
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "retry");
        co_await settle();
    }());

    const auto thrown = log.with_message("reconcile threw an exception; retrying with backoff");
    REQUIRE(thrown.size() == 1);
    CHECK(thrown[0].fields.at("exception") == "bug in reconcile");
    CHECK(thrown[0].fields.at("key") == "a");
    CHECK(thrown[0].fields.at("stage") == "reconcile");
    CHECK(report.pending.empty());
}

namespace {

// The observed state of `in_place_handler`: what its reads wrote into the reconciler's object.
struct written_status {
    std::string text;
    int writes = 0;
};

// Reads the status into the reconciler's own object, and fails the first read of each key.
struct in_place_handler {
    std::shared_ptr<std::mutex> mutex = std::make_shared<std::mutex>();
    std::shared_ptr<std::map<std::string, int>> reads = std::make_shared<std::map<std::string, int>>();
    std::shared_ptr<strings> reconciled = std::make_shared<strings>();

    awaitable<lcm::result<strings>> list_keys() { co_return strings{}; }

    awaitable<lcm::result<std::optional<std::string>>> read_spec(const std::string& key) { co_return key; }

    awaitable<lcm::result<void>> read_status(const std::string& key, std::string&, written_status& status)
    {
        ++status.writes;
        status.text = "status of " + key;
        std::lock_guard lock(*mutex);
        if (++(*reads)[key] == 1) {
            co_return unavailable();
        }
        co_return lcm::success();
    }

    awaitable<action> reconcile(const std::string& key, std::string&, written_status& status)
    {
        std::lock_guard lock(*mutex);
        reconciled->push_back(key + ": " + status.text + ", writes " + std::to_string(status.writes));
        co_return action::done();
    }
};

static_assert(lcm::reconcile::reconcile_handler<in_place_handler, std::string, std::string, written_status>);
static_assert(lcm::reconcile::reads_status_in_place<in_place_handler, std::string, std::string, written_status>);
static_assert(!lcm::reconcile::reads_status_in_place<scripted_handler, std::string, std::string, std::string>);

} // namespace

TEST_CASE("reconciler reads status in place", "[reconcile]")
{
    boost::asio::io_context context;
    manual_clock clock;
    in_place_handler handler;
    auto options = test_options();
    options.backoff = {1s, 1s};
    lcm::reconcile::reconciler<std::string, written_status, std::string, manual_clock> reconciler(
        context.get_executor(), handler, options, clock);
    reconciler.enqueue("a");
    reconciler.enqueue("b");

    auto report = lcm::testing::run_with_timeout(context, run_scenario(reconciler, [&]() -> awaitable<void> {
        co_await settle();
        CHECK(handler.reconciled->empty());
        clock.advance(1s);
        co_await wait_until([&] { return handler.reconciled->size() == 2; }, "both keys reconciled");
        co_await settle();
    }()));

    // Each attempt reads into a fresh status, so the retry after the failed read writes once.
    auto reconciled = *handler.reconciled;
    std::sort(reconciled.begin(), reconciled.end());
    CHECK(reconciled == strings{"a: status of a, writes 1", "b: status of b, writes 1"});
    CHECK(*handler.reads == std::map<std::string, int>{{"a", 2}, {"b", 2}});
    CHECK(report.pending.empty());
}

TEST_CASE("reconciler exports controller metrics", "[reconcile]")
{
    fixture f;
    f.set_behaviour([](const std::string& key, int attempt) -> awaitable<action> {
        if (key == "poll" && attempt == 1) {
            co_return action::requeue_after(5s);
        }
        co_return action::done();
    });
    auto registry = std::make_shared<lcm::metrics::prometheus_registry>();
    auto options = test_options(2);
    options.metrics = registry;
    auto reconciler = f.make(options);
    reconciler.enqueue("poll");
    reconciler.enqueue("once");

    auto report = f.run(reconciler, [&]() -> awaitable<void> {
        co_await wait_until([&] { return f.state->finished_count() == 2; }, "first reconciles");
        f.clock.advance(5s);
        co_await wait_until([&] { return f.state->finished_count() == 3; }, "requeued reconcile");
        co_await settle();
    }());

    const std::string text = registry->text();
    CHECK_THAT(text, Catch::Contains("controller_runtime_reconcile_total{controller=\"test\",result=\"success\"} 2\n"));
    CHECK_THAT(text,
               Catch::Contains("controller_runtime_reconcile_total{controller=\"test\",result=\"requeue_after\"} 1\n"));
    CHECK_THAT(text, Catch::Contains("controller_runtime_reconcile_total{controller=\"test\",result=\"error\"} 0\n"));
    CHECK_THAT(text, Catch::Contains("controller_runtime_reconcile_time_seconds_count{controller=\"test\"} 3\n"));
    CHECK_THAT(text, Catch::Contains("controller_runtime_max_concurrent_reconciles{controller=\"test\"} 2\n"));
    CHECK_THAT(text, Catch::Contains("controller_runtime_active_workers{controller=\"test\"} 0\n"));
    CHECK_THAT(text, Catch::Contains("workqueue_adds_total{controller=\"test\",name=\"test\"} 2\n"));
    CHECK_THAT(text, Catch::Contains("workqueue_depth{controller=\"test\",name=\"test\"} 0\n"));
    CHECK_THAT(text, Catch::Contains("workqueue_queue_duration_seconds_count{controller=\"test\",name=\"test\"} 3\n"));
    CHECK_THAT(text, Catch::Contains("# TYPE controller_runtime_reconcile_time_seconds histogram\n"));
    CHECK(report.pending.empty());
}
