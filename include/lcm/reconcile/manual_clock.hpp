// A clock that only moves when a test advances it, with timers that fire on advance().
#pragma once

#include <lcm/reconcile/clock.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/associated_cancellation_slot.hpp>
#include <boost/asio/associated_executor.hpp>
#include <boost/asio/async_result.hpp>
#include <boost/asio/error.hpp>
#include <boost/asio/execution/outstanding_work.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/prefer.hpp>
#include <boost/system/error_code.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <utility>
#include <vector>

namespace lcm::reconcile {

class manual_timer;

namespace detail {

using wait_handler = boost::asio::any_completion_handler<void(boost::system::error_code)>;

struct manual_wait {
    std::uint64_t timer_id;
    time_point expiry;
    wait_handler handler;
    // The timer's executor with outstanding work tracked, so that a run() does not return while
    // a wait is pending, as with a real timer.
    boost::asio::any_io_executor work;
};

struct manual_clock_state {
    std::mutex mutex;
    time_point now;
    std::uint64_t next_id = 1;
    std::map<std::uint64_t, manual_wait> waits;
};

// Runs in the handler's own context: clears the cancellation handler installed by async_wait,
// then completes the wait.
class manual_wait_completion {
public:
    using executor_type = boost::asio::associated_executor_t<wait_handler, boost::asio::any_io_executor>;

    manual_wait_completion(manual_wait wait, boost::system::error_code error)
        : wait_(std::move(wait)), error_(error)
    {
    }

    executor_type get_executor() const noexcept
    {
        return boost::asio::get_associated_executor(wait_.handler, wait_.work);
    }

    void operator()()
    {
        auto slot = boost::asio::get_associated_cancellation_slot(wait_.handler);
        if (slot.is_connected()) {
            slot.clear();
        }
        auto handler = std::move(wait_.handler);
        auto work = std::move(wait_.work);
        std::move(handler)(error_);
    }

private:
    manual_wait wait_;
    boost::system::error_code error_;
};

// Posts the completions in order of expiry. The order is sorted through pointers because
// any_completion_handler's move assignment recurses without end in Boost 1.81, so the waits
// themselves must only be move-constructed, never assigned.
inline void complete_waits(std::vector<manual_wait> waits, boost::system::error_code error)
{
    std::vector<manual_wait*> order;
    order.reserve(waits.size());
    for (auto& wait : waits) {
        order.push_back(&wait);
    }
    std::stable_sort(order.begin(), order.end(), [](const manual_wait* a, const manual_wait* b) {
        return a->expiry < b->expiry;
    });
    for (manual_wait* wait : order) {
        auto executor = wait->work;
        boost::asio::post(executor, manual_wait_completion(std::move(*wait), error));
    }
}

} // namespace detail

/// A clock for tests. Its time moves only through `advance`, which completes the waits of every
/// `manual_timer` that expire by then. Copies share one time, so a test keeps a copy and hands
/// another to the code under test.
/// Thread safety: every member may be called from any thread. Completions are posted, never run
/// inside `advance`.
class manual_clock {
public:
    using timer_type = manual_timer;

    /// Starts at `start`; the default is one hour past the epoch, so that code subtracting small
    /// durations from `now()` stays within range.
    explicit manual_clock(time_point start = time_point(std::chrono::hours(1)))
        : state_(std::make_shared<detail::manual_clock_state>())
    {
        state_->now = start;
    }

    time_point now() const
    {
        std::lock_guard lock(state_->mutex);
        return state_->now;
    }

    /// Moves time forward by `by` (negative values are ignored) and completes, with success, every
    /// wait that expires by the new time, in order of expiry. The completions are posted to their
    /// handlers' executors.
    void advance(duration by)
    {
        std::vector<detail::manual_wait> due;
        {
            std::lock_guard lock(state_->mutex);
            if (by > duration::zero()) {
                state_->now = by > time_point::max() - state_->now ? time_point::max() : state_->now + by;
            }
            for (auto position = state_->waits.begin(); position != state_->waits.end();) {
                if (position->second.expiry <= state_->now) {
                    due.push_back(std::move(position->second));
                    position = state_->waits.erase(position);
                } else {
                    ++position;
                }
            }
        }
        detail::complete_waits(std::move(due), {});
    }

    /// Number of waits not yet completed, across all timers of this clock.
    std::size_t pending_waits() const
    {
        std::lock_guard lock(state_->mutex);
        return state_->waits.size();
    }

    manual_timer make_timer(const boost::asio::any_io_executor& executor) const;

private:
    friend class manual_timer;

