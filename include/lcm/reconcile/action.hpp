// What a reconcile returns: done, requeue after a delay, retry after an error, or give up.
#pragma once

#include <boost/system/error_code.hpp>

#include <chrono>
#include <cmath>
#include <optional>

namespace lcm::reconcile {

/// Every time in the reconcile framework is a `std::chrono::steady_clock` time point, also under
/// a manual clock, so that the work queue needs no clock parameter.
using time_point = std::chrono::steady_clock::time_point;
using duration = std::chrono::steady_clock::duration;

/// Converts any duration to `duration`, saturating at `duration::max()` and `duration::min()`
/// instead of overflowing. NaN becomes zero. `std::chrono::hours::max()` and floating-point
/// durations are therefore safe to pass anywhere a delay is expected.
template <class Rep, class Period>
constexpr duration saturating_duration(std::chrono::duration<Rep, Period> value) noexcept
{
    // long double holds every int64 exactly on x86-64 and the product of any chrono ratio with
    // the largest count, so the comparison below cannot itself overflow.
    const long double ticks = std::chrono::duration<long double, duration::period>(value).count();
    if (std::isnan(ticks)) {
        return duration::zero();
    }
    if (ticks >= static_cast<long double>(duration::max().count())) {
        return duration::max();
    }
    if (ticks <= static_cast<long double>(duration::min().count())) {
        return duration::min();
    }
    return duration(static_cast<duration::rep>(ticks));
}

/// The outcome of one reconcile, returned by the user's reconcile coroutine.
class action {
public:
    enum class kind {
        /// The observed state matches the desired state; the key is forgotten until enqueued again.
        done,
        /// Run the key again after `delay()`, for example to poll an operation still in progress.
        /// The attempt counts as a success: its key's failure count is reset.
        requeue_after,
        /// The attempt failed and may succeed later: retry with backoff, or after `retry_after()`.
        retry,
        /// The attempt failed and retrying cannot help; the key goes to the terminal-failure hook.
        terminal_error,
    };

    static action done() noexcept { return action(kind::done); }

    /// Requeues the key after `delay`. Negative delays mean "now"; huge ones are clamped to the
    /// reconciler's maximum delay.
    template <class Rep, class Period>
    static action requeue_after(std::chrono::duration<Rep, Period> delay) noexcept
    {
        action result(kind::requeue_after);
        result.delay_ = saturating_duration(delay);
        return result;
    }

    /// Retries the key with exponential backoff.
    static action retry(boost::system::error_code error) noexcept
    {
        action result(kind::retry);
        result.error_ = error;
        return result;
    }

    /// Retries the key after `hint`, such as an HTTP `Retry-After`, instead of the backoff delay.
    /// The failure still counts towards the backoff of later failures and the retry deadline.
    template <class Rep, class Period>
    static action retry(boost::system::error_code error, std::chrono::duration<Rep, Period> hint) noexcept
    {
        action result(kind::retry);
        result.error_ = error;
        result.retry_after_ = saturating_duration(hint);
        return result;
    }

    static action terminal_error(boost::system::error_code error) noexcept
    {
        action result(kind::terminal_error);
        result.error_ = error;
        return result;
    }

    kind type() const noexcept { return kind_; }

    /// Delay of `requeue_after`; zero for the other kinds.
    duration delay() const noexcept { return delay_; }

    /// Error of `retry` and `terminal_error`; empty for the other kinds.
    const boost::system::error_code& error() const noexcept { return error_; }

    /// Retry-after hint of `retry`, if the reconcile gave one.
    const std::optional<duration>& retry_after() const noexcept { return retry_after_; }

private:
    explicit action(kind type) noexcept : kind_(type) {}

    kind kind_;
    duration delay_{};
    boost::system::error_code error_;
    std::optional<duration> retry_after_;
};

} // namespace lcm::reconcile
