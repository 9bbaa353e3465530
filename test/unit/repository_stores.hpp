// Store fixtures for the repository conformance suite: each opens a fresh, empty repository
// of one kind and removes what it created when it goes out of scope.
#pragma once

#include <lcm/log.hpp>
#include <lcm/storage/memory_repository.hpp>
#include <lcm/testing/run.hpp>

#ifdef LCM_TEST_SQLITE
#include <lcm/storage/sqlite_repository.hpp>
#endif
#ifdef LCM_TEST_POSTGRES
#include <lcm/storage/postgres_repository.hpp>

#include <libpq-fe.h>
#endif

#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <mutex>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include <unistd.h>

namespace lcm::test {

/// A log sink that keeps every formatted line, for tests that check what was logged.
class captured_log {
public:
    lcm::logger logger(lcm::log_level level = lcm::log_level::debug)
    {
        return lcm::logger(level, [this](const lcm::log_record& record) {
            std::lock_guard lock(mutex_);
            lines_.push_back(lcm::format_log_line(record));
        });
    }

    std::vector<std::string> lines() const
    {
        std::lock_guard lock(mutex_);
        return lines_;
    }

    /// Returns the first line that contains `text`, or an empty string.
    std::string find(std::string_view text) const
    {
        std::lock_guard lock(mutex_);
        for (const auto& line : lines_) {
            if (line.find(text) != std::string::npos) {
                return line;
            }
        }
        return {};
    }

private:
    mutable std::mutex mutex_;
    std::vector<std::string> lines_;
};

/// Returns a name that no other test process or test case uses at the same time.
inline std::string unique_name(std::string_view prefix)
{
    static std::atomic<int> counter{0};
    std::random_device entropy;
    return std::string(prefix) + std::to_string(::getpid()) + "_" + std::to_string(counter++) + "_" +
           std::to_string(entropy() % 1'000'000);
}

/// Returns a new running worker with the given id.
inline lcm::domain::cml_worker make_worker(std::string id)
{
    return lcm::domain::cml_worker::create(std::move(id), "lab", "https://cml.example.test",
                                           lcm::domain::worker_status::running, "admin")
        .value();
}

// g++ 12 pairs the aligned_alloc of Asio's coroutine frame allocator with the frame's sized
// operator delete when it inlines this coroutine, and warns although both belong to Asio.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmismatched-new-delete"
#endif

/// Renames the worker `id` and saves it with the version it read.
template <class Repository>
boost::asio::awaitable<lcm::result<std::uint64_t>> rename(Repository& repository, std::string id, std::string name)
{
    auto loaded = co_await repository.get(id);
    if (!loaded) {
        co_return loaded.error();
    }
    auto fields = loaded.value().state();
    fields.name = std::move(name);
    auto changed = lcm::domain::cml_worker::restore(std::move(fields)).value();
    auto saved = co_await repository.update(changed);
    co_return saved;
}

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic pop
#endif

/// A temporary directory, removed with its content on destruction.
class temporary_directory {
public:
    temporary_directory()
    {
        const char* base = std::getenv("TMPDIR");
        std::string pattern = std::string(base && *base ? base : "/tmp") + "/lcm-test-XXXXXX";
        if (::mkdtemp(pattern.data()) == nullptr) {
            throw std::runtime_error("creating a temporary directory failed: " + pattern);
        }
        path_ = pattern;
    }

    temporary_directory(const temporary_directory&) = delete;
    temporary_directory& operator=(const temporary_directory&) = delete;

    ~temporary_directory()
    {
        std::error_code ignored;
        std::filesystem::remove_all(path_, ignored);
    }

    const std::filesystem::path& path() const noexcept { return path_; }

private:
    std::filesystem::path path_;
};

struct memory_store {
    using repository_type = lcm::storage::memory_repository;
    static constexpr const char* name = "memory";
    static constexpr int updates_per_writer = 200;

    static std::unique_ptr<memory_store> open(boost::asio::io_context&) { return std::make_unique<memory_store>(); }

    repository_type& repository() { return repository_; }

    repository_type repository_;
};

#ifdef LCM_TEST_SQLITE
struct sqlite_store {
    using repository_type = lcm::storage::sqlite_repository;
    static constexpr const char* name = "SQLite";
    // Every commit syncs the file, so the concurrent test writes less than in memory.
    static constexpr int updates_per_writer = 25;

    static lcm::storage::sqlite_options options_for(const temporary_directory& directory)
    {
        lcm::storage::sqlite_options options;
        options.path = (directory.path() / "workers.db").string();
        options.threads = 3;
        return options;
    }

    static std::unique_ptr<sqlite_store> open(boost::asio::io_context& context)
    {
        auto store = std::make_unique<sqlite_store>();
        auto opened =
            lcm::testing::run_with_timeout(context, repository_type::open(options_for(store->directory), store->log.logger()));
        if (!opened) {
            FAIL("opening the SQLite repository failed: " << opened.error().message());
        }
        store->repository_ = std::move(opened).value();
        return store;
    }

    repository_type& repository() { return *repository_; }

