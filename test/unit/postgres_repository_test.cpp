// Behaviour of `postgres_repository` beyond the shared contract: reconnects, notifications
// between replicas, concurrent migrations and the secrecy of the connection URL.
#include "concurrent_tasks.hpp"
#include "repository_stores.hpp"

#include <lcm/storage/postgres_repository.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <libpq-fe.h>

#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace {

using lcm::errc;
using lcm::result;
using lcm::domain::cml_worker;
using lcm::storage::postgres_options;
using lcm::storage::postgres_repository;
using lcm::test::captured_log;
using lcm::test::make_worker;
using lcm::test::rename;
using lcm::test::postgres_admin;
using lcm::test::postgres_store;
using boost::asio::awaitable;

std::unique_ptr<postgres_repository> open_repository(boost::asio::io_context& context, postgres_options options,
                                                     lcm::logger log = {})
{
    auto opened = lcm::testing::run_with_timeout(context, postgres_repository::open(std::move(options), std::move(log)));
    if (!opened) {
        throw std::runtime_error("opening the PostgreSQL repository failed: " + opened.error().message());
    }
    return std::move(opened).value();
}

/// Drops the test's schema when the test ends.
struct schema_guard {
    std::string name = lcm::test::unique_name("lcm_test_");

    ~schema_guard()
    {
        try {
            postgres_admin().drop_schema(name);
        }
        catch (const std::exception&) {
            // A schema left behind only costs space on the throwaway test server.
        }
    }
};

/// Returns the password of the test server's URL, which the tests must never find in a log.
std::string test_password()
{
    char* error = nullptr;
    PQconninfoOption* options = PQconninfoParse(lcm::test::postgres_test_url().c_str(), &error);
    PQfreemem(error);
    std::string password;
    for (auto* option = options; option && option->keyword; ++option) {
        if (std::string_view(option->keyword) == "password" && option->val) {
            password = option->val;
        }
    }
    PQconninfoFree(options);
    return password;
}

} // namespace

TEST_CASE("PostgreSQL reconnects after termination", "[storage][postgres]")
{
    if (!lcm::test::require_postgres()) {
        return;
    }
    schema_guard schema;
    boost::asio::io_context context;
    captured_log log;
    const auto application = lcm::test::unique_name("lcm-victim-");
    auto repository = open_repository(context, postgres_store::options_for(schema.name, application), log.logger());
    auto worker = make_worker("w-1");
    REQUIRE(lcm::testing::run_with_timeout(context, repository->add(worker)));
    const auto before = repository->change_sequence();

    postgres_admin admin;
    const auto terminated = admin.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1", {application});
    // The pooled connection used above and the listening connection.
    REQUIRE(terminated.size() >= 2);

    auto loaded = lcm::testing::run_with_timeout(context, repository->get("w-1"));
    auto renamed = lcm::testing::run_with_timeout(context, rename(*repository, "w-1", "after"));
    // The listener advances the sequence once it has reconnected, so waiters resync.
    auto resynced = lcm::testing::run_with_timeout(context, repository->wait_for_change(before + 1));

    REQUIRE(loaded);
    CHECK(loaded.value().version() == 1);
    REQUIRE(renamed);
    CHECK(renamed.value() == 2);
    REQUIRE(resynced);
    CHECK(resynced.value() > before + 1);
    CHECK_FALSE(log.find("retrying on a new connection").empty());
    CHECK_FALSE(log.find("notification connection restored").empty());
}

TEST_CASE("PostgreSQL replicas wake each other", "[storage][postgres]")
{
    if (!lcm::test::require_postgres()) {
        return;
    }
    schema_guard schema;
    boost::asio::io_context context;
    auto first = open_repository(context, postgres_store::options_for(schema.name));
    auto second = open_repository(context, postgres_store::options_for(schema.name));
    const auto before = second->change_sequence();

    std::optional<result<std::uint64_t>> woken;
    std::optional<result<std::uint64_t>> written;
    auto wait = [&]() -> awaitable<void> { woken = co_await second->wait_for_change(before); };
    auto write = [&]() -> awaitable<void> {
        auto worker = make_worker("w-1");
        written = co_await first->add(worker);
    };
    std::vector<awaitable<void>> tasks;
    tasks.push_back(wait());
    tasks.push_back(write());
    lcm::testing::run_with_timeout(context, lcm::test::run_concurrently(std::move(tasks)));

    REQUIRE(written.has_value());
    CHECK(written->has_value());
    REQUIRE(woken.has_value());
    REQUIRE(*woken);
    CHECK(woken->value() == before + 1);
    // The writer counts its own commit once, although its listener also receives it.
    CHECK(first->change_sequence() == 1);

    auto seen = lcm::testing::run_with_timeout(context, second->get("w-1"));
    REQUIRE(seen);
    CHECK(seen.value().version() == 1);
}

