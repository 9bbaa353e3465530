// The control-plane calls a worker-controller makes, and an in-process implementation of them.
#pragma once

#include <lcm/application/control_plane.hpp>
#include <lcm/domain/license.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>

#include <boost/asio/awaitable.hpp>

#include <algorithm>
#include <chrono>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::controller {

/// A pending license operation as a worker-controller sees it: the desired state of one worker.
struct license_task {
    std::string worker_id;
    std::string cml_url;
    domain::worker_status worker_status = domain::worker_status::unknown;
    domain::license_operation operation = domain::license_operation::none;
    std::uint64_t operation_id = 0;
    /// Whether some controller already recorded `start` for this operation, so CML may have
    /// received a mutating call for it.
    bool started = false;
    bool reregister = false;
    /// The token to register; set for registrations only.
    std::optional<secret> token;
    std::optional<timestamp> requested_at;
    std::optional<timestamp> started_at;
    std::uint32_t attempts = 0;
    /// The controller that holds the claim on the operation; empty while unclaimed.
    std::string claim_holder;
    /// When the claim expires, on the control plane's clock.
    std::optional<timestamp> claim_expires_at;
    /// The fence of the claim, which `start`, `complete_*` and `fail` carry.
    std::uint64_t fence = domain::no_fence;
    /// Time left on the claim when the control plane granted it; zero in tasks read otherwise.
    /// A controller adds it to its own clock, so clocks that disagree do not skew the wait.
    std::chrono::milliseconds claim_remaining{0};
    /// The earliest expiry of this controller's claim on its own steady clock, which is the
    /// time just before it sent the claim request plus `claim_remaining`. The license handler
    /// sets it on its own claims. Tasks read otherwise leave it empty.
    std::optional<std::chrono::steady_clock::time_point> claim_deadline{};

    /// Returns the key that reports on this task name: its operation and its claim's fence.
    domain::operation_key key() const noexcept { return {operation_id, fence}; }
};

/// The result of `claim`: the claimed task, or the claim another controller holds.
struct license_claim {
    /// The task with the caller's fence; empty when another controller holds the claim.
    std::optional<license_task> task;
    /// The holder of the claim: the caller when granted, another controller otherwise.
    std::string holder;
    timestamp expires_at{};
    /// Time left on the claim when the control plane decided.
    std::chrono::milliseconds remaining{0};
};

namespace detail {

/// Builds the task of a pending operation from the worker's id, URL, status and license. The
/// strings are forwarded, so that each is copied or moved once, straight into the task.
template <class Id, class Url>
license_task make_task(Id&& worker_id, Url&& cml_url, domain::worker_status status, const domain::cml_license& license)
{
    return license_task{std::forward<Id>(worker_id),
                        std::forward<Url>(cml_url),
                        status,
                        license.pending_operation(),
                        license.operation_id(),
                        license.operation_in_progress(),
                        license.reregister(),
                        license.pending_token(),
                        license.requested_at(),
                        license.started_at(),
                        license.attempts(),
                        license.claim_holder(),
                        license.claim_expires_at(),
                        license.fence()};
}

} // namespace detail

/// Builds the task of a worker's pending operation, or nothing when none is pending.
inline std::optional<license_task> task_of(const domain::cml_worker& worker)
{
    if (!worker.license().has_pending_operation()) {
        return std::nullopt;
    }
    return detail::make_task(worker.id(), worker.cml_url(), worker.status(), worker.license());
}

/// Builds the task like `task_of(const cml_worker&)`, but moves the worker's id and URL
/// instead of copying them.
inline std::optional<license_task> task_of(domain::cml_worker&& worker)
{
    if (!worker.license().has_pending_operation()) {
        return std::nullopt;
    }
    auto state = std::move(worker).release_state();
    return detail::make_task(std::move(state.id), std::move(state.cml_url), state.status, state.license);
}

