// The license reconciler: drives each worker's CML host to the license intent that the
// control plane recorded, on top of the generic reconcile loop.
#pragma once

#include <lcm/controller/cml_client.hpp>
#include <lcm/controller/control_plane_client.hpp>
#include <lcm/controller/license_decision.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/reconcile/reconciler.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json/value.hpp>

#include <unistd.h>

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <exception>
#include <functional>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace lcm::controller {

struct license_reconciler_options {
    license_decision_options decision;
    /// How long to wait before reading CML's licensing status again while a registration
    /// runs. CML's own Python client polls every 1.5 s.
    std::chrono::milliseconds poll_interval{1500};
    /// The maximum number of pending operations one listing returns, at startup, at each resync and after
    /// each change notification. Oldest requests come first, and each finished operation is
    /// a change, so a backlog larger than this is worked off in order. It must not exceed the
    /// control plane's page size limit (500 by default in lcm's HTTP API).
    std::size_t list_limit = 500;
    /// The wall clock that operation deadlines are measured with; `now_utc` when empty.
    std::function<timestamp()> wall_clock;
    /// The id under which this controller claims operations. It must differ between the
    /// controllers that share a control plane. Empty: `default_controller_id()`.
    std::string controller_id;
    /// How long a claim lasts without renewal. A crashed controller's operations wait this
    /// long before another controller takes them over. Each reconcile renews the claim once
    /// less than half of it remains, so it must be more than twice `poll_interval`. Otherwise
    /// a registration that CML is still working on would lose its claim between polls.
    /// The fence guards the control plane, not CML, so every call to CML must end while the
    /// claim lasts. A reconcile starts with at least half of the lease left on its claim, and
    /// `license_controller` limits the reconcile timeout to half of the lease. A mutating call
    /// starts only with at least a quarter of the lease left; otherwise the worker is requeued
    /// and the claim renewed first.
    std::chrono::milliseconds lease{30000};
    /// How long after another controller's claim expires this controller tries to take it over,
    /// so that the holder's last renewal wins a close race.
    std::chrono::milliseconds takeover_margin{500};
    logger log;
};

/// Returns an id that is unique per controller process: `HOSTNAME-PID-SUFFIX`, with a random
/// hexadecimal suffix, so that a restarted process on the same host gets a new id.
inline std::string default_controller_id()
{
    char host[256] = {};
    if (::gethostname(host, sizeof host - 1) != 0 || host[0] == '\0') {
        std::snprintf(host, sizeof host, "%s", "controller");
    }
    std::random_device random;
    char suffix[9];
    std::snprintf(suffix, sizeof suffix, "%08x", static_cast<unsigned>(random()));
    auto id = std::string(host) + "-" + std::to_string(::getpid()) + "-" + suffix;
    if (id.size() > domain::max_claim_holder_length) {
        id.erase(0, id.size() - domain::max_claim_holder_length);
    }
    return id;
}

/// The observation of `read_status`: CML's licensing status, a decision taken without it
/// (the worker stopped, the deadline passed, or CML rejected the read permanently), or
/// another controller's claim.
struct license_observation {
    std::optional<cml_licensing_status> cml;
    std::optional<license_decision> verdict;
    /// Set when another controller holds the claim: how long until it expires. CML was not read.
    std::optional<std::chrono::milliseconds> claimed_elsewhere_for;
};

