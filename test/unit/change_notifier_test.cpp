#include <lcm/storage/change_notifier.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <catch2/catch.hpp>

#include <exception>
#include <optional>

namespace {

using lcm::errc;
using lcm::result;
using lcm::storage::change_notifier;
using boost::asio::awaitable;
using boost::asio::use_awaitable;

/// Spawns a wait on `notifier` bound to `signal`, storing its result in `observed`.
/// `throw_if_cancelled` sets the coroutine's option of that name before it waits.
void spawn_wait(boost::asio::io_context& context, change_notifier& notifier, std::uint64_t after,
                boost::asio::cancellation_signal& signal, std::optional<result<std::uint64_t>>& observed,
                std::exception_ptr& failure, bool throw_if_cancelled = true)
{
    auto wait = [](change_notifier& waited, std::uint64_t sequence, std::optional<result<std::uint64_t>>& out,
                   bool throw_option) -> awaitable<void> {
        co_await boost::asio::this_coro::throw_if_cancelled(throw_option);
        out = co_await waited.wait_for_change(sequence);
    };
    boost::asio::co_spawn(context, wait(notifier, after, observed, throw_if_cancelled),
                          boost::asio::bind_cancellation_slot(signal.slot(),
                                                              [&failure](std::exception_ptr error) { failure = error; }));
}

/// Yields to the executor until `done` returns true.
template <class Predicate>
awaitable<void> yield_until(Predicate done)
{
    auto executor = co_await boost::asio::this_coro::executor;
    while (!done()) {
        co_await boost::asio::post(executor, use_awaitable);
    }
}

} // namespace

TEST_CASE("notifier wakes every waiter", "[storage]")
{
    boost::asio::io_context context;
    change_notifier notifier;
    boost::asio::cancellation_signal first_signal;
    boost::asio::cancellation_signal second_signal;
    std::optional<result<std::uint64_t>> first;
    std::optional<result<std::uint64_t>> second;
    std::exception_ptr first_failure;
    std::exception_ptr second_failure;

    spawn_wait(context, notifier, 0, first_signal, first, first_failure);
    spawn_wait(context, notifier, 0, second_signal, second, second_failure);
    lcm::testing::run_with_timeout(context, [&]() -> awaitable<void> {
        co_await yield_until([&] { return notifier.waiter_count() == 2; });
        notifier.notify();
        co_await yield_until([&] { return first.has_value() && second.has_value(); });
    }());

    CHECK_FALSE(first_failure);
    CHECK_FALSE(second_failure);
    REQUIRE(first.has_value());
    CHECK(first->value() == 1);
    REQUIRE(second.has_value());
    CHECK(second->value() == 1);
    CHECK(notifier.waiter_count() == 0);
    CHECK(notifier.sequence() == 1);
}

TEST_CASE("notifier cancellation removes the waiter", "[storage]")
{
    boost::asio::io_context context;
    change_notifier notifier;
    boost::asio::cancellation_signal signal;
    std::optional<result<std::uint64_t>> observed;
    std::exception_ptr failure;

    spawn_wait(context, notifier, 0, signal, observed, failure);
    lcm::testing::run_with_timeout(context, [&]() -> awaitable<void> {
        co_await yield_until([&] { return notifier.waiter_count() == 1; });
        signal.emit(boost::asio::cancellation_type::terminal);
        co_await yield_until([&] { return observed.has_value(); });
    }());

    CHECK_FALSE(failure);
    REQUIRE(observed.has_value());
    CHECK(observed->error() == errc::cancelled);
    CHECK(notifier.waiter_count() == 0);
    CHECK(notifier.sequence() == 0);
}

TEST_CASE("notifier wait cancelled before start", "[storage]")
{
    boost::asio::io_context context;
    change_notifier notifier;
    boost::asio::cancellation_signal signal;
    std::optional<result<std::uint64_t>> observed;
    std::exception_ptr failure;

    // The coroutine does not throw on cancellation, so the wait itself must see that the
    // cancellation came before it started.
    spawn_wait(context, notifier, 0, signal, observed, failure, false);
    signal.emit(boost::asio::cancellation_type::terminal);
    lcm::testing::run_with_timeout(context, yield_until([&] { return observed.has_value() || failure; }),
                                   std::chrono::seconds(5));

    CHECK_FALSE(failure);
    REQUIRE(observed.has_value());
    CHECK(observed->error() == errc::cancelled);
    CHECK(notifier.waiter_count() == 0);
}
