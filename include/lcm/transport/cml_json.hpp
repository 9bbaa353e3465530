// JSON bodies of CML's authentication and licensing calls: encoders, and decoders that
// tolerate what real CML servers send. Pure functions without I/O.
#pragma once

#include <lcm/controller/cml_client.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/error.hpp>

#include <boost/json/array.hpp>
#include <boost/json/object.hpp>
#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lcm::transport {

/// CML's error body `{"code": <HTTP status>, "description": <text>}`.
/// `code` is 0 when the body was empty or carried no code.
struct cml_error_body {
    int code = 0;
    std::string description;

    friend bool operator==(const cml_error_body&, const cml_error_body&) = default;
};

/// The body of `POST /licensing/registration`.
struct cml_registration_request {
    secret token;
    bool reregister = false;
};

namespace detail {

inline const boost::json::value* find_member(const boost::json::object& object, std::string_view key) noexcept
{
    const auto* member = object.if_contains(key);
    return member == nullptr || member->is_null() ? nullptr : member;
}

inline const boost::json::object* find_object(const boost::json::object& object, std::string_view key) noexcept
{
    const auto* member = find_member(object, key);
    return member == nullptr ? nullptr : member->if_object();
}

inline std::optional<std::string> find_string(const boost::json::object& object, std::string_view key)
{
    const auto* member = find_member(object, key);
    if (member == nullptr || !member->is_string()) {
        return std::nullopt;
    }
    return std::string(member->get_string());
}

inline std::int64_t find_integer(const boost::json::object& object, std::string_view key) noexcept
{
    const auto* member = find_member(object, key);
    if (member == nullptr) {
        return 0;
    }
    if (member->is_int64()) {
        return member->get_int64();
    }
    if (member->is_uint64()) {
        return static_cast<std::int64_t>(member->get_uint64());
    }
    if (member->is_double()) {
        return static_cast<std::int64_t>(member->get_double());
    }
    return 0;
}

inline bool find_bool(const boost::json::object& object, std::string_view key) noexcept
{
    const auto* member = find_member(object, key);
    return member != nullptr && member->is_bool() && member->get_bool();
}

// An unparsable timestamp reads as absent: CML's timestamps are informative, and one odd
// field should not make the whole status unreadable.
inline std::optional<timestamp> find_timestamp(const boost::json::object& object, std::string_view key) noexcept
{
    const auto* member = find_member(object, key);
    if (member == nullptr || !member->is_string()) {
        return std::nullopt;
    }
    return parse_timestamp(member->get_string());
}

inline boost::json::value optional_to_json(const std::optional<std::string>& value)
{
    return value ? boost::json::value(*value) : boost::json::value(nullptr);
}

inline boost::json::value optional_to_json(const std::optional<timestamp>& value)
{
    return value ? boost::json::value(format_timestamp(*value)) : boost::json::value(nullptr);
}

// CML always sends all six keys of a TimeInfo.
inline boost::json::object make_time_info(std::optional<std::string> status, const std::string& failure,
                                          std::optional<std::string> success,
                                          const std::optional<timestamp>& succeeded = std::nullopt,
                                          const std::optional<timestamp>& attempted = std::nullopt)
{
    boost::json::object info;
    info["succeeded"] = optional_to_json(succeeded);
    info["attempted"] = optional_to_json(attempted);
    info["scheduled"] = nullptr;
    info["status"] = optional_to_json(status);
    info["failure"] = failure.empty() ? boost::json::value(nullptr) : boost::json::value(failure);
    info["success"] = optional_to_json(success);
    return info;
}

inline std::optional<boost::json::value> parse_json(std::string_view text) noexcept
{
    boost::system::error_code error;
    auto value = boost::json::parse(text, error);
    if (error) {
        return std::nullopt;
    }
    return value;
}

} // namespace detail

// ---------------------------------------------------------------------------------------
// LicensingStatus

