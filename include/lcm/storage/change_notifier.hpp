// A change sequence that coroutines can wait on, shared by the repository implementations.
#pragma once

#include <lcm/error.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

namespace lcm::storage {

/// A counter that increases with every committed change, and the coroutines waiting for it.
///
/// Thread safety: every member may be called from any thread.
class change_notifier {
public:
    /// Returns the sequence number of the latest change; 0 before the first.
    std::uint64_t sequence() const
    {
        std::lock_guard lock(mutex_);
        return sequence_;
    }

    /// Advances the sequence and wakes every waiter.
    void notify()
    {
        std::vector<std::shared_ptr<waiter>> woken;
        {
            std::lock_guard lock(mutex_);
            ++sequence_;
            woken.swap(waiters_);
        }
        for (auto& entry : woken) {
            entry->channel.try_send(boost::system::error_code{});
        }
    }

    /// Waits until the sequence is greater than `after` and returns the new sequence.
    /// Returns at once when a change already happened. Cancellation: the wait supports
    /// terminal cancellation and then returns `errc::cancelled`.
    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        auto executor = co_await boost::asio::this_coro::executor;
        auto entry = std::make_shared<waiter>(executor);
        {
            std::lock_guard lock(mutex_);
            if (sequence_ > after) {
                co_return sequence_;
            }
            waiters_.push_back(entry);
        }

        auto [error] = co_await entry->channel.async_receive(boost::asio::as_tuple(boost::asio::use_awaitable));

        std::lock_guard lock(mutex_);
        if (error) {
            waiters_.erase(std::remove(waiters_.begin(), waiters_.end(), entry), waiters_.end());
            co_return errc::cancelled;
        }
        co_return sequence_;
    }

    /// Returns the number of coroutines waiting, for tests and metrics.
    std::size_t waiter_count() const
    {
        std::lock_guard lock(mutex_);
        return waiters_.size();
    }

private:
    struct waiter {
        template <class Executor>
        explicit waiter(Executor executor) : channel(std::move(executor), 1)
        {
        }

        boost::asio::experimental::concurrent_channel<void(boost::system::error_code)> channel;
    };

    mutable std::mutex mutex_;
    std::uint64_t sequence_ = 0;
    std::vector<std::shared_ptr<waiter>> waiters_;
};

} // namespace lcm::storage
