// The license reconciler's decisions as pure functions of the task, CML's licensing status
// and the time, so that every case is testable without a socket.
#pragma once

#include <lcm/controller/cml_client.hpp>
#include <lcm/controller/control_plane_client.hpp>
#include <lcm/domain/time.hpp>

#include <chrono>
#include <string>

namespace lcm::controller {

struct license_decision_options {
    /// The longest a license operation may stay pending, counted from its request. Real
    /// registrations take from 5 s to over a minute; five minutes leaves room for retries
    /// while CML or the Cisco licensing service is briefly unreachable.
    std::chrono::seconds operation_deadline{300};
    /// How much earlier than the operation's start a CML registration attempt may be
    /// stamped and still count as this operation's, to absorb clock skew between the
    /// control plane and the CML host.
    std::chrono::seconds clock_skew{5};
};

/// The reconciler's next step for one task.
enum class license_action {
    /// Nothing to do now: CML is still working; read its status again after the poll interval.
    wait,
    /// Record `start` unless the task is started, then post the registration.
    post_registration,
    /// Report the registration as completed with the details CML reported.
    complete_registration,
    /// Record `start` unless the task is started, then send the deregistration.
    send_deregistration,
    /// Report the operation as failed with `error_code` and `message`.
    fail,
};

struct license_decision {
    license_action action = license_action::wait;
    std::string error_code;
    /// Free of secrets: CML's failure text arrives here with the token redacted.
    std::string message;
};

namespace detail {

inline license_decision fail_with(std::string code, std::string message)
{
    return {license_action::fail, std::move(code), std::move(message)};
}

/// Returns whether CML's last registration attempt belongs to this task's operation: CML
/// accepted it after the operation started. An unknown attempt time counts as this
/// operation's, because posting twice is worse than waiting for the deadline.
///
/// NOTE: an older operation's attempt less than `clock_skew` before this start also counts
/// as this operation's. When this operation's first POST never reached CML, it then fails
/// (`registration_lost` or `registration_failed`) instead of posting.
/// Returns whether CML stamped its last attempt at or after this task's start, so that its
/// failure text can only quote this task's token, which the caller redacts.
inline bool attempt_surely_ours(const license_task& task, const cml_licensing_status& status)
{
    return task.started && status.registration_attempted && task.started_at &&
           *status.registration_attempted >= *task.started_at;
}

inline bool attempt_is_ours(const license_task& task, const cml_licensing_status& status,
                            const license_decision_options& options)
{
    if (!task.started) {
        return false;
    }
    if (!status.registration_attempted || !task.started_at) {
        return true;
    }
    return *status.registration_attempted >= *task.started_at - options.clock_skew;
}

} // namespace detail

/// Decides what to do before any CML call: fails tasks that cannot or should not go on.
/// Returns nothing when the reconciler should read CML's status next.
inline std::optional<license_decision> decide_before_cml(const license_task& task, timestamp now,
                                                         const license_decision_options& options)
{
    if (task.worker_status != domain::worker_status::running) {
        return detail::fail_with("worker_not_running", "worker is " + std::string(to_string(task.worker_status)) +
                                                           ", so the license operation cannot go on");
    }
    if (task.requested_at && now - *task.requested_at > options.operation_deadline) {
        return detail::fail_with("timeout", "license operation did not finish within " +
                                                std::to_string(options.operation_deadline.count()) + " s");
    }
    return std::nullopt;
}

/// Decides the next step of a registration from CML's licensing status. Level-triggered:
/// the same status always gives the same step, so a controller that restarted, or took over
/// another's claim, resumes where CML is and never posts a registration twice for one
/// operation that CML already accepted.
inline license_decision decide_registration(const license_task& task, const cml_licensing_status& status,
                                            const license_decision_options& options)
{
    const bool ours = detail::attempt_is_ours(task, status, options);
    switch (status.registration_status) {
    case cml_registration_status::in_progress:
    case cml_registration_status::retry_in_progress:
    case cml_registration_status::reservation_in_progress:
        // Ours or not, CML rejects a new request with 409 while one runs.
        return {license_action::wait, {}, {}};

    case cml_registration_status::completed:
        if (ours) {
            return {license_action::complete_registration, {}, {}};
        }
        if (task.reregister) {
            return {license_action::post_registration, {}, {}};
        }
        return detail::fail_with("already_registered",
                                 "CML host is already registered with another request; "
                                 "request the registration again with reregister to replace it");

    case cml_registration_status::failed:
        if (ours) {
            // CML's failure text quotes the token of the attempt it describes. Only text of
            // this task's own attempt is shown, because an older attempt's token is unknown
            // here and could not be redacted.
            const auto reason = task.token && detail::attempt_surely_ours(task, status)
                                    ? status.registration_failure.redacted(*task.token)
                                    : std::string();
            return detail::fail_with("registration_failed",
                                     reason.empty() ? "CML reported the registration as FAILED"
                                                    : "CML reported the registration as FAILED: " + reason);
        }
        return {license_action::post_registration, {}, {}};

    case cml_registration_status::not_registered:
        if (ours && status.registration_attempted) {
            return detail::fail_with("registration_lost",
                                     "CML accepted the registration, then reported NOT_REGISTERED; "
                                     "request it again");
        }
        return {license_action::post_registration, {}, {}};

    case cml_registration_status::unknown: break;
    }
    return {license_action::wait, {}, {}};
}

/// Decides the next step of a deregistration from CML's licensing status.
inline license_decision decide_deregistration(const license_task&, const cml_licensing_status& status)
{
    switch (status.registration_status) {
    case cml_registration_status::in_progress:
    case cml_registration_status::retry_in_progress:
    case cml_registration_status::reservation_in_progress:
        // CML rejects a deregistration with 409 while a registration runs.
        return {license_action::wait, {}, {}};
    default: break;
    }
    // DELETE is safe to repeat: CML returns 400 when the host is already deregistered.
    return {license_action::send_deregistration, {}, {}};
}

/// Maps a permanent CML error of a mutating call to the failure that the operation records.
inline license_decision fail_for_cml_error(const boost::system::error_code& error, cml_call call)
{
    if (error == errc::invalid_token) {
        return detail::fail_with("invalid_token", "CML rejected the license token as invalid (HTTP 400)");
    }
    if (error == errc::forbidden) {
        return detail::fail_with("forbidden", "CML user of the controller lacks admin rights (HTTP 403)");
    }
    if (error == errc::unauthorized) {
        return detail::fail_with("unauthorized", "CML rejected the controller's credentials");
    }
    return detail::fail_with(error_name(error), std::string(to_string(call)) + " failed: " + error.message());
}

} // namespace lcm::controller
