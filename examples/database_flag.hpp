// The `--db` flag of lcm-control-plane: parsing `memory`, `sqlite:PATH` and
// `postgres:CONNINFO`, opening that store, and a repository type that wraps any of them.
#pragma once

#include "program_support.hpp"

#include <lcm/application/worker_repository.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/memory_repository.hpp>

#ifdef LCM_EXAMPLES_WITH_SQLITE
#include <lcm/storage/sqlite_repository.hpp>
#endif
#ifdef LCM_EXAMPLES_WITH_POSTGRES
#include <lcm/storage/postgres_repository.hpp>
#endif

#include <boost/asio/awaitable.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>

#include <algorithm>
#include <cctype>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lcm::examples {

/// The value of `--db` when neither the flag nor its variable is set: an SQLite file in the
/// working directory, so that a control plane started twice in one place keeps its workers.
inline constexpr std::string_view default_database = "sqlite:lcm-control-plane.db";

/// The store that `--db` names.
struct database_choice {
    enum class kind_type { memory, sqlite, postgres };

    kind_type kind = kind_type::memory;
    /// The SQLite file, or the libpq connection string. A connection string may contain a
    /// password, so it is never printed; `describe` leaves it out.
    std::string location;
    /// The PostgreSQL schema of lcm's tables; empty for the server's search_path.
    std::string schema;

    /// Returns the value for logs: `memory`, `sqlite:PATH` or `postgres`. The schema is logged
    /// on its own.
    std::string describe() const
    {
        switch (kind) {
        case kind_type::memory: return "memory";
        case kind_type::sqlite: return "sqlite:" + location;
        case kind_type::postgres: return "postgres";
        }
        return "unknown";
    }
};

/// Parses `--db`: `memory`, `sqlite:PATH`, `postgres:CONNINFO`, or a libpq URL that starts
/// with `postgres://` or `postgresql://`. An empty CONNINFO leaves every setting to libpq's
/// environment variables (PGHOST, PGPASSFILE and so on). Throws `usage_error` for anything
/// else. The message never repeats the value, because the value may contain a password.
inline database_choice parse_database_flag(const std::string& text)
{
    database_choice choice;
    if (text == "memory") {
        return choice;
    }
    if (text.starts_with("sqlite:")) {
        choice.kind = database_choice::kind_type::sqlite;
        choice.location = text.substr(std::string_view("sqlite:").size());
        if (choice.location.empty()) {
            throw usage_error("invalid --db value 'sqlite:': the file path is missing; pass sqlite:PATH such as "
                              "sqlite:/var/lib/lcm/control-plane.db");
        }
        return choice;
    }
    if (text.starts_with("postgres://") || text.starts_with("postgresql://")) {
        choice.kind = database_choice::kind_type::postgres;
        choice.location = text;
        return choice;
    }
    if (text.starts_with("postgres:")) {
        choice.kind = database_choice::kind_type::postgres;
        choice.location = text.substr(std::string_view("postgres:").size());
        return choice;
    }

    // Name the kind only when it is a plain word, so that no part of a connection string,
    // which may contain a password, reaches the message.
    const auto colon = text.find(':');
    const auto kind = text.substr(0, colon);
    const bool plain_word = !kind.empty() && kind.size() <= 20 && colon != std::string::npos &&
                            std::all_of(kind.begin(), kind.end(), [](unsigned char c) { return std::isalnum(c); });
    throw usage_error("invalid --db value" + (plain_word ? " of kind '" + kind + "'" : std::string()) +
                      "; expected memory, sqlite:PATH or postgres:CONNINFO (the value is not shown because it may "
                      "contain a password)");
}

/// Sets the PostgreSQL schema from `--db-schema`. Throws `usage_error` for a schema with
/// another store, or one longer than PostgreSQL's channel name allows.
inline void set_database_schema(database_choice& choice, const std::string& schema)
{
    if (schema.empty()) {
        return;
    }
    if (choice.kind != database_choice::kind_type::postgres) {
        throw usage_error("--db-schema applies to --db postgres:CONNINFO only, but --db is " + choice.describe());
    }
    // The notification channel is `lcm_` followed by the schema, and PostgreSQL cuts
    // identifiers at 63 bytes.
    constexpr std::size_t max_schema_length = 59;
    if (schema.size() > max_schema_length) {
        throw usage_error("--db-schema is " + std::to_string(schema.size()) + " bytes long; the maximum is " +
                          std::to_string(max_schema_length));
    }
    choice.schema = schema;
}

/// A worker repository chosen at run time: forwards every call to the memory, SQLite or
/// PostgreSQL repository that it owns. Thread safety and cancellation are those of the
/// wrapped repository.
class any_worker_repository {
public:
    template <application::worker_repository Repository>
    explicit any_worker_repository(std::unique_ptr<Repository> repository)
        : model_(std::make_unique<model<Repository>>(std::move(repository)))
    {
    }

    boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id) { return model_->get(id); }

    boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker)
    {
        return model_->add(worker);
    }

    boost::asio::awaitable<result<std::uint64_t>> update(const domain::cml_worker& worker)
    {
        return model_->update(worker);
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list(std::string_view after_id, std::size_t limit)
    {
        return model_->list(after_id, limit);
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit)
    {
        return model_->list_pending(limit);
    }

    std::uint64_t change_sequence() { return model_->change_sequence(); }

    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        return model_->wait_for_change(after);
    }

private:
    struct interface {
        virtual ~interface() = default;
        virtual boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id) = 0;
        virtual boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker) = 0;
        virtual boost::asio::awaitable<result<std::uint64_t>> update(const domain::cml_worker& worker) = 0;
        virtual boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list(std::string_view after_id,
                                                                                     std::size_t limit) = 0;
        virtual boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit) = 0;
        virtual std::uint64_t change_sequence() = 0;
        virtual boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after) = 0;
    };

    template <class Repository>
    struct model final : interface {
        explicit model(std::unique_ptr<Repository> owned) : repository(std::move(owned)) {}

        boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id) override
        {
            return repository->get(id);
        }
        boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker) override
        {
            return repository->add(worker);
        }
        boost::asio::awaitable<result<std::uint64_t>> update(const domain::cml_worker& worker) override
        {
            return repository->update(worker);
        }
        boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list(std::string_view after_id,
                                                                             std::size_t limit) override
        {
            return repository->list(after_id, limit);
        }
        boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit) override
        {
            return repository->list_pending(limit);
        }
        std::uint64_t change_sequence() override { return repository->change_sequence(); }
        boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after) override
        {
            return repository->wait_for_change(after);
        }

        std::unique_ptr<Repository> repository;
    };

    std::unique_ptr<interface> model_;
};

static_assert(application::worker_repository<any_worker_repository>);

/// Runs a repository's `open` coroutine to its end on a private `io_context` and returns
/// the repository. The repositories run their database calls on their own threads and
/// resume later calls on the caller's executor, so the context is not needed afterwards.
/// Throws `std::runtime_error` starting with `what` when opening fails; the repository has
/// logged the cause.
template <class Repository>
std::unique_ptr<Repository> wait_for_open(boost::asio::awaitable<result<std::unique_ptr<Repository>>> opening,
                                          const std::string& what)
{
    boost::asio::io_context context;
    std::optional<result<std::unique_ptr<Repository>>> opened;
    std::exception_ptr failure;
    // co_spawn's handler needs a default-constructible value, which result<T> is not, so
    // the outcome goes through `opened`.
    auto store = [](boost::asio::awaitable<result<std::unique_ptr<Repository>>> task,
                    std::optional<result<std::unique_ptr<Repository>>>& out) -> boost::asio::awaitable<void> {
        out.emplace(co_await std::move(task));
    };
    boost::asio::co_spawn(context, store(std::move(opening), opened),
                          [&failure](std::exception_ptr error) { failure = error; });
    context.run();
    if (failure) {
        std::rethrow_exception(failure);
    }
    if (!opened || !*opened) {
        const auto reason = opened ? opened->error().message() : std::string("it did not finish");
        throw std::runtime_error(what + " failed: " + reason + "; the log above names the cause");
    }
    return std::move(*opened).value();
}

/// Opens the store that `choice` names. SQLite and PostgreSQL create or migrate their schema
/// first. Throws `usage_error` for a store that this build left out, and `std::runtime_error`
/// when opening fails.
inline any_worker_repository open_database(const database_choice& choice, const logger& log)
{
    switch (choice.kind) {
    case database_choice::kind_type::memory:
        return any_worker_repository(std::make_unique<storage::memory_repository>());

    case database_choice::kind_type::sqlite: {
#ifdef LCM_EXAMPLES_WITH_SQLITE
        storage::sqlite_options options;
        options.path = choice.location;
        return any_worker_repository(wait_for_open(storage::sqlite_repository::open(std::move(options), log),
                                                   "opening the SQLite database " + choice.location));
#else
        throw usage_error("this build has no SQLite support (SQLite 3 was not found when it was configured); "
                          "use --db memory or postgres:CONNINFO");
#endif
    }

    case database_choice::kind_type::postgres: {
#ifdef LCM_EXAMPLES_WITH_POSTGRES
        storage::postgres_options options;
        options.url = choice.location;
        options.schema = choice.schema;
        options.application_name = "lcm-control-plane";
        return any_worker_repository(wait_for_open(storage::postgres_repository::open(std::move(options), log),
                                                   "opening the PostgreSQL database"));
#else
        throw usage_error("this build has no PostgreSQL support (libpq was not found when it was configured); "
                          "use --db memory or sqlite:PATH");
#endif
    }
    }
    throw std::logic_error("unknown database kind");
}

} // namespace lcm::examples
