// The clock and timer that a reconciler uses: std::chrono::steady_clock in production, a manual
// clock in tests.
#pragma once

#include <lcm/reconcile/action.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <concepts>

namespace lcm::reconcile {

/// A clock that a reconciler can run on. `C::timer_type` must offer what `boost::asio::steady_timer`
/// offers for `time_point`: `expires_at`, `cancel`, and `async_wait(token)` with the signature
/// `void(boost::system::error_code)` and per-operation cancellation.
template <class C>
concept reconcile_clock = std::copy_constructible<C> &&
    requires(const C& clock, const boost::asio::any_io_executor& executor, typename C::timer_type& timer,
             time_point expiry) {
        { clock.now() } -> std::same_as<time_point>;
        { clock.make_timer(executor) } -> std::same_as<typename C::timer_type>;
        timer.expires_at(expiry);
        timer.cancel();
    };

/// `std::chrono::steady_clock` with `boost::asio::steady_timer`: the clock for production.
struct steady_clock {
    using timer_type = boost::asio::steady_timer;

    time_point now() const noexcept { return std::chrono::steady_clock::now(); }

    timer_type make_timer(const boost::asio::any_io_executor& executor) const { return timer_type(executor); }
};

static_assert(reconcile_clock<steady_clock>);

} // namespace lcm::reconcile