    temporary_directory directory;
    captured_log log;
    std::unique_ptr<repository_type> repository_;
};
#endif

/// Returns whether PostgreSQL tests must run: `LCM_TEST_REQUIRE_POSTGRES=1`, which
/// `scripts/test` sets, or `CI=true`.
inline bool postgres_tests_required()
{
    const char* required = std::getenv("LCM_TEST_REQUIRE_POSTGRES");
    const char* ci = std::getenv("CI");
    return (required && std::string_view(required) == "1") || (ci && std::string_view(ci) == "true");
}

#ifdef LCM_TEST_POSTGRES
/// Returns the server that `scripts/postgres-test-server` started, or an empty string.
inline std::string postgres_test_url()
{
    const char* url = std::getenv("LCM_TEST_POSTGRES_URL");
    return url ? url : "";
}

/// Returns whether PostgreSQL tests can run. When `postgres_tests_required()`, a missing
/// server fails the test, because a green run must include them; otherwise the test passes
/// with a warning, so that a developer can run lcm-tests without a server.
inline bool require_postgres()
{
    if (!postgres_test_url().empty()) {
        return true;
    }
    if (postgres_tests_required()) {
        FAIL("LCM_TEST_POSTGRES_URL is not set although PostgreSQL tests are required (LCM_TEST_REQUIRE_POSTGRES=1 "
             "or CI=true); run the tests through scripts/test, which starts PostgreSQL");
    }
    WARN("LCM_TEST_POSTGRES_URL is not set, so this PostgreSQL test did not run");
    return false;
}

/// A direct libpq connection for test setup and for disturbing the repository under test.
class postgres_admin {
public:
    postgres_admin() : connection_(PQconnectdb(postgres_test_url().c_str()))
    {
        if (PQstatus(connection_) != CONNECTION_OK) {
            throw std::runtime_error("test connection to PostgreSQL failed");
        }
        PQsetNoticeProcessor(connection_, [](void*, const char*) {}, nullptr);
    }

    postgres_admin(const postgres_admin&) = delete;
    postgres_admin& operator=(const postgres_admin&) = delete;
    ~postgres_admin() { PQfinish(connection_); }

    /// Runs one statement and returns the first column of every row; throws on failure.
    std::vector<std::string> query(const std::string& sql, const std::vector<std::string>& parameters = {})
    {
        std::vector<const char*> values;
        for (const auto& parameter : parameters) {
            values.push_back(parameter.c_str());
        }
        PGresult* outcome = PQexecParams(connection_, sql.c_str(), static_cast<int>(values.size()), nullptr,
                                         values.data(), nullptr, nullptr, 0);
        const auto status = PQresultStatus(outcome);
        if (status != PGRES_COMMAND_OK && status != PGRES_TUPLES_OK) {
            std::string message = PQresultErrorMessage(outcome);
            PQclear(outcome);
            throw std::runtime_error("test statement failed: " + message);
        }
        std::vector<std::string> rows;
        for (int row = 0; row < PQntuples(outcome); ++row) {
            rows.emplace_back(PQgetvalue(outcome, row, 0));
        }
        PQclear(outcome);
        return rows;
    }

    std::string quote_identifier(const std::string& name)
    {
        char* quoted = PQescapeIdentifier(connection_, name.c_str(), name.size());
        std::string out = quoted;
        PQfreemem(quoted);
        return out;
    }

    void drop_schema(const std::string& schema) { query("DROP SCHEMA IF EXISTS " + quote_identifier(schema) + " CASCADE"); }

private:
    PGconn* connection_;
};

struct postgres_store {
    using repository_type = lcm::storage::postgres_repository;
    static constexpr const char* name = "PostgreSQL";
    static constexpr int updates_per_writer = 25;

    /// Options for a repository in `schema` of the test server, under `application_name`
    /// so that tests can find its server processes.
    static lcm::storage::postgres_options options_for(const std::string& schema,
                                                      std::string application_name = "lcm-test")
    {
        lcm::storage::postgres_options options;
        options.url = postgres_test_url();
        options.schema = schema;
        options.connections = 3;
        options.application_name = std::move(application_name);
        return options;
    }

    static std::unique_ptr<postgres_store> open(boost::asio::io_context& context)
    {
        if (!require_postgres()) {
            return nullptr;
        }
        auto store = std::make_unique<postgres_store>();
        auto opened = lcm::testing::run_with_timeout(
            context, repository_type::open(options_for(store->schema), store->log.logger()));
        if (!opened) {
            FAIL("opening the PostgreSQL repository failed: " << opened.error().message());
        }
        store->repository_ = std::move(opened).value();
        return store;
    }

    postgres_store() = default;
    postgres_store(const postgres_store&) = delete;
    postgres_store& operator=(const postgres_store&) = delete;

    ~postgres_store()
    {
        repository_.reset();
        try {
            postgres_admin().drop_schema(schema);
        }
        catch (const std::exception&) {
            // A schema left behind only costs space on the throwaway test server.
        }
    }

    repository_type& repository() { return *repository_; }

    std::string schema = unique_name("lcm_test_");
    captured_log log;
    std::unique_ptr<repository_type> repository_;
};
#endif

/// The stores that the conformance suite runs against in this build.
using store_types = std::tuple<memory_store
#ifdef LCM_TEST_SQLITE
                               ,
                               sqlite_store
#endif
#ifdef LCM_TEST_POSTGRES
                               ,
                               postgres_store
#endif
                               >;

} // namespace lcm::test
