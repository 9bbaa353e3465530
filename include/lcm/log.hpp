// The injected logger: a level and a sink. lcm itself never writes to stdout or stderr.
#pragma once

#include <cstdint>
#include <functional>
#include <initializer_list>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lcm {

enum class log_level { trace, debug, info, warning, error, off };

inline std::string_view to_string(log_level level) noexcept
{
    switch (level) {
    case log_level::trace: return "trace";
    case log_level::debug: return "debug";
    case log_level::info: return "info";
    case log_level::warning: return "warning";
    case log_level::error: return "error";
    case log_level::off: return "off";
    }
    return "unknown";
}

/// One structured field of a log record, such as `worker_id` or `operation_id`.
/// Values are plain text, so a secret can only get here through `secret::reveal()`.
struct log_field {
    std::string_view name;
    std::string value;
};

/// One log record as handed to the sink.
struct log_record {
    log_level level;
    std::string_view message;
    std::vector<log_field> fields;
};

/// A level and a sink. Records below the level are dropped before any field is formatted,
/// so a disabled level costs one comparison. Copying a logger shares its sink.
/// Thread safety: the sink is called from whichever thread logs, so it must be thread-safe.
class logger {
public:
    using sink_type = std::function<void(const log_record&)>;

    /// Creates a logger that drops everything.
    logger() = default;

    logger(log_level level, sink_type sink) : level_(level), sink_(std::move(sink)) {}

    log_level level() const noexcept { return level_; }

    bool enabled(log_level level) const noexcept { return sink_ && level >= level_ && level != log_level::off; }

    void log(log_level level, std::string_view message, std::initializer_list<log_field> fields = {}) const
    {
        if (!enabled(level)) {
            return;
        }
        sink_(log_record{level, message, std::vector<log_field>(fields)});
    }

    void debug(std::string_view message, std::initializer_list<log_field> fields = {}) const
    {
        log(log_level::debug, message, fields);
    }

    void info(std::string_view message, std::initializer_list<log_field> fields = {}) const
    {
        log(log_level::info, message, fields);
    }

    void warning(std::string_view message, std::initializer_list<log_field> fields = {}) const
    {
        log(log_level::warning, message, fields);
    }

    void error(std::string_view message, std::initializer_list<log_field> fields = {}) const
    {
        log(log_level::error, message, fields);
    }

private:
    log_level level_ = log_level::off;
    sink_type sink_;
};

/// Formats a record as one line of `key=value` pairs, quoting values that contain spaces.
inline std::string format_log_line(const log_record& record)
{
    auto append_value = [](std::string& out, std::string_view value) {
        const bool quote = value.empty() || value.find_first_of(" \t\"=") != std::string_view::npos;
        if (!quote) {
            out.append(value);
            return;
        }
        out.push_back('"');
        for (char c : value) {
            if (c == '"' || c == '\\') {
                out.push_back('\\');
            }
            out.push_back(c == '\n' ? ' ' : c);
        }
        out.push_back('"');
    };

    std::string line = "level=";
    line.append(to_string(record.level));
    line.append(" msg=");
    append_value(line, record.message);
    for (const auto& field : record.fields) {
        line.push_back(' ');
        line.append(field.name);
        line.push_back('=');
        append_value(line, field.value);
    }
    return line;
}

} // namespace lcm
