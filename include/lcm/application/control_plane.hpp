// Command handlers of the control plane: they validate against the worker aggregate, save,
// and publish events. They never call CML.
#pragma once

#include <lcm/application/event_sink.hpp>
#include <lcm/application/worker_repository.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/uuid/random_generator.hpp>
#include <boost/uuid/uuid_io.hpp>

#include <chrono>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

namespace lcm::application {

/// The answer to an accepted license request: the operation a worker-controller will carry out.
struct operation_accepted {
    std::string worker_id;
    std::uint64_t operation_id = 0;
    domain::license_operation operation = domain::license_operation::none;

    friend bool operator==(const operation_accepted&, const operation_accepted&) = default;
};

/// The result of a claim: granted to the caller, or held by another controller.
struct operation_claim {
    /// The worker after the claim. When `granted` is false it is unchanged, and its license
    /// names the other controller's claim.
    domain::cml_worker worker;
    bool granted = false;
    /// The control plane's time when it decided, so that a caller can compute the time left
    /// on the claim (`claim_expires_at - decided_at`) without comparing clocks.
    timestamp decided_at{};
};

/// A request to add a worker. An empty `id` gets a random UUID.
struct add_worker_request {
    std::string id;
    std::string name;
    std::string cml_url;
    domain::worker_status status = domain::worker_status::running;
    std::string initiated_by;
};

struct control_plane_options {
    /// How many times a command tries to save, the first try included, before it returns
    /// `version_conflict`. Conflicts only happen when two writers touch one worker at the
    /// same moment, so a handful of tries is enough. Each try costs one read and one
    /// conditional write.
    int max_attempts = 8;
    /// The clock that claims are timed with; `now_utc` when empty.
    std::function<timestamp()> clock;
};

/// The control plane's command handlers.
///
/// Each mutating command loads the worker, applies one aggregate method, saves with the
/// version it read, and on `version_conflict` starts over, at most `max_attempts` times.
/// Events reach the sink only after the save succeeded, and a command that changed nothing
/// (an idempotent repeat) neither saves nor publishes.
///
/// Thread safety: as safe as the repository and the sink; the handlers keep no state of
/// their own besides the id generator, which is guarded. Cancellation: as the repository's.
template <worker_repository Repository, event_sink Sink>
class control_plane {
public:
    control_plane(Repository& repository, Sink& sink, logger log = {}, control_plane_options options = {})
        : repository_(repository), sink_(sink), log_(std::move(log)), options_(std::move(options))
    {
        if (!options_.clock) {
            options_.clock = [] { return now_utc(); };
        }
    }

    Repository& repository() noexcept { return repository_; }

    /// Adds a worker. Fails with `invalid_argument` or `already_exists`.
    boost::asio::awaitable<result<domain::cml_worker>> add_worker(add_worker_request request)
    {
        if (request.id.empty()) {
            request.id = generate_id();
        }
        BOOST_OUTCOME_CO_TRY(auto worker, domain::cml_worker::create(std::move(request.id), std::move(request.name),
                                                                     std::move(request.cml_url), request.status,
                                                                     request.initiated_by));
        BOOST_OUTCOME_CO_TRY(auto version, co_await repository_.add(worker));
        worker.set_version(version);
        log_.info("worker added", {{"worker_id", worker.id()}, {"status", std::string(to_string(worker.status()))}});
        co_await sink_.publish(worker.take_events());
        co_return worker;
    }

    boost::asio::awaitable<result<domain::cml_worker>> get_worker(std::string_view worker_id)
    {
        return repository_.get(worker_id);
    }

    /// Records a new lifecycle status for a worker.
    boost::asio::awaitable<result<domain::cml_worker>> change_worker_status(std::string worker_id,
                                                                            domain::worker_status status,
                                                                            std::string initiated_by)
    {
        co_return co_await mutate(worker_id, [&](domain::cml_worker& worker) -> result<void> {
            worker.change_status(status, initiated_by);
            return success();
        });
    }

    /// Records the intent to register `token` on a worker. See
    /// `cml_worker::request_license_registration` for the rules and errors.
    boost::asio::awaitable<result<operation_accepted>> request_registration(std::string worker_id, secret token,
                                                                            bool reregister,
                                                                            std::string initiated_by)
    {
        auto accepted = co_await mutate(worker_id, [&](domain::cml_worker& worker) -> result<operation_accepted> {
            BOOST_OUTCOME_TRY(auto operation_id, worker.request_license_registration(token, reregister, initiated_by));
            return operation_accepted{worker.id(), operation_id, domain::license_operation::registration};
        });
        log_outcome("license registration requested", worker_id, accepted);
        co_return accepted;
    }

