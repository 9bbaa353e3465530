// Exponential backoff with full jitter, as a pure function of the failure count and a random source.
#pragma once

#include <lcm/reconcile/action.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>

namespace lcm::reconcile {

/// Exponential backoff: after `n` consecutive failures the retry delay is drawn uniformly from
/// [0, min(cap, base * 2^(n-1))] ("full jitter"), so keys that failed together do not retry together.
///
/// The defaults suit reconciles that call other hosts over HTTP. A first window of 100 ms lets a
/// blip pass without hammering a host that is restarting. The 5 minute cap is reached after about
/// 12 failures in a row and bounds how long a key waits after its dependency recovers; client-go's
/// default of 5 ms to 1000 s was made for an in-cluster API server and retries far too eagerly here.
struct backoff_policy {
    duration base = std::chrono::milliseconds(100);
    duration cap = std::chrono::minutes(5);

    /// Upper bound of the jitter window after `failures` consecutive failures; zero for none.
    /// Never overflows: the doubling stops at `cap`.
    constexpr duration window(std::uint32_t failures) const noexcept
    {
        if (failures == 0 || base <= duration::zero() || cap <= duration::zero()) {
            return duration::zero();
        }
        const duration bounded_base = std::min(base, cap);
        const std::uint32_t doublings = failures - 1;
        // Shifting by 63 or more, or past cap / 2^doublings, would overflow or exceed the cap.
        if (doublings >= 63 || bounded_base.count() > (cap.count() >> doublings)) {
            return cap;
        }
        return duration(bounded_base.count() << doublings);
    }
};

/// A fast, seedable pseudo-random source (SplitMix64). Not for cryptography: it only spreads retries.
/// Thread safety: none; the work queue calls it under its own lock.
class jitter_source {
public:
    explicit constexpr jitter_source(std::uint64_t seed) noexcept : state_(seed) {}

    constexpr std::uint64_t next() noexcept
    {
        std::uint64_t z = (state_ += 0x9e3779b97f4a7c15ULL);
        z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
        z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
        return z ^ (z >> 31);
    }

    /// Returns a delay drawn uniformly from [0, window]. The modulo bias is below 2^-20 for any
    /// window under 2^44 ns (about 4.9 hours), which no backoff cap should exceed by much.
    constexpr duration uniform(duration window) noexcept
    {
        if (window <= duration::zero()) {
            return duration::zero();
        }
        // window.count() is positive, so span + 1 cannot wrap.
        const auto span = static_cast<std::uint64_t>(window.count());
        return duration(static_cast<duration::rep>(next() % (span + 1)));
    }

private:
    std::uint64_t state_;
};

} // namespace lcm::reconcile
