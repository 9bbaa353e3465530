// Small helpers of the fake CML: a transparent string hash, a seeded random generator and
// base64url encoding for JWT-looking bearer tokens.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <string>
#include <string_view>

namespace lcm::testing::detail {

/// Lets unordered maps keyed by `std::string` be searched with a `std::string_view`.
struct string_hash {
    using is_transparent = void;

    std::size_t operator()(std::string_view text) const noexcept { return std::hash<std::string_view>{}(text); }
};

/// FNV-1a: a hash that is the same on every platform, so seeds derived from instance
/// names give the same fault sequence everywhere.
inline std::uint64_t stable_hash(std::string_view text) noexcept
{
    std::uint64_t hash = 0xcbf29ce484222325ULL;
    for (char c : text) {
        hash ^= static_cast<unsigned char>(c);
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

/// SplitMix64: eight bytes of state per instance, which matters with 100k instances.
class random_generator {
public:
    explicit random_generator(std::uint64_t seed = 0) noexcept : state_(seed) {}

    std::uint64_t next() noexcept
    {
        std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }

    /// Returns true with probability `rate`; a rate of 0 or less never draws.
    bool chance(double rate) noexcept
    {
        if (rate <= 0.0) {
            return false;
        }
        // The top 53 bits give a uniform double in [0, 1).
        return static_cast<double>(next() >> 11) * 0x1.0p-53 < rate;
    }

private:
    std::uint64_t state_;
};

/// Returns the length of the unpadded base64url encoding of `size` bytes.
constexpr std::size_t base64url_length(std::size_t size) noexcept
{
    return size / 3 * 4 + (size % 3 == 0 ? 0 : size % 3 + 1);
}

/// Appends the unpadded base64url encoding of `bytes` to `out`. It grows `out` once and
/// encodes three bytes per step, because a token is encoded on every fake login.
inline void append_base64url(std::string& out, std::string_view bytes)
{
    static constexpr char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    const std::size_t start = out.size();
    out.resize(start + base64url_length(bytes.size()));
    char* target = out.data() + start;
    const auto byte = [&bytes](std::size_t i) { return static_cast<std::uint32_t>(static_cast<unsigned char>(bytes[i])); };

    std::size_t i = 0;
    for (; i + 3 <= bytes.size(); i += 3) {
        const std::uint32_t group = byte(i) << 16 | byte(i + 1) << 8 | byte(i + 2);
        *target++ = alphabet[group >> 18 & 0x3f];
        *target++ = alphabet[group >> 12 & 0x3f];
        *target++ = alphabet[group >> 6 & 0x3f];
        *target++ = alphabet[group & 0x3f];
    }
    const std::size_t rest = bytes.size() - i;
    if (rest == 1) {
        const std::uint32_t group = byte(i) << 16;
        *target++ = alphabet[group >> 18 & 0x3f];
        *target++ = alphabet[group >> 12 & 0x3f];
    }
    else if (rest == 2) {
        const std::uint32_t group = byte(i) << 16 | byte(i + 1) << 8;
        *target++ = alphabet[group >> 18 & 0x3f];
        *target++ = alphabet[group >> 12 & 0x3f];
        *target++ = alphabet[group >> 6 & 0x3f];
    }
}

} // namespace lcm::testing::detail
