// Helpers shared by lcm's benchmark programs.
#pragma once

#include <malloc.h>

#include <cstddef>
#include <fstream>
#include <string>

namespace lcm::bench {

/// Heap and resident memory of this process at one moment.
struct memory_sample {
    /// Bytes allocated through malloc and not freed (glibc `mallinfo2().uordblks + hblkhd`),
    /// including large blocks such as hash tables, which glibc may map on their own.
    std::size_t heap_in_use = 0;
    std::size_t rss = 0;
    std::size_t peak_rss = 0;
};

/// Reads a `kB` field of `/proc/self/status`, such as `VmRSS`, in bytes; 0 when it is missing.
inline std::size_t status_field_bytes(const char* field)
{
    std::ifstream status("/proc/self/status");
    std::string line;
    const std::string prefix = std::string(field) + ":";
    while (std::getline(status, line)) {
        if (line.rfind(prefix, 0) == 0) {
            return std::stoull(line.substr(prefix.size())) * 1024;
        }
    }
    return 0;
}

inline memory_sample sample_memory()
{
    memory_sample sample;
    const auto info = mallinfo2();
    sample.heap_in_use = info.uordblks + info.hblkhd;
    sample.rss = status_field_bytes("VmRSS");
    sample.peak_rss = status_field_bytes("VmHWM");
    return sample;
}

} // namespace lcm::bench
