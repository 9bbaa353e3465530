// A string that must never be printed, logged or serialized in clear text by accident.
#pragma once

#include <boost/json/conversion.hpp>
#include <boost/json/value.hpp>
#include <boost/json/value_from.hpp>

#include <ostream>
#include <string>
#include <string_view>
#include <utility>

namespace lcm {

/// A license token, password or API key. It prints, logs and converts to JSON as
/// `"<redacted>"`; only `reveal()` gives the clear text, so every place that needs the
/// secret itself is a visible call in the code.
class secret {
public:
    /// The text that stands for a secret wherever it is printed or serialized.
    static constexpr std::string_view redacted_text = "<redacted>";

    secret() = default;

    explicit secret(std::string value) : value_(std::move(value)) {}

    /// Returns the clear text. Call it only to hand the secret to its consumer (CML, a database).
    const std::string& reveal() const noexcept { return value_; }

    bool empty() const noexcept { return value_.empty(); }

    /// Compares in time that depends only on the lengths, so a mismatch does not reveal the
    /// length of the matching prefix.
    bool equals(std::string_view other) const noexcept
    {
        if (other.size() != value_.size()) {
            return false;
        }
        unsigned char difference = 0;
        for (std::size_t i = 0; i < value_.size(); ++i) {
            difference |= static_cast<unsigned char>(value_[i] ^ other[i]);
        }
        return difference == 0;
    }

    friend bool operator==(const secret& lhs, const secret& rhs) noexcept { return lhs.equals(rhs.value_); }

    friend std::ostream& operator<<(std::ostream& out, const secret&) { return out << redacted_text; }

    friend void tag_invoke(boost::json::value_from_tag, boost::json::value& target, const secret&)
    {
        target = boost::json::string(redacted_text);
    }

private:
    std::string value_;
};

/// Returns `text` with every occurrence of the secret's clear text replaced by `<redacted>`.
/// An empty secret leaves the text unchanged.
inline std::string redact_secret(std::string_view text, const secret& value)
{
    const std::string_view clear = value.reveal();
    std::string out;
    if (clear.empty()) {
        out.assign(text);
        return out;
    }
    out.reserve(text.size());
    std::size_t position = 0;
    for (auto found = text.find(clear); found != std::string_view::npos; found = text.find(clear, position)) {
        out.append(text.substr(position, found - position));
        out.append(secret::redacted_text);
        position = found + clear.size();
    }
    out.append(text.substr(position));
    return out;
}

} // namespace lcm