namespace detail {

// Copies from a status that is read again later, moves from one that is about to go.
template <class Status>
domain::registration_details registration_details_of(Status&& status)
{
    constexpr bool owned = !std::is_lvalue_reference_v<Status>;
    auto pass = [](auto& field) -> decltype(auto) {
        if constexpr (owned) {
            return std::move(field);
        }
        else {
            return std::as_const(field);
        }
    };
    domain::registration_details details;
    details.registration_status = std::string(to_string(status.registration_status));
    details.smart_account = pass(status.smart_account).value_or(std::string());
    details.virtual_account = pass(status.virtual_account).value_or(std::string());
    details.expiry_date = status.registration_expires;
    details.authorization_status = status.authorization_status == cml_authorization_status::unknown
                                       ? std::string(pass(status.authorization_status_text))
                                       : std::string(to_string(status.authorization_status));
    // Each feature and CML's info are built in their final place, which saves moving their strings.
    details.features.reserve(status.features.size());
    for (auto& feature : status.features) {
        auto& added = details.features.emplace_back();
        added.id = pass(feature.id);
        added.name = pass(feature.name);
        added.version = pass(feature.version);
        added.status = pass(feature.status);
        added.in_use = feature.in_use;
    }
    // Reserved and filled, because the initializer-list constructor allocates the table twice.
    auto& info = details.cml_info.emplace_object();
    info.reserve(2);
    info.emplace("product_license", status.product_license);
    info.emplace("is_enterprise", status.is_enterprise);
    return details;
}

} // namespace detail

/// Converts what CML reported for a completed registration into the domain's details.
/// CML's failure text is left out, because it may quote an older token.
inline domain::registration_details registration_details_of(const cml_licensing_status& status)
{
    return detail::registration_details_of(status);
}

/// Like `registration_details_of(const cml_licensing_status&)`, but moves the strings out of
/// `status`.
inline domain::registration_details registration_details_of(cml_licensing_status&& status)
{
    return detail::registration_details_of(std::move(status));
}

/// The reconcile handler for license operations, keyed by worker id. Spec is the worker's
/// pending `license_task`, Status the `license_observation` of its CML host.
///
/// Each reconcile first claims the worker's operation (or renews its claim) with `claim`, which
/// also returns the task. It then reads CML's status and decides from both (see
/// `decide_registration`). So it is level-triggered: after a crash or a takeover it resumes
/// from what CML reports. Every report carries the claim's fence. While another controller
/// holds an unexpired claim, the key is requeued for when that claim expires, plus
/// `takeover_margin`, without calling CML.
///
/// It records `start` before the first mutating call to CML, completes a
/// registration only when CML reports COMPLETED, and requeues after `poll_interval` while CML
/// is still working, without holding a concurrency slot. Transient errors are returned as
/// retries, so the reconciler backs off; permanent ones fail the operation at once.
///
/// Thread safety: the reconciler never runs two reconciles of one worker at once; `Cml` and
/// `ControlPlane` must be safe to call concurrently for different workers. Both are held by
/// reference and must outlive the handler.
template <cml_client Cml, control_plane_client ControlPlane>
class license_handler {
public:
    /// Throws `std::invalid_argument` when `lease` is not more than twice `poll_interval`, or
    /// `controller_id` is longer than `domain::max_claim_holder_length`.
    license_handler(Cml& cml, ControlPlane& control_plane, license_reconciler_options options)
        : cml_(&cml), control_plane_(&control_plane), options_(std::move(options))
    {
        if (!options_.wall_clock) {
            options_.wall_clock = [] { return now_utc(); };
        }
        if (options_.controller_id.empty()) {
            options_.controller_id = default_controller_id();
        }
        if (options_.controller_id.size() > domain::max_claim_holder_length) {
            throw std::invalid_argument("license controller id of " +
                                        std::to_string(options_.controller_id.size()) +
                                        " characters is longer than the maximum of " +
                                        std::to_string(domain::max_claim_holder_length) + "; set a shorter id");
        }
        if (options_.lease <= 2 * options_.poll_interval) {
            throw std::invalid_argument("license lease (" + std::to_string(options_.lease.count()) +
                                        " ms) must be more than twice the poll interval (" +
                                        std::to_string(options_.poll_interval.count()) +
                                        " ms); raise the lease or shorten the poll interval");
        }
    }

    /// Returns the id under which this handler claims operations.
    const std::string& controller_id() const noexcept { return options_.controller_id; }

