// A worker repository in an SQLite database file. Link `lcm::sqlite` to use it.
#pragma once

#include <lcm/application/worker_repository.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/change_notifier.hpp>
#include <lcm/storage/detail/blocking_call.hpp>
#include <lcm/storage/detail/sqlite_connection.hpp>
#include <lcm/storage/detail/sqlite_schema.hpp>
#include <lcm/storage/detail/worker_rows.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/thread_pool.hpp>

#include <sqlite3.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::storage {

/// Settings of `sqlite_repository::open`.
struct sqlite_options {
    /// The database file, created when missing.
    std::string path;
    /// Threads that run SQLite calls, each with its own connection. Readers run in
    /// parallel in WAL mode; writers wait for each other on SQLite's write lock.
    std::size_t threads = 2;
    /// The maximum time of one operation, including waits for the write lock.
    std::chrono::milliseconds timeout{5000};
};

/// Stores workers in an SQLite file: one row per worker with the `to_record` document and
/// the columns that `update` and `list_pending` need.
///
/// Every call runs on the repository's own thread pool, never on the caller's threads, and
/// resumes the caller on its executor. Thread safety: every member may be called
/// concurrently from any thread. Cancellation: every awaitable operation supports terminal
/// cancellation and then returns `errc::cancelled`; a write that had already started may
/// still commit. Each operation ends with `errc::timeout` after `sqlite_options::timeout`.
///
/// `change_sequence` and `wait_for_change` see the writes made through this object only.
/// Writes by another process or another repository object on the same file are found by
/// the periodic resync of the callers, not through `wait_for_change`.
///
/// The object must outlive every operation and wait started on it; the destructor waits
/// for calls that are still running on its pool.
class sqlite_repository {
public:
    /// The schema version this build writes. Files with a newer version are rejected.
    static constexpr int schema_version = detail::sqlite_schema_version;

    /// Opens or creates the database file, applies missing migrations and returns the
    /// repository. Fails with `errc::invalid_argument` when the file's schema is newer than
    /// `schema_version` or the file is not an SQLite database, and with `errc::unavailable`
    /// when it cannot be opened; the log names the cause. Awaits the setup on the repository's
    /// pool; cancellable like every operation.
    static boost::asio::awaitable<result<std::unique_ptr<sqlite_repository>>> open(sqlite_options options,
                                                                                 logger log = {})
    {
        std::unique_ptr<sqlite_repository> repository(new sqlite_repository(std::move(options), std::move(log)));
        auto& pool = repository->pool_;
        const auto timeout = repository->options_.timeout;
        auto* self = repository.get();
        auto opened = co_await detail::run_blocking<void>(
            pool, timeout, [self](detail::deadline_type deadline) { return self->open_connections(deadline); });
        if (!opened) {
            co_return opened.error();
        }
        co_return std::move(repository);
    }

    sqlite_repository(const sqlite_repository&) = delete;
    sqlite_repository& operator=(const sqlite_repository&) = delete;

    ~sqlite_repository() { pool_.join(); }

    boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id)
    {
        return run<domain::cml_worker>([this, key = std::string(id)](detail::sqlite_connection& connection) {
            return get_blocking(connection, key);
        });
    }

    boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker)
    {
        return run<std::uint64_t>([this, row = detail::encode_row(worker, 1)](detail::sqlite_connection& connection) {
            return add_blocking(connection, row);
        });
    }

    boost::asio::awaitable<result<std::uint64_t>> update(const domain::cml_worker& worker)
    {
        return run<std::uint64_t>(
            [this, row = detail::encode_row(worker, worker.version() + 1)](detail::sqlite_connection& connection) {
                return update_blocking(connection, row);
            });
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list(std::string_view after_id, std::size_t limit)
    {
        return run<std::vector<domain::cml_worker>>(
            [this, after = std::string(after_id), limit](detail::sqlite_connection& connection) {
                detail::sqlite_statement query(connection.handle(),
                                               "SELECT id, version, record FROM workers WHERE id > ?1 "
                                               "ORDER BY id LIMIT ?2");
                query.bind(1, after);
                query.bind(2, clamp_limit(limit));
                return read_workers(query, "list");
            });
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit)
    {
        return run<std::vector<domain::cml_worker>>([this, limit](detail::sqlite_connection& connection) {
            detail::sqlite_statement query(connection.handle(), pending_query);
            query.bind(1, clamp_limit(limit));
            return read_workers(query, "list_pending");
        });
    }

    std::uint64_t change_sequence() const { return notifier_.sequence(); }

    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        return notifier_.wait_for_change(after);
    }

    /// The query behind `list_pending`, exposed so that tests can check its plan.
    static constexpr const char* pending_query = "SELECT id, version, record FROM workers WHERE pending = 1 "
                                                 "ORDER BY requested_at, id LIMIT ?1";

