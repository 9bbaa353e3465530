// Helpers of the tests that run the example programs as child processes: secret files,
// the bound port from the first line of stdout, a port for a program that restarts, a clean
// stop, a kill and a check for secrets.
#pragma once

#include "child_process.hpp"

#include <catch2/catch.hpp>

#include <boost/url/parse.hpp>

#include <chrono>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <string_view>
#include <system_error>
#include <vector>

namespace lcm::test {

inline constexpr auto start_timeout = std::chrono::seconds(10);
inline constexpr auto exit_timeout = std::chrono::seconds(10);

/// A temporary directory with secret files, deleted by the destructor.
class secret_files {
public:
    secret_files()
    {
        std::string pattern = (std::filesystem::temp_directory_path() / "lcm-programs-XXXXXX").string();
        REQUIRE(::mkdtemp(pattern.data()) != nullptr);
        directory_ = pattern;
    }

    secret_files(const secret_files&) = delete;
    secret_files& operator=(const secret_files&) = delete;

    ~secret_files()
    {
        std::error_code ignored;
        std::filesystem::remove_all(directory_, ignored);
    }

    /// Writes `content` to a new file and returns its path.
    std::string write(const std::string& name, const std::string& content)
    {
        const auto path = directory_ / name;
        std::ofstream(path) << content;
        return path.string();
    }

    /// Returns the path of `name` in the directory, without creating the file.
    std::string path(const std::string& name) const { return (directory_ / name).string(); }

private:
    std::filesystem::path directory_;
};

/// Reads `listening on <url>` from the first line and returns the port.
inline unsigned short read_port(child_process& child)
{
    auto line = child.read_first_line(start_timeout);
    INFO("stderr: " << child.standard_error());
    REQUIRE(line);
    INFO("first line: " << *line);
    REQUIRE(line->starts_with("listening on http://127.0.0.1:"));
    auto url = boost::urls::parse_absolute_uri(line->substr(std::string_view("listening on ").size()));
    REQUIRE(url);
    return url->port_number();
}

/// Returns a random port above 1023 and outside the kernel's ephemeral port range
/// (`/proc/sys/net/ipv4/ip_local_port_range`, 32768 to 60999 when it is unreadable), for
/// a program that restarts on the same port. The kernel picks the local port of each outgoing
/// connection from that range, so a port outside it stays free while the program is down.
/// Another listener may still use the port, so callers try another one when the start fails.
inline unsigned short pick_port_outside_ephemeral_range()
{
    unsigned first_ephemeral = 32768;
    unsigned last_ephemeral = 60999;
    unsigned first_read = 0;
    unsigned last_read = 0;
    if (std::ifstream("/proc/sys/net/ipv4/ip_local_port_range") >> first_read >> last_read) {
        first_ephemeral = first_read;
        last_ephemeral = last_read;
    }

    constexpr unsigned first_allowed = 1024;
    constexpr unsigned last_allowed = 65535;
    const unsigned below = first_ephemeral > first_allowed ? first_ephemeral - first_allowed : 0;
    const unsigned above = last_ephemeral < last_allowed ? last_allowed - last_ephemeral : 0;
    INFO("ephemeral port range " << first_ephemeral << " to " << last_ephemeral);
    REQUIRE(below + above > 0);

    std::random_device seed;
    std::uniform_int_distribution<unsigned> pick(0, below + above - 1);
    const unsigned offset = pick(seed);
    const unsigned port = offset < below ? first_allowed + offset : last_ephemeral + 1 + (offset - below);
    return static_cast<unsigned short>(port);
}

/// Sends SIGTERM and checks that the program exits with 0.
inline void stop_cleanly(child_process& child)
{
    child.send_signal(SIGTERM);
    const auto status = child.wait_for_exit(exit_timeout);
    INFO("stderr: " << child.standard_error());
    REQUIRE(status);
    CHECK(*status == 0);
}

/// Sends SIGKILL and checks that the signal ended the program.
inline void kill_program(child_process& child)
{
    child.send_signal(SIGKILL);
    const auto status = child.wait_for_exit(exit_timeout);
    REQUIRE(status);
    CHECK(*status == 128 + SIGKILL);
}

/// Returns the PostgreSQL server that scripts/test started, or an empty string.
inline std::string postgres_test_url()
{
    const char* url = std::getenv("LCM_TEST_POSTGRES_URL");
    return url ? url : "";
}

/// Returns whether a run must include the PostgreSQL tests: `LCM_TEST_REQUIRE_POSTGRES=1`,
/// which scripts/test sets, or `CI=true`, as in the unit tests.
inline bool postgres_tests_required()
{
    const char* required = std::getenv("LCM_TEST_REQUIRE_POSTGRES");
    const char* ci = std::getenv("CI");
    return (required && std::string_view(required) == "1") || (ci && std::string_view(ci) == "true");
}

/// Returns the password in the test server's URL, which no program output may contain.
inline std::string postgres_test_password()
{
    const auto parsed = boost::urls::parse_uri(postgres_test_url());
    REQUIRE(parsed);
    std::string password = parsed->password();
    REQUIRE(password.size() >= 8);
    return password;
}

/// Returns whether the PostgreSQL tests can run. A missing server fails the test when the
/// tests are required, because a green run must include them. Otherwise the test passes
/// with a warning, so that a developer can run the integration tests without a server.
inline bool postgres_available()
{
    if (!postgres_test_url().empty()) {
        return true;
    }
    if (postgres_tests_required()) {
        FAIL("LCM_TEST_POSTGRES_URL is not set although PostgreSQL tests are required "
             "(LCM_TEST_REQUIRE_POSTGRES=1 or CI=true); run the tests through scripts/test, which starts "
             "PostgreSQL");
    }
    WARN("LCM_TEST_POSTGRES_URL is not set, so this PostgreSQL test did not run");
    return false;
}

/// Checks that no value of `secrets` appears in the child's stdout or stderr.
inline void check_output_free_of(const child_process& child, const std::vector<std::string>& secrets)
{
    const auto output = child.standard_output() + child.standard_error();
    for (const auto& value : secrets) {
        INFO("secret: " << value);
        CHECK(output.find(value) == std::string::npos);
    }
}

} // namespace lcm::test
