// The CMLLicense value object: a worker's license state and its pending license operation.
#pragma once

#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/error.hpp>

#include <boost/json/value.hpp>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::domain {

/// The state of a worker's license as lcm last recorded it.
enum class license_status { unregistered, registered, evaluation, expired, invalid };

/// The kind of license operation a worker has pending, or had last.
enum class license_operation { none, registration, deregistration };

/// The outcome of the last finished license operation.
enum class operation_outcome { none, completed, failed };

namespace detail {

inline bool iequals(std::string_view lhs, std::string_view rhs) noexcept
{
    return lhs.size() == rhs.size() && std::equal(lhs.begin(), lhs.end(), rhs.begin(), [](char a, char b) {
               return std::tolower(static_cast<unsigned char>(a)) == std::tolower(static_cast<unsigned char>(b));
           });
}

} // namespace detail

inline std::string_view to_string(license_status value) noexcept
{
    switch (value) {
    case license_status::unregistered: return "unregistered";
    case license_status::registered: return "registered";
    case license_status::evaluation: return "evaluation";
    case license_status::expired: return "expired";
    case license_status::invalid: return "invalid";
    }
    return "unknown";
}

inline std::string_view to_string(license_operation value) noexcept
{
    switch (value) {
    case license_operation::none: return "none";
    case license_operation::registration: return "register";
    case license_operation::deregistration: return "deregister";
    }
    return "unknown";
}

inline std::string_view to_string(operation_outcome value) noexcept
{
    switch (value) {
    case operation_outcome::none: return "none";
    case operation_outcome::completed: return "completed";
    case operation_outcome::failed: return "failed";
    }
    return "unknown";
}

/// Parses a license status, ignoring case. Unknown text is `errc::invalid_argument`.
inline result<license_status> parse_license_status(std::string_view text) noexcept
{
    for (auto value : {license_status::unregistered, license_status::registered, license_status::evaluation,
                       license_status::expired, license_status::invalid}) {
        if (detail::iequals(text, to_string(value))) {
            return value;
        }
    }
    return errc::invalid_argument;
}

/// Parses a license operation (`none`, `register`, `deregister`), ignoring case.
/// Unknown text is `errc::invalid_argument`.
inline result<license_operation> parse_license_operation(std::string_view text) noexcept
{
    for (auto value : {license_operation::none, license_operation::registration, license_operation::deregistration}) {
        if (detail::iequals(text, to_string(value))) {
            return value;
        }
    }
    return errc::invalid_argument;
}

/// Parses an operation outcome (`none`, `completed`, `failed`), ignoring case.
inline result<operation_outcome> parse_operation_outcome(std::string_view text) noexcept
{
    for (auto value : {operation_outcome::none, operation_outcome::completed, operation_outcome::failed}) {
        if (detail::iequals(text, to_string(value))) {
            return value;
        }
    }
    return errc::invalid_argument;
}

/// The maximum length of a license token that CML accepts.
inline constexpr std::size_t max_license_token_length = 256;

/// Checks a token against CML's format `^[a-zA-Z0-9+/%=-]{1,256}$`.
inline bool is_valid_license_token(std::string_view token) noexcept
{
    if (token.empty() || token.size() > max_license_token_length) {
        return false;
    }
    return std::all_of(token.begin(), token.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '+' || c == '/' ||
               c == '%' || c == '=' || c == '-';
    });
}

/// A licensed feature as CML reports it.
struct license_feature {
    std::string id;
    std::string name;
    std::string version;
    std::string status;
    std::int64_t in_use = 0;

    friend bool operator==(const license_feature&, const license_feature&) = default;
};

/// Why the last operation failed: a stable code and a message free of secrets.
struct operation_error {
    std::string code;
    std::string message;

    friend bool operator==(const operation_error&, const operation_error&) = default;
};

/// The details CML reported for a completed registration.
struct registration_details {
    std::string registration_status;
    std::string smart_account;
    std::string virtual_account;
    std::optional<timestamp> expiry_date;
    std::string authorization_status;
    std::vector<license_feature> features;
    /// CML's licensing status as received, kept for operators. It must not contain a token.
    boost::json::value cml_info;
};

/// The fence of a report made without a claim. It is accepted only while no controller has claimed
/// the operation, so a single controller that never claims keeps working.
inline constexpr std::uint64_t no_fence = 0;

/// The maximum length of a claim holder, the id of a worker-controller.
inline constexpr std::size_t max_claim_holder_length = 128;

/// Names the operation that a start, completion or failure reports on, and the fence of the
/// claim under which the controller acts. An operation id alone converts to a key with
/// `no_fence`.
struct operation_key {
    std::uint64_t operation_id = 0;
    std::uint64_t fence = no_fence;

    operation_key() = default;
    // Implicit, so that callers that do not claim can keep passing a bare operation id.
    operation_key(std::uint64_t id, std::uint64_t claim_fence = no_fence) noexcept
        : operation_id(id), fence(claim_fence)
    {
    }

    friend bool operator==(const operation_key&, const operation_key&) = default;
};

