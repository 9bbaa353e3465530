// Licensing data types of CML hosts, the `cml_client` concept a worker-controller calls
// them through, and the single mapping from CML's HTTP status codes to `lcm::errc`.
#pragma once

#include <lcm/domain/license.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/json/conversion.hpp>
#include <boost/json/value.hpp>
#include <boost/system/error_code.hpp>

#include <concepts>
#include <cstdint>
#include <optional>
#include <ostream>
#include <string>
#include <string_view>
#include <vector>

namespace lcm {

/// The base URL of one worker's CML instance, such as `http://127.0.0.1:8080/instances/lab-1`.
/// Clients append `/api/v0/...` to it.
struct cml_endpoint {
    std::string base_url;
};

/// A CML user's login. The password prints and serializes as `<redacted>`.
struct cml_credentials {
    std::string username;
    secret password;
};

/// `registration.status` of CML's `LicensingStatus`.
enum class cml_registration_status {
    not_registered,
    in_progress,
    retry_in_progress,
    completed,
    failed,
    reservation_in_progress,
    /// A status this version of lcm does not know; the record keeps CML's text.
    unknown,
};

/// `authorization.status` of CML's `LicensingStatus`.
enum class cml_authorization_status {
    init,
    eval,
    in_compliance,
    not_authorized,
    eval_expired,
    out_of_compliance,
    /// A status this version of lcm does not know; the record keeps CML's text.
    unknown,
};

/// Returns CML's text for a registration status, or an empty view for `unknown`.
inline std::string_view to_string(cml_registration_status status) noexcept
{
    switch (status) {
    case cml_registration_status::not_registered: return "NOT_REGISTERED";
    case cml_registration_status::in_progress: return "IN_PROGRESS";
    case cml_registration_status::retry_in_progress: return "RETRY_IN_PROGRESS";
    case cml_registration_status::completed: return "COMPLETED";
    case cml_registration_status::failed: return "FAILED";
    case cml_registration_status::reservation_in_progress: return "RESERVATION_IN_PROGRESS";
    case cml_registration_status::unknown: break;
    }
    return {};
}

/// Returns CML's text for an authorization status, or an empty view for `unknown`.
inline std::string_view to_string(cml_authorization_status status) noexcept
{
    switch (status) {
    case cml_authorization_status::init: return "INIT";
    case cml_authorization_status::eval: return "EVAL";
    case cml_authorization_status::in_compliance: return "IN_COMPLIANCE";
    case cml_authorization_status::not_authorized: return "NOT_AUTHORIZED";
    case cml_authorization_status::eval_expired: return "EVAL_EXPIRED";
    case cml_authorization_status::out_of_compliance: return "OUT_OF_COMPLIANCE";
    case cml_authorization_status::unknown: break;
    }
    return {};
}

namespace detail {

// Both status enums list CML's values first and end with `unknown`.
template <class Status>
Status parse_cml_status(std::string_view text) noexcept
{
    for (int i = 0; i < static_cast<int>(Status::unknown); ++i) {
        if (text == to_string(static_cast<Status>(i))) {
            return static_cast<Status>(i);
        }
    }
    return Status::unknown;
}

} // namespace detail

/// Parses CML's text of a registration status; any other text gives `unknown`.
inline cml_registration_status parse_registration_status(std::string_view text) noexcept
{
    return detail::parse_cml_status<cml_registration_status>(text);
}

/// Parses CML's text of an authorization status; any other text gives `unknown`.
inline cml_authorization_status parse_authorization_status(std::string_view text) noexcept
{
    return detail::parse_cml_status<cml_authorization_status>(text);
}

// The token format check and redaction are the domain's, so every layer agrees on them.
using domain::is_valid_license_token;

/// CML's `register_time.failure` text. CML quotes the license token in it, so the text
/// prints and serializes as `<redacted>`, and reading it takes an explicit call:
/// `redacted(token)` for logs and messages, `reveal()` only to hand it to a codec.
class cml_failure_reason {
public:
    cml_failure_reason() = default;

    explicit cml_failure_reason(std::string text) : text_(std::move(text)) {}

    bool empty() const noexcept { return text_.empty(); }

    /// Returns the text with the clear text of `token` replaced by `<redacted>`.
    std::string redacted(const secret& token) const { return redact_secret(text_, token); }

    /// Returns the text as CML sent it, token included.
    const std::string& reveal() const noexcept { return text_; }

    friend bool operator==(const cml_failure_reason&, const cml_failure_reason&) = default;

    friend std::ostream& operator<<(std::ostream& out, const cml_failure_reason& reason)
    {
        return out << (reason.empty() ? std::string_view{} : secret::redacted_text);
    }

