// A scriptable reconcile handler and helpers for driving a reconciler on a manual clock.
#pragma once

#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/reconcile/manual_clock.hpp>
#include <lcm/reconcile/reconciler.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace reconcile_test {

using lcm::reconcile::action;
using lcm::reconcile::duration;
using lcm::reconcile::manual_clock;
using test_reconciler = lcm::reconcile::reconciler<std::string, std::string, std::string, manual_clock>;

/// What the handler saw, shared between the handler and the test. Thread-safe.
struct handler_state {
    using behaviour_type = std::function<boost::asio::awaitable<action>(const std::string& key, int attempt)>;

    mutable std::mutex mutex;
    behaviour_type behaviour;
    std::vector<std::string> listed_keys;
    std::set<std::string> absent_keys;
    std::vector<std::string> started;
    std::map<std::string, int> attempts;
    std::multiset<std::string> running;
    std::size_t max_running = 0;
    bool same_key_overlap = false;
    std::size_t finished = 0;
    std::size_t list_calls = 0;
    std::vector<std::pair<std::string, lcm::reconcile::terminal_failure>> terminal_failures;

    std::size_t finished_count() const
    {
        std::lock_guard lock(mutex);
        return finished;
    }

    std::vector<std::string> started_keys() const
    {
        std::lock_guard lock(mutex);
        return started;
    }

    std::size_t running_count() const
    {
        std::lock_guard lock(mutex);
        return running.size();
    }
};

/// A handler whose reconcile records what runs and then follows `handler_state::behaviour`.
struct scripted_handler {
    std::shared_ptr<handler_state> state;

    boost::asio::awaitable<lcm::result<std::vector<std::string>>> list_keys()
    {
        std::lock_guard lock(state->mutex);
        ++state->list_calls;
        co_return state->listed_keys;
    }

    boost::asio::awaitable<lcm::result<std::optional<std::string>>> read_spec(const std::string& key)
    {
        std::lock_guard lock(state->mutex);
        if (state->absent_keys.count(key) > 0) {
            co_return std::nullopt;
        }
        co_return "spec of " + key;
    }

    boost::asio::awaitable<lcm::result<std::string>> read_status(const std::string& key, const std::string&)
    {
        co_return "status of " + key;
    }

    boost::asio::awaitable<action> reconcile(const std::string& key, const std::string& spec, const std::string&)
    {
        if (spec != "spec of " + key) {
            throw std::logic_error("reconcile got the spec of another key");
        }
        int attempt = 0;
        behaviour_type behaviour;
        {
            std::lock_guard lock(state->mutex);
            attempt = ++state->attempts[key];
            state->started.push_back(key);
            if (state->running.count(key) > 0) {
                state->same_key_overlap = true;
            }
            state->running.insert(key);
            state->max_running = std::max(state->max_running, state->running.size());
            behaviour = state->behaviour;
        }
        // Leaves the running set also when the behaviour throws, as it does when cancelled.
        struct leave_running {
            handler_state& state;
            std::string key;
            ~leave_running()
            {
                std::lock_guard lock(state.mutex);
                state.running.erase(state.running.find(key));
                ++state.finished;
            }
        } guard{*state, key};
        // A co_await inside a conditional expression is miscompiled by g++ 12, hence the if.
        if (!behaviour) {
            co_return action::done();
        }
        co_return co_await behaviour(key, attempt);
    }

    boost::asio::awaitable<void> on_terminal_failure(const std::string& key,
                                                     const lcm::reconcile::terminal_failure& failure)
    {
        std::lock_guard lock(state->mutex);
        state->terminal_failures.emplace_back(key, failure);
        co_return;
    }

private:
    using behaviour_type = handler_state::behaviour_type;
};

/// Log records captured for checks. Thread-safe.
struct captured_log {
    struct record {
        lcm::log_level level;
        std::string message;
        std::map<std::string, std::string> fields;
    };

    std::shared_ptr<std::mutex> mutex = std::make_shared<std::mutex>();
    std::shared_ptr<std::vector<record>> records = std::make_shared<std::vector<record>>();

    lcm::logger make_logger() const
    {
        return lcm::logger(lcm::log_level::debug, [mutex = mutex, records = records](const lcm::log_record& entry) {
            record copy{entry.level, std::string(entry.message), {}};
            for (const auto& field : entry.fields) {
                copy.fields[std::string(field.name)] = field.value;
            }
            std::lock_guard lock(*mutex);
            records->push_back(std::move(copy));
        });
    }

    std::vector<record> with_message(const std::string& message) const
    {
        std::lock_guard lock(*mutex);
        std::vector<record> found;
        for (const auto& entry : *records) {
            if (entry.message == message) {
                found.push_back(entry);
            }
        }
        return found;
    }
};

/// Options for tests: fixed jitter, no resync after the startup sweep, no timeout, and no stop grace
/// period, so that a failed test stops at once instead of waiting for manual time that never comes.
inline lcm::reconcile::reconciler_options test_options(std::size_t concurrency = 1)
{
    lcm::reconcile::reconciler_options options;
    options.name = "test";
    options.max_concurrent_reconciles = concurrency;
    options.jitter_seed = 7;
    options.resync_period = duration::zero();
    options.reconcile_timeout.reset();
    options.stop_grace_period = duration::zero();
    return options;
}

/// Lets every handler that is ready run, `rounds` times over. On a one-threaded io_context, work
/// that needs fewer than `rounds` hops completes before this returns.
inline boost::asio::awaitable<void> settle(int rounds = 200)
{
    auto executor = co_await boost::asio::this_coro::executor;
    for (int i = 0; i < rounds; ++i) {
        co_await boost::asio::post(executor, boost::asio::use_awaitable);
    }
}

/// Yields until `condition` is true. Throws after `max_rounds` yields, naming `description`.
template <class Condition>
boost::asio::awaitable<void> wait_until(Condition condition, const char* description, int max_rounds = 100000)
{
    auto executor = co_await boost::asio::this_coro::executor;
    for (int i = 0; i < max_rounds; ++i) {
        if (condition()) {
            co_return;
        }
        co_await boost::asio::post(executor, boost::asio::use_awaitable);
    }
    throw std::runtime_error(std::string("condition not reached: ") + description);
}

/// Work that takes `length` of manual time; a cancellation ends it with `operation_aborted`.
inline boost::asio::awaitable<void> simulated_work(manual_clock clock, duration length)
{
    auto timer = clock.make_timer(co_await boost::asio::this_coro::executor);
    timer.expires_after(length);
    co_await timer.async_wait(boost::asio::use_awaitable);
}

/// Runs `reconciler` and `body` together; stops the reconciler when `body` returns. When `body`
/// throws, the reconciler's run is cancelled, which stops it gracefully, and the exception propagates.
template <class Reconciler>
boost::asio::awaitable<lcm::reconcile::stop_report<std::string>> run_scenario(Reconciler& reconciler,
                                                                               boost::asio::awaitable<void> body)
{
    auto body_then_stop = [](Reconciler& target, boost::asio::awaitable<void> steps) -> boost::asio::awaitable<void> {
        co_await std::move(steps);
        target.request_stop();
    };
    using namespace boost::asio::experimental::awaitable_operators;
    co_return co_await (reconciler.run() && body_then_stop(reconciler, std::move(body)));
}

} // namespace reconcile_test
