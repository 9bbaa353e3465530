// A worker repository in PostgreSQL, shared by every control-plane replica. Link
// `lcm::postgres` to use it.
#pragma once

#include <lcm/application/worker_repository.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/change_notifier.hpp>
#include <lcm/storage/detail/blocking_call.hpp>
#include <lcm/storage/detail/postgres_connection.hpp>
#include <lcm/storage/detail/postgres_listener.hpp>
#include <lcm/storage/detail/postgres_schema.hpp>
#include <lcm/storage/detail/worker_rows.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/thread_pool.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::storage {

/// Settings of `postgres_repository::open`.
struct postgres_options {
    /// A libpq connection URL (`postgresql://user:password@host:port/dbname`) or key/value
    /// string. It may contain a password, so lcm never logs it; logs name host, port and
    /// database only.
    std::string url;
    /// The schema that contains lcm's tables, created when missing; empty for the server's
    /// default search path. At most 59 bytes, so that the notification channel name fits.
    std::string schema;
    /// Connections in the pool, each used by one pool thread. The listening connection
    /// comes on top.
    std::size_t connections = 4;
    /// The maximum time of one statement on the server (`statement_timeout`, `lock_timeout`)
    /// and of one operation as the caller waits for it.
    std::chrono::milliseconds timeout{5000};
    /// The maximum time to open a connection; libpq rounds it up to whole seconds, at least 2.
    std::chrono::milliseconds connect_timeout{5000};
    /// The time between attempts to reopen the listening connection after it was lost.
    std::chrono::milliseconds listen_retry{1000};
    /// Shown in `pg_stat_activity`.
    std::string application_name = "lcm";
};

/// Stores workers in PostgreSQL: one row per worker with the `to_record` document as
/// `jsonb` and the columns that `update` and `list_pending` need.
///
/// Calls run with blocking libpq on the repository's thread pool, one pooled connection
/// per pool thread, and resume the caller on its executor. A connection found broken is
/// reopened. An operation whose connection broke before its first statement succeeded runs
/// once more on the new connection. Any other broken operation returns `errc::unavailable`. Every write sends NOTIFY in its own transaction, and a listening
/// connection turns other replicas' notifications into `wait_for_change` wake-ups.
///
/// Thread safety: every member may be called concurrently from any thread. Cancellation:
/// every awaitable operation supports terminal cancellation and then returns
/// `errc::cancelled`; a write that had already started may still commit. An operation
/// ends with `errc::timeout` when the server cancels a statement at `timeout`, or when
/// the caller has waited longer than that.
///
/// The object must outlive every operation and wait started on it; the destructor waits
/// for calls that are still running on its pool and stops the listener.
class postgres_repository {
public:
    /// The schema version this build writes. Databases with a newer version are rejected.
    static constexpr int schema_version = detail::postgres_schema_version;

    /// Connects, applies missing migrations, starts listening and returns the repository.
    /// Fails with `errc::unavailable` when the server cannot be reached, with
    /// `errc::invalid_argument` for a URL that libpq cannot parse, a too long schema name or
    /// a schema newer than `schema_version`, and with `errc::timeout`; the log names the cause.
    /// Awaits the setup on the repository's pool; cancellable like every operation.
    static boost::asio::awaitable<result<std::unique_ptr<postgres_repository>>> open(postgres_options options,
                                                                                   logger log = {})
    {
        if (options.schema.size() > 59) {
            log.error("PostgreSQL schema name is longer than 59 bytes", {{"schema", options.schema}});
            co_return errc::invalid_argument;
        }
        std::unique_ptr<postgres_repository> repository(new postgres_repository(std::move(options), std::move(log)));
        if (!repository->settings_.endpoint.valid) {
            // libpq's parse error quotes the URL, password included, so only the fact is logged.
            repository->log_.error("PostgreSQL connection URL is invalid; check its syntax against libpq's "
                                   "connection string formats");
            co_return errc::invalid_argument;
        }
        auto* self = repository.get();
        auto& pool = repository->pool_;
        const auto timeout = repository->options_.connect_timeout + repository->options_.timeout;
        auto started = co_await detail::run_blocking<void>(
            pool, timeout, [self](detail::deadline_type) { return self->start(); });
        if (!started) {
            co_return started.error();
        }
        co_return std::move(repository);
    }

    postgres_repository(const postgres_repository&) = delete;
    postgres_repository& operator=(const postgres_repository&) = delete;

    ~postgres_repository()
    {
        pool_.join();
        if (listener_) {
            listener_->stop();
        }
    }

    boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id)
    {
        return run<domain::cml_worker>([this, key = std::string(id)](detail::postgres_connection& connection) {
            return get_blocking(connection, key);
        });
    }

    boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker)
    {
        return run<std::uint64_t>([this, row = detail::encode_row(worker, 1)](detail::postgres_connection& connection) {
            return add_blocking(connection, row);
        });
    }

    boost::asio::awaitable<result<std::uint64_t>> update(const domain::cml_worker& worker)
    {
        return run<std::uint64_t>(
            [this, row = detail::encode_row(worker, worker.version() + 1)](detail::postgres_connection& connection) {
                return update_blocking(connection, row);
            });
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list(std::string_view after_id, std::size_t limit)
    {
        return run<std::vector<domain::cml_worker>>(
            [this, after = std::string(after_id), limit](detail::postgres_connection& connection) {
                auto rows = connection.execute("SELECT id, version, record::text FROM lcm_workers WHERE id > $1 "
                                               "ORDER BY id LIMIT $2::bigint",
                                               {after, limit_text(limit)}, log_);
                return read_workers(rows);
            });
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit)
    {
        return run<std::vector<domain::cml_worker>>([this, limit](detail::postgres_connection& connection) {
            auto rows = connection.execute("SELECT id, version, record::text FROM lcm_workers WHERE pending "
                                           "ORDER BY requested_at, id LIMIT $1::bigint",
                                           {limit_text(limit)}, log_);
            return read_workers(rows);
        });
    }

    std::uint64_t change_sequence() const { return notifier_.sequence(); }

    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        return notifier_.wait_for_change(after);
    }

