// A small metrics interface shared by every layer, and a Prometheus text exposition registry.
#pragma once

#include <algorithm>
#include <atomic>
#include <charconv>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <span>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

namespace lcm::metrics {

/// One label of a time series, such as `controller="license"`.
struct label {
    std::string name;
    std::string value;
};

using labels = std::vector<label>;

/// A monotonically increasing count.
/// Thread safety: `increment` may be called from any thread at the same time.
class counter {
public:
    virtual ~counter() = default;

    /// Adds `amount`. Negative and NaN amounts are ignored, because a counter never decreases.
    virtual void increment(double amount = 1.0) noexcept = 0;
};

/// A value that goes up and down, such as a queue depth.
/// Thread safety: every member may be called from any thread at the same time.
class gauge {
public:
    virtual ~gauge() = default;
    virtual void set(double value) noexcept = 0;
    virtual void add(double amount) noexcept = 0;
};

/// A distribution of observed values, counted into fixed buckets.
/// Thread safety: `observe` may be called from any thread at the same time.
class histogram {
public:
    virtual ~histogram() = default;
    virtual void observe(double value) noexcept = 0;
};

/// The interface through which code creates its metrics. Each call returns the one series for
/// that name and label set, creating it on first use, so two callers with the same labels share it.
/// Errors: a name or label name that the exposition format forbids, or a name registered before
/// with another type, label names or buckets, is a bug and throws `std::invalid_argument`.
/// Thread safety: implementations must allow calls from any thread at the same time.
class registry {
public:
    virtual ~registry() = default;

    virtual std::shared_ptr<counter> get_counter(std::string_view name, std::string_view help,
                                                 const labels& series_labels) = 0;

    virtual std::shared_ptr<gauge> get_gauge(std::string_view name, std::string_view help,
                                             const labels& series_labels) = 0;

    /// `upper_bounds` must be finite and strictly increasing; the `+Inf` bucket is implied.
    virtual std::shared_ptr<histogram> get_histogram(std::string_view name, std::string_view help,
                                                     const labels& series_labels,
                                                     std::span<const double> upper_bounds) = 0;
};

/// Returns `count` bucket bounds: `start`, `start * factor`, `start * factor^2`, ...
inline std::vector<double> exponential_buckets(double start, double factor, std::size_t count)
{
    if (!(start > 0.0) || !(factor > 1.0)) {
        throw std::invalid_argument("exponential_buckets needs start > 0 and factor > 1");
    }
    std::vector<double> bounds;
    bounds.reserve(count);
    for (double bound = start; bounds.size() < count; bound *= factor) {
        bounds.push_back(bound);
    }
    return bounds;
}

namespace detail {

class null_counter final : public counter {
public:
    void increment(double) noexcept override {}
};

class null_gauge final : public gauge {
public:
    void set(double) noexcept override {}
    void add(double) noexcept override {}
};

class null_histogram final : public histogram {
public:
    void observe(double) noexcept override {}
};

} // namespace detail

/// A registry whose metrics discard every update, for code that was given no registry.
class null_registry final : public registry {
public:
    std::shared_ptr<counter> get_counter(std::string_view, std::string_view, const labels&) override
    {
        return std::make_shared<detail::null_counter>();
    }

    std::shared_ptr<gauge> get_gauge(std::string_view, std::string_view, const labels&) override
    {
        return std::make_shared<detail::null_gauge>();
    }

    std::shared_ptr<histogram> get_histogram(std::string_view, std::string_view, const labels&,
                                             std::span<const double>) override
    {
        return std::make_shared<detail::null_histogram>();
    }
};

namespace detail {

// Floating-point atomics in libstdc++ 12 compile fetch_add to a compare-exchange loop anyway;
// writing it out keeps the code identical on every standard library.
inline void atomic_add(std::atomic<double>& target, double amount) noexcept
{
    double current = target.load(std::memory_order_relaxed);
    while (!target.compare_exchange_weak(current, current + amount, std::memory_order_relaxed)) {
    }
}

class prometheus_counter final : public counter {
public:
    void increment(double amount) noexcept override
    {
        if (amount >= 0.0) {
            atomic_add(value_, amount);
        }
    }

    double value() const noexcept { return value_.load(std::memory_order_relaxed); }

private:
    std::atomic<double> value_{0.0};
};

class prometheus_gauge final : public gauge {
public:
    void set(double value) noexcept override { value_.store(value, std::memory_order_relaxed); }
    void add(double amount) noexcept override { atomic_add(value_, amount); }
    double value() const noexcept { return value_.load(std::memory_order_relaxed); }

private:
    std::atomic<double> value_{0.0};
};

class prometheus_histogram final : public histogram {
public:
    explicit prometheus_histogram(std::vector<double> upper_bounds)
        : upper_bounds_(std::move(upper_bounds)),
          counts_(std::make_unique<std::atomic<std::uint64_t>[]>(upper_bounds_.size() + 1))
    {
    }

