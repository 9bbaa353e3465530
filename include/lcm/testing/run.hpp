// Helpers that run coroutines in tests under a hard timeout.
#pragma once

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>

#include <chrono>
#include <exception>
#include <optional>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

namespace lcm::testing {

/// The hard limit on one coroutine test, after which the test fails instead of hanging.
inline constexpr std::chrono::seconds default_test_timeout{30};

/// Thrown when a coroutine under test does not finish within its timeout.
class test_timeout : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Runs `task` on `context` with `threads` threads until it finishes, and returns its value.
/// Rethrows the coroutine's exception. Throws `test_timeout` when the coroutine is still
/// running after `timeout`; the context is then stopped, so pending work is abandoned.
template <class T>
T run_with_timeout(boost::asio::io_context& context, boost::asio::awaitable<T> task,
                   std::chrono::steady_clock::duration timeout = default_test_timeout, int threads = 1)
{
    using stored_type = std::conditional_t<std::is_void_v<T>, bool, T>;
    std::optional<stored_type> value;
    std::exception_ptr failure;
    bool finished = false;

    boost::asio::steady_timer watchdog(context, timeout);
    watchdog.async_wait([&](boost::system::error_code error) {
        if (!error) {
            context.stop();
        }
    });

    // The wrapper returns void because co_spawn's handler needs a default-constructible
    // value type, which lcm::result<T> is not.
    auto wrapper = [](boost::asio::awaitable<T> inner, std::optional<stored_type>& out) -> boost::asio::awaitable<void> {
        if constexpr (std::is_void_v<T>) {
            co_await std::move(inner);
            out.emplace(true);
        }
        else {
            out.emplace(co_await std::move(inner));
        }
    };
    boost::asio::co_spawn(context, wrapper(std::move(task), value), [&](std::exception_ptr error) {
        failure = error;
        finished = true;
        watchdog.cancel();
    });

    std::vector<std::thread> helpers;
    for (int i = 1; i < threads; ++i) {
        helpers.emplace_back([&context] { context.run(); });
    }
    context.run();
    for (auto& helper : helpers) {
        helper.join();
    }
    context.restart();

    if (!finished) {
        throw test_timeout("coroutine did not finish within " +
                           std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(timeout).count()) +
                           " ms");
    }
    if (failure) {
        std::rethrow_exception(failure);
    }
    if constexpr (!std::is_void_v<T>) {
        return std::move(*value);
    }
}

} // namespace lcm::testing