private:
    postgres_repository(postgres_options options, logger log)
        : options_(std::move(options)), log_(std::move(log)),
          pool_(std::max<std::size_t>(options_.connections, 1))
    {
        settings_.url = options_.url;
        settings_.schema = options_.schema;
        settings_.application_name = options_.application_name;
        settings_.statement_timeout = options_.timeout;
        settings_.connect_timeout = options_.connect_timeout;
        settings_.endpoint = detail::postgres_endpoint::from_url(options_.url);
        channel_ = options_.schema.empty() ? "lcm_workers" : "lcm_" + options_.schema;

        std::random_device entropy;
        instance_ = std::to_string(entropy()) + "-" + std::to_string(entropy());
        for (std::size_t i = 0; i < std::max<std::size_t>(options_.connections, 1); ++i) {
            idle_.push_back(std::make_unique<detail::postgres_connection>());
        }
    }

    static std::string limit_text(std::size_t limit)
    {
        return std::to_string(std::min<std::size_t>(limit, std::numeric_limits<std::int64_t>::max()));
    }

    // Migrates the schema on the first pooled connection, then starts the listener.
    result<void> start()
    {
        auto connection = take_connection();
        auto migrated = [&]() -> result<void> {
            if (auto connected = connection->connect(settings_, log_); !connected) {
                return connected.error();
            }
            return detail::migrate_postgres_schema(*connection, options_.schema, log_);
        }();
        return_connection(std::move(connection));
        if (!migrated) {
            return migrated.error();
        }

        listener_ = std::make_unique<detail::postgres_listener>(settings_, channel_, instance_, notifier_, log_,
                                                                options_.listen_retry);
        if (auto listening = listener_->start(); !listening) {
            listener_.reset();
            return listening.error();
        }
        log_.info("PostgreSQL worker repository opened", {{"host", settings_.endpoint.host},
                                                          {"port", settings_.endpoint.port},
                                                          {"dbname", settings_.endpoint.dbname},
                                                          {"schema", options_.schema},
                                                          {"schema_version", std::to_string(schema_version)}});
        return success();
    }

    // Runs `work` on the pool with a connected connection. Retries once on a new connection
    // when the old one broke before any statement of `work` succeeded.
    template <class T, class Work>
    boost::asio::awaitable<result<T>> run(Work work)
    {
        return detail::run_blocking<T>(pool_, options_.timeout,
                                       [this, work = std::move(work)](detail::deadline_type) mutable -> result<T> {
                                           auto connection = take_connection();
                                           auto outcome = run_on(*connection, work);
                                           return_connection(std::move(connection));
                                           return outcome;
                                       });
    }

    template <class Work>
    auto run_on(detail::postgres_connection& connection, Work& work) -> decltype(work(connection))
    {
        for (int attempt = 0;; ++attempt) {
            if (!connection.healthy()) {
                if (auto connected = connection.connect(settings_, log_); !connected) {
                    return connected.error();
                }
            }
            connection.reset_transaction(log_);
            connection.begin_operation();
            auto outcome = work(connection);
            if (outcome || attempt > 0 || !connection.lost_before_work()) {
                return outcome;
            }
            log_.info("PostgreSQL connection was closed; retrying on a new connection",
                      {{"host", settings_.endpoint.host},
                       {"port", settings_.endpoint.port},
                       {"dbname", settings_.endpoint.dbname}});
        }
    }

    std::unique_ptr<detail::postgres_connection> take_connection()
    {
        std::lock_guard lock(mutex_);
        // Each pool thread runs one call at a time and there is a connection per thread.
        if (idle_.empty()) {
            throw std::logic_error("postgres_repository: no idle connection for a pool thread");
        }
        auto connection = std::move(idle_.back());
        idle_.pop_back();
        return connection;
    }

    void return_connection(std::unique_ptr<detail::postgres_connection> connection)
    {
        std::lock_guard lock(mutex_);
        idle_.push_back(std::move(connection));
    }

    static std::optional<std::string> requested_at_text(const detail::worker_row& row)
    {
        if (!row.requested_at) {
            return std::nullopt;
        }
        return format_timestamp(timestamp{std::chrono::microseconds{*row.requested_at}});
    }

    // Ends the transaction with ROLLBACK and returns `error`.
    template <class T>
    result<T> abort(detail::postgres_connection& connection, boost::system::error_code error)
    {
        connection.reset_transaction(log_);
        return error;
    }

    // Sends the notification and commits; the notification is delivered only on commit.
    result<void> notify_and_commit(detail::postgres_connection& connection)
    {
        auto notified = connection.execute("SELECT pg_notify($1, $2)", {channel_, instance_}, log_);
        if (!notified) {
            return abort<void>(connection, notified.error());
        }
        auto committed = connection.execute("COMMIT", {}, log_);
        if (!committed) {
            return committed.error();
        }
        notifier_.notify();
        return success();
    }

    result<domain::cml_worker> get_blocking(detail::postgres_connection& connection, const std::string& id)
    {
        auto rows = connection.execute("SELECT version, record::text FROM lcm_workers WHERE id = $1", {id}, log_);
        if (!rows) {
            return rows.error();
        }
        if (rows.value().rows() == 0) {
            return errc::not_found;
        }
        const auto version = std::stoull(std::string(rows.value().text(0, 0)));
        return detail::decode_row(id, version, rows.value().text(0, 1), log_);
    }

    result<std::uint64_t> add_blocking(detail::postgres_connection& connection, const detail::worker_row& row)
    {
        if (auto begun = connection.execute("BEGIN", {}, log_); !begun) {
            return begun.error();
        }
        auto inserted = connection.execute(
            "INSERT INTO lcm_workers (id, version, pending, requested_at, record) "
            "VALUES ($1, $2::bigint, $3::boolean, $4::timestamptz, $5::jsonb) ON CONFLICT (id) DO NOTHING",
            {row.id, std::to_string(row.version), row.pending ? "true" : "false", requested_at_text(row), row.record},
            log_);
        if (!inserted) {
            return abort<std::uint64_t>(connection, inserted.error());
        }
        if (inserted.value().changed_rows() == 0) {
            return abort<std::uint64_t>(connection, errc::already_exists);
        }
        if (auto committed = notify_and_commit(connection); !committed) {
            return committed.error();
        }
        return row.version;
    }

    result<std::uint64_t> update_blocking(detail::postgres_connection& connection, const detail::worker_row& row)
    {
        if (auto begun = connection.execute("BEGIN", {}, log_); !begun) {
            return begun.error();
        }
        auto updated = connection.execute(
            "UPDATE lcm_workers SET version = $2::bigint, pending = $3::boolean, requested_at = $4::timestamptz, "
            "record = $5::jsonb WHERE id = $1 AND version = $6::bigint",
            {row.id, std::to_string(row.version), row.pending ? "true" : "false", requested_at_text(row), row.record,
             std::to_string(row.version - 1)},
            log_);
        if (!updated) {
            return abort<std::uint64_t>(connection, updated.error());
        }
        if (updated.value().changed_rows() == 1) {
            if (auto committed = notify_and_commit(connection); !committed) {
                return committed.error();
            }
            return row.version;
        }

        // Rows are never deleted, so a row that exists now existed with another version.
        auto exists = connection.execute("SELECT 1 FROM lcm_workers WHERE id = $1", {row.id}, log_);
        if (!exists) {
            return abort<std::uint64_t>(connection, exists.error());
        }
        const auto error = exists.value().rows() == 1 ? errc::version_conflict : errc::not_found;
        return abort<std::uint64_t>(connection, error);
    }

    // Decodes every row. A corrupt row is logged by `decode_row` and skipped, so one bad
    // row cannot stop the listing of all the others.
    result<std::vector<domain::cml_worker>> read_workers(const result<detail::postgres_result>& rows)
    {
        if (!rows) {
            return rows.error();
        }
        std::vector<domain::cml_worker> workers;
        for (int i = 0; i < rows.value().rows(); ++i) {
            const auto id = rows.value().text(i, 0);
            const auto version = std::stoull(std::string(rows.value().text(i, 1)));
            auto worker = detail::decode_row(id, version, rows.value().text(i, 2), log_);
            if (worker) {
                workers.push_back(std::move(worker).value());
            }
        }
        return workers;
    }

    postgres_options options_;
    logger log_;
    detail::postgres_settings settings_;
    std::string channel_;
    /// Sent as the NOTIFY payload, so the listener can skip this object's own commits.
    std::string instance_;
    change_notifier notifier_;
    std::mutex mutex_;
    std::vector<std::unique_ptr<detail::postgres_connection>> idle_;
    std::unique_ptr<detail::postgres_listener> listener_;
    // Last, so that it is destroyed first: its threads use every member above.
    boost::asio::thread_pool pool_;
};

static_assert(application::worker_repository<postgres_repository>);

} // namespace lcm::storage
