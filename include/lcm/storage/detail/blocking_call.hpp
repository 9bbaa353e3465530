// Runs blocking database work on a thread pool and resumes the awaiting coroutine on its own
// executor, with a deadline and cancellation. Shared by the SQLite and PostgreSQL adapters.
#pragma once

#include <lcm/error.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/thread_pool.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <atomic>
#include <chrono>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <utility>

namespace lcm::storage::detail {

using deadline_type = std::chrono::steady_clock::time_point;

/// The state shared by one blocking call and the coroutine that awaits it. The call may
/// outlive the coroutine (after a timeout or cancellation), so both hold it by `shared_ptr`.
template <class T>
struct blocking_call_state {
    template <class Executor>
    explicit blocking_call_state(Executor executor) : done(std::move(executor), 1)
    {
    }

    std::mutex mutex;
    std::optional<result<T>> outcome;
    std::exception_ptr failure;
    /// Set when the awaiting coroutine gave up, so work that has not started yet is skipped.
    std::atomic<bool> abandoned{false};
    /// Receives one message: success from the worker thread or `errc::timeout` from the timer.
    boost::asio::experimental::concurrent_channel<void(boost::system::error_code)> done;
};

/// The time after the deadline that an Asio timer waits for the database's own timeout to
/// end the work, before the caller stops waiting for it.
inline constexpr std::chrono::milliseconds blocking_call_grace{250};

/// Runs `work(deadline)` on `pool` and returns its result on the awaiting coroutine's executor.
///
/// `work` returns `result<T>` and runs on a pool thread. It should bound its own database
/// calls by `deadline` with a busy or statement timeout. Exceptions it throws are rethrown
/// here. When the work overruns the deadline by `blocking_call_grace`, an Asio
/// timer ends the wait with `errc::timeout` in any case. Cancellation: terminal
/// cancellation ends the wait with `errc::cancelled`.
/// After a timeout or cancellation the work still runs to its end if it had started, so a
/// write may commit although its caller saw `timeout` or `cancelled`; work that had not
/// started yet is skipped.
template <class T, class Work>
boost::asio::awaitable<result<T>> run_blocking(boost::asio::thread_pool& pool, std::chrono::milliseconds timeout,
                                               Work work)
{
    auto executor = co_await boost::asio::this_coro::executor;
    auto state = std::make_shared<blocking_call_state<T>>(executor);
    const auto deadline = std::chrono::steady_clock::now() + timeout;

    // The guard keeps the caller's io_context from running out of work until this thread has
    // dropped its reference to `state`, whose channel belongs to that context. Without it,
    // run() could return once the channel delivered, and a caller could destroy the context
    // while this thread still destroys the channel.
    boost::asio::post(pool, [state, deadline, work = std::move(work),
                             guard = boost::asio::make_work_guard(executor)]() mutable {
        const auto release = [&] {
            state.reset();
            guard.reset();
        };
        if (state->abandoned.load()) {
            release();
            return;
        }
        std::optional<result<T>> outcome;
        std::exception_ptr failure;
        if (std::chrono::steady_clock::now() >= deadline) {
            outcome.emplace(errc::timeout);
        }
        else {
            try {
                outcome.emplace(work(deadline));
            }
            catch (...) {
                failure = std::current_exception();
            }
        }
        {
            std::lock_guard lock(state->mutex);
            state->outcome = std::move(outcome);
            state->failure = failure;
        }
        state->done.try_send(boost::system::error_code{});
        release();
    });

    boost::asio::steady_timer timer(executor, deadline + blocking_call_grace);
    timer.async_wait([state](boost::system::error_code error) {
        if (!error) {
            state->done.try_send(make_error_code(errc::timeout));
        }
    });

    auto [error] = co_await state->done.async_receive(boost::asio::as_tuple(boost::asio::use_awaitable));
    timer.cancel();

    if (error) {
        state->abandoned.store(true);
        if (error == errc::timeout) {
            co_return errc::timeout;
        }
        co_return errc::cancelled;
    }

    std::lock_guard lock(state->mutex);
    if (state->failure) {
        std::rethrow_exception(state->failure);
    }
    co_return std::move(*state->outcome);
}

} // namespace lcm::storage::detail
