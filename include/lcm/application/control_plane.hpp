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

/// A claim decision as a projection of `claim_operation` sees it. `worker` is the worker after
/// the claim; when `granted` is false it is unchanged and its license names the other claim.
struct claim_view {
    const domain::cml_worker& worker;
    bool granted = false;
    timestamp decided_at{};
};

/// The projection that makes a command return a copy of the worker it saved: the default.
struct copy_worker {
    domain::cml_worker operator()(const domain::cml_worker& worker) const { return worker; }
    domain::cml_worker operator()(domain::cml_worker&& worker) const { return std::move(worker); }
    operation_claim operator()(const claim_view& claim) const { return {claim.worker, claim.granted, claim.decided_at}; }
};

/// The projection that makes a command return `result<void>`, for callers that need nothing
/// of the saved worker.
struct discard_worker {
    void operator()(const domain::cml_worker&) const noexcept {}
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
/// With a `lending_worker_repository` it changes the stored worker in place instead, which
/// cannot conflict. Events reach the sink only after the save succeeded, and a command that
/// changed nothing (an idempotent repeat) neither saves nor publishes.
///
/// The commands that report on an operation (`claim_operation`, `start_operation`,
/// `complete_*`, `fail_operation`) take a projection of the saved worker, which decides what
/// they return: a copy of the worker by default (`copy_worker`), nothing with
/// `discard_worker`. It may run with the repository locked, so it must be quick and must not
/// call the repository.
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
        if constexpr (publishes_at_once<Sink>) {
            sink_.publish(worker.take_events());
        }
        else {
            co_await sink_.publish(worker.take_events());
        }
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
        co_return co_await mutate(
            worker_id,
            [&](domain::cml_worker& worker) -> result<void> {
                worker.change_status(status, initiated_by);
                return success();
            },
            copy_worker{});
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
        }, discard_worker{});
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
        }, discard_worker{});
        log_outcome("license deregistration requested", worker_id, accepted);
        co_return accepted;
    }

    /// Claims a worker's pending operation for `holder` for `lease`, or renews the holder's
    /// claim. See `cml_worker::claim_license_operation` for the rules. A claim held by another
    /// controller is not an error here: the answer has `granted` false and names that claim.
    /// Fails with `not_found` for an unknown worker or when no operation is pending, and
    /// `invalid_argument` for an empty or over-long holder or a lease that is not positive.
    /// `project` receives a `claim_view` and builds the result; the default builds an `operation_claim`.
    template <class Project = copy_worker>
    auto claim_operation(std::string worker_id, std::string holder, std::chrono::milliseconds lease,
                         Project project = {})
        -> boost::asio::awaitable<result<std::invoke_result_t<Project&, const claim_view&>>>
    {
        // Returns mutate's awaitable without a coroutine frame of its own: the change and the
        // projection carry everything by value.
        return mutate(std::move(worker_id), claim_change{std::move(holder), lease, &options_.clock},
                      claim_projection<Project>{std::move(project)}, claim_log{this});
    }

    /// Marks an operation as started, before a worker-controller first calls CML. `key`
    /// carries the fence of the controller's claim.
    template <class Project = copy_worker>
    auto start_operation(std::string worker_id, domain::operation_key key, Project project = {})
    {
        // Returns mutate's awaitable without a coroutine frame of its own, so the change stores
        // the key by value.
        return mutate(
            std::move(worker_id), [key](domain::cml_worker& worker) { return worker.start_license_operation(key); },
            std::move(project));
    }

    template <class Project = copy_worker>
    auto complete_registration(std::string worker_id, domain::operation_key key,
                               domain::registration_details details, Project project = {})
    {
        return mutate(
            std::move(worker_id),
            [key, details = std::move(details)](domain::cml_worker& worker) mutable {
                return worker.complete_license_registration(key, pass_on(details));
            },
            std::move(project), finish_log{this, "license registration completed", key});
    }

    template <class Project = copy_worker>
    auto complete_deregistration(std::string worker_id, domain::operation_key key,
                                 std::optional<std::string> warning, Project project = {})
    {
        return mutate(
            std::move(worker_id),
            [key, warning = std::move(warning)](domain::cml_worker& worker) mutable {
                return worker.complete_license_deregistration(key, pass_on(warning));
            },
            std::move(project), finish_log{this, "license deregistration completed", key});
    }

    /// Records the failure of the operation, whichever kind it is. `message` may quote the
    /// token; the aggregate stores it redacted.
    template <class Project = copy_worker>
    auto fail_operation(std::string worker_id, domain::operation_key key, std::string error_code, std::string message,
                        Project project = {})
    {
        auto fail = [key, error_code = std::move(error_code),
                     message = std::move(message)](domain::cml_worker& worker) mutable -> result<void> {
            const auto& license = worker.license();
            // A finished operation keeps its kind in last_operation, so a repeated failure
            // still reaches the aggregate, which accepts it idempotently.
            const auto kind = license.operation_id() == key.operation_id && !license.has_pending_operation()
                                  ? license.last_operation()
                                  : license.pending_operation();
            if (kind == domain::license_operation::deregistration) {
                return worker.fail_license_deregistration(key, pass_on(error_code), pass_on(message));
            }
            return worker.fail_license_registration(key, pass_on(error_code), pass_on(message));
        };
        return mutate(std::move(worker_id), std::move(fail), std::move(project),
                      finish_log{this, "license operation failed", key});
    }

