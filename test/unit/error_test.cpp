#include <lcm/error.hpp>
#include <lcm/log.hpp>

#include <catch2/catch.hpp>

#include <set>
#include <string>
#include <vector>

TEST_CASE("errc converts to an error_code of the lcm category", "[error]")
{
    boost::system::error_code error = lcm::errc::version_conflict;

    CHECK(error.category().name() == std::string("lcm"));
    CHECK(error == lcm::errc::version_conflict);
    CHECK(error != lcm::errc::not_found);
    CHECK_FALSE(error.message().empty());
}

TEST_CASE("errc maps to HTTP status codes", "[error]")
{
    CHECK(lcm::http_status(lcm::errc::not_found) == 404);
    CHECK(lcm::http_status(lcm::errc::invalid_argument) == 400);
    CHECK(lcm::http_status(lcm::errc::invalid_token) == 422);
    CHECK(lcm::http_status(lcm::errc::operation_in_progress) == 409);
    CHECK(lcm::http_status(lcm::errc::claimed) == 409);
    CHECK(lcm::http_status(lcm::errc::claim_lost) == 409);
    CHECK(lcm::http_status(lcm::errc::unauthorized) == 401);
    CHECK(lcm::http_status(lcm::errc::payload_too_large) == 413);
    CHECK(lcm::http_status(lcm::errc::unsupported_media_type) == 415);
    CHECK(lcm::http_status(boost::system::error_code(5, boost::system::generic_category())) == 500);
}

TEST_CASE("every errc value has a distinct name and a message", "[error]")
{
    std::set<std::string> names;
    for (int value = static_cast<int>(lcm::errc::not_found); value <= static_cast<int>(lcm::errc::claimed); ++value) {
        boost::system::error_code error(value, lcm::error_category());
        CHECK(std::string(lcm::error_name(error)) != "internal");
        CHECK(error.message() != "unknown lcm error");
        names.insert(lcm::error_name(error));
    }
    CHECK(names.size() == static_cast<std::size_t>(lcm::errc::claimed));
}

TEST_CASE("logger drops records below its level", "[log]")
{
    std::vector<std::string> lines;
    lcm::logger log(lcm::log_level::info, [&](const lcm::log_record& record) { lines.push_back(lcm::format_log_line(record)); });

    log.debug("hidden");
    log.info("worker added", {{"worker_id", "w-1"}, {"name", "lab one"}});

    REQUIRE(lines.size() == 1);
    CHECK(lines[0] == "level=info msg=\"worker added\" worker_id=w-1 name=\"lab one\"");
}
