// Timestamps as lcm stores them, and their text forms.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <string_view>

namespace lcm {

/// A point in UTC time with microsecond precision, the precision every store keeps exactly.
using timestamp = std::chrono::sys_time<std::chrono::microseconds>;

/// Returns the current time, truncated to `timestamp`'s precision.
inline timestamp now_utc() noexcept
{
    return std::chrono::floor<std::chrono::microseconds>(std::chrono::system_clock::now());
}

/// Formats as RFC 3339 in UTC with six fractional digits, e.g. `2026-08-20T17:25:30.000000Z`.
inline std::string format_timestamp(timestamp value)
{
    using namespace std::chrono;
    const auto day = floor<days>(value);
    const year_month_day date{day};
    const hh_mm_ss<microseconds> time{value - day};
    char buffer[40];
    std::snprintf(buffer, sizeof buffer, "%04d-%02u-%02uT%02d:%02d:%02d.%06lldZ", static_cast<int>(date.year()),
                  static_cast<unsigned>(date.month()), static_cast<unsigned>(date.day()),
                  static_cast<int>(time.hours().count()), static_cast<int>(time.minutes().count()),
                  static_cast<int>(time.seconds().count()), static_cast<long long>(time.subseconds().count()));
    return buffer;
}

namespace detail {

inline bool parse_digits(std::string_view text, std::size_t offset, std::size_t count, int& out) noexcept
{
    if (offset + count > text.size()) {
        return false;
    }
    int value = 0;
    for (std::size_t i = offset; i < offset + count; ++i) {
        if (text[i] < '0' || text[i] > '9') {
            return false;
        }
        value = value * 10 + (text[i] - '0');
    }
    out = value;
    return true;
}

} // namespace detail

/// Parses the timestamp forms seen from CML and written by lcm: ISO 8601 / RFC 3339
/// (`2026-08-20T17:25:30Z`, with optional fraction and `+hh:mm` offset) and CML's
/// `2026-08-20 17:25:30` (space, no zone, read as UTC). A fraction finer than a
/// microsecond is truncated. Returns nothing for any other text.
inline std::optional<timestamp> parse_timestamp(std::string_view text) noexcept
{
    using namespace std::chrono;
    int year = 0, month = 0, day_of_month = 0, hour = 0, minute = 0, second = 0;
    if (!detail::parse_digits(text, 0, 4, year) || text.size() < 19 || text[4] != '-' ||
        !detail::parse_digits(text, 5, 2, month) || text[7] != '-' || !detail::parse_digits(text, 8, 2, day_of_month) ||
        (text[10] != 'T' && text[10] != 't' && text[10] != ' ') || !detail::parse_digits(text, 11, 2, hour) ||
        text[13] != ':' || !detail::parse_digits(text, 14, 2, minute) || text[16] != ':' ||
        !detail::parse_digits(text, 17, 2, second)) {
        return std::nullopt;
    }
    const year_month_day date{std::chrono::year{year}, std::chrono::month{static_cast<unsigned>(month)},
                              std::chrono::day{static_cast<unsigned>(day_of_month)}};
    if (!date.ok() || hour > 23 || minute > 59 || second > 60) {
        return std::nullopt;
    }

    std::size_t position = 19;
    std::int64_t micros = 0;
    if (position < text.size() && text[position] == '.') {
        ++position;
        std::size_t digits = 0;
        while (position < text.size() && text[position] >= '0' && text[position] <= '9') {
            if (digits < 6) {
                micros = micros * 10 + (text[position] - '0');
            }
            ++digits;
            ++position;
        }
        if (digits == 0) {
            return std::nullopt;
        }
        for (std::size_t i = digits; i < 6; ++i) {
            micros *= 10;
        }
    }

    minutes offset{0};
    if (position == text.size()) {
        // No zone: CML's own form, which is UTC.
    }
    else if ((text[position] == 'Z' || text[position] == 'z') && position + 1 == text.size()) {
        ++position;
    }
    else if ((text[position] == '+' || text[position] == '-') && position + 6 == text.size() &&
             text[position + 3] == ':') {
        int offset_hours = 0, offset_minutes = 0;
        if (!detail::parse_digits(text, position + 1, 2, offset_hours) ||
            !detail::parse_digits(text, position + 4, 2, offset_minutes) || offset_hours > 23 || offset_minutes > 59) {
            return std::nullopt;
        }
        offset = hours{offset_hours} + minutes{offset_minutes};
        if (text[position] == '-') {
            offset = -offset;
        }
    }
    else {
        return std::nullopt;
    }

    return timestamp{sys_days{date}.time_since_epoch() + hours{hour} + minutes{minute} + seconds{second} +
                     microseconds{micros} - offset};
}

} // namespace lcm