private:
    sqlite_repository(sqlite_options options, logger log)
        : options_(std::move(options)), log_(std::move(log)), pool_(std::max<std::size_t>(options_.threads, 1))
    {
    }

    static std::int64_t clamp_limit(std::size_t limit)
    {
        return static_cast<std::int64_t>(std::min<std::size_t>(limit, std::numeric_limits<std::int64_t>::max()));
    }

    // Opens one connection per pool thread; the first one also migrates the schema.
    result<void> open_connections(detail::deadline_type deadline)
    {
        const auto count = std::max<std::size_t>(options_.threads, 1);
        for (std::size_t i = 0; i < count; ++i) {
            auto connection = std::make_unique<detail::sqlite_connection>();
            if (const int code = connection->open(options_.path); code != SQLITE_OK) {
                log_.error("opening the SQLite database failed",
                           {{"path", options_.path}, {"error", connection->message()}});
                return detail::sqlite_errc(code);
            }
            connection->set_deadline(deadline);
            if (auto configured = configure(*connection, i == 0); !configured) {
                return configured.error();
            }
            if (i == 0) {
                if (auto migrated = detail::migrate_sqlite_schema(*connection, log_); !migrated) {
                    return migrated.error();
                }
            }
            idle_.push_back(std::move(connection));
        }
        log_.info("SQLite worker repository opened",
                  {{"path", options_.path}, {"schema_version", std::to_string(schema_version)}});
        return success();
    }

    result<void> configure(detail::sqlite_connection& connection, bool first)
    {
        // WAL lets readers run while one writer commits. The mode is stored in the file,
        // so only the first connection sets it.
        if (first) {
            detail::sqlite_statement journal(connection.handle(), "PRAGMA journal_mode = WAL");
            if (journal.step() != SQLITE_ROW) {
                log_.error("reading the SQLite database failed", {{"path", options_.path}, {"error", journal.message()}});
                return detail::sqlite_errc(journal.code());
            }
            if (journal.column_text(0) != "wal") {
                log_.warning("SQLite kept its journal mode instead of WAL",
                             {{"path", options_.path}, {"journal_mode", std::string(journal.column_text(0))}});
            }
        }
        // FULL syncs the WAL on every commit. NORMAL, the usual WAL setting, may lose the
        // last commits on a power failure, and a worker's license intent that a client saw
        // accepted must not vanish.
        if (connection.execute("PRAGMA synchronous = FULL") != SQLITE_OK) {
            log_.error("configuring the SQLite connection failed",
                       {{"path", options_.path}, {"error", connection.message()}});
            return errc::unavailable;
        }
        return success();
    }

    // Runs `work` on the pool with an idle connection bound to the operation's deadline.
    template <class T, class Work>
    boost::asio::awaitable<result<T>> run(Work work)
    {
        return detail::run_blocking<T>(pool_, options_.timeout,
                                       [this, work = std::move(work)](detail::deadline_type deadline) mutable {
                                           auto connection = take_connection();
                                           connection->set_deadline(deadline);
                                           auto outcome = work(*connection);
                                           return_connection(std::move(connection));
                                           return outcome;
                                       });
    }

    std::unique_ptr<detail::sqlite_connection> take_connection()
    {
        std::lock_guard lock(mutex_);
        // Each pool thread runs one call at a time and there is a connection per thread.
        if (idle_.empty()) {
            throw std::logic_error("sqlite_repository: no idle connection for a pool thread");
        }
        auto connection = std::move(idle_.back());
        idle_.pop_back();
        return connection;
    }

    void return_connection(std::unique_ptr<detail::sqlite_connection> connection)
    {
        std::lock_guard lock(mutex_);
        idle_.push_back(std::move(connection));
    }

    errc failed(const detail::sqlite_statement& statement, const char* operation, std::string_view id) const
    {
        log_.warning("SQLite statement failed", {{"operation", operation},
                                                 {"worker_id", std::string(id)},
                                                 {"error", statement.message()}});
        return detail::sqlite_errc(statement.code());
    }

    result<domain::cml_worker> get_blocking(detail::sqlite_connection& connection, const std::string& id)
    {
        detail::sqlite_statement query(connection.handle(), "SELECT version, record FROM workers WHERE id = ?1");
        query.bind(1, id);
        const int code = query.step();
        if (code == SQLITE_DONE) {
            return errc::not_found;
        }
        if (code != SQLITE_ROW) {
            return failed(query, "get", id);
        }
        return detail::decode_row(id, static_cast<std::uint64_t>(query.column_int(0)), query.column_text(1), log_);
    }

    result<std::uint64_t> add_blocking(detail::sqlite_connection& connection, const detail::worker_row& row)
    {
        detail::sqlite_statement insert(connection.handle(),
                                        "INSERT INTO workers (id, version, pending, requested_at, record) "
                                        "VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING");
        insert.bind(1, row.id);
        insert.bind(2, static_cast<std::int64_t>(row.version));
        insert.bind(3, std::int64_t{row.pending ? 1 : 0});
        insert.bind(4, row.requested_at);
        insert.bind(5, row.record);
        if (insert.step() != SQLITE_DONE) {
            return failed(insert, "add", row.id);
        }
        if (connection.changes() == 0) {
            return errc::already_exists;
        }
        notifier_.notify();
        return row.version;
    }

    result<std::uint64_t> update_blocking(detail::sqlite_connection& connection, const detail::worker_row& row)
    {
        detail::sqlite_statement update(connection.handle(),
                                        "UPDATE workers SET version = ?2, pending = ?3, requested_at = ?4, record = ?5 "
                                        "WHERE id = ?1 AND version = ?6");
        update.bind(1, row.id);
        update.bind(2, static_cast<std::int64_t>(row.version));
        update.bind(3, std::int64_t{row.pending ? 1 : 0});
        update.bind(4, row.requested_at);
        update.bind(5, row.record);
        update.bind(6, static_cast<std::int64_t>(row.version - 1));
        if (update.step() != SQLITE_DONE) {
            return failed(update, "update", row.id);
        }
        if (connection.changes() == 1) {
            notifier_.notify();
            return row.version;
        }

        // Rows are never deleted, so a row that exists now existed with another version.
        detail::sqlite_statement exists(connection.handle(), "SELECT 1 FROM workers WHERE id = ?1");
        exists.bind(1, row.id);
        const int code = exists.step();
        if (code == SQLITE_ROW) {
            return errc::version_conflict;
        }
        if (code == SQLITE_DONE) {
            return errc::not_found;
        }
        return failed(exists, "update", row.id);
    }

    // Reads every row of `query`. A corrupt row is logged by `decode_row` and skipped, so
    // one bad row cannot stop the listing of all the others.
    result<std::vector<domain::cml_worker>> read_workers(detail::sqlite_statement& query, const char* operation)
    {
        std::vector<domain::cml_worker> workers;
        for (;;) {
            const int code = query.step();
            if (code == SQLITE_DONE) {
                return workers;
            }
            if (code != SQLITE_ROW) {
                return failed(query, operation, "");
            }
            const auto id = query.column_text(0);
            auto worker = detail::decode_row(id, static_cast<std::uint64_t>(query.column_int(1)), query.column_text(2),
                                             log_);
            if (worker) {
                workers.push_back(std::move(worker).value());
            }
        }
    }

    sqlite_options options_;
    logger log_;
    change_notifier notifier_;
    std::mutex mutex_;
    std::vector<std::unique_ptr<detail::sqlite_connection>> idle_;
    // Last, so that it is destroyed first: its threads use every member above.
    boost::asio::thread_pool pool_;
};

static_assert(application::worker_repository<sqlite_repository>);

} // namespace lcm::storage