    std::shared_ptr<detail::manual_clock_state> state_;
};

/// A timer on a `manual_clock`, with the part of `boost::asio::steady_timer`'s interface that the
/// reconciler uses. A wait completes with success when the clock is advanced to its expiry, and
/// with `operation_aborted` on `cancel`, `expires_at`, destruction, or per-operation cancellation.
/// Thread safety: distinct timers may be used from different threads; one timer, like an Asio
/// timer, must not be used from two threads at once.
class manual_timer {
public:
    using executor_type = boost::asio::any_io_executor;

    manual_timer(executor_type executor, manual_clock clock)
        : executor_(std::move(executor)), clock_(std::move(clock.state_))
    {
        std::lock_guard lock(clock_->mutex);
        id_ = clock_->next_id++;
    }

    manual_timer(manual_timer&& other) noexcept
        : executor_(std::move(other.executor_)), clock_(std::move(other.clock_)),
          expiry_(other.expiry_), id_(std::exchange(other.id_, 0))
    {
    }

    manual_timer& operator=(manual_timer&&) = delete;
    manual_timer(const manual_timer&) = delete;
    manual_timer& operator=(const manual_timer&) = delete;

    ~manual_timer() { cancel(); }

    executor_type get_executor() const noexcept { return executor_; }

    time_point expiry() const noexcept { return expiry_; }

    /// Sets the expiry and cancels pending waits, like `steady_timer::expires_at`.
    std::size_t expires_at(time_point expiry)
    {
        const std::size_t cancelled = cancel();
        expiry_ = expiry;
        return cancelled;
    }

    std::size_t expires_after(duration delay)
    {
        const time_point now = manual_clock_now();
        return expires_at(delay > time_point::max() - now ? time_point::max() : now + delay);
    }

    /// Completes every pending wait of this timer with `operation_aborted`; returns how many.
    std::size_t cancel()
    {
        if (id_ == 0) {
            return 0;
        }
        std::vector<detail::manual_wait> cancelled;
        {
            std::lock_guard lock(clock_->mutex);
            for (auto position = clock_->waits.begin(); position != clock_->waits.end();) {
                if (position->second.timer_id == id_) {
                    cancelled.push_back(std::move(position->second));
                    position = clock_->waits.erase(position);
                } else {
                    ++position;
                }
            }
        }
        const std::size_t count = cancelled.size();
        detail::complete_waits(std::move(cancelled), boost::asio::error::operation_aborted);
        return count;
    }

    /// Waits until the clock reaches the expiry. Completion signature: `void(error_code)`.
    template <class CompletionToken>
    auto async_wait(CompletionToken&& token)
    {
        return boost::asio::async_initiate<CompletionToken, void(boost::system::error_code)>(
            [this](auto handler) { start_wait(detail::wait_handler(std::move(handler))); }, token);
    }

private:
    // Removes one wait when its handler's cancellation slot is emitted.
    struct cancel_wait {
        std::weak_ptr<detail::manual_clock_state> clock;
        std::uint64_t wait_id;

        void operator()(boost::asio::cancellation_type_t type)
        {
            auto state = clock.lock();
            if (!state || type == boost::asio::cancellation_type::none) {
                return;
            }
            std::vector<detail::manual_wait> cancelled;
            {
                std::lock_guard lock(state->mutex);
                auto position = state->waits.find(wait_id);
                if (position == state->waits.end()) {
                    return;
                }
                cancelled.push_back(std::move(position->second));
                state->waits.erase(position);
            }
            detail::complete_waits(std::move(cancelled), boost::asio::error::operation_aborted);
        }
    };

    time_point manual_clock_now() const
    {
        std::lock_guard lock(clock_->mutex);
        return clock_->now;
    }

    void start_wait(detail::wait_handler handler)
    {
        auto slot = boost::asio::get_associated_cancellation_slot(handler);
        auto work = boost::asio::prefer(executor_, boost::asio::execution::outstanding_work.tracked);
        {
            std::lock_guard lock(clock_->mutex);
            if (expiry_ > clock_->now) {
                const std::uint64_t wait_id = clock_->next_id++;
                // Installed under the lock, so that no advance() on another thread can complete
                // the wait, and clear the slot, before the cancellation handler is in place.
                if (slot.is_connected()) {
                    slot.template emplace<cancel_wait>(cancel_wait{clock_, wait_id});
                }
                clock_->waits.emplace(wait_id, detail::manual_wait{id_, expiry_, std::move(handler), work});
                return;
            }
        }
        std::vector<detail::manual_wait> expired;
        expired.push_back(detail::manual_wait{id_, expiry_, std::move(handler), std::move(work)});
        detail::complete_waits(std::move(expired), {});
    }

    executor_type executor_;
    std::shared_ptr<detail::manual_clock_state> clock_;
    time_point expiry_{};
    std::uint64_t id_ = 0;
};

inline manual_timer manual_clock::make_timer(const boost::asio::any_io_executor& executor) const
{
    return manual_timer(executor, *this);
}

static_assert(reconcile_clock<manual_clock>);

} // namespace lcm::reconcile
