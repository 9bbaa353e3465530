// Domain events of the CMLWorker aggregate. None of them carries a token.
#pragma once

#include <lcm/domain/license.hpp>
#include <lcm/domain/time.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace lcm::domain {

/// Lifecycle status of a CML worker host.
enum class worker_status {
    pending,
    provisioning,
    starting,
    running,
    draining,
    stopping,
    stopped,
    terminating,
    terminated,
    failed,
    unknown,
};

inline std::string_view to_string(worker_status value) noexcept
{
    switch (value) {
    case worker_status::pending: return "pending";
    case worker_status::provisioning: return "provisioning";
    case worker_status::starting: return "starting";
    case worker_status::running: return "running";
    case worker_status::draining: return "draining";
    case worker_status::stopping: return "stopping";
    case worker_status::stopped: return "stopped";
    case worker_status::terminating: return "terminating";
    case worker_status::terminated: return "terminated";
    case worker_status::failed: return "failed";
    case worker_status::unknown: return "unknown";
    }
    return "unknown";
}

/// Parses a worker status, ignoring case. Unknown text is `errc::invalid_argument`; the
/// status named `unknown` is a valid value of its own.
inline result<worker_status> parse_worker_status(std::string_view text) noexcept
{
    for (int i = 0; i <= static_cast<int>(worker_status::unknown); ++i) {
        const auto value = static_cast<worker_status>(i);
        if (detail::iequals(text, to_string(value))) {
            return value;
        }
    }
    return errc::invalid_argument;
}

/// The fields every event carries. `operation_id` is 0 for events outside a license operation.
struct event_header {
    std::string worker_id;
    std::uint64_t operation_id = 0;
    timestamp occurred_at{};
    /// The requester of the change: a user, a service or `system`.
    std::string initiated_by;

    friend bool operator==(const event_header&, const event_header&) = default;
};

struct worker_created {
    static constexpr std::string_view type = "cml_worker.created.v1";
    event_header header;
    std::string name;
    std::string cml_url;
    worker_status status = worker_status::unknown;
    friend bool operator==(const worker_created&, const worker_created&) = default;
};

struct worker_status_changed {
    static constexpr std::string_view type = "cml_worker.status.changed.v1";
    event_header header;
    worker_status previous_status = worker_status::unknown;
    worker_status status = worker_status::unknown;
    friend bool operator==(const worker_status_changed&, const worker_status_changed&) = default;
};

struct license_registration_requested {
    static constexpr std::string_view type = "cml_worker.license.registration.requested.v1";
    event_header header;
    bool reregister = false;
    friend bool operator==(const license_registration_requested&, const license_registration_requested&) = default;
};

struct license_registration_started {
    static constexpr std::string_view type = "cml_worker.license.registration.started.v1";
    event_header header;
    std::uint32_t attempt = 0;
    friend bool operator==(const license_registration_started&, const license_registration_started&) = default;
};

struct license_registration_completed {
    static constexpr std::string_view type = "cml_worker.license.registration.completed.v1";
    event_header header;
    std::optional<timestamp> expiry_date;
    std::string smart_account;
    std::string virtual_account;
    std::string authorization_status;
    std::vector<std::string> features;
    friend bool operator==(const license_registration_completed&, const license_registration_completed&) = default;
};

struct license_registration_failed {
    static constexpr std::string_view type = "cml_worker.license.registration.failed.v1";
    event_header header;
    operation_error error;
    friend bool operator==(const license_registration_failed&, const license_registration_failed&) = default;
};

struct license_deregistration_requested {
    static constexpr std::string_view type = "cml_worker.license.deregistration.requested.v1";
    event_header header;
    friend bool operator==(const license_deregistration_requested&,
                           const license_deregistration_requested&) = default;
};

struct license_deregistration_started {
    static constexpr std::string_view type = "cml_worker.license.deregistration.started.v1";
    event_header header;
    std::uint32_t attempt = 0;
    friend bool operator==(const license_deregistration_started&, const license_deregistration_started&) = default;
};

struct license_deregistration_completed {
    static constexpr std::string_view type = "cml_worker.license.deregistration.completed.v1";
    event_header header;
    std::optional<std::string> warning;
    friend bool operator==(const license_deregistration_completed&,
                           const license_deregistration_completed&) = default;
};

struct license_deregistration_failed {
    static constexpr std::string_view type = "cml_worker.license.deregistration.failed.v1";
    event_header header;
    operation_error error;
    friend bool operator==(const license_deregistration_failed&, const license_deregistration_failed&) = default;
};

/// A controller took a new claim on the pending operation: the first claim, or one taken over
/// after another controller's claim expired. Renewals record no event.
struct license_operation_claimed {
    static constexpr std::string_view type = "cml_worker.license.operation.claimed.v1";
    event_header header;
    std::string holder;
    std::uint64_t fence = 0;
    timestamp expires_at{};
    friend bool operator==(const license_operation_claimed&, const license_operation_claimed&) = default;
};

/// Any event of the worker aggregate.
using domain_event = std::variant<worker_created, worker_status_changed, license_registration_requested,
                                  license_registration_started, license_registration_completed,
                                  license_registration_failed, license_deregistration_requested,
                                  license_deregistration_started, license_deregistration_completed,
                                  license_deregistration_failed, license_operation_claimed>;

/// Returns the CloudEvents type of an event, such as `cml_worker.license.registration.requested.v1`.
inline std::string_view event_type(const domain_event& event) noexcept
{
    return std::visit([](const auto& alternative) { return std::decay_t<decltype(alternative)>::type; }, event);
}

/// Returns the header that every event carries.
inline const event_header& header_of(const domain_event& event) noexcept
{
    return std::visit([](const auto& alternative) -> const event_header& { return alternative.header; }, event);
}

} // namespace lcm::domain