TEST_CASE("PostgreSQL replicas migrate at once", "[storage][postgres]")
{
    if (!lcm::test::require_postgres()) {
        return;
    }
    schema_guard schema;
    boost::asio::io_context context;
    std::optional<result<std::unique_ptr<postgres_repository>>> first;
    std::optional<result<std::unique_ptr<postgres_repository>>> second;
    auto open_into = [&](std::optional<result<std::unique_ptr<postgres_repository>>>& out) -> awaitable<void> {
        auto options = postgres_store::options_for(schema.name);
        out.emplace(co_await postgres_repository::open(std::move(options)));
    };
    std::vector<awaitable<void>> tasks;
    tasks.push_back(open_into(first));
    tasks.push_back(open_into(second));
    lcm::testing::run_with_timeout(context, lcm::test::run_concurrently(std::move(tasks)), std::chrono::seconds(30), 2);

    REQUIRE(first.has_value());
    REQUIRE(*first);
    REQUIRE(second.has_value());
    REQUIRE(*second);
    postgres_admin admin;
    const auto versions = admin.query("SELECT version::text FROM " + admin.quote_identifier(schema.name) +
                                      ".lcm_schema_version ORDER BY version");
    CHECK(versions == std::vector<std::string>{std::to_string(postgres_repository::schema_version)});
}

TEST_CASE("PostgreSQL rejects a newer schema", "[storage][postgres]")
{
    if (!lcm::test::require_postgres()) {
        return;
    }
    schema_guard schema;
    boost::asio::io_context context;
    open_repository(context, postgres_store::options_for(schema.name));
    postgres_admin admin;
    admin.query("INSERT INTO " + admin.quote_identifier(schema.name) + ".lcm_schema_version (version) VALUES (99)");

    captured_log log;
    auto opened = lcm::testing::run_with_timeout(
        context, postgres_repository::open(postgres_store::options_for(schema.name), log.logger()));

    REQUIRE_FALSE(opened);
    CHECK(opened.error() == errc::invalid_argument);
    CHECK(log.find("schema is newer").find("schema_version=99") != std::string::npos);
}

TEST_CASE("PostgreSQL logs no password", "[storage][postgres]")
{
    if (!lcm::test::require_postgres()) {
        return;
    }
    const auto password = test_password();
    REQUIRE(password.size() >= 8);
    schema_guard schema;
    boost::asio::io_context context;
    captured_log log;
    const auto application = lcm::test::unique_name("lcm-secret-");
    {
        auto repository = open_repository(context, postgres_store::options_for(schema.name, application),
                                          log.logger(lcm::log_level::trace));
        auto worker = make_worker("w-1");
        REQUIRE(lcm::testing::run_with_timeout(context, repository->add(worker)));
        postgres_admin().query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
                               {application});
        REQUIRE(lcm::testing::run_with_timeout(context, repository->get("w-1")));
    }

    // No server listens on port 1; the URL keeps the password.
    auto unreachable = postgres_store::options_for(schema.name);
    const auto port_start = unreachable.url.rfind(':');
    const auto port_end = unreachable.url.find('/', port_start);
    REQUIRE(port_start != std::string::npos);
    REQUIRE(port_end != std::string::npos);
    unreachable.url.replace(port_start + 1, port_end - port_start - 1, "1");
    auto failed = lcm::testing::run_with_timeout(context,
                                                 postgres_repository::open(unreachable, log.logger(lcm::log_level::trace)));

    CHECK(failed.error() == errc::unavailable);
    const auto lines = log.lines();
    REQUIRE_FALSE(lines.empty());
    CHECK_FALSE(log.find("connecting to PostgreSQL failed").empty());
    CHECK(log.find("connecting to PostgreSQL failed").find("host=127.0.0.1") != std::string::npos);
    for (const auto& line : lines) {
        INFO(line);
        CHECK(line.find(password) == std::string::npos);
    }
}

TEST_CASE("PostgreSQL rejects an unparsable URL", "[storage][postgres]")
{
    // libpq quotes an unparsable URL in its error message, password included. Opening fails
    // before any connection attempt, so this test needs no server.
    const std::string password = "unparsable-url-password";
    const std::vector<std::string> urls = {
        "postgresql://lcm:" + password + "@[::1",
        "host=127.0.0.1 password=" + password + " stray",
        "postgresql://lcm:" + password + "%zz@127.0.0.1/lcm_test",
    };
    for (const auto& url : urls) {
        INFO(url);
        boost::asio::io_context context;
        captured_log log;
        postgres_options options;
        options.url = url;
        auto opened =
            lcm::testing::run_with_timeout(context, postgres_repository::open(options, log.logger(lcm::log_level::trace)));

        REQUIRE_FALSE(opened);
        CHECK(opened.error() == errc::invalid_argument);
        CHECK_FALSE(log.find("connection URL is invalid").empty());
        for (const auto& line : log.lines()) {
            INFO(line);
            CHECK(line.find(password) == std::string::npos);
        }
    }
}
