#include <lcm/reconcile/manual_clock.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <vector>

using namespace std::chrono_literals;
using lcm::reconcile::manual_clock;

TEST_CASE("manual timer fires on advance", "[reconcile]")
{
    boost::asio::io_context context;
    manual_clock clock;
    const auto start = clock.now();
    std::vector<int> fired;
    auto late = clock.make_timer(context.get_executor());
    auto early = clock.make_timer(context.get_executor());
    late.expires_after(10s);
    early.expires_after(5s);
    late.async_wait([&](boost::system::error_code error) { fired.push_back(error ? -1 : 10); });
    early.async_wait([&](boost::system::error_code error) { fired.push_back(error ? -1 : 5); });

    context.poll();
    CHECK(fired.empty());
    clock.advance(4s);
    context.poll();
    CHECK(fired.empty());
    clock.advance(10s);
    CHECK(clock.pending_waits() == 0);
    context.poll();
    CHECK(fired == std::vector<int>{5, 10});
    CHECK(clock.now() == start + 14s);
}

TEST_CASE("manual timer cancel aborts wait", "[reconcile]")
{
    boost::asio::io_context context;
    manual_clock clock;
    std::optional<boost::system::error_code> result;
    auto timer = clock.make_timer(context.get_executor());
    timer.expires_after(1h);
    timer.async_wait([&](boost::system::error_code error) { result = error; });

    CHECK(timer.cancel() == 1);
    context.poll();
    REQUIRE(result);
    CHECK(*result == boost::asio::error::operation_aborted);

    // An expiry already reached completes at once, with success.
    result.reset();
    timer.expires_at(clock.now());
    timer.async_wait([&](boost::system::error_code error) { result = error; });
    // The first poll ran out of work, which stops an io_context until it is restarted.
    context.restart();
    context.poll();
    REQUIRE(result);
    CHECK_FALSE(*result);
}

TEST_CASE("cancellation slot aborts manual wait", "[reconcile]")
{
    boost::asio::io_context context;
    manual_clock clock;
    boost::asio::cancellation_signal signal;
    std::optional<boost::system::error_code> result;
    auto timer = clock.make_timer(context.get_executor());
    timer.expires_after(1h);
    timer.async_wait(boost::asio::bind_cancellation_slot(
        signal.slot(), [&](boost::system::error_code error) { result = error; }));

    signal.emit(boost::asio::cancellation_type::terminal);
    context.poll();
    REQUIRE(result);
    CHECK(*result == boost::asio::error::operation_aborted);
    CHECK(clock.pending_waits() == 0);
}

TEST_CASE("manual timer keeps io_context running", "[reconcile]")
{
    boost::asio::io_context context;
    manual_clock clock;
    auto waiter = [&]() -> boost::asio::awaitable<int> {
        auto timer = clock.make_timer(co_await boost::asio::this_coro::executor);
        timer.expires_after(1s);
        auto advance = [&] { clock.advance(1s); };
        // The advance runs later, from a posted handler, while the wait is pending.
        boost::asio::post(context, advance);
        auto [error] = co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        co_return error ? 0 : 1;
    };
    CHECK(lcm::testing::run_with_timeout(context, waiter()) == 1);
}