    void observe(double value) noexcept override
    {
        // A bucket counts values less than or equal to its bound; NaN goes to +Inf only.
        std::size_t bucket = upper_bounds_.size();
        if (!std::isnan(value)) {
            bucket = static_cast<std::size_t>(
                std::lower_bound(upper_bounds_.begin(), upper_bounds_.end(), value) - upper_bounds_.begin());
        }
        counts_[bucket].fetch_add(1, std::memory_order_relaxed);
        atomic_add(sum_, value);
    }

    const std::vector<double>& upper_bounds() const noexcept { return upper_bounds_; }

    /// Count of bucket `index`, not cumulative; index `upper_bounds().size()` is the +Inf bucket.
    std::uint64_t bucket_count(std::size_t index) const noexcept
    {
        return counts_[index].load(std::memory_order_relaxed);
    }

    double sum() const noexcept { return sum_.load(std::memory_order_relaxed); }

private:
    std::vector<double> upper_bounds_;
    std::unique_ptr<std::atomic<std::uint64_t>[]> counts_;
    std::atomic<double> sum_{0.0};
};

inline bool is_valid_metric_name(std::string_view name) noexcept
{
    if (name.empty()) {
        return false;
    }
    for (std::size_t i = 0; i < name.size(); ++i) {
        const char c = name[i];
        const bool letter = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':';
        const bool digit = c >= '0' && c <= '9';
        if (!letter && !(digit && i > 0)) {
            return false;
        }
    }
    return true;
}

inline bool is_valid_label_name(std::string_view name) noexcept
{
    // Names starting with two underscores are reserved for Prometheus itself.
    return is_valid_metric_name(name) && name.find(':') == std::string_view::npos && !name.starts_with("__");
}

inline void append_number(std::string& out, double value)
{
    if (std::isnan(value)) {
        out.append("NaN");
        return;
    }
    if (std::isinf(value)) {
        out.append(value > 0 ? "+Inf" : "-Inf");
        return;
    }
    char buffer[32];
    const auto [end, error] = std::to_chars(buffer, buffer + sizeof buffer, value);
    out.append(buffer, error == std::errc{} ? end : buffer);
}

inline void append_escaped(std::string& out, std::string_view text, bool escape_quotes)
{
    for (const char c : text) {
        if (c == '\\') {
            out.append("\\\\");
        } else if (c == '\n') {
            out.append("\\n");
        } else if (c == '"' && escape_quotes) {
            out.append("\\\"");
        } else {
            out.push_back(c);
        }
    }
}

} // namespace detail

/// A registry that keeps its metrics in memory and renders them in the Prometheus text
/// exposition format, version 0.0.4, for a `/metrics` endpoint.
/// Thread safety: every member may be called from any thread at the same time. A scrape reads
/// each value atomically, but not all values at one instant.
class prometheus_registry final : public registry {
public:
    /// The `Content-Type` of the text that `text()` returns.
    static constexpr std::string_view content_type = "text/plain; version=0.0.4; charset=utf-8";

    std::shared_ptr<counter> get_counter(std::string_view name, std::string_view help,
                                         const labels& series_labels) override
    {
        return get_series<detail::prometheus_counter>(family_type::counter, name, help, series_labels, {});
    }

    std::shared_ptr<gauge> get_gauge(std::string_view name, std::string_view help,
                                     const labels& series_labels) override
    {
        return get_series<detail::prometheus_gauge>(family_type::gauge, name, help, series_labels, {});
    }

    std::shared_ptr<histogram> get_histogram(std::string_view name, std::string_view help,
                                             const labels& series_labels,
                                             std::span<const double> upper_bounds) override
    {
        for (std::size_t i = 0; i < upper_bounds.size(); ++i) {
            if (!std::isfinite(upper_bounds[i]) || (i > 0 && !(upper_bounds[i - 1] < upper_bounds[i]))) {
                throw std::invalid_argument("histogram '" + std::string(name) +
                                            "' needs finite, strictly increasing bucket bounds");
            }
        }
        for (const auto& series_label : series_labels) {
            if (series_label.name == "le") {
                throw std::invalid_argument("histogram '" + std::string(name) +
                                            "' cannot use the label name 'le', which names its buckets");
            }
        }
        return get_series<detail::prometheus_histogram>(family_type::histogram, name, help, series_labels,
                                                        upper_bounds);
    }

    /// Renders every metric, families sorted by name and series by label values.
    std::string text() const
    {
        std::lock_guard lock(mutex_);
        std::string out;
        for (const auto& [name, family_entry] : families_) {
            out.append("# HELP ").append(name).push_back(' ');
            detail::append_escaped(out, family_entry.help, false);
            out.append("\n# TYPE ").append(name).push_back(' ');
            out.append(type_name(family_entry.type)).push_back('\n');
            for (const auto& [values, series] : family_entry.series) {
                append_series(out, name, family_entry, values, series.get());
            }
        }
        return out;
    }

private:
    enum class family_type { counter, gauge, histogram };