    boost::asio::awaitable<result<std::vector<std::string>>> list_keys()
    {
        return list_pending_keys(*control_plane_, options_.list_limit);
    }

    /// Claims the worker's pending operation, or renews this controller's claim, and returns
    /// the task. When another controller holds the claim, the task names only that claim.
    boost::asio::awaitable<result<std::optional<license_task>>> read_spec(const std::string& worker_id)
    {
        // The control plane granted the claim after this instant, so the claim lasts at least
        // until this instant plus the remaining time it reports.
        const auto requested_at = std::chrono::steady_clock::now();
        auto claim = co_await control_plane_->claim(worker_id, options_.controller_id, options_.lease);
        co_return spec_of(worker_id, std::move(claim), requested_at);
    }

    /// Writes the observation into `observed`, the reconciler's own, so that CML's status is read
    /// into its final place. Borrows `task.cml_url` for the call and puts it back, so that the URL
    /// is not copied.
    boost::asio::awaitable<result<void>> read_status(const std::string&, license_task& task,
                                                     license_observation& observed)
    {
        // The decision depends only on the task and the time, so both calls agree.
        const auto now = options_.wall_clock();
        if (task.claim_holder != options_.controller_id || decide_before_cml(task, now, options_.decision)) {
            observe_without_cml(task, now, observed);
            co_return result<void>(boost::outcome_v2::success());
        }
        cml_endpoint endpoint{std::move(task.cml_url)};
        auto read = co_await read_licensing_status(*cml_, endpoint, observed.cml.emplace());
        task.cml_url = std::move(endpoint.base_url);
        co_return observe_cml_reply(task, read, observed);
    }

    /// Records progress (`started`, `started_at`) in `task`, the reconciler's own copy, and
    /// moves its `cml_url` out. Moves CML's status out of `observed`, also the reconciler's own,
    /// and puts a status read again in its place.
    ///
    /// The paths that await more than one call run in helper coroutines, so that every frame
    /// stays under 1 KiB, the largest that Asio's frame cache and glibc's thread cache take.
    boost::asio::awaitable<reconcile::action> reconcile(const std::string&, license_task& task,
                                                        license_observation& observed)
    {
        if (observed.claimed_elsewhere_for) {
            const auto wait = *observed.claimed_elsewhere_for + options_.takeover_margin;
            if (options_.log.enabled(log_level::debug)) {
                options_.log.debug("license operation claimed by another controller",
                                   {{"worker_id", task.worker_id},
                                    {"holder", task.claim_holder},
                                    {"retry_in_ms", std::to_string(wait.count())}});
            }
            co_return reconcile::action::requeue_after(wait);
        }
        if (observed.verdict) {
            co_return co_await report(task, *observed.verdict, nullptr);
        }

        // Built once, because each copy of the URL allocates. `task.cml_url` is empty afterwards.
        const cml_endpoint endpoint{std::move(task.cml_url)};
        auto decision = decide(task, *observed.cml);
        // Two rounds: act, then read the status once more, so that a registration CML
        // finishes at once completes in the same reconcile instead of after a poll interval.
        for (int round = 0; round < 2; ++round) {
            const bool mutates_cml = decision.action == license_action::post_registration ||
                                     decision.action == license_action::send_deregistration;
            if (mutates_cml) {
                if (!task.started) {
                    const auto key = task.key();
                    auto started = co_await control_plane_->start(task.worker_id, key);
                    if (auto stop = record_start(task, started)) {
                        co_return *stop;
                    }
                }
                if (!enough_claim_left(task)) {
                    co_return renew_claim_first(task);
                }
            }

            switch (decision.action) {
            case license_action::wait: co_return reconcile::action::requeue_after(options_.poll_interval);

            case license_action::complete_registration:
            case license_action::fail: co_return co_await report(task, decision, &*observed.cml);

            case license_action::post_registration: {
                auto posted = co_await post_registration(task, endpoint, observed);
                if (posted) {
                    co_return *posted;
                }
                decision = decide(task, *observed.cml);
                break;
            }

            case license_action::send_deregistration: co_return co_await send_deregistration(task, endpoint);
            }
        }
        co_return reconcile::action::requeue_after(options_.poll_interval);
    }