private:
    /// The change of `claim_operation`. A claim of another controller is not an error: it
    /// changes nothing, and the projection returns that claim. A granted claim keeps what the
    /// log line names, because the log is written after the repository's lock is released.
    struct claim_change {
        std::string holder;
        std::chrono::milliseconds lease;
        const std::function<timestamp()>* clock;
        timestamp decided_at{};
        bool granted = false;
        std::uint64_t operation_id = 0;
        std::uint64_t fence = 0;
        timestamp expires_at{};

        result<void> operator()(domain::cml_worker& worker)
        {
            decided_at = (*clock)();
            auto claimed = worker.claim_license_operation(holder, lease, decided_at);
            granted = claimed.has_value();
            if (!claimed) {
                return claimed.error() == errc::claimed ? success() : result<void>(claimed.error());
            }
            operation_id = worker.license().operation_id();
            fence = claimed.value();
            expires_at = *worker.license().claim_expires_at();
            return success();
        }
    };

    /// The projection of `claim_operation`: the caller's projection of a `claim_view`.
    template <class Project>
    struct claim_projection {
        Project project;

        auto operator()(const domain::cml_worker& worker, const claim_change& change)
        {
            return project(claim_view{worker, change.granted, change.decided_at});
        }
    };

    /// The type a projection makes of the saved worker. A projection may also take the change,
    /// to build its result from what the change found out.
    template <class Project, class Change>
    using projected_t = std::conditional_t<std::is_invocable_v<Project&, const domain::cml_worker&, Change&>,
                                           std::invoke_result<Project&, const domain::cml_worker&, Change&>,
                                           std::invoke_result<Project&, const domain::cml_worker&>>;

    /// The result of `mutate`: the change's own result, or for a change that returns
    /// `result<void>`, the projection of the saved worker (`result<void>` when it returns nothing).
    template <class Change, class Project>
    using mutate_result =
        std::conditional_t<std::is_same_v<std::invoke_result_t<Change&, domain::cml_worker&>, result<void>>,
                           result<typename projected_t<Project, Change>::type>,
                           std::invoke_result_t<Change&, domain::cml_worker&>>;

    // The log functors of `mutate` get the worker id, the error or null on success, and the
    // change, and run after the repository's lock is released.

    /// Logs nothing about a command's end.
    struct no_log {
        template <class Change>
        void operator()(const std::string&, const boost::system::error_code*, const Change&) const noexcept
        {
        }
    };

    /// Logs a granted claim at debug level.
    struct claim_log {
        control_plane* plane;

        void operator()(const std::string& worker_id, const boost::system::error_code* error,
                        const claim_change& change) const
        {
            const auto& log = plane->log_;
            if (error != nullptr || !change.granted || !log.enabled(log_level::debug)) {
                return;
            }
            log.debug("license operation claimed", {{"worker_id", worker_id},
                                                    {"operation_id", std::to_string(change.operation_id)},
                                                    {"holder", change.holder},
                                                    {"fence", std::to_string(change.fence)},
                                                    {"expires_at", format_timestamp(change.expires_at)}});
        }
    };

    /// Logs the end of a report on an operation: info when applied, a warning when rejected.
    struct finish_log {
        control_plane* plane;
        std::string_view message;
        domain::operation_key key;

        template <class Change>
        void operator()(const std::string& worker_id, const boost::system::error_code* error, const Change&) const
        {
            plane->log_finish(message, worker_id, key, error);
        }
    };

    /// Hands an argument of a change on to the aggregate: moved when the change runs once, as
    /// with a lending repository, and copied when a version conflict may run it again.
    template <class T>
    static T pass_on(T& value)
    {
        if constexpr (lending_worker_repository<Repository>) {
            return std::move(value);
        }
        else {
            return value;
        }
    }

    /// Applies `change` to the worker and saves it; see the class comment. `change` returns
    /// `result<T>` and leaves the worker unchanged when it fails. A change that recorded no
    /// event and left the state as it was is not saved. A claim renewal records no event but
    /// moves the expiry, so it is saved. `log` is called once with the worker id, the error or
    /// null on success, and the change.
    /// Takes the id by value, so that a command may return mutate's awaitable without
    /// awaiting it in a frame of its own.
    template <class Change, class Project, class Log = no_log>
    auto mutate(std::string worker_id, Change change, Project project, Log log = {})
        -> boost::asio::awaitable<mutate_result<Change, Project>>
    {
        if constexpr (lending_worker_repository<Repository>) {
            std::vector<domain::domain_event> events;
            auto answer = change_lent_worker(worker_id, change, project, events);
            // The loan has ended, so the log and the sink run without the repository's lock.
            log(worker_id, answer ? nullptr : &answer.error(), change);
            if (!events.empty()) {
                if constexpr (publishes_at_once<Sink>) {
                    sink_.publish(std::move(events));
                }
                else {
                    co_await sink_.publish(std::move(events));
                }
            }
            co_return answer;
        }
        else {
            for (int attempt = 1;; ++attempt) {
                auto loaded = co_await repository_.get(worker_id);
                if (!loaded) {
                    log(worker_id, &loaded.error(), change);
                    co_return loaded.error();
                }
                auto& worker = loaded.value();
                const auto before = worker.revision();
                auto outcome = change(worker);
                if (!outcome) {
                    log(worker_id, &outcome.error(), change);
                    co_return outcome.error();
                }
                if (worker.events().empty() && worker.revision() == before) {
                    log(worker_id, nullptr, change);
                    co_return answer_of<mutate_result<Change, Project>>(outcome, project, change, std::move(worker));
                }

                auto saved = co_await repository_.update(worker);
                if (saved) {
                    worker.set_version(saved.value());
                    auto events = worker.take_events();
                    log(worker_id, nullptr, change);
                    if constexpr (publishes_at_once<Sink>) {
                        sink_.publish(std::move(events));
                    }
                    else {
                        co_await sink_.publish(std::move(events));
                    }
                    co_return answer_of<mutate_result<Change, Project>>(outcome, project, change, std::move(worker));
                }
                if (saved.error() != errc::version_conflict || attempt >= options_.max_attempts) {
                    log_.warning("saving worker failed",
                                 {{"worker_id", worker_id}, {"error", saved.error().message()},
                                  {"attempts", std::to_string(attempt)}});
                    log(worker_id, &saved.error(), change);
                    co_return saved.error();
                }
                log_.debug("version conflict, retrying", {{"worker_id", worker_id}, {"attempt", std::to_string(attempt)}});
            }
        }
    }

    /// The part of `mutate` with a lending repository that keeps the loan: applies `change`,
    /// saves when it changed the worker, and moves the events into `events`. A function of
    /// its own, because every local of a coroutine takes room in its frame, and a frame over
    /// 1 KiB misses the allocation caches of Asio and glibc.
    template <class Change, class Project>
    mutate_result<Change, Project> change_lent_worker(const std::string& worker_id, Change& change, Project& project,
                                                      std::vector<domain::domain_event>& events)
    {
        auto loan = repository_.borrow(worker_id);
        if (!loan) {
            return loan.error();
        }
        auto& worker = loan.value().worker();
        auto outcome = change(worker);
        if (!outcome) {
            return outcome.error();
        }
        if (loan.value().changed()) {
            events = loan.value().save();
        }
        return answer_of<mutate_result<Change, Project>>(outcome, project, change, std::as_const(worker));
    }

    /// Builds mutate's result from a change's successful `outcome`: the outcome itself, or the
    /// projection of the saved worker for a change that returns `result<void>`.
    /// The worker is moved into the projection when it is the command's own copy.
    template <class Answer, class Outcome, class Project, class Change, class Worker>
    static Answer answer_of(Outcome& outcome, Project& project, Change& change, Worker&& worker)
    {
        if constexpr (!std::is_same_v<Outcome, result<void>>) {
            return std::move(outcome);
        }
        else {
            auto apply = [&]() -> decltype(auto) {
                if constexpr (std::is_invocable_v<Project&, const domain::cml_worker&, Change&>) {
                    return project(std::as_const(worker), change);
                }
                else {
                    return project(std::forward<Worker>(worker));
                }
            };
            if constexpr (std::is_void_v<typename projected_t<Project, Change>::type>) {
                apply();
                return success();
            }
            else {
                return apply();
            }
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
                    const boost::system::error_code* error)
    {
        if (!log_.enabled(error == nullptr ? log_level::info : log_level::warning)) {
            return;
        }
        if (error == nullptr) {
            log_.info(message, {{"worker_id", worker_id},
                                {"operation_id", std::to_string(key.operation_id)},
                                {"fence", std::to_string(key.fence)}});
        }
        else {
            log_.warning("license operation report rejected", {{"worker_id", worker_id},
                                                               {"operation_id", std::to_string(key.operation_id)},
                                                               {"fence", std::to_string(key.fence)},
                                                               {"error", error->message()}});
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