    struct family {
        family_type type;
        std::string help;
        std::vector<std::string> label_names;
        std::vector<double> upper_bounds;
        std::map<std::vector<std::string>, std::shared_ptr<void>> series;
    };

    static std::string_view type_name(family_type type) noexcept
    {
        switch (type) {
        case family_type::counter: return "counter";
        case family_type::gauge: return "gauge";
        case family_type::histogram: return "histogram";
        }
        return "untyped";
    }

    template <class Series>
    std::shared_ptr<Series> get_series(family_type type, std::string_view name, std::string_view help,
                                       const labels& series_labels, std::span<const double> upper_bounds)
    {
        if (!detail::is_valid_metric_name(name)) {
            throw std::invalid_argument("invalid metric name '" + std::string(name) +
                                        "'; use letters, digits, '_' and ':' and no leading digit");
        }
        std::vector<std::string> names;
        std::vector<std::string> values;
        for (const auto& series_label : series_labels) {
            if (!detail::is_valid_label_name(series_label.name)) {
                throw std::invalid_argument("invalid label name '" + series_label.name + "' on metric '" +
                                            std::string(name) + "'");
            }
            names.push_back(series_label.name);
            values.push_back(series_label.value);
        }

        std::lock_guard lock(mutex_);
        auto [position, inserted] = families_.try_emplace(std::string(name));
        family& entry = position->second;
        if (inserted) {
            entry.type = type;
            entry.help = std::string(help);
            entry.label_names = names;
            entry.upper_bounds.assign(upper_bounds.begin(), upper_bounds.end());
        } else if (entry.type != type || entry.label_names != names ||
                   !std::equal(entry.upper_bounds.begin(), entry.upper_bounds.end(), upper_bounds.begin(),
                               upper_bounds.end())) {
            throw std::invalid_argument("metric '" + std::string(name) +
                                        "' is already registered with another type, label names or buckets");
        }

        auto& series = entry.series[values];
        if (!series) {
            if constexpr (std::is_same_v<Series, detail::prometheus_histogram>) {
                series = std::make_shared<Series>(entry.upper_bounds);
            } else {
                series = std::make_shared<Series>();
            }
        }
        return std::static_pointer_cast<Series>(series);
    }

    static void append_labels(std::string& out, const family& entry, const std::vector<std::string>& values,
                              std::string_view le = {})
    {
        if (values.empty() && le.empty()) {
            return;
        }
        out.push_back('{');
        for (std::size_t i = 0; i < values.size(); ++i) {
            if (i > 0) {
                out.push_back(',');
            }
            out.append(entry.label_names[i]).append("=\"");
            detail::append_escaped(out, values[i], true);
            out.push_back('"');
        }
        if (!le.empty()) {
            out.append(values.empty() ? "le=\"" : ",le=\"").append(le).push_back('"');
        }
        out.push_back('}');
    }

    static void append_series(std::string& out, const std::string& name, const family& entry,
                              const std::vector<std::string>& values, const void* series)
    {
        if (entry.type != family_type::histogram) {
            const double value = entry.type == family_type::counter
                                     ? static_cast<const detail::prometheus_counter*>(series)->value()
                                     : static_cast<const detail::prometheus_gauge*>(series)->value();
            out.append(name);
            append_labels(out, entry, values);
            out.push_back(' ');
            detail::append_number(out, value);
            out.push_back('\n');
            return;
        }

        const auto& histogram_series = *static_cast<const detail::prometheus_histogram*>(series);
        const auto& bounds = histogram_series.upper_bounds();
        std::uint64_t cumulative = 0;
        for (std::size_t i = 0; i <= bounds.size(); ++i) {
            cumulative += histogram_series.bucket_count(i);
            std::string le;
            detail::append_number(le, i < bounds.size() ? bounds[i] : HUGE_VAL);
            out.append(name).append("_bucket");
            append_labels(out, entry, values, le);
            out.push_back(' ');
            out.append(std::to_string(cumulative)).push_back('\n');
        }
        out.append(name).append("_sum");
        append_labels(out, entry, values);
        out.push_back(' ');
        detail::append_number(out, histogram_series.sum());
        out.push_back('\n');
        // The count is the +Inf bucket, so the two always agree within one scrape.
        out.append(name).append("_count");
        append_labels(out, entry, values);
        out.push_back(' ');
        out.append(std::to_string(cumulative)).push_back('\n');
    }

    mutable std::mutex mutex_;
    std::map<std::string, family, std::less<>> families_;
};

} // namespace lcm::metrics
