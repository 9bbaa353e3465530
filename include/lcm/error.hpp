// Error codes shared by every layer of lcm, and their single mapping to HTTP status codes.
#pragma once

#include <boost/outcome/result.hpp>
#include <boost/outcome/try.hpp>
#include <boost/system/error_code.hpp>

#include <string>
#include <type_traits>

namespace lcm {

/// Expected failures of lcm operations. Bugs are reported as exceptions instead.
enum class errc {
    /// A worker, operation or route does not exist.
    not_found = 1,
    /// A request field is missing, malformed or out of range.
    invalid_argument,
    /// A license token does not match CML's format `^[a-zA-Z0-9+/%=-]{1,256}$`, or CML rejected it.
    invalid_token,
    /// The worker's lifecycle status is not `running`, so CML cannot be called.
    worker_not_running,
    /// Another license operation is pending or in progress on the worker.
    operation_in_progress,
    /// A registration was requested for a registered worker without `reregister`.
    already_registered,
    /// A deregistration was requested for a worker that holds no license.
    not_registered,
    /// A start, completion or failure names an operation that is no longer the current one.
    stale_operation,
    /// A completion names the current operation, which has not been started.
    operation_not_started,
    /// A conditional update found a newer version than the one it read.
    version_conflict,
    /// An entity with the same identity already exists.
    already_exists,
    /// Credentials are missing or wrong.
    unauthorized,
    /// Credentials are valid but lack the permission for the call.
    forbidden,
    /// A request body is larger than the configured limit.
    payload_too_large,
    /// A request body has a content type other than JSON.
    unsupported_media_type,
    /// A dependency (CML, the control plane, a database) cannot be reached right now.
    unavailable,
    /// An operation did not finish before its deadline.
    timeout,
    /// A start, completion or failure carries a fence other than the current claim's: another
    /// controller took the operation over, or the caller never claimed it.
    claim_lost,
    /// A peer sent a response that breaks its contract.
    protocol_error,
    /// The operation was cancelled, for example by a stop request.
    cancelled,
    /// Another controller holds an unexpired claim on the operation.
    claimed,
};

namespace detail {

class error_category_impl final : public boost::system::error_category {
public:
    // A fixed identifier lets boost::system compare categories across shared libraries.
    constexpr error_category_impl() noexcept : boost::system::error_category(0x6c636d5f65727263ULL) {}

    const char* name() const noexcept override { return "lcm"; }

    std::string message(int value) const override { return describe(static_cast<errc>(value)); }

    static const char* describe(errc value) noexcept
    {
        switch (value) {
        case errc::not_found: return "not found";
        case errc::invalid_argument: return "invalid argument";
        case errc::invalid_token: return "invalid license token";
        case errc::worker_not_running: return "worker is not running";
        case errc::operation_in_progress: return "another license operation is pending or in progress";
        case errc::already_registered: return "worker is already registered; set reregister to replace the license";
        case errc::not_registered: return "worker holds no license";
        case errc::stale_operation: return "operation id is not the worker's current operation";
        case errc::operation_not_started: return "operation has not been started";
        case errc::version_conflict: return "version conflict: the entity was changed concurrently";
        case errc::already_exists: return "already exists";
        case errc::unauthorized: return "missing or invalid credentials";
        case errc::forbidden: return "forbidden";
        case errc::payload_too_large: return "request body too large";
        case errc::unsupported_media_type: return "unsupported media type; send application/json";
        case errc::unavailable: return "service unavailable";
        case errc::timeout: return "timed out";
        case errc::claim_lost: return "fence is not the current claim's: the operation was claimed by another controller";
        case errc::protocol_error: return "peer violated the protocol";
        case errc::cancelled: return "cancelled";
        case errc::claimed: return "another controller holds an unexpired claim on the operation";
        }
        return "unknown lcm error";
    }
};

} // namespace detail

/// Returns the category of `lcm::errc`.
inline const boost::system::error_category& error_category() noexcept
{
    static constexpr detail::error_category_impl instance;
    return instance;
}

inline boost::system::error_code make_error_code(errc value) noexcept
{
    return {static_cast<int>(value), error_category()};
}

/// Result of an operation that may fail with an expected error.
template <class T>
using result = boost::outcome_v2::result<T, boost::system::error_code>;

/// `return success();` ends a function that returns `result<void>` without an error.
using boost::outcome_v2::success;

/// Maps an error to the HTTP status a server responds with. This is the only such mapping in lcm.
inline int http_status(const boost::system::error_code& error) noexcept
{
    if (error.category() != error_category()) {
        return 500;
    }
    switch (static_cast<errc>(error.value())) {
    case errc::not_found: return 404;
    case errc::invalid_argument: return 400;
    case errc::invalid_token: return 422;
    case errc::worker_not_running: return 409;
    case errc::operation_in_progress: return 409;
    case errc::already_registered: return 409;
    case errc::not_registered: return 409;
    case errc::stale_operation: return 409;
    case errc::operation_not_started: return 409;
    case errc::version_conflict: return 409;
    case errc::already_exists: return 409;
    case errc::unauthorized: return 401;
    case errc::forbidden: return 403;
    case errc::payload_too_large: return 413;
    case errc::unsupported_media_type: return 415;
    case errc::unavailable: return 503;
    case errc::timeout: return 504;
    case errc::claim_lost: return 409;
    case errc::protocol_error: return 502;
    case errc::cancelled: return 503;
    case errc::claimed: return 409;
    }
    return 500;
}

/// Returns the stable snake_case name of an error, used as the `code` field of API errors.
inline const char* error_name(const boost::system::error_code& error) noexcept
{
    if (error.category() != error_category()) {
        return "internal";
    }
    switch (static_cast<errc>(error.value())) {
    case errc::not_found: return "not_found";
    case errc::invalid_argument: return "invalid_argument";
    case errc::invalid_token: return "invalid_token";
    case errc::worker_not_running: return "worker_not_running";
    case errc::operation_in_progress: return "operation_in_progress";
    case errc::already_registered: return "already_registered";
    case errc::not_registered: return "not_registered";
    case errc::stale_operation: return "stale_operation";
    case errc::operation_not_started: return "operation_not_started";
    case errc::version_conflict: return "version_conflict";
    case errc::already_exists: return "already_exists";
    case errc::unauthorized: return "unauthorized";
    case errc::forbidden: return "forbidden";
    case errc::payload_too_large: return "payload_too_large";
    case errc::unsupported_media_type: return "unsupported_media_type";
    case errc::unavailable: return "unavailable";
    case errc::timeout: return "timeout";
    case errc::claim_lost: return "claim_lost";
    case errc::protocol_error: return "protocol_error";
    case errc::cancelled: return "cancelled";
    case errc::claimed: return "claimed";
    }
    return "internal";
}

} // namespace lcm

template <>
struct boost::system::is_error_code_enum<lcm::errc> : std::true_type {};