/// The CMLLicense value object. Copies share its fields, and a copy handed out stays a
/// consistent snapshot: the worker aggregate changes the fields in place only while no other
/// copy shares them, and otherwise gives its own license a changed copy of them.
class cml_license {
public:
    /// Every field of the value object, for repositories and codecs that rebuild it.
    struct fields {
        license_status status = license_status::unregistered;
        /// The token of the registered license.
        std::optional<secret> token;
        /// The token of the pending registration, until it completes or fails.
        std::optional<secret> pending_token;
        license_operation pending_operation = license_operation::none;
        bool reregister = false;
        bool operation_in_progress = false;
        /// The fencing key of the current or last operation; it increases with every request.
        std::uint64_t operation_id = 0;
        std::string requested_by;
        std::optional<timestamp> requested_at;
        std::optional<timestamp> started_at;
        std::optional<timestamp> finished_at;
        std::uint32_t attempts = 0;
        license_operation last_operation = license_operation::none;
        operation_outcome last_outcome = operation_outcome::none;
        std::optional<operation_error> last_error;
        /// The warning of a deregistration for which CML returned 202.
        std::optional<std::string> last_warning;
        std::optional<timestamp> expiry_date;
        std::string smart_account;
        std::string virtual_account;
        std::string authorization_status;
        std::vector<license_feature> features;
        boost::json::value cml_info;
        /// The controller that holds the claim on the pending operation; empty while unclaimed.
        /// An expired claim keeps its holder until another controller takes it over.
        std::string claim_holder;
        /// When the claim expires, on the control plane's clock; set exactly while a claim exists.
        std::optional<timestamp> claim_expires_at;
        /// The fence of the current or last claim. Every new claim of the worker increases it,
        /// across operations too, so no two claims ever share a fence.
        std::uint64_t fence = 0;

        friend bool operator==(const fields&, const fields&) = default;
    };

    cml_license() : state_(empty_state()) {}

    /// Rebuilds a license from stored fields. The fields are not a const object, because
    /// `cml_worker` changes them in place while no copy shares them.
    explicit cml_license(fields state) : state_(std::make_shared<fields>(std::move(state))) {}

    const fields& state() const noexcept { return *state_; }

    license_status status() const noexcept { return state_->status; }
    const std::optional<secret>& token() const noexcept { return state_->token; }
    const std::optional<secret>& pending_token() const noexcept { return state_->pending_token; }
    license_operation pending_operation() const noexcept { return state_->pending_operation; }
    bool has_pending_operation() const noexcept { return state_->pending_operation != license_operation::none; }
    bool reregister() const noexcept { return state_->reregister; }
    bool operation_in_progress() const noexcept { return state_->operation_in_progress; }
    std::uint64_t operation_id() const noexcept { return state_->operation_id; }
    const std::string& requested_by() const noexcept { return state_->requested_by; }
    const std::optional<timestamp>& requested_at() const noexcept { return state_->requested_at; }
    const std::optional<timestamp>& started_at() const noexcept { return state_->started_at; }
    const std::optional<timestamp>& finished_at() const noexcept { return state_->finished_at; }
    std::uint32_t attempts() const noexcept { return state_->attempts; }
    license_operation last_operation() const noexcept { return state_->last_operation; }
    operation_outcome last_outcome() const noexcept { return state_->last_outcome; }
    const std::optional<operation_error>& last_error() const noexcept { return state_->last_error; }
    const std::optional<std::string>& last_warning() const noexcept { return state_->last_warning; }
    const std::optional<timestamp>& expiry_date() const noexcept { return state_->expiry_date; }
    const std::string& smart_account() const noexcept { return state_->smart_account; }
    const std::string& virtual_account() const noexcept { return state_->virtual_account; }
    const std::string& authorization_status() const noexcept { return state_->authorization_status; }
    const std::vector<license_feature>& features() const noexcept { return state_->features; }
    const boost::json::value& cml_info() const noexcept { return state_->cml_info; }
    const std::string& claim_holder() const noexcept { return state_->claim_holder; }
    const std::optional<timestamp>& claim_expires_at() const noexcept { return state_->claim_expires_at; }
    std::uint64_t fence() const noexcept { return state_->fence; }
    bool is_claimed() const noexcept { return !state_->claim_holder.empty(); }

    /// Returns whether the license holds a token CML accepted, so deregistration makes sense.
    bool holds_license() const noexcept
    {
        return state_->status == license_status::registered || state_->status == license_status::evaluation;
    }

    friend bool operator==(const cml_license& lhs, const cml_license& rhs) noexcept
    {
        return lhs.state_ == rhs.state_ || *lhs.state_ == *rhs.state_;
    }

private:
    friend class cml_worker;

    static const std::shared_ptr<const fields>& empty_state()
    {
        static const auto empty = std::make_shared<const fields>();
        return empty;
    }

    // Copies share the fields, so a copied worker costs one reference count instead of copying
    // tokens, features and CML's info. `cml_worker::edit_license` keeps the sharing invisible.
    std::shared_ptr<const fields> state_;
};

} // namespace lcm::domain
