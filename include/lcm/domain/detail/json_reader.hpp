// A small reader that pulls typed fields out of a JSON object and remembers the first error.
#pragma once

#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/error.hpp>

#include <boost/json/value.hpp>

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>

namespace lcm::domain::detail {

/// Reads fields of one JSON object. A missing or mistyped required field sets `failed()`,
/// and `error_field()` names the first such field for the error message.
class json_reader {
public:
    explicit json_reader(const boost::json::value& value) : object_(value.if_object())
    {
        if (!object_) {
            error_field_ = "(root)";
        }
    }

    bool failed() const noexcept { return !error_field_.empty(); }
    const std::string& error_field() const noexcept { return error_field_; }

    const boost::json::value* find(std::string_view name) const noexcept
    {
        if (!object_) {
            return nullptr;
        }
        auto it = object_->find(name);
        return it == object_->end() ? nullptr : &it->value();
    }

    std::string string(std::string_view name) { return optional_string(name, true).value_or(std::string()); }

    /// Reads a string that may be absent or null.
    std::optional<std::string> optional_string(std::string_view name, bool required = false)
    {
        const auto* value = find(name);
        if (!value || value->is_null()) {
            if (required) {
                fail(name);
            }
            return std::nullopt;
        }
        if (!value->is_string()) {
            fail(name);
            return std::nullopt;
        }
        return std::string(value->get_string());
    }

    bool boolean(std::string_view name)
    {
        const auto* value = find(name);
        if (!value || !value->is_bool()) {
            fail(name);
            return false;
        }
        return value->get_bool();
    }

    /// Reads a non-negative integer that fits in `std::uint64_t`.
    std::uint64_t unsigned_integer(std::string_view name)
    {
        const auto* value = find(name);
        if (value && value->is_uint64()) {
            return value->get_uint64();
        }
        if (value && value->is_int64() && value->get_int64() >= 0) {
            return static_cast<std::uint64_t>(value->get_int64());
        }
        fail(name);
        return 0;
    }

    std::int64_t integer(std::string_view name)
    {
        const auto* value = find(name);
        if (value && value->is_int64()) {
            return value->get_int64();
        }
        if (value && value->is_uint64() &&
            value->get_uint64() <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max())) {
            return static_cast<std::int64_t>(value->get_uint64());
        }
        fail(name);
        return 0;
    }

    timestamp time(std::string_view name) { return optional_time(name, true).value_or(timestamp{}); }

    std::optional<timestamp> optional_time(std::string_view name, bool required = false)
    {
        auto text = optional_string(name, required);
        if (!text) {
            return std::nullopt;
        }
        auto parsed = parse_timestamp(*text);
        if (!parsed) {
            fail(name);
        }
        return parsed;
    }

    std::optional<secret> optional_secret(std::string_view name)
    {
        auto text = optional_string(name);
        if (!text) {
            return std::nullopt;
        }
        return secret(std::move(*text));
    }

    /// Reads a string field with `parse(text) -> result<T>`.
    template <class T, class Parse>
    T enumeration(std::string_view name, Parse parse, T fallback)
    {
        auto text = optional_string(name, true);
        if (!text) {
            return fallback;
        }
        auto parsed = parse(*text);
        if (!parsed) {
            fail(name);
            return fallback;
        }
        return parsed.value();
    }

    void fail(std::string_view name)
    {
        if (error_field_.empty()) {
            error_field_ = std::string(name);
        }
    }

private:
    const boost::json::object* object_;
    std::string error_field_;
};

} // namespace lcm::domain::detail