    boost::asio::awaitable<void> on_terminal_failure(const std::string& worker_id,
                                                     const reconcile::terminal_failure& failure)
    {
        options_.log.error("license reconcile gave up",
                           {{"worker_id", worker_id},
                            {"error", failure.error.message()},
                            {"attempts", std::to_string(failure.attempts)}});
        co_return;
    }

private:
    /// Builds the result of `read_spec` from the claim. A helper rather than code in `read_spec`,
    /// because every local of a coroutine takes room in its frame, and a frame over 1 KiB misses
    /// the allocation caches of Asio and glibc.
    static result<std::optional<license_task>> spec_of(const std::string& worker_id, result<license_claim>&& claim,
                                                       std::chrono::steady_clock::time_point requested_at)
    {
        if (!claim && claim.error() == errc::not_found) {
            return std::optional<license_task>();
        }
        if (!claim) {
            return claim.error();
        }
        if (claim.value().task) {
            auto& task = *claim.value().task;
            task.claim_deadline = requested_at + task.claim_remaining;
            return std::move(claim.value().task);
        }
        license_task foreign;
        foreign.worker_id = worker_id;
        foreign.claim_holder = std::move(claim.value().holder);
        foreign.claim_expires_at = claim.value().expires_at;
        foreign.claim_remaining = claim.value().remaining;
        return std::optional<license_task>(std::move(foreign));
    }

    /// Writes the observation of `read_status` when CML need not be read: the claim is another
    /// controller's, or a decision needs no status. A helper for the reason `spec_of` is.
    void observe_without_cml(const license_task& task, timestamp now, license_observation& observed) const
    {
        if (task.claim_holder != options_.controller_id) {
            observed.claimed_elsewhere_for = task.claim_remaining;
            return;
        }
        observed.verdict = decide_before_cml(task, now, options_.decision);
    }

    /// Completes the observation of `read_status` after CML's status was read into
    /// `observed.cml`. On a failed read the status is dropped. A transient error is returned, and a
    /// permanent one becomes a verdict. A helper for the reason `spec_of` is.
    result<void> observe_cml_reply(const license_task& task, const result<void>& read,
                                   license_observation& observed) const
    {
        if (read) {
            return read;
        }
        observed.cml.reset();
        if (is_transient_cml_error(read.error())) {
            log_cml_error(task, cml_call::get_licensing_status, read.error());
            return read.error();
        }
        observed.verdict = fail_for_cml_error(read.error(), cml_call::get_licensing_status);
        return boost::outcome_v2::success();
    }

    license_decision decide(const license_task& task, const cml_licensing_status& status) const
    {
        if (task.operation == domain::license_operation::deregistration) {
            return decide_deregistration(task, status);
        }
        return decide_registration(task, status, options_.decision);
    }

    /// Marks the task started once the control plane recorded `start`. Returns the action to
    /// end the reconcile with when it did not.
    std::optional<reconcile::action> record_start(license_task& task, const result<void>& started) const
    {
        if (!started) {
            return after_report(task, started, {});
        }
        task.started = true;
        task.started_at = options_.wall_clock();
        log_step(task.operation == domain::license_operation::registration ? "license registration started"
                                                                          : "license deregistration started",
                 task);
        return std::nullopt;
    }