    /// Records the intent to deregister a worker's license.
    boost::asio::awaitable<result<operation_accepted>> request_deregistration(std::string worker_id,
                                                                              std::string initiated_by)
    {
        auto accepted = co_await mutate(worker_id, [&](domain::cml_worker& worker) -> result<operation_accepted> {
            BOOST_OUTCOME_TRY(auto operation_id, worker.request_license_deregistration(initiated_by));
            return operation_accepted{worker.id(), operation_id, domain::license_operation::deregistration};
        });
        log_outcome("license deregistration requested", worker_id, accepted);
        co_return accepted;
    }

    /// Claims a worker's pending operation for `holder` for `lease`, or renews the holder's
    /// claim. See `cml_worker::claim_license_operation` for the rules. A claim held by another
    /// controller is not an error here: the answer has `granted` false and names that claim.
    /// Fails with `not_found` for an unknown worker or when no operation is pending, and
    /// `invalid_argument` for an empty or over-long holder or a lease that is not positive.
    boost::asio::awaitable<result<operation_claim>> claim_operation(std::string worker_id, std::string holder,
                                                                    std::chrono::milliseconds lease)
    {
        std::optional<domain::cml_worker> held_elsewhere;
        timestamp decided_at{};
        auto claimed = co_await mutate(worker_id, [&](domain::cml_worker& worker) -> result<void> {
            decided_at = options_.clock();
            auto fence = worker.claim_license_operation(holder, lease, decided_at);
            if (!fence) {
                if (fence.error() == errc::claimed) {
                    held_elsewhere = worker;
                }
                return fence.error();
            }
            return success();
        });
        if (!claimed && held_elsewhere) {
            co_return operation_claim{std::move(*held_elsewhere), false, decided_at};
        }
        if (!claimed) {
            co_return claimed.error();
        }
        if (log_.enabled(log_level::debug)) {
            const auto& license = claimed.value().license();
            log_.debug("license operation claimed", {{"worker_id", worker_id},
                                                     {"operation_id", std::to_string(license.operation_id())},
                                                     {"holder", holder},
                                                     {"fence", std::to_string(license.fence())},
                                                     {"expires_at", format_timestamp(*license.claim_expires_at())}});
        }
        co_return operation_claim{std::move(claimed).value(), true, decided_at};
    }

    /// Marks an operation as started, before a worker-controller first calls CML. `key`
    /// carries the fence of the controller's claim.
    boost::asio::awaitable<result<domain::cml_worker>> start_operation(std::string worker_id, domain::operation_key key)
    {
        // Returns mutate's awaitable without a coroutine frame of its own, so the change stores
        // the key by value.
        return mutate(std::move(worker_id),
                      [key](domain::cml_worker& worker) { return worker.start_license_operation(key); });
    }

    boost::asio::awaitable<result<domain::cml_worker>> complete_registration(std::string worker_id,
                                                                             domain::operation_key key,
                                                                             domain::registration_details details)
    {
        auto done = co_await mutate(worker_id, [&](domain::cml_worker& worker) -> result<void> {
            return worker.complete_license_registration(key, details);
        });
        log_finish("license registration completed", worker_id, key, done);
        co_return done;
    }

    boost::asio::awaitable<result<domain::cml_worker>> complete_deregistration(std::string worker_id,
                                                                               domain::operation_key key,
                                                                               std::optional<std::string> warning)
    {
        auto done = co_await mutate(worker_id, [&](domain::cml_worker& worker) -> result<void> {
            return worker.complete_license_deregistration(key, warning);
        });
        log_finish("license deregistration completed", worker_id, key, done);
        co_return done;
    }