/// Builds the result of a claim from the control plane's decision.
inline license_claim claim_of(const application::claim_view& decision)
{
    const auto& license = decision.worker.license();
    license_claim claim;
    claim.holder = license.claim_holder();
    claim.expires_at = license.claim_expires_at().value_or(decision.decided_at);
    const auto left = std::chrono::duration_cast<std::chrono::milliseconds>(claim.expires_at - decision.decided_at);
    claim.remaining = std::max(left, std::chrono::milliseconds::zero());
    if (decision.granted) {
        claim.task = task_of(decision.worker);
        claim.task->claim_remaining = claim.remaining;
    }
    return claim;
}

inline license_claim claim_of(const application::operation_claim& decision)
{
    return claim_of(application::claim_view{decision.worker, decision.granted, decision.decided_at});
}

/// The control-plane calls of a worker-controller.
///
/// - `list_pending(limit)`: tasks of up to `limit` workers with a pending operation.
/// - `get_task(worker_id)`: the worker's pending task, or an empty optional when none is
///   pending; `errc::not_found` for an unknown worker.
/// - `claim(worker_id, holder, lease)`: claims the pending operation for `holder` for
///   `lease`, or renews the holder's claim. While another controller holds the claim, the
///   result carries that claim instead of a task. Fails with `errc::not_found` for an
///   unknown worker or when no operation is pending.
/// - `start`, `complete_registration`, `complete_deregistration`, `fail`: report a step of
///   the operation that `key` names, under the claim whose fence `key` carries. The control
///   plane rejects any but the current operation with `errc::stale_operation` and a fence
///   other than the current claim's with `errc::claim_lost`. It accepts repeats of an
///   applied step.
/// - `change_sequence()` and `wait_for_change(after)`: a feed that wakes the controller when
///   intents change, so that it need not poll.
///
/// A client may also offer `list_pending_keys(limit)`: the worker ids of `list_pending`, which
/// a controller that only enqueues them reads through `list_pending_keys(client, limit)`.
template <class C>
concept control_plane_client = requires(C& client, std::string_view worker_id, std::uint64_t sequence,
                                        domain::operation_key key, std::size_t limit,
                                        std::chrono::milliseconds lease, domain::registration_details details,
                                        std::optional<std::string> warning, std::string text) {
    { client.list_pending(limit) } -> std::same_as<boost::asio::awaitable<result<std::vector<license_task>>>>;
    { client.get_task(worker_id) } -> std::same_as<boost::asio::awaitable<result<std::optional<license_task>>>>;
    { client.claim(worker_id, worker_id, lease) } -> std::same_as<boost::asio::awaitable<result<license_claim>>>;
    { client.start(worker_id, key) } -> std::same_as<boost::asio::awaitable<result<void>>>;
    {
        client.complete_registration(worker_id, key, std::move(details))
    } -> std::same_as<boost::asio::awaitable<result<void>>>;
    {
        client.complete_deregistration(worker_id, key, std::move(warning))
    } -> std::same_as<boost::asio::awaitable<result<void>>>;
    { client.fail(worker_id, key, text, text) } -> std::same_as<boost::asio::awaitable<result<void>>>;
    { client.change_sequence() } -> std::same_as<boost::asio::awaitable<result<std::uint64_t>>>;
    { client.wait_for_change(sequence) } -> std::same_as<boost::asio::awaitable<result<std::uint64_t>>>;
};

/// Returns the ids of up to `limit` workers with a pending operation, oldest request first:
/// from `client.list_pending_keys` when the client offers it, from `list_pending` otherwise.
template <control_plane_client C>
boost::asio::awaitable<result<std::vector<std::string>>> list_pending_keys(C& client, std::size_t limit)
{
    if constexpr (requires {
                      { client.list_pending_keys(limit) } -> std::same_as<boost::asio::awaitable<result<std::vector<std::string>>>>;
                  }) {
        co_return co_await client.list_pending_keys(limit);
    }
    else {
        BOOST_OUTCOME_CO_TRY(auto tasks, co_await client.list_pending(limit));
        std::vector<std::string> keys;
        keys.reserve(tasks.size());
        for (auto& task : tasks) {
            keys.push_back(std::move(task.worker_id));
        }
        co_return keys;
    }
}