/// Converts a status to the JSON of `GET /licensing`, with every key CML sends.
/// `registration.register_time.failure` carries the failure reason in clear text, as CML
/// does, so the result may contain a license token and must not be logged.
inline boost::json::value licensing_status_to_json(const cml_licensing_status& status, std::string_view hostname = {})
{
    using boost::json::object;
    using boost::json::value;

    const auto registration_text = status.registration_status == cml_registration_status::unknown
                                       ? std::string_view(status.registration_status_text)
                                       : to_string(status.registration_status);
    const auto authorization_text = status.authorization_status == cml_authorization_status::unknown
                                        ? std::string_view(status.authorization_status_text)
                                        : to_string(status.authorization_status);
    const bool failed = status.registration_status == cml_registration_status::failed;
    const bool completed = status.registration_status == cml_registration_status::completed;

    object registration;
    registration["status"] = registration_text;
    registration["smart_account"] = detail::optional_to_json(status.smart_account);
    registration["virtual_account"] = detail::optional_to_json(status.virtual_account);
    registration["expires"] = detail::optional_to_json(status.registration_expires);
    registration["register_time"] = detail::make_time_info(
        failed ? std::optional<std::string>("FAILED") : std::nullopt, status.registration_failure.reveal(),
        completed ? std::optional<std::string>("SUCCEEDED") : std::nullopt, status.registration_succeeded,
        status.registration_attempted);
    registration["renew_time"] = detail::make_time_info(std::nullopt, {}, std::nullopt);

    object authorization;
    authorization["status"] = authorization_text;
    authorization["expires"] = detail::optional_to_json(status.authorization_expires);
    authorization["renew_time"] = detail::make_time_info(std::nullopt, {}, std::nullopt);

    boost::json::array features;
    for (const auto& feature : status.features) {
        object entry;
        entry["id"] = feature.id;
        entry["name"] = feature.name;
        entry["description"] = feature.description;
        entry["version"] = feature.version;
        entry["in_use"] = feature.in_use;
        entry["status"] = feature.status;
        entry["min"] = feature.min;
        entry["max"] = feature.max;
        entry["minEndDate"] = detail::optional_to_json(feature.min_end_date);
        entry["maxEndDate"] = detail::optional_to_json(feature.max_end_date);
        features.push_back(std::move(entry));
    }

    object proxy;
    proxy["server"] = nullptr;
    proxy["port"] = nullptr;
    object transport;
    transport["ssms"] = nullptr;
    transport["proxy"] = std::move(proxy);
    transport["default_ssms"] = "https://smartreceiver.cisco.com/licservice/license";

    object body;
    body["udi"] = object{{"hostname", hostname}, {"product_uuid", ""}};
    body["registration"] = std::move(registration);
    body["authorization"] = std::move(authorization);
    body["reservation_mode"] = false;
    body["features"] = std::move(features);
    body["product_license"] = object{{"active", status.product_license}, {"is_enterprise", status.is_enterprise}};
    body["transport"] = std::move(transport);
    return body;
}

/// Reads the JSON of `GET /licensing`. Unknown fields are ignored; nulls, missing
/// optional objects and unparsable timestamps read as absent; timestamps may be ISO 8601
/// or CML's `2026-08-20 17:25:30`. A missing `registration` or `authorization` object
/// gives status `unknown`. Fails with `protocol_error` only when the body is not an object.
inline result<cml_licensing_status> licensing_status_from_json(const boost::json::value& body)
{
    const auto* root = body.if_object();
    if (root == nullptr) {
        return make_error_code(errc::protocol_error);
    }

    cml_licensing_status status;
    status.registration_status = cml_registration_status::unknown;
    status.authorization_status = cml_authorization_status::unknown;

    if (const auto* registration = detail::find_object(*root, "registration")) {
        auto text = detail::find_string(*registration, "status").value_or(std::string{});
        status.registration_status = parse_registration_status(text);
        if (status.registration_status == cml_registration_status::unknown) {
            status.registration_status_text = std::move(text);
        }
        status.smart_account = detail::find_string(*registration, "smart_account");
        status.virtual_account = detail::find_string(*registration, "virtual_account");
        status.registration_expires = detail::find_timestamp(*registration, "expires");
        if (const auto* register_time = detail::find_object(*registration, "register_time")) {
            if (auto failure = detail::find_string(*register_time, "failure")) {
                status.registration_failure = cml_failure_reason(std::move(*failure));
            }
            status.registration_attempted = detail::find_timestamp(*register_time, "attempted");
            status.registration_succeeded = detail::find_timestamp(*register_time, "succeeded");
        }
    }

    if (const auto* authorization = detail::find_object(*root, "authorization")) {
        auto text = detail::find_string(*authorization, "status").value_or(std::string{});
        status.authorization_status = parse_authorization_status(text);
        if (status.authorization_status == cml_authorization_status::unknown) {
            status.authorization_status_text = std::move(text);
        }
        status.authorization_expires = detail::find_timestamp(*authorization, "expires");
    }

    if (const auto* features = detail::find_member(*root, "features"); features != nullptr && features->is_array()) {
        for (const auto& item : features->get_array()) {
            const auto* entry = item.if_object();
            if (entry == nullptr) {
                continue;
            }
            cml_feature feature;
            feature.id = detail::find_string(*entry, "id").value_or(std::string{});
            feature.name = detail::find_string(*entry, "name").value_or(std::string{});
            feature.description = detail::find_string(*entry, "description").value_or(std::string{});
            feature.version = detail::find_string(*entry, "version").value_or(std::string{});
            feature.status = detail::find_string(*entry, "status").value_or(std::string{});
            feature.in_use = detail::find_integer(*entry, "in_use");
            feature.min = detail::find_integer(*entry, "min");
            feature.max = detail::find_integer(*entry, "max");
            feature.min_end_date = detail::find_timestamp(*entry, "minEndDate");
            feature.max_end_date = detail::find_timestamp(*entry, "maxEndDate");
            status.features.push_back(std::move(feature));
        }
    }

    if (const auto* product = detail::find_object(*root, "product_license")) {
        status.product_license = detail::find_string(*product, "active").value_or(std::string{});
        status.is_enterprise = detail::find_bool(*product, "is_enterprise");
    }
    return status;
}

