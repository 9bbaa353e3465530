// What a user of the reconciler supplies: how to list keys, read desired and observed state, and
// reconcile them.
#pragma once

#include <lcm/error.hpp>
#include <lcm/reconcile/action.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/system/error_code.hpp>

#include <concepts>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace lcm::reconcile {

/// Why a key was handed to the terminal-failure hook.
struct terminal_failure {
    /// The error of the last attempt.
    boost::system::error_code error;
    /// Consecutive failed attempts, including the last one.
    std::uint32_t attempts = 0;
    /// True when retries stopped because the retry deadline passed; false for a terminal error.
    bool deadline_exceeded = false;
};

namespace detail {

template <class Key>
std::string format_key(const Key& key)
{
    if constexpr (std::is_convertible_v<const Key&, std::string_view>) {
        return std::string(std::string_view(key));
    } else if constexpr (requires { std::to_string(key); }) {
        return std::to_string(key);
    } else {
        return to_string(key);
    }
}

} // namespace detail

/// A key names one object to reconcile, such as a worker id. It is copied into the queue, hashed
/// with `std::hash`, and written into log records.
template <class Key>
concept reconcile_key = std::copy_constructible<Key> && std::equality_comparable<Key> &&
    requires(const Key& key) {
        { std::hash<Key>{}(key) } -> std::convertible_to<std::size_t>;
        { detail::format_key(key) } -> std::same_as<std::string>;
    };

/// The user's side of a reconciler for keys `Key`, desired state `Spec` and observed state `Status`.
///
/// - `list_keys()` returns every key that may need work. The reconciler calls it at startup and at
///   each resync, and queues the keys that have no pending work.
/// - `read_spec(key)` returns the desired state, or no value when nothing is desired: the key is
///   then done without a reconcile.
/// - `read_status(key, spec)` returns the observed state. Instead, a handler may offer
///   `read_status(key, spec, status)`, returning `result<void>`: it writes the observed state into
///   a default-constructed `Status` that the reconciler owns, which saves moving a large status out
///   of two awaitables. A handler that has both forms is called with the second.
/// - `reconcile(key, spec, status)` acts to bring the observed state to the desired one and returns
///   an `action`.
/// - `spec` and `status` are the reconciler's own copies, which it discards after the reconcile.
///   So `read_status` and `reconcile` may take `spec` as a non-const reference and change it,
///   and `reconcile` may do the same with `status` and move from both.
/// - Optionally, `on_terminal_failure(key, failure)` is awaited when a key gives up: after a
///   `terminal_error`, or when its retry deadline passed. Without it, the reconciler only logs.
///
/// Errors returned by `read_spec` or `read_status` are retried like `action::retry`. An exception
/// thrown by any of them is caught, logged and retried with backoff, because one faulty key must not
/// stop the others.
///
/// Thread safety: on a multi-threaded executor the member functions run concurrently for different
/// keys, never for the same key. Cancellation: a reconcile that outlives its timeout, or the stop
/// grace period, gets a terminal cancellation through the awaitable's cancellation state.
template <class H, class Key, class Spec, class Status>
concept reconcile_handler =
    requires(H& handler, const Key& key, Spec& owned_spec, Status& owned_status) {
        { handler.list_keys() } -> std::same_as<boost::asio::awaitable<result<std::vector<Key>>>>;
        { handler.read_spec(key) } -> std::same_as<boost::asio::awaitable<result<std::optional<Spec>>>>;
        { handler.reconcile(key, owned_spec, owned_status) } -> std::same_as<boost::asio::awaitable<action>>;
    } &&
    (requires(H& handler, const Key& key, Spec& owned_spec) {
        { handler.read_status(key, owned_spec) } -> std::same_as<boost::asio::awaitable<result<Status>>>;
    } || (std::default_initializable<Status> && requires(H& handler, const Key& key, Spec& owned_spec, Status& status) {
        { handler.read_status(key, owned_spec, status) } -> std::same_as<boost::asio::awaitable<result<void>>>;
    }));

/// Whether `H` writes the observed state into the reconciler's status instead of returning it.
template <class H, class Key, class Spec, class Status>
concept reads_status_in_place = requires(H& handler, const Key& key, Spec& owned_spec, Status& status) {
    { handler.read_status(key, owned_spec, status) } -> std::same_as<boost::asio::awaitable<result<void>>>;
};

/// Whether `H` has the optional terminal-failure hook.
template <class H, class Key>
concept has_terminal_failure_hook = requires(H& handler, const Key& key, const terminal_failure& failure) {
    { handler.on_terminal_failure(key, failure) } -> std::same_as<boost::asio::awaitable<void>>;
};

} // namespace lcm::reconcile
