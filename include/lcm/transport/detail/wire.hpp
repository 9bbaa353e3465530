// JSON forms of the internal API that both the server and the HTTP client use.
#pragma once

#include <lcm/controller/control_plane_client.hpp>
#include <lcm/domain/detail/json_reader.hpp>
#include <lcm/domain/json.hpp>
#include <lcm/domain/license.hpp>
#include <lcm/error.hpp>

#include <boost/json/value.hpp>

#include <chrono>
#include <optional>
#include <string>
#include <string_view>

namespace lcm::transport::detail {

/// Encodes a task for a worker-controller. The pending token is written in clear text, so
/// only the internal API may send this form.
inline boost::json::object encode_task(const controller::license_task& task)
{
    return {
        {"worker_id", task.worker_id},
        {"cml_url", task.cml_url},
        {"worker_status", to_string(task.worker_status)},
        {"operation", to_string(task.operation)},
        {"operation_id", task.operation_id},
        {"started", task.started},
        {"reregister", task.reregister},
        {"token", task.token ? boost::json::value(task.token->reveal()) : nullptr},
        {"requested_at", domain::detail::encode_optional_time(task.requested_at)},
        {"started_at", domain::detail::encode_optional_time(task.started_at)},
        {"attempts", task.attempts},
        {"claim_holder", task.claim_holder},
        {"claim_expires_at", domain::detail::encode_optional_time(task.claim_expires_at)},
        {"fence", task.fence},
    };
}

/// Decodes a task written by `encode_task`. Fails with `errc::protocol_error`, because a
/// malformed task breaks the server's contract.
inline result<controller::license_task> decode_task(const boost::json::value& value)
{
    domain::detail::json_reader reader(value);
    controller::license_task task;
    task.worker_id = reader.string("worker_id");
    task.cml_url = reader.string("cml_url");
    task.worker_status = reader.enumeration("worker_status", domain::parse_worker_status, domain::worker_status::unknown);
    task.operation = reader.enumeration("operation", domain::parse_license_operation, domain::license_operation::none);
    task.operation_id = reader.unsigned_integer("operation_id");
    task.started = reader.boolean("started");
    task.reregister = reader.boolean("reregister");
    task.token = reader.optional_secret("token");
    task.requested_at = reader.optional_time("requested_at");
    task.started_at = reader.optional_time("started_at");
    task.attempts = static_cast<std::uint32_t>(reader.unsigned_integer("attempts"));
    // Servers that predate claims send none of the claim fields.
    task.claim_holder = reader.optional_string("claim_holder").value_or(std::string());
    task.claim_expires_at = reader.optional_time("claim_expires_at");
    if (reader.find("fence")) {
        task.fence = reader.unsigned_integer("fence");
    }
    if (reader.failed()) {
        return errc::protocol_error;
    }
    return task;
}

/// Encodes what CML reported on a completed registration.
inline boost::json::object encode_details(const domain::registration_details& details)
{
    boost::json::array features;
    for (const auto& feature : details.features) {
        features.push_back(domain::detail::encode_feature(feature));
    }
    return {
        {"registration_status", details.registration_status},
        {"smart_account", details.smart_account},
        {"virtual_account", details.virtual_account},
        {"expiry_date", domain::detail::encode_optional_time(details.expiry_date)},
        {"authorization_status", details.authorization_status},
        {"features", std::move(features)},
        {"cml_info", details.cml_info},
    };
}

/// Decodes registration details. Fails with `errc::invalid_argument`; `error_field`
/// receives the name of the first invalid field.
inline result<domain::registration_details> decode_details(const boost::json::value& value, std::string& error_field)
{
    domain::detail::json_reader reader(value);
    domain::registration_details details;
    details.registration_status = reader.optional_string("registration_status").value_or("");
    details.smart_account = reader.optional_string("smart_account").value_or("");
    details.virtual_account = reader.optional_string("virtual_account").value_or("");
    details.expiry_date = reader.optional_time("expiry_date");
    details.authorization_status = reader.optional_string("authorization_status").value_or("");
    if (const auto* features = reader.find("features"); features && !features->is_null()) {
        if (!features->is_array()) {
            reader.fail("features");
        }
        else {
            for (const auto& item : features->get_array()) {
                domain::detail::json_reader feature_reader(item);
                domain::license_feature feature{feature_reader.string("id"), feature_reader.string("name"),
                                                feature_reader.optional_string("version").value_or(""),
                                                feature_reader.optional_string("status").value_or(""), 0};
                if (feature_reader.find("in_use")) {
                    feature.in_use = feature_reader.integer("in_use");
                }
                if (feature_reader.failed()) {
                    reader.fail("features");
                    break;
                }
                details.features.push_back(std::move(feature));
            }
        }
    }
    if (const auto* info = reader.find("cml_info")) {
        details.cml_info = *info;
    }
    if (reader.failed()) {
        error_field = reader.error_field();
        return errc::invalid_argument;
    }
    return details;
}

/// Reads the optional `fence` of a step report: `no_fence` when absent or null. Fails with
/// `errc::invalid_argument` when it is not an unsigned integer.
inline result<std::uint64_t> decode_fence(const boost::json::value& body)
{
    const auto* fence = body.is_object() ? body.get_object().if_contains("fence") : nullptr;
    if (!fence || fence->is_null()) {
        return domain::no_fence;
    }
    if (fence->is_uint64()) {
        return fence->get_uint64();
    }
    if (fence->is_int64() && fence->get_int64() >= 0) {
        return static_cast<std::uint64_t>(fence->get_int64());
    }
    return errc::invalid_argument;
}

/// Encodes the fields of a claim that another controller holds, which the 409 response to a
/// claim carries besides `code` and `message`.
inline void encode_foreign_claim(boost::json::object& body, const controller::license_claim& claim)
{
    body["holder"] = claim.holder;
    body["claim_expires_at"] = format_timestamp(claim.expires_at);
    body["claim_remaining_ms"] = claim.remaining.count();
}

/// Decodes the claim that another controller holds from a 409 response to a claim. Fails with
/// `errc::protocol_error`.
inline result<controller::license_claim> decode_foreign_claim(const boost::json::value& body)
{
    domain::detail::json_reader reader(body);
    controller::license_claim claim;
    claim.holder = reader.string("holder");
    claim.expires_at = reader.time("claim_expires_at");
    claim.remaining = std::chrono::milliseconds(reader.integer("claim_remaining_ms"));
    if (reader.failed()) {
        return errc::protocol_error;
    }
    return claim;
}

/// Returns the error whose `lcm::error_name` is `name`, or nothing for an unknown name.
inline std::optional<errc> errc_from_name(std::string_view name) noexcept
{
    for (int value = static_cast<int>(errc::not_found); value <= static_cast<int>(errc::claimed); ++value) {
        if (name == error_name(static_cast<errc>(value))) {
            return static_cast<errc>(value);
        }
    }
    return std::nullopt;
}

} // namespace lcm::transport::detail
