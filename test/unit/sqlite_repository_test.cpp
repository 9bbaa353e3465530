// Behaviour of `sqlite_repository` beyond the shared contract: durability, migrations,
// the pending index, corrupt rows and lock timeouts.
#include "repository_stores.hpp"

#include <lcm/storage/sqlite_repository.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <sqlite3.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

namespace {

using lcm::errc;
using lcm::domain::cml_worker;
using lcm::storage::sqlite_options;
using lcm::storage::sqlite_repository;
using lcm::test::captured_log;
using lcm::test::make_worker;
using lcm::test::rename;
using lcm::test::temporary_directory;
using boost::asio::awaitable;

sqlite_options options_in(const temporary_directory& directory)
{
    sqlite_options options;
    options.path = (directory.path() / "workers.db").string();
    return options;
}

std::unique_ptr<sqlite_repository> open_repository(boost::asio::io_context& context, sqlite_options options,
                                                   lcm::logger log = {})
{
    auto opened = lcm::testing::run_with_timeout(context, sqlite_repository::open(std::move(options), std::move(log)));
    if (!opened) {
        throw std::runtime_error("opening the SQLite repository failed: " + opened.error().message());
    }
    return std::move(opened).value();
}

/// A plain connection to the test's database file, for setup that the repository forbids.
class raw_database {
public:
    explicit raw_database(const std::string& path)
    {
        if (sqlite3_open(path.c_str(), &db_) != SQLITE_OK) {
            throw std::runtime_error("opening the test database failed: " + path);
        }
    }

    raw_database(const raw_database&) = delete;
    raw_database& operator=(const raw_database&) = delete;
    ~raw_database() { sqlite3_close(db_); }

    void execute(const std::string& sql)
    {
        char* message = nullptr;
        if (sqlite3_exec(db_, sql.c_str(), nullptr, nullptr, &message) != SQLITE_OK) {
            std::string text = message ? message : "unknown error";
            sqlite3_free(message);
            throw std::runtime_error("test statement failed: " + text);
        }
    }

    /// Returns column `column` of every row of `sql`.
    std::vector<std::string> query(const std::string& sql, int column = 0)
    {
        sqlite3_stmt* statement = nullptr;
        if (sqlite3_prepare_v2(db_, sql.c_str(), -1, &statement, nullptr) != SQLITE_OK) {
            throw std::runtime_error("preparing a test query failed: " + std::string(sqlite3_errmsg(db_)));
        }
        std::vector<std::string> rows;
        while (sqlite3_step(statement) == SQLITE_ROW) {
            const auto* text = sqlite3_column_text(statement, column);
            rows.emplace_back(text ? reinterpret_cast<const char*>(text) : "");
        }
        sqlite3_finalize(statement);
        return rows;
    }

private:
    sqlite3* db_ = nullptr;
};

} // namespace

TEST_CASE("SQLite data survives reopening", "[storage]")
{
    temporary_directory directory;
    boost::asio::io_context context;
    {
        auto repository = open_repository(context, options_in(directory));
        auto worker = make_worker("w-1");
        REQUIRE(worker.request_license_registration(lcm::secret("TOKEN-1"), false, "admin"));
        REQUIRE(lcm::testing::run_with_timeout(context, repository->add(worker)));
        REQUIRE(lcm::testing::run_with_timeout(context, rename(*repository, "w-1", "renamed")));
    }

    auto reopened = open_repository(context, options_in(directory));
    auto stored = lcm::testing::run_with_timeout(context, reopened->get("w-1"));
    auto pending = lcm::testing::run_with_timeout(context, reopened->list_pending(10));

    REQUIRE(stored);
    CHECK(stored.value().version() == 2);
    CHECK(stored.value().name() == "renamed");
    REQUIRE(stored.value().license().pending_token().has_value());
    CHECK(stored.value().license().pending_token()->reveal() == "TOKEN-1");
    REQUIRE(pending);
    CHECK(pending.value().size() == 1);
}

