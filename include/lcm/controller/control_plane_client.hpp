// The control-plane calls a worker-controller makes, and an in-process implementation of them.
#pragma once

#include <lcm/application/control_plane.hpp>
#include <lcm/domain/license.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>

#include <boost/asio/awaitable.hpp>

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
};

/// Builds the task of a worker's pending operation, or nothing when none is pending.
inline std::optional<license_task> task_of(const domain::cml_worker& worker)
{
    const auto& license = worker.license();
    if (!license.has_pending_operation()) {
        return std::nullopt;
    }
    return license_task{worker.id(),
                        worker.cml_url(),
                        worker.status(),
                        license.pending_operation(),
                        license.operation_id(),
                        license.operation_in_progress(),
                        license.reregister(),
                        license.pending_token(),
                        license.requested_at(),
                        license.started_at(),
                        license.attempts()};
}

/// The control-plane calls of a worker-controller.
///
/// - `list_pending(limit)`: tasks of up to `limit` workers with a pending operation.
/// - `get_task(worker_id)`: the worker's pending task, or an empty optional when none is
///   pending; `errc::not_found` for an unknown worker.
/// - `start`, `complete_registration`, `complete_deregistration`, `fail`: report a step of
///   operation `operation_id`; the control plane rejects any but the current operation with
///   `errc::stale_operation`, and accepts repeats of an applied step.
/// - `change_sequence()` and `wait_for_change(after)`: a feed that wakes the controller when
///   intents change, so that it need not poll.
template <class C>
concept control_plane_client = requires(C& client, std::string_view worker_id, std::uint64_t operation_id,
                                        std::size_t limit, domain::registration_details details,
                                        std::optional<std::string> warning, std::string text) {
    { client.list_pending(limit) } -> std::same_as<boost::asio::awaitable<result<std::vector<license_task>>>>;
    { client.get_task(worker_id) } -> std::same_as<boost::asio::awaitable<result<std::optional<license_task>>>>;
    { client.start(worker_id, operation_id) } -> std::same_as<boost::asio::awaitable<result<void>>>;
    {
        client.complete_registration(worker_id, operation_id, std::move(details))
    } -> std::same_as<boost::asio::awaitable<result<void>>>;
    {
        client.complete_deregistration(worker_id, operation_id, std::move(warning))
    } -> std::same_as<boost::asio::awaitable<result<void>>>;
    { client.fail(worker_id, operation_id, text, text) } -> std::same_as<boost::asio::awaitable<result<void>>>;
    { client.change_sequence() } -> std::same_as<boost::asio::awaitable<result<std::uint64_t>>>;
    { client.wait_for_change(operation_id) } -> std::same_as<boost::asio::awaitable<result<std::uint64_t>>>;
};

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
        for (const auto& worker : workers) {
            if (auto task = task_of(worker)) {
                tasks.push_back(std::move(*task));
            }
        }
        co_return tasks;
    }

    boost::asio::awaitable<result<std::optional<license_task>>> get_task(std::string_view worker_id)
    {
        BOOST_OUTCOME_CO_TRY(auto worker, co_await plane_.get_worker(worker_id));
        co_return task_of(worker);
    }

    boost::asio::awaitable<result<void>> start(std::string_view worker_id, std::uint64_t operation_id)
    {
        co_return discard(co_await plane_.start_operation(std::string(worker_id), operation_id));
    }

    boost::asio::awaitable<result<void>> complete_registration(std::string_view worker_id, std::uint64_t operation_id,
                                                               domain::registration_details details)
    {
        co_return discard(co_await plane_.complete_registration(std::string(worker_id), operation_id, std::move(details)));
    }

    boost::asio::awaitable<result<void>> complete_deregistration(std::string_view worker_id, std::uint64_t operation_id,
                                                                 std::optional<std::string> warning)
    {
        co_return discard(
            co_await plane_.complete_deregistration(std::string(worker_id), operation_id, std::move(warning)));
    }

    boost::asio::awaitable<result<void>> fail(std::string_view worker_id, std::uint64_t operation_id,
                                              std::string error_code, std::string message)
    {
        co_return discard(co_await plane_.fail_operation(std::string(worker_id), operation_id, std::move(error_code),
                                                         std::move(message)));
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
    static result<void> discard(const result<domain::cml_worker>& outcome)
    {
        if (!outcome) {
            return outcome.error();
        }
        return success();
    }

    application::control_plane<Repository, Sink>& plane_;
};

} // namespace lcm::controller