    /// Reports the decision: a completion with the details in `status`, which it moves from, or
    /// a failure.
    boost::asio::awaitable<reconcile::action> report(const license_task& task, const license_decision& decision,
                                                     cml_licensing_status* status)
    {
        if (decision.action == license_action::complete_registration && status) {
            auto details = registration_details_of(std::move(*status));
            const auto key = task.key();
            auto reported = co_await control_plane_->complete_registration(task.worker_id, key, std::move(details));
            co_return after_report(task, reported, "license registration completed");
        }
        const auto key = task.key();
        auto reported = co_await control_plane_->fail(task.worker_id, key, decision.error_code, decision.message);
        if (reported) {
            options_.log.warning("license operation failed", {{"worker_id", task.worker_id},
                                                              {"operation_id", std::to_string(task.operation_id)},
                                                              {"code", decision.error_code},
                                                              {"reason", decision.message}});
        }
        co_return after_report(task, reported, {});
    }

    /// Posts the registration, then reads CML's status again into `observed`. Returns the
    /// action that ends the reconcile, or none when `observed` contains the new status.
    boost::asio::awaitable<std::optional<reconcile::action>> post_registration(const license_task& task,
                                                                             const cml_endpoint& endpoint,
                                                                             license_observation& observed)
    {
        auto posted = co_await cml_->register_license(endpoint, *task.token, task.reregister);
        if (!posted) {
            co_return co_await on_cml_error(task, cml_call::register_license, posted.error());
        }
        log_step("license registration posted to CML", task);

        // Read into the status that the decision was taken from, which it replaces.
        auto reread = co_await read_licensing_status(*cml_, endpoint, *observed.cml);
        if (!reread) {
            co_return reconcile::action::requeue_after(options_.poll_interval);
        }
        co_return std::nullopt;
    }

    boost::asio::awaitable<reconcile::action> send_deregistration(const license_task& task,
                                                                  const cml_endpoint& endpoint)
    {
        auto outcome = co_await cml_->deregister_license(endpoint);
        if (!outcome) {
            co_return co_await on_cml_error(task, cml_call::deregister_license, outcome.error());
        }
        std::optional<std::string> warning;
        if (outcome.value() == cml_deregistration_outcome::deregistered_locally) {
            warning = "CML deregistered the license locally but could not reach the Cisco licensing "
                      "service; the license may count as used there until it expires";
        }
        const auto key = task.key();
        auto reported = co_await control_plane_->complete_deregistration(task.worker_id, key, warning);
        co_return after_report(task, reported, "license deregistration completed");
    }

    /// Maps the control plane's response to a report: done on success; a fresh look at the
    /// worker when the operation is no longer current; a retry when the control plane failed.
    reconcile::action after_report(const license_task& task, const result<void>& reported,
                                   std::string_view success_message) const
    {
        if (reported) {
            if (!success_message.empty()) {
                log_step(success_message, task);
            }
            return reconcile::action::done();
        }
        if (reported.error() == errc::stale_operation || reported.error() == errc::worker_not_running ||
            reported.error() == errc::claim_lost) {
            // Another controller finished the operation or took it over, or a newer request
            // replaced it: read the worker again instead of acting on an outdated task.
            options_.log.info("license operation changed under the reconciler",
                              {{"worker_id", task.worker_id},
                               {"operation_id", std::to_string(task.operation_id)},
                               {"error", reported.error().message()}});
            return reconcile::action::requeue_after(std::chrono::milliseconds(0));
        }
        options_.log.warning("reporting to the control plane failed",
                             {{"worker_id", task.worker_id},
                              {"operation_id", std::to_string(task.operation_id)},
                              {"error", reported.error().message()}});
        return reconcile::action::retry(reported.error());
    }

    boost::asio::awaitable<reconcile::action> on_cml_error(const license_task& task, cml_call call,
                                                           const boost::system::error_code& error)
    {
        log_cml_error(task, call, error);
        if (is_transient_cml_error(error)) {
            co_return reconcile::action::retry(error);
        }
        co_return co_await report(task, fail_for_cml_error(error, call), nullptr);
    }