/// Parses and decodes the body of `GET /licensing`; text that is not JSON is `protocol_error`.
inline result<cml_licensing_status> decode_licensing_status(std::string_view body)
{
    auto value = detail::parse_json(body);
    if (!value) {
        return make_error_code(errc::protocol_error);
    }
    return licensing_status_from_json(*value);
}

/// Encodes the body of `GET /licensing`; see `licensing_status_to_json`. Must not be logged.
inline std::string encode_licensing_status(const cml_licensing_status& status, std::string_view hostname = {})
{
    return boost::json::serialize(licensing_status_to_json(status, hostname));
}

// ---------------------------------------------------------------------------------------
// Error body

inline std::string encode_error_body(const cml_error_body& error)
{
    return boost::json::serialize(boost::json::object{{"code", error.code}, {"description", error.description}});
}

/// Decodes CML's error body and never fails. An empty body gives code 0 and no
/// description, and text that is not JSON becomes the description. A description that
/// is itself a JSON-encoded string is unwrapped, and a description that is a JSON
/// object or array is kept as compact JSON text.
/// NOTE: CML may echo request input in the description, so a caller that sent a license
/// token should pass the description through `redact_secret` before logging it.
inline cml_error_body decode_error_body(std::string_view body)
{
    cml_error_body error;
    const auto first = body.find_first_not_of(" \t\r\n");
    if (first == std::string_view::npos) {
        return error;
    }

    auto value = detail::parse_json(body);
    const auto* object = value ? value->if_object() : nullptr;
    if (object == nullptr) {
        error.description.assign(body.substr(first));
        return error;
    }

    error.code = static_cast<int>(detail::find_integer(*object, "code"));
    const auto* description = detail::find_member(*object, "description");
    if (description == nullptr) {
        return error;
    }
    if (!description->is_string()) {
        error.description = boost::json::serialize(*description);
        return error;
    }
    error.description = description->get_string();
    if (auto inner = detail::parse_json(error.description); inner && inner->is_string()) {
        error.description = inner->get_string();
    }
    return error;
}

// ---------------------------------------------------------------------------------------
// Registration request

/// Encodes `{"token", "reregister"}` with the token in clear text, as CML requires;
/// the result must not be logged.
inline std::string encode_registration_request(const secret& token, bool reregister)
{
    return boost::json::serialize(boost::json::object{{"token", token.reveal()}, {"reregister", reregister}});
}

/// Decodes the body of `POST /licensing/registration`. Fails with `invalid_argument`
/// when the body is not a JSON object, when `token` is missing or not a string, when
/// `reregister` is not a boolean, or when any other key is present, because CML's schema
/// forbids extra keys. The token's format is not checked here; see `is_valid_license_token`.
inline result<cml_registration_request> decode_registration_request(std::string_view body)
{
    auto value = detail::parse_json(body);
    const auto* object = value ? value->if_object() : nullptr;
    if (object == nullptr) {
        return make_error_code(errc::invalid_argument);
    }

    cml_registration_request request;
    bool has_token = false;
    for (const auto& member : *object) {
        if (member.key() == "token" && member.value().is_string()) {
            request.token = secret(std::string(member.value().get_string()));
            has_token = true;
        }
        else if (member.key() == "reregister" && member.value().is_bool()) {
            request.reregister = member.value().get_bool();
        }
        else {
            return make_error_code(errc::invalid_argument);
        }
    }
    if (!has_token) {
        return make_error_code(errc::invalid_argument);
    }
    return request;
}

// ---------------------------------------------------------------------------------------
// Authentication

/// Encodes `{"username", "password"}` with the password in clear text; must not be logged.
inline std::string encode_authenticate_request(const cml_credentials& credentials)
{
    return boost::json::serialize(
        boost::json::object{{"username", credentials.username}, {"password", credentials.password.reveal()}});
}

/// Decodes the body of `POST /authenticate`. Fails with `invalid_argument` unless it is
/// an object with a `username` of 1 to 32 characters and a string `password`.
inline result<cml_credentials> decode_authenticate_request(std::string_view body)
{
    auto value = detail::parse_json(body);
    const auto* object = value ? value->if_object() : nullptr;
    if (object == nullptr) {
        return make_error_code(errc::invalid_argument);
    }
    auto username = detail::find_string(*object, "username");
    auto password = detail::find_string(*object, "password");
    if (!username || username->empty() || username->size() > 32 || !password) {
        return make_error_code(errc::invalid_argument);
    }
    return cml_credentials{std::move(*username), secret(std::move(*password))};
}

/// Encodes the response of `POST /authenticate`: the bearer token as a bare JSON string.
inline std::string encode_authenticate_response(const secret& bearer_token)
{
    return boost::json::serialize(boost::json::value(bearer_token.reveal()));
}

/// Decodes the response of `POST /authenticate`. Fails with `protocol_error` unless the
/// body is a non-empty JSON string.
inline result<secret> decode_authenticate_response(std::string_view body)
{
    auto value = detail::parse_json(body);
    if (!value || !value->is_string() || value->get_string().empty()) {
        return make_error_code(errc::protocol_error);
    }
    return secret(std::string(value->get_string()));
}

} // namespace lcm::transport
