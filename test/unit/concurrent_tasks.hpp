// Test helper that runs several coroutines at once and waits for all of them.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/deferred.hpp>
#include <boost/asio/experimental/parallel_group.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <exception>
#include <utility>
#include <vector>

namespace lcm::test {

/// Spawns every task on the current executor, so that on a multi-threaded `io_context` they
/// run in parallel, and waits for all of them. Rethrows the first exception of a task.
inline boost::asio::awaitable<void> run_concurrently(std::vector<boost::asio::awaitable<void>> tasks)
{
    auto executor = co_await boost::asio::this_coro::executor;
    using spawn_operation =
        decltype(boost::asio::co_spawn(executor, std::declval<boost::asio::awaitable<void>>(), boost::asio::deferred));
    std::vector<spawn_operation> operations;
    for (auto& task : tasks) {
        operations.push_back(boost::asio::co_spawn(executor, std::move(task), boost::asio::deferred));
    }

    auto [order, exceptions] = co_await boost::asio::experimental::make_parallel_group(std::move(operations))
                                   .async_wait(boost::asio::experimental::wait_for_all(), boost::asio::use_awaitable);
    for (const auto& exception : exceptions) {
        if (exception) {
            std::rethrow_exception(exception);
        }
    }
}

} // namespace lcm::test