    /// Returns whether at least a quarter of the lease is left on this controller's claim on
    /// `task`, enough to start a mutating CML call. A call started later would more likely be
    /// cut off by the reconcile timeout after CML received it, which leaves its outcome
    /// unknown until the next status read. A task without a claim deadline was not claimed
    /// through `read_spec`, and nothing limits it.
    bool enough_claim_left(const license_task& task) const
    {
        return !task.claim_deadline || *task.claim_deadline - std::chrono::steady_clock::now() >= options_.lease / 4;
    }

    /// Requeues the worker at once. Its next reconcile renews the claim, because less than
    /// half of the lease is left, and then makes the mutating call.
    reconcile::action renew_claim_first(const license_task& task) const
    {
        options_.log.info("license claim too short for a CML call; renewing it first",
                          {{"worker_id", task.worker_id}, {"operation_id", std::to_string(task.operation_id)}});
        return reconcile::action::requeue_after(std::chrono::milliseconds(0));
    }

    void log_cml_error(const license_task& task, cml_call call, const boost::system::error_code& error) const
    {
        options_.log.warning("CML call failed", {{"worker_id", task.worker_id},
                                                 {"operation_id", std::to_string(task.operation_id)},
                                                 {"call", std::string(to_string(call))},
                                                 {"error", error.message()}});
    }

    void log_step(std::string_view message, const license_task& task) const
    {
        // Checked first, because building the fields allocates even when the level is off.
        if (!options_.log.enabled(log_level::info)) {
            return;
        }
        options_.log.info(message, {{"worker_id", task.worker_id}, {"operation_id", std::to_string(task.operation_id)}});
    }

    Cml* cml_;
    ControlPlane* control_plane_;
    license_reconciler_options options_;
};

struct license_controller_options {
    license_reconciler_options license;
    /// The reconcile loop's options. Its `reconcile_timeout` is at most half of
    /// `license.lease`, so a longer value, or none, is replaced by that half.
    reconcile::reconciler_options reconciler;
    /// Whether to wait on the control plane's change feed and enqueue new intents at once.
    /// Without it, new intents are found by the periodic resync only.
    bool watch_changes = true;
    /// The delay before the change feed is read again after it failed.
    std::chrono::milliseconds change_feed_retry{1000};
};

/// A license worker-controller: the reconcile loop with the license handler, fed by a
/// startup sweep, the periodic resync and the control plane's change feed.
///
/// Thread safety: `enqueue` and `request_stop` may be called from any thread.
/// Cancellation: cancelling `run()` stops the controller gracefully, like `request_stop`.
template <cml_client Cml, control_plane_client ControlPlane, reconcile::reconcile_clock Clock = reconcile::steady_clock>
class license_controller {
public:
    using handler_type = license_handler<Cml, ControlPlane>;
    using reconciler_type = reconcile::reconciler<license_task, license_observation, std::string, Clock>;

    license_controller(boost::asio::any_io_executor executor, Cml& cml, ControlPlane& control_plane,
                       license_controller_options options, Clock clock = {})
        : control_plane_(control_plane),
          options_(options),
          reconciler_(executor, handler_type(cml, control_plane, options.license), configure(options),
                      std::move(clock))
    {
    }

    /// Runs until a stop is requested or `run()` is cancelled, and returns the keys left undone.
    boost::asio::awaitable<reconcile::stop_report<std::string>> run()
    {
        if (!options_.watch_changes) {
            co_return co_await reconciler_.run();
        }
        // On a strand, the change feed's completion handler and the wait for it take turns.
        auto strand = boost::asio::make_strand(co_await boost::asio::this_coro::executor);
        co_return co_await boost::asio::co_spawn(strand, run_with_feed(), boost::asio::use_awaitable);
    }

    void request_stop() { reconciler_.request_stop(); }

    bool enqueue(std::string worker_id) { return reconciler_.enqueue(std::move(worker_id)); }