    /// Records the failure of the operation, whichever kind it is. `message` may quote the
    /// token; the aggregate stores it redacted.
    boost::asio::awaitable<result<domain::cml_worker>> fail_operation(std::string worker_id, domain::operation_key key,
                                                                      std::string error_code, std::string message)
    {
        auto done = co_await mutate(worker_id, [&](domain::cml_worker& worker) -> result<void> {
            const auto& license = worker.license();
            // A finished operation keeps its kind in last_operation, so a repeated failure
            // still reaches the aggregate, which accepts it idempotently.
            const auto kind = license.operation_id() == key.operation_id && !license.has_pending_operation()
                                  ? license.last_operation()
                                  : license.pending_operation();
            if (kind == domain::license_operation::deregistration) {
                return worker.fail_license_deregistration(key, error_code, message);
            }
            return worker.fail_license_registration(key, error_code, message);
        });
        log_finish("license operation failed", worker_id, key, done);
        co_return done;
    }

private:
    /// The result of `mutate` with `Change`: the worker as saved (or as loaded, when nothing
    /// changed) for a change that returns `result<void>`, the change's own result otherwise.
    template <class Change>
    using mutate_result = std::conditional_t<std::is_same_v<std::invoke_result_t<Change&, domain::cml_worker&>, result<void>>,
                                             result<domain::cml_worker>, std::invoke_result_t<Change&, domain::cml_worker&>>;

    /// Loads, applies `change`, saves; retries on version conflicts. `change` returns
    /// `result<T>` and leaves the worker unchanged when it fails. A change that recorded no
    /// event and left the state as it was is not saved. A claim renewal records no event but
    /// moves the expiry, so it is saved.
    /// Takes the id by value, so that a command may return mutate's awaitable without
    /// awaiting it in a frame of its own.
    template <class Change>
    auto mutate(std::string worker_id, Change change) -> boost::asio::awaitable<mutate_result<Change>>
    {
        constexpr bool returns_worker = std::is_same_v<std::invoke_result_t<Change&, domain::cml_worker&>, result<void>>;
        for (int attempt = 1;; ++attempt) {
            BOOST_OUTCOME_CO_TRY(auto worker, co_await repository_.get(worker_id));
            const auto before = worker.changeable();
            auto outcome = change(worker);
            if (!outcome) {
                co_return outcome.error();
            }
            if (worker.events().empty() && worker.changeable() == before) {
                if constexpr (returns_worker) {
                    co_return std::move(worker);
                }
                else {
                    co_return outcome;
                }
            }

            auto saved = co_await repository_.update(worker);
            if (saved) {
                worker.set_version(saved.value());
                auto events = worker.take_events();
                co_await sink_.publish(std::move(events));
                if constexpr (returns_worker) {
                    co_return std::move(worker);
                }
                else {
                    co_return outcome;
                }
            }
            if (saved.error() != errc::version_conflict || attempt >= options_.max_attempts) {
                log_.warning("saving worker failed",
                             {{"worker_id", worker_id}, {"error", saved.error().message()},
                              {"attempts", std::to_string(attempt)}});
                co_return saved.error();
            }
            log_.debug("version conflict, retrying", {{"worker_id", worker_id}, {"attempt", std::to_string(attempt)}});
        }
    }

    void log_outcome(std::string_view message, const std::string& worker_id, const result<operation_accepted>& accepted)
    {
        // Checked first, because building the fields allocates even when the level is off.
        if (!log_.enabled(log_level::info)) {
            return;
        }
        if (accepted) {
            log_.info(message, {{"worker_id", worker_id}, {"operation_id", std::to_string(accepted.value().operation_id)}});
        }
        else {
            log_.info("license request rejected", {{"worker_id", worker_id}, {"error", accepted.error().message()}});
        }
    }

    void log_finish(std::string_view message, const std::string& worker_id, domain::operation_key key,
                    const result<domain::cml_worker>& done)
    {
        if (!log_.enabled(done ? log_level::info : log_level::warning)) {
            return;
        }
        if (done) {
            log_.info(message, {{"worker_id", worker_id},
                                {"operation_id", std::to_string(key.operation_id)},
                                {"fence", std::to_string(key.fence)}});
        }
        else {
            log_.warning("license operation report rejected", {{"worker_id", worker_id},
                                                               {"operation_id", std::to_string(key.operation_id)},
                                                               {"fence", std::to_string(key.fence)},
                                                               {"error", done.error().message()}});
        }
    }

    std::string generate_id()
    {
        std::lock_guard lock(id_mutex_);
        return boost::uuids::to_string(id_generator_());
    }

    Repository& repository_;
    Sink& sink_;
    logger log_;
    control_plane_options options_;
    std::mutex id_mutex_;
    boost::uuids::random_generator id_generator_;
};

} // namespace lcm::application