    friend void tag_invoke(boost::json::value_from_tag, boost::json::value& target, const cml_failure_reason&)
    {
        target = boost::json::string(secret::redacted_text);
    }

private:
    std::string text_;
};

/// One entry of `LicensingStatus.features`: a licensed feature and its counts.
struct cml_feature {
    std::string id;
    std::string name;
    std::string description;
    std::string version;
    /// CML's text, such as `IN_COMPLIANCE` or `INIT`.
    std::string status;
    std::int64_t in_use = 0;
    std::int64_t min = 0;
    std::int64_t max = 0;
    std::optional<timestamp> min_end_date;
    std::optional<timestamp> max_end_date;

    friend bool operator==(const cml_feature&, const cml_feature&) = default;
};

/// The parts of CML's `LicensingStatus` that a license reconciler reads.
struct cml_licensing_status {
    cml_registration_status registration_status = cml_registration_status::not_registered;
    /// CML's text when `registration_status` is `unknown`, empty otherwise.
    std::string registration_status_text;
    std::optional<std::string> smart_account;
    std::optional<std::string> virtual_account;
    std::optional<timestamp> registration_expires;
    /// Reason of the last failed registration. It quotes the license token, hence its own type.
    cml_failure_reason registration_failure;
    /// `register_time.attempted`: when CML last accepted a registration request. A reconciler
    /// compares it with the start of its operation to tell its own request from an older one.
    std::optional<timestamp> registration_attempted;
    /// `register_time.succeeded`: when the last registration completed.
    std::optional<timestamp> registration_succeeded;

    cml_authorization_status authorization_status = cml_authorization_status::eval;
    /// CML's text when `authorization_status` is `unknown`, empty otherwise.
    std::string authorization_status_text;
    std::optional<timestamp> authorization_expires;

    std::vector<cml_feature> features;
    /// `product_license.active`, such as `CML_Enterprise`.
    std::string product_license;
    bool is_enterprise = false;