    reconciler_type& reconciler() noexcept { return reconciler_; }

private:
    static reconcile::reconciler_options configure(const license_controller_options& license_options)
    {
        auto options = license_options.reconciler;
        if (options.name == reconcile::reconciler_options{}.name) {
            options.name = "license";
        }
        // A reconcile starts with at least half of the lease left on its claim, because the
        // claim is renewed when less is left. Ending every reconcile within half of the lease
        // therefore ends each CML call while the claim lasts, before another controller can
        // take the operation over and call CML for it too.
        const auto half_lease = std::chrono::duration_cast<reconcile::duration>(license_options.license.lease / 2);
        if (!options.reconcile_timeout || *options.reconcile_timeout > half_lease) {
            options.reconcile_timeout = half_lease;
        }
        return options;
    }

    /// Runs the reconciler with the change feed beside it. Only the reconciler receives a
    /// cancellation of `run()`, so it stops gracefully and returns its report; the feed is
    /// cancelled after that. Runs on a strand.
    boost::asio::awaitable<reconcile::stop_report<std::string>> run_with_feed()
    {
        auto strand = co_await boost::asio::this_coro::executor;
        boost::asio::cancellation_signal stop_feed;
        boost::asio::steady_timer feed_finished(strand, boost::asio::steady_timer::time_point::max());
        bool feed_running = true;
        boost::asio::co_spawn(strand, watch_changes(),
                              boost::asio::bind_cancellation_slot(stop_feed.slot(), [&](std::exception_ptr thrown) {
                                  if (thrown) {
                                      // New intents still arrive through the resync.
                                      options_.license.log.error("license change feed stopped with an exception");
                                  }
                                  feed_running = false;
                                  feed_finished.cancel();
                              }));

        std::exception_ptr failure;
        reconcile::stop_report<std::string> report;
        try {
            report = co_await reconciler_.run();
        }
        catch (...) {
            failure = std::current_exception();
        }

        // The feed uses this object, so run() returns only after the feed has; a further
        // cancellation of run() must not end that wait.
        co_await boost::asio::this_coro::reset_cancellation_state(boost::asio::disable_cancellation());
        stop_feed.emit(boost::asio::cancellation_type::terminal);
        while (feed_running) {
            co_await feed_finished.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        }
        if (failure) {
            std::rethrow_exception(failure);
        }
        co_return report;
    }

    /// Enqueues every pending operation each time the control plane reports a change. The
    /// reconciler drops duplicates, so listing a worker that is already queued costs little.
    ///
    /// NOTE: the controller's own writes are changes too, so each one lists up to
    /// `list_limit` tasks again, and a key that waits for a backoff retry is run early. A
    /// feed that names the changed workers would remove both costs.
    boost::asio::awaitable<void> watch_changes()
    {
        const auto& log = options_.license.log;
        auto executor = co_await boost::asio::this_coro::executor;
        std::uint64_t seen = 0;
        bool have_sequence = false;
        for (;;) {
            result<std::uint64_t> next = have_sequence ? co_await control_plane_.wait_for_change(seen)
                                                       : co_await control_plane_.change_sequence();
            if (next && have_sequence) {
                auto keys = co_await list_pending_keys(control_plane_, options_.license.list_limit);
                if (keys) {
                    for (auto& key : keys.value()) {
                        reconciler_.enqueue(std::move(key));
                    }
                }
                else {
                    next = keys.error();
                }
            }
            if (next) {
                seen = next.value();
                have_sequence = true;
                continue;
            }
            if (next.error() == errc::cancelled) {
                co_return;
            }
            log.warning("reading the control plane's change feed failed",
                        {{"error", next.error().message()},
                         {"retry_in_ms", std::to_string(options_.change_feed_retry.count())}});
            boost::asio::steady_timer timer(executor, options_.change_feed_retry);
            auto [error] = co_await timer.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
            if (error) {
                co_return;
            }
        }
    }

    ControlPlane& control_plane_;
    license_controller_options options_;
    reconciler_type reconciler_;
};

} // namespace lcm::controller
