// The repository concept: how the application layer loads and saves worker aggregates.
#pragma once

#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>

#include <boost/asio/awaitable.hpp>

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::application {

/// A repository of `cml_worker` aggregates with optimistic concurrency.
///
/// - `get(id)`: the stored worker, or `errc::not_found`.
/// - `add(worker)`: stores a new worker and returns its version (1); `errc::already_exists`
///   when the id is taken.
/// - `update(worker)`: stores the worker if the stored version still equals
///   `worker.version()`, and returns the new version; `errc::version_conflict` otherwise,
///   `errc::not_found` for an unknown id.
/// - `list(after_id, limit)`: up to `limit` workers ordered by id, starting after `after_id`
///   (empty for the first page).
/// - `list_pending(limit)`: up to `limit` workers with a pending license operation, oldest
///   request first; its cost grows with the number of pending operations, not with all workers.
/// - `change_sequence()` and `wait_for_change(after)`: a counter that grows with every
///   committed change, and a wait until it passes `after` (cancellable; `errc::cancelled`).
///
/// Implementations are safe to call concurrently from any thread of a multi-threaded
/// `io_context`, and every operation honours the awaiting coroutine's cancellation.
template <class R>
concept worker_repository = requires(R& repository, const domain::cml_worker& worker, std::string_view id,
                                     std::size_t limit, std::uint64_t sequence) {
    { repository.get(id) } -> std::same_as<boost::asio::awaitable<result<domain::cml_worker>>>;
    { repository.add(worker) } -> std::same_as<boost::asio::awaitable<result<std::uint64_t>>>;
    { repository.update(worker) } -> std::same_as<boost::asio::awaitable<result<std::uint64_t>>>;
    { repository.list(id, limit) } -> std::same_as<boost::asio::awaitable<result<std::vector<domain::cml_worker>>>>;
    { repository.list_pending(limit) } -> std::same_as<boost::asio::awaitable<result<std::vector<domain::cml_worker>>>>;
    { repository.change_sequence() } -> std::same_as<std::uint64_t>;
    { repository.wait_for_change(sequence) } -> std::same_as<boost::asio::awaitable<result<std::uint64_t>>>;
};

/// A `worker_repository` that can also lend a stored worker for a change in place, which saves
/// copying the worker into and out of the repository. The control plane uses it when present.
///
/// - `borrow(id)`: a loan of the stored worker, or `errc::not_found`. The repository stays
///   locked while the loan lives, and the loan must end before its holder suspends.
/// - `loan.worker()`: the stored worker itself. A change that fails must leave it as it was,
///   as the aggregate's methods do, because the loan keeps no copy to put back.
/// - `loan.changed()`: whether the worker recorded an event or changed a field since the loan
///   began.
/// - `loan.save()`: keeps the change under the next version and returns the change's events.
///
/// Only a repository whose state lives in the process can offer this; a database cannot hold
/// a row lent out without a transaction.
template <class R>
concept lending_worker_repository = worker_repository<R> && requires(R& repository, std::string_view id) {
    { repository.borrow(id).value().worker() } -> std::same_as<domain::cml_worker&>;
    { repository.borrow(id).value().changed() } -> std::same_as<bool>;
    { repository.borrow(id).value().save() } -> std::same_as<std::vector<domain::domain_event>>;
};

} // namespace lcm::application
