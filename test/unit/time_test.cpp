#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>

#include <boost/json.hpp>
#include <catch2/catch.hpp>

#include <sstream>

using namespace std::chrono_literals;

TEST_CASE("timestamp formats as RFC 3339 and parses back", "[time]")
{
    const lcm::timestamp value{std::chrono::sys_days{std::chrono::year{2026} / 8 / 20}.time_since_epoch() + 17h + 25min +
                               30s + 123456us};

    CHECK(lcm::format_timestamp(value) == "2026-08-20T17:25:30.123456Z");
    CHECK(lcm::parse_timestamp(lcm::format_timestamp(value)) == value);
}

TEST_CASE("timestamp parses CML's space form as UTC", "[time]")
{
    const auto parsed = lcm::parse_timestamp("2026-08-20 17:25:30");

    REQUIRE(parsed);
    CHECK(lcm::format_timestamp(*parsed) == "2026-08-20T17:25:30.000000Z");
}

TEST_CASE("timestamp applies zone offsets", "[time]")
{
    CHECK(lcm::parse_timestamp("2026-08-20T19:25:30+02:00") == lcm::parse_timestamp("2026-08-20T17:25:30Z"));
    CHECK(lcm::parse_timestamp("2026-08-20T17:25:30.5-01:30") == lcm::parse_timestamp("2026-08-20T18:55:30.500000Z"));
}

TEST_CASE("timestamp rejects malformed text", "[time]")
{
    CHECK_FALSE(lcm::parse_timestamp(""));
    CHECK_FALSE(lcm::parse_timestamp("2026-02-30T00:00:00Z"));
    CHECK_FALSE(lcm::parse_timestamp("2026-08-20T25:00:00Z"));
    CHECK_FALSE(lcm::parse_timestamp("2026-08-20T17:25:30.Z"));
    CHECK_FALSE(lcm::parse_timestamp("2026-08-20T17:25:30Zjunk"));
    CHECK_FALSE(lcm::parse_timestamp("yesterday"));
}

TEST_CASE("secret never prints its value", "[secret]")
{
    const lcm::secret token("abc123TOKEN");
    std::ostringstream out;
    out << token;

    CHECK(out.str() == "<redacted>");
    CHECK(boost::json::serialize(boost::json::value_from(token)) == "\"<redacted>\"");
    CHECK(token.reveal() == "abc123TOKEN");
    CHECK(token.equals("abc123TOKEN"));
    CHECK_FALSE(token.equals("abc123TOKEX"));
    CHECK_FALSE(token.equals("abc"));
}
