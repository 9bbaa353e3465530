// The event sink concept: the receiver of domain events once the worker that raised them is saved.
#pragma once

#include <lcm/domain/events.hpp>

#include <boost/asio/awaitable.hpp>

#include <concepts>
#include <mutex>
#include <type_traits>
#include <utility>
#include <vector>

namespace lcm::application {

/// Receives the events of one saved change, in the order the aggregate raised them.
/// `publish` is awaited before the command returns; an exception from it propagates to the
/// caller, but the change stays saved. Implementations must be safe to call concurrently.
///
/// `publish` returns `awaitable<void>`, or `void` for a sink that does no I/O: the command
/// then calls it directly, which saves a coroutine frame per command.
///
/// NOTE: two saves of one worker publish independently, so a slow `publish` of the first
/// can arrive after the second. Consumers that need the order sort a worker's events by
/// operation id and step; a transactional outbox would remove the gap.
template <class S>
concept event_sink = requires(S& sink, std::vector<domain::domain_event> events) {
    requires std::same_as<decltype(sink.publish(std::move(events))), boost::asio::awaitable<void>> ||
                 std::same_as<decltype(sink.publish(std::move(events))), void>;
};

/// Whether `S::publish` completes at once and returns `void`.
template <class S>
inline constexpr bool publishes_at_once =
    std::is_void_v<decltype(std::declval<S&>().publish(std::declval<std::vector<domain::domain_event>>()))>;

/// Drops every event.
struct null_event_sink {
    boost::asio::awaitable<void> publish(std::vector<domain::domain_event>) { co_return; }
};

/// Keeps every event in memory, for tests, examples and timelines. Thread-safe.
class memory_event_sink {
public:
    boost::asio::awaitable<void> publish(std::vector<domain::domain_event> events)
    {
        std::lock_guard lock(mutex_);
        for (auto& event : events) {
            events_.push_back(std::move(event));
        }
        co_return;
    }

    /// Returns a copy of every event received so far.
    std::vector<domain::domain_event> events() const
    {
        std::lock_guard lock(mutex_);
        return events_;
    }

private:
    mutable std::mutex mutex_;
    std::vector<domain::domain_event> events_;
};

static_assert(event_sink<null_event_sink>);
static_assert(event_sink<memory_event_sink>);

} // namespace lcm::application