    friend bool operator==(const cml_licensing_status&, const cml_licensing_status&) = default;
};

/// Outcome of a deregistration. All three leave the host without a license.
enum class cml_deregistration_outcome {
    /// 204: the host and the Cisco licensing service both dropped the registration.
    deregistered,
    /// 202: the host dropped its registration, but could not reach the Cisco licensing
    /// service, so the license may still count as used there until it expires.
    deregistered_locally,
    /// 400: the host was not registered.
    already_deregistered,
};

/// The CML calls a license reconciler makes. Also names the routes the fake counts.
enum class cml_call {
    /// `POST /authenticate`
    authenticate,
    /// `GET /licensing`
    get_licensing_status,
    /// `POST /licensing/registration`
    register_license,
    /// `DELETE /licensing/deregistration`
    deregister_license,
};

inline constexpr std::size_t cml_call_count = 4;

/// Returns the HTTP method and path of a call, relative to `/api/v0`, for logs.
inline std::string_view to_string(cml_call call) noexcept
{
    switch (call) {
    case cml_call::authenticate: return "POST /authenticate";
    case cml_call::get_licensing_status: return "GET /licensing";
    case cml_call::register_license: return "POST /licensing/registration";
    case cml_call::deregister_license: return "DELETE /licensing/deregistration";
    }
    return "unknown call";
}

/// Meaning of a CML success status for the call it responds to.
enum class cml_success {
    ok,
    deregistered,
    deregistered_locally,
    already_deregistered,
};

/// Maps CML's HTTP status for `call` to a success or an `lcm::errc`. Both the HTTP client
/// and the in-process fake client use it, so they fail alike.
///
/// 2xx is success (CML 2.9 responds to mutations with 204, 2.11 and later with 200 or 202).
/// Deregistration has three successes: 204, 202 (deregistered locally) and 400 (already
/// deregistered). 400 on registration is `invalid_token`; on other calls it is
/// `invalid_argument`. 401 is `unauthorized`, because a client maps it only after its one
/// re-login failed. 403 on `authenticate` means wrong credentials (`unauthorized`), on
/// the licensing calls a user without admin rights (`forbidden`). 409 is
/// `operation_in_progress`: CML sends it while a registration runs, and also when the
/// host is already registered and `reregister` is false, which only a status read tells
/// apart. 408, 429 and 5xx (including 502 "not ready") are `unavailable`. Anything else
/// is `protocol_error`.
inline result<cml_success> map_cml_status(cml_call call, int status) noexcept
{
    if (call == cml_call::deregister_license) {
        switch (status) {
        case 200:
        case 204: return cml_success::deregistered;
        case 202: return cml_success::deregistered_locally;
        case 400: return cml_success::already_deregistered;
        default: break;
        }
    }
    if (status >= 200 && status < 300) {
        return cml_success::ok;
    }
    switch (status) {
    case 400: return make_error_code(call == cml_call::register_license ? errc::invalid_token : errc::invalid_argument);
    case 401: return make_error_code(errc::unauthorized);
    case 403: return make_error_code(call == cml_call::authenticate ? errc::unauthorized : errc::forbidden);
    case 404: return make_error_code(errc::not_found);
    case 409: return make_error_code(errc::operation_in_progress);
    case 408:
    case 429: return make_error_code(errc::unavailable);
    default: break;
    }
    if (status >= 500 && status < 600) {
        return make_error_code(errc::unavailable);
    }
    return make_error_code(errc::protocol_error);
}

/// Converts the success of a deregistration call into its outcome, and logs a warning when
/// the host could not reach the Cisco licensing service.
inline cml_deregistration_outcome deregistration_outcome_of(cml_success success, const cml_endpoint& endpoint,
                                                            const logger& log)
{
    switch (success) {
    case cml_success::deregistered_locally:
        log.warning("CML deregistered locally but could not reach the Cisco licensing service",
                    {{"endpoint", endpoint.base_url}});
        return cml_deregistration_outcome::deregistered_locally;
    case cml_success::already_deregistered: return cml_deregistration_outcome::already_deregistered;
    default: return cml_deregistration_outcome::deregistered;
    }
}

/// Returns true when a CML call that failed with `error` may succeed if retried later
/// unchanged: CML was busy (`operation_in_progress`), unreachable or not ready
/// (`unavailable`), or slow (`timeout`). Errors of other categories come from the
/// network layer (refused or reset connections) and count as transient too. Every
/// other `lcm::errc`, including `cancelled`, is permanent for the request as sent.
inline bool is_transient_cml_error(const boost::system::error_code& error) noexcept
{
    if (!error) {
        return false;
    }
    if (error.category() != error_category()) {
        return true;
    }
    switch (static_cast<errc>(error.value())) {
    case errc::operation_in_progress:
    case errc::unavailable:
    case errc::timeout: return true;
    default: return false;
    }
}

/// A client of the CML licensing API, one object for a whole fleet of CML hosts.
///
/// The client owns the CML credentials and caches one bearer token per host and user.
/// When a call gets 401, it logs in again once and retries the call once; a second
/// 401 fails with `unauthorized`. Errors come from `map_cml_status`, or are
/// `unavailable` when the host cannot be reached, and `cancelled` when the awaiting
/// coroutine was cancelled. Every coroutine takes the endpoint (and the token) by
/// reference, so they must outlive the returned awaitable.
///
/// - `authenticate(endpoint)` logs in and caches the new bearer token.
/// - `get_licensing_status(endpoint)` reads `GET /licensing`.
/// - `register_license(endpoint, token, reregister)` posts a registration. Success means
///   only that CML accepted it; the outcome shows later in the licensing status.
/// - `deregister_license(endpoint)` sends `DELETE /licensing/deregistration`.
template <class C>
concept cml_client = requires(C& client, const cml_endpoint& endpoint, const secret& token, bool reregister) {
    { client.authenticate(endpoint) } -> std::same_as<boost::asio::awaitable<result<void>>>;
    { client.get_licensing_status(endpoint) } -> std::same_as<boost::asio::awaitable<result<cml_licensing_status>>>;
    { client.register_license(endpoint, token, reregister) } -> std::same_as<boost::asio::awaitable<result<void>>>;
    {
        client.deregister_license(endpoint)
    } -> std::same_as<boost::asio::awaitable<result<cml_deregistration_outcome>>>;
};

/// Whether a client can also read CML's licensing status into the caller's object:
/// `get_licensing_status(endpoint, status)`, which overwrites every field of `status` on success
/// and leaves it unspecified on failure.
template <class C>
concept cml_client_reads_in_place = requires(C& client, const cml_endpoint& endpoint, cml_licensing_status& status) {
    { client.get_licensing_status(endpoint, status) } -> std::same_as<boost::asio::awaitable<result<void>>>;
};

namespace detail {

template <cml_client C>
boost::asio::awaitable<result<void>> assign_licensing_status(C& client, const cml_endpoint& endpoint,
                                                            cml_licensing_status& status)
{
    auto read = co_await client.get_licensing_status(endpoint);
    if (!read) {
        co_return read.error();
    }
    status = std::move(read).value();
    co_return result<void>(boost::outcome_v2::success());
}

} // namespace detail

/// Reads CML's licensing status into `status` and overwrites it on success. On failure `status`
/// is unspecified. Uses the client's in-place read when it has one, which saves moving the status
/// out of two coroutines, and otherwise assigns the result of `get_licensing_status(endpoint)`.
/// `endpoint` and `status` must outlive the returned awaitable.
template <cml_client C>
boost::asio::awaitable<result<void>> read_licensing_status(C& client, const cml_endpoint& endpoint,
                                                          cml_licensing_status& status)
{
    if constexpr (cml_client_reads_in_place<C>) {
        return client.get_licensing_status(endpoint, status);
    }
    else {
        return detail::assign_licensing_status(client, endpoint, status);
    }
}

} // namespace lcm