TEST_CASE("SQLite keeps commits of a killed process", "[storage]")
{
    temporary_directory directory;
    const auto options = options_in(directory);
    {
        boost::asio::io_context context;
        auto repository = open_repository(context, options);
        auto worker = make_worker("w-1");
        REQUIRE(lcm::testing::run_with_timeout(context, repository->add(worker)));
    }

    int reports[2];
    REQUIRE(::pipe(reports) == 0);
    const pid_t child = ::fork();
    REQUIRE(child >= 0);
    if (child == 0) {
        // The child renames the worker until it is killed and writes each committed
        // version to the pipe after the commit returned. It never returns into Catch.
        ::close(reports[0]);
        try {
            boost::asio::io_context context;
            auto repository = open_repository(context, options);
            for (int i = 0;; ++i) {
                auto saved = lcm::testing::run_with_timeout(context, rename(*repository, "w-1", std::to_string(i)));
                if (!saved) {
                    ::_exit(3);
                }
                const std::uint64_t version = saved.value();
                if (::write(reports[1], &version, sizeof version) != sizeof version) {
                    ::_exit(4);
                }
            }
        }
        catch (...) {
            ::_exit(2);
        }
    }

    ::close(reports[1]);
    std::uint64_t last_reported = 0;
    int report_count = 0;
    while (report_count < 30) {
        pollfd readable{reports[0], POLLIN, 0};
        REQUIRE(::poll(&readable, 1, 20'000) == 1);
        std::uint64_t version = 0;
        REQUIRE(::read(reports[0], &version, sizeof version) == sizeof version);
        last_reported = version;
        ++report_count;
    }
    ::kill(child, SIGKILL);
    int status = 0;
    ::waitpid(child, &status, 0);
    ::close(reports[0]);
    REQUIRE(WIFSIGNALED(status));

    boost::asio::io_context context;
    auto reopened = open_repository(context, options);
    auto stored = lcm::testing::run_with_timeout(context, reopened->get("w-1"));
    REQUIRE(stored);
    // Every reported commit is there; one more may have committed before its report.
    CHECK(stored.value().version() >= last_reported);
    CHECK(stored.value().version() <= last_reported + 1);
}

TEST_CASE("SQLite migrations are idempotent", "[storage]")
{
    temporary_directory directory;
    boost::asio::io_context context;
    captured_log log;
    {
        auto first = open_repository(context, options_in(directory), log.logger());
        auto worker = make_worker("w-1");
        REQUIRE(lcm::testing::run_with_timeout(context, first->add(worker)));
    }
    auto second = open_repository(context, options_in(directory), log.logger());
    auto stored = lcm::testing::run_with_timeout(context, second->get("w-1"));

    REQUIRE(stored);
    raw_database database(options_in(directory).path);
    CHECK(database.query("PRAGMA user_version") == std::vector<std::string>{std::to_string(sqlite_repository::schema_version)});
    CHECK(database.query("PRAGMA journal_mode") == std::vector<std::string>{"wal"});
    // Only the first open migrated.
    int migrations = 0;
    for (const auto& line : log.lines()) {
        migrations += line.find("schema migrated") != std::string::npos ? 1 : 0;
    }
    CHECK(migrations == sqlite_repository::schema_version);
}

TEST_CASE("SQLite rejects a newer schema", "[storage]")
{
    temporary_directory directory;
    boost::asio::io_context context;
    open_repository(context, options_in(directory));
    {
        raw_database database(options_in(directory).path);
        database.execute("PRAGMA user_version = 99");
    }

    captured_log log;
    auto opened = lcm::testing::run_with_timeout(context, sqlite_repository::open(options_in(directory), log.logger()));

    REQUIRE_FALSE(opened);
    CHECK(opened.error() == errc::invalid_argument);
    const auto line = log.find("schema is newer");
    CHECK(line.find("schema_version=99") != std::string::npos);
    CHECK(line.find("supported_version=" + std::to_string(sqlite_repository::schema_version)) != std::string::npos);
}

TEST_CASE("SQLite pending query uses its index", "[storage]")
{
    temporary_directory directory;
    boost::asio::io_context context;
    open_repository(context, options_in(directory));

    raw_database database(options_in(directory).path);
    const auto plan = database.query(std::string("EXPLAIN QUERY PLAN ") + sqlite_repository::pending_query, 3);

    REQUIRE(plan.size() == 1);
    CHECK(plan.front().find("USING INDEX workers_pending") != std::string::npos);
    // The index already has the returned order, so SQLite needs no sort step.
    CHECK(plan.front().find("TEMP B-TREE") == std::string::npos);
}

TEST_CASE("SQLite reports a corrupt row", "[storage]")
{
    temporary_directory directory;
    boost::asio::io_context context;
    captured_log log;
    auto repository = open_repository(context, options_in(directory), log.logger());
    auto good = make_worker("good");
    auto bad = make_worker("bad");
    REQUIRE(lcm::testing::run_with_timeout(context, repository->add(good)));
    REQUIRE(lcm::testing::run_with_timeout(context, repository->add(bad)));
    {
        raw_database database(options_in(directory).path);
        database.execute("UPDATE workers SET record = '{\"id\": \"bad\"}' WHERE id = 'bad'");
    }

    auto loaded = lcm::testing::run_with_timeout(context, repository->get("bad"));
    auto listed = lcm::testing::run_with_timeout(context, repository->list("", 10));

    CHECK(loaded.error() == errc::invalid_argument);
    CHECK(log.find("stored worker is corrupt").find("worker_id=bad") != std::string::npos);
    REQUIRE(listed);
    REQUIRE(listed.value().size() == 1);
    CHECK(listed.value().front().id() == "good");
}

TEST_CASE("SQLite write times out on a held lock", "[storage]")
{
    temporary_directory directory;
    boost::asio::io_context context;
    auto options = options_in(directory);
    options.timeout = std::chrono::milliseconds(200);
    auto repository = open_repository(context, options);
    auto worker = make_worker("w-1");
    REQUIRE(lcm::testing::run_with_timeout(context, repository->add(worker)));

    raw_database holder(options.path);
    holder.execute("BEGIN IMMEDIATE");
    auto blocked = lcm::testing::run_with_timeout(context, rename(*repository, "w-1", "blocked"));
    holder.execute("ROLLBACK");
    auto unblocked = lcm::testing::run_with_timeout(context, rename(*repository, "w-1", "unblocked"));

    CHECK(blocked.error() == errc::timeout);
    REQUIRE(unblocked);
    CHECK(unblocked.value() == 2);
}
