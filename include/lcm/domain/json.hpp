// Boost.JSON codecs for the worker aggregate, its license and its events.
//
// Two representations exist. The record form (`to_record` / `from_record`) carries every
// field, tokens included, and round-trips exactly; only storage adapters should use it.
// The public form (`to_public_json`, and `boost::json::value_from` on workers and licenses)
// redacts every token and is what APIs and logs may show. Events carry no token, so their
// single form round-trips exactly through `value_from` / `value_to`.
#pragma once

#include <lcm/domain/detail/json_reader.hpp>
#include <lcm/domain/events.hpp>
#include <lcm/domain/license.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>

#include <boost/json/conversion.hpp>
#include <boost/json/value.hpp>
#include <boost/json/value_from.hpp>
#include <boost/json/value_to.hpp>
#include <boost/system/system_error.hpp>

#include <limits>
#include <optional>
#include <string>
#include <type_traits>
#include <variant>

namespace lcm::domain {

/// Whether an encoder writes secrets in clear text or as `<redacted>`.
enum class secret_exposure { redact, reveal };

namespace detail {

inline boost::json::value encode_optional_time(const std::optional<timestamp>& value)
{
    if (!value) {
        return nullptr;
    }
    return boost::json::string(format_timestamp(*value));
}

inline boost::json::value encode_optional_secret(const std::optional<secret>& value, secret_exposure exposure)
{
    if (!value) {
        return nullptr;
    }
    if (exposure == secret_exposure::reveal) {
        return boost::json::string(value->reveal());
    }
    return boost::json::string(secret::redacted_text);
}

/// Reads a stored token. A value outside CML's token format fails the field, which also
/// catches the `<redacted>` placeholder of a public form decoded by mistake as a record.
inline std::optional<secret> decode_token(json_reader& reader, std::string_view name)
{
    auto token = reader.optional_secret(name);
    if (token && !is_valid_license_token(token->reveal())) {
        reader.fail(name);
    }
    return token;
}

inline boost::json::object encode_error(const operation_error& error)
{
    return {{"code", error.code}, {"message", error.message}};
}

inline operation_error decode_error(const boost::json::value& value, json_reader& parent, std::string_view name)
{
    json_reader reader(value);
    operation_error error{reader.string("code"), reader.string("message")};
    if (reader.failed()) {
        parent.fail(name);
    }
    return error;
}

inline boost::json::object encode_feature(const license_feature& feature)
{
    return {{"id", feature.id},
            {"name", feature.name},
            {"version", feature.version},
            {"status", feature.status},
            {"in_use", feature.in_use}};
}

inline boost::json::object encode_header(const event_header& header, std::string_view type)
{
    return {{"type", type},
            {"worker_id", header.worker_id},
            {"operation_id", header.operation_id},
            {"occurred_at", format_timestamp(header.occurred_at)},
            {"initiated_by", header.initiated_by}};
}

} // namespace detail

/// Encodes a license. With `secret_exposure::reveal` the result contains tokens in clear text.
inline boost::json::object encode_license(const cml_license& license, secret_exposure exposure)
{
    const auto& state = license.state();
    boost::json::array features;
    for (const auto& feature : state.features) {
        features.push_back(detail::encode_feature(feature));
    }
    boost::json::object object{
        {"status", to_string(state.status)},
        {"token", detail::encode_optional_secret(state.token, exposure)},
        {"pending_token", detail::encode_optional_secret(state.pending_token, exposure)},
        {"pending_operation", to_string(state.pending_operation)},
        {"reregister", state.reregister},
        {"operation_in_progress", state.operation_in_progress},
        {"operation_id", state.operation_id},
        {"requested_by", state.requested_by},
        {"requested_at", detail::encode_optional_time(state.requested_at)},
        {"started_at", detail::encode_optional_time(state.started_at)},
        {"finished_at", detail::encode_optional_time(state.finished_at)},
        {"attempts", state.attempts},
        {"last_operation", to_string(state.last_operation)},
        {"last_outcome", to_string(state.last_outcome)},
        {"last_error", state.last_error ? boost::json::value(detail::encode_error(*state.last_error)) : nullptr},
        {"last_warning", state.last_warning ? boost::json::value(*state.last_warning) : nullptr},
        {"expiry_date", detail::encode_optional_time(state.expiry_date)},
        {"smart_account", state.smart_account},
        {"virtual_account", state.virtual_account},
        {"authorization_status", state.authorization_status},
        {"features", std::move(features)},
        {"cml_info", state.cml_info},
        {"claim_holder", state.claim_holder},
        {"claim_expires_at", detail::encode_optional_time(state.claim_expires_at)},
        {"fence", state.fence},
    };
    return object;
}

/// Decodes a license written by `encode_license`. Fails with `errc::invalid_argument`;
/// `error_field`, when given, receives the name of the first invalid field.
inline result<cml_license> decode_license(const boost::json::value& value, std::string* error_field = nullptr)
{
    detail::json_reader reader(value);
    cml_license::fields state;
    state.status = reader.enumeration("status", parse_license_status, license_status::unregistered);
    state.token = detail::decode_token(reader, "token");
    state.pending_token = detail::decode_token(reader, "pending_token");
    state.pending_operation =
        reader.enumeration("pending_operation", parse_license_operation, license_operation::none);
    state.reregister = reader.boolean("reregister");
    state.operation_in_progress = reader.boolean("operation_in_progress");
    state.operation_id = reader.unsigned_integer("operation_id");
    state.requested_by = reader.string("requested_by");
    state.requested_at = reader.optional_time("requested_at");
    state.started_at = reader.optional_time("started_at");
    state.finished_at = reader.optional_time("finished_at");
    const auto attempts = reader.unsigned_integer("attempts");
    if (attempts > std::numeric_limits<std::uint32_t>::max()) {
        reader.fail("attempts");
    }
    state.attempts = static_cast<std::uint32_t>(attempts);
    state.last_operation = reader.enumeration("last_operation", parse_license_operation, license_operation::none);
    state.last_outcome = reader.enumeration("last_outcome", parse_operation_outcome, operation_outcome::none);
    if (const auto* error = reader.find("last_error"); error && !error->is_null()) {
        state.last_error = detail::decode_error(*error, reader, "last_error");
    }
    state.last_warning = reader.optional_string("last_warning");
    state.expiry_date = reader.optional_time("expiry_date");
    state.smart_account = reader.string("smart_account");
    state.virtual_account = reader.string("virtual_account");
    state.authorization_status = reader.string("authorization_status");
    if (const auto* features = reader.find("features"); features && features->is_array()) {
        for (const auto& item : features->get_array()) {
            detail::json_reader feature_reader(item);
            license_feature feature{feature_reader.string("id"), feature_reader.string("name"),
                                    feature_reader.string("version"), feature_reader.string("status"),
                                    feature_reader.integer("in_use")};
            if (feature_reader.failed()) {
                reader.fail("features");
            }
            state.features.push_back(std::move(feature));
        }
    }
    else {
        reader.fail("features");
    }
    if (const auto* info = reader.find("cml_info")) {
        state.cml_info = *info;
    }
    // Records written before claims existed have none of the claim fields.
    state.claim_holder = reader.optional_string("claim_holder").value_or(std::string());
    state.claim_expires_at = reader.optional_time("claim_expires_at");
    if (reader.find("fence")) {
        state.fence = reader.unsigned_integer("fence");
    }

    if (reader.failed()) {
        if (error_field) {
            *error_field = reader.error_field();
        }
        return errc::invalid_argument;
    }
    return cml_license(std::move(state));
}

namespace detail {

inline boost::json::object encode_worker(const cml_worker& worker, secret_exposure exposure)
{
    const auto& state = worker.state();
    return {
        {"id", state.id},
        {"name", state.name},
        {"cml_url", state.cml_url},
        {"status", to_string(state.status)},
        {"desired_status", to_string(state.desired_status)},
        {"license", encode_license(state.license, exposure)},
        {"version", state.version},
        {"created_at", format_timestamp(state.created_at)},
        {"updated_at", format_timestamp(state.updated_at)},
    };
}

} // namespace detail

/// Encodes every field of a worker, tokens in clear text, for storage adapters only.
inline boost::json::object to_record(const cml_worker& worker)
{
    return detail::encode_worker(worker, secret_exposure::reveal);
}

/// Encodes the public view of a worker: every field, with tokens redacted.
inline boost::json::object to_public_json(const cml_worker& worker)
{
    return detail::encode_worker(worker, secret_exposure::redact);
}

/// Decodes a record written by `to_record`. Fails with `errc::invalid_argument` on a missing
/// or malformed field, or on fields that break the aggregate's invariants. `error_field`,
/// when given, receives the name of the first invalid field in both cases.
inline result<cml_worker> from_record(const boost::json::value& value, std::string* error_field = nullptr)
{
    detail::json_reader reader(value);
    cml_worker::fields state;
    state.id = reader.string("id");
    state.name = reader.string("name");
    state.cml_url = reader.string("cml_url");
    state.status = reader.enumeration("status", parse_worker_status, worker_status::unknown);
    state.desired_status = reader.enumeration("desired_status", parse_worker_status, worker_status::unknown);
    state.version = reader.unsigned_integer("version");
    state.created_at = reader.time("created_at");
    state.updated_at = reader.time("updated_at");

    std::string license_field;
    if (const auto* license = reader.find("license")) {
        auto decoded = decode_license(*license, &license_field);
        if (decoded) {
            state.license = std::move(decoded).value();
        }
        else {
            reader.fail("license." + license_field);
        }
    }
    else {
        reader.fail("license");
    }

    if (reader.failed()) {
        if (error_field) {
            *error_field = reader.error_field();
        }
        return errc::invalid_argument;
    }
    return cml_worker::restore(std::move(state), error_field);
}

/// Encodes an event as a flat object: `type`, the header fields, then the event's own fields.
inline boost::json::object encode_event(const domain_event& event)
{
    return std::visit(
        [](const auto& alternative) {
            using event_type = std::decay_t<decltype(alternative)>;
            auto object = detail::encode_header(alternative.header, event_type::type);
            if constexpr (std::is_same_v<event_type, worker_created>) {
                object["name"] = alternative.name;
                object["cml_url"] = alternative.cml_url;
                object["status"] = to_string(alternative.status);
            }
            else if constexpr (std::is_same_v<event_type, worker_status_changed>) {
                object["previous_status"] = to_string(alternative.previous_status);
                object["status"] = to_string(alternative.status);
            }
            else if constexpr (std::is_same_v<event_type, license_registration_requested>) {
                object["reregister"] = alternative.reregister;
            }
            else if constexpr (std::is_same_v<event_type, license_registration_started> ||
                               std::is_same_v<event_type, license_deregistration_started>) {
                object["attempt"] = alternative.attempt;
            }
            else if constexpr (std::is_same_v<event_type, license_registration_completed>) {
                object["expiry_date"] = detail::encode_optional_time(alternative.expiry_date);
                object["smart_account"] = alternative.smart_account;
                object["virtual_account"] = alternative.virtual_account;
                object["authorization_status"] = alternative.authorization_status;
                boost::json::array features;
                for (const auto& name : alternative.features) {
                    features.push_back(boost::json::string(name));
                }
                object["features"] = std::move(features);
            }
            else if constexpr (std::is_same_v<event_type, license_registration_failed> ||
                               std::is_same_v<event_type, license_deregistration_failed>) {
                object["error"] = detail::encode_error(alternative.error);
            }
            else if constexpr (std::is_same_v<event_type, license_deregistration_completed>) {
                object["warning"] = alternative.warning ? boost::json::value(*alternative.warning) : nullptr;
            }
            else if constexpr (std::is_same_v<event_type, license_operation_claimed>) {
                object["holder"] = alternative.holder;
                object["fence"] = alternative.fence;
                object["expires_at"] = format_timestamp(alternative.expires_at);
            }
            return object;
        },
        event);
}

namespace detail {

template <class Event>
bool decode_event_as(std::string_view type, json_reader& reader, event_header header, std::optional<domain_event>& out)
{
    if (type != Event::type) {
        return false;
    }
    Event event;
    event.header = std::move(header);
    if constexpr (std::is_same_v<Event, worker_created>) {
        event.name = reader.string("name");
        event.cml_url = reader.string("cml_url");
        event.status = reader.enumeration("status", parse_worker_status, worker_status::unknown);
    }
    else if constexpr (std::is_same_v<Event, worker_status_changed>) {
        event.previous_status = reader.enumeration("previous_status", parse_worker_status, worker_status::unknown);
        event.status = reader.enumeration("status", parse_worker_status, worker_status::unknown);
    }
    else if constexpr (std::is_same_v<Event, license_registration_requested>) {
        event.reregister = reader.boolean("reregister");
    }
    else if constexpr (std::is_same_v<Event, license_registration_started> ||
                       std::is_same_v<Event, license_deregistration_started>) {
        const auto attempt = reader.unsigned_integer("attempt");
        if (attempt > std::numeric_limits<std::uint32_t>::max()) {
            reader.fail("attempt");
        }
        event.attempt = static_cast<std::uint32_t>(attempt);
    }
    else if constexpr (std::is_same_v<Event, license_registration_completed>) {
        event.expiry_date = reader.optional_time("expiry_date");
        event.smart_account = reader.string("smart_account");
        event.virtual_account = reader.string("virtual_account");
        event.authorization_status = reader.string("authorization_status");
        const auto* features = reader.find("features");
        if (!features || !features->is_array()) {
            reader.fail("features");
        }
        else {
            for (const auto& name : features->get_array()) {
                if (!name.is_string()) {
                    reader.fail("features");
                    break;
                }
                event.features.emplace_back(name.get_string());
            }
        }
    }
    else if constexpr (std::is_same_v<Event, license_registration_failed> ||
                       std::is_same_v<Event, license_deregistration_failed>) {
        const auto* error = reader.find("error");
        if (!error) {
            reader.fail("error");
        }
        else {
            event.error = decode_error(*error, reader, "error");
        }
    }
    else if constexpr (std::is_same_v<Event, license_deregistration_completed>) {
        event.warning = reader.optional_string("warning");
    }
    else if constexpr (std::is_same_v<Event, license_operation_claimed>) {
        event.holder = reader.string("holder");
        event.fence = reader.unsigned_integer("fence");
        event.expires_at = reader.time("expires_at");
    }
    out = std::move(event);
    return true;
}

template <class... Events>
bool decode_any_event(std::variant<Events...>*, std::string_view type, json_reader& reader, const event_header& header,
                      std::optional<domain_event>& out)
{
    return (decode_event_as<Events>(type, reader, header, out) || ...);
}

} // namespace detail

/// Decodes an event written by `encode_event`. Fails with `errc::invalid_argument` on an
/// unknown type or a missing or malformed field.
inline result<domain_event> decode_event(const boost::json::value& value, std::string* error_field = nullptr)
{
    detail::json_reader reader(value);
    const auto type = reader.string("type");
    event_header header{reader.string("worker_id"), reader.unsigned_integer("operation_id"),
                        reader.time("occurred_at"), reader.string("initiated_by")};
    std::optional<domain_event> event;
    if (!reader.failed() &&
        !detail::decode_any_event(static_cast<domain_event*>(nullptr), type, reader, header, event)) {
        reader.fail("type");
    }
    if (reader.failed()) {
        if (error_field) {
            *error_field = reader.error_field();
        }
        return errc::invalid_argument;
    }
    return std::move(*event);
}

/// `boost::json::value_from` on a license gives its public, redacted form.
inline void tag_invoke(boost::json::value_from_tag, boost::json::value& target, const cml_license& license)
{
    target = encode_license(license, secret_exposure::redact);
}

/// `boost::json::value_from` on a worker gives its public, redacted form.
inline void tag_invoke(boost::json::value_from_tag, boost::json::value& target, const cml_worker& worker)
{
    target = to_public_json(worker);
}

inline void tag_invoke(boost::json::value_from_tag, boost::json::value& target, const domain_event& event)
{
    target = encode_event(event);
}

/// `boost::json::value_to<domain_event>` throws `boost::system::system_error` on invalid input.
inline domain_event tag_invoke(boost::json::value_to_tag<domain_event>, const boost::json::value& value)
{
    std::string field;
    auto decoded = decode_event(value, &field);
    if (!decoded) {
        throw boost::system::system_error(decoded.error(), "invalid event field '" + field + "'");
    }
    return std::move(decoded).value();
}

} // namespace lcm::domain