/// A `control_plane_client` that calls the command handlers in the same process, for
/// single-process deployments, tests and benchmarks. Thread safety and cancellation are
/// those of the control plane's repository.
template <application::worker_repository Repository, application::event_sink Sink>
class in_process_control_plane_client {
public:
    explicit in_process_control_plane_client(application::control_plane<Repository, Sink>& plane) : plane_(plane) {}

    boost::asio::awaitable<result<std::vector<license_task>>> list_pending(std::size_t limit)
    {
        BOOST_OUTCOME_CO_TRY(auto workers, co_await plane_.repository().list_pending(limit));
        std::vector<license_task> tasks;
        tasks.reserve(workers.size());
        for (auto& worker : workers) {
            if (auto task = task_of(std::move(worker))) {
                tasks.push_back(std::move(*task));
            }
        }
        co_return tasks;
    }

    /// Lists the ids of `list_pending` without copying workers or building tasks. Present only
    /// with a repository that offers `list_pending_ids`, such as the memory repository;
    /// `list_pending_keys(client, limit)` falls back to `list_pending` otherwise.
    boost::asio::awaitable<result<std::vector<std::string>>> list_pending_keys(std::size_t limit)
        requires requires(Repository& repository) {
            { repository.list_pending_ids(std::size_t{}) } -> std::same_as<boost::asio::awaitable<result<std::vector<std::string>>>>;
        }
    {
        return plane_.repository().list_pending_ids(limit);
    }

    boost::asio::awaitable<result<std::optional<license_task>>> get_task(std::string_view worker_id)
    {
        BOOST_OUTCOME_CO_TRY(auto worker, co_await plane_.get_worker(worker_id));
        co_return task_of(worker);
    }

    // The reports return the control plane's awaitables directly, without a coroutine frame of
    // their own, and project the claim or nothing instead of copying the worker.

    boost::asio::awaitable<result<license_claim>> claim(std::string_view worker_id, std::string_view holder,
                                                        std::chrono::milliseconds lease)
    {
        return plane_.claim_operation(std::string(worker_id), std::string(holder), lease, project_claim{});
    }

    boost::asio::awaitable<result<void>> start(std::string_view worker_id, domain::operation_key key)
    {
        return plane_.start_operation(std::string(worker_id), key, application::discard_worker{});
    }

    boost::asio::awaitable<result<void>> complete_registration(std::string_view worker_id, domain::operation_key key,
                                                               domain::registration_details details)
    {
        return plane_.complete_registration(std::string(worker_id), key, std::move(details),
                                            application::discard_worker{});
    }

    boost::asio::awaitable<result<void>> complete_deregistration(std::string_view worker_id, domain::operation_key key,
                                                                 std::optional<std::string> warning)
    {
        return plane_.complete_deregistration(std::string(worker_id), key, std::move(warning),
                                              application::discard_worker{});
    }

    boost::asio::awaitable<result<void>> fail(std::string_view worker_id, domain::operation_key key,
                                              std::string error_code, std::string message)
    {
        return plane_.fail_operation(std::string(worker_id), key, std::move(error_code), std::move(message),
                                     application::discard_worker{});
    }

    boost::asio::awaitable<result<std::uint64_t>> change_sequence()
    {
        co_return plane_.repository().change_sequence();
    }

    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        return plane_.repository().wait_for_change(after);
    }

private:
    struct project_claim {
        license_claim operator()(const application::claim_view& decision) const { return claim_of(decision); }
    };

    application::control_plane<Repository, Sink>& plane_;
};

} // namespace lcm::controller
