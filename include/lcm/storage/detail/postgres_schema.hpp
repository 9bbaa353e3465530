// The PostgreSQL schema of `postgres_repository` as an ordered list of migrations.
#pragma once

#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/detail/postgres_connection.hpp>

#include <array>
#include <cstdint>
#include <string>

namespace lcm::storage::detail {

/// One step of the schema; `lcm_schema_version` records `version` once the step is applied.
/// Scripts are constants without values, so they run through the simple query protocol,
/// which accepts several statements in one call.
struct postgres_migration {
    int version;
    const char* sql;
};

/// Every migration, oldest first. Append new steps; never edit a released one.
inline constexpr std::array postgres_migrations{
    postgres_migration{1, R"sql(
        CREATE TABLE lcm_workers (
            -- "C" collation orders ids by bytes, as the other repositories do.
            id text COLLATE "C" PRIMARY KEY,
            version bigint NOT NULL,
            pending boolean NOT NULL,
            requested_at timestamptz,
            record jsonb NOT NULL
        );
        -- Only rows with a pending operation are indexed, so list_pending reads as many
        -- index entries as there are pending operations, in the order it returns them.
        CREATE INDEX lcm_workers_pending ON lcm_workers (requested_at, id) WHERE pending;
    )sql"},
};

inline constexpr int postgres_schema_version = postgres_migrations.back().version;

/// The advisory lock that serializes migrations of every lcm schema in one database.
inline constexpr const char* postgres_migration_lock = "7810771467011827570";

/// Brings the schema to `postgres_schema_version` in one transaction that first takes a
/// transaction-level advisory lock, so replicas that start at once migrate one after the
/// other and the later ones find the work done. Rejects a schema newer than this build
/// with `errc::invalid_argument`.
inline result<void> migrate_postgres_schema(postgres_connection& connection, const std::string& schema,
                                            const logger& log)
{
    auto rollback = [&](boost::system::error_code error) -> result<void> {
        connection.reset_transaction(log);
        return error;
    };

    if (auto begun = connection.execute("BEGIN", {}, log); !begun) {
        return begun.error();
    }
    if (auto locked = connection.execute("SELECT pg_advisory_xact_lock($1::bigint)", {postgres_migration_lock}, log);
        !locked) {
        return rollback(locked.error());
    }
    if (!schema.empty()) {
        // CREATE SCHEMA takes an identifier, which cannot be a bound parameter.
        const auto create_schema = "CREATE SCHEMA IF NOT EXISTS " + connection.quote_identifier(schema);
        if (auto created = connection.execute(create_schema.c_str(), {}, log); !created) {
            return rollback(created.error());
        }
    }
    if (auto created = connection.execute("CREATE TABLE IF NOT EXISTS lcm_schema_version (version integer NOT NULL)",
                                          {}, log);
        !created) {
        return rollback(created.error());
    }

    auto read = connection.execute("SELECT coalesce(max(version), 0) FROM lcm_schema_version", {}, log);
    if (!read) {
        return rollback(read.error());
    }
    const int current = std::stoi(std::string(read.value().text(0, 0)));
    if (current > postgres_schema_version) {
        log.error("PostgreSQL schema is newer than this build supports; run a newer lcm",
                  {{"schema_version", std::to_string(current)},
                   {"supported_version", std::to_string(postgres_schema_version)}});
        return rollback(make_error_code(errc::invalid_argument));
    }

    for (const auto& migration : postgres_migrations) {
        if (migration.version <= current) {
            continue;
        }
        if (auto applied = connection.execute_script(migration.sql, log); !applied) {
            return rollback(applied.error());
        }
        const auto version = std::to_string(migration.version);
        if (auto recorded = connection.execute("INSERT INTO lcm_schema_version (version) VALUES ($1::integer)",
                                               {version}, log);
            !recorded) {
            return rollback(recorded.error());
        }
        log.info("PostgreSQL schema migrated", {{"schema_version", version}});
    }

    if (auto committed = connection.execute("COMMIT", {}, log); !committed) {
        return committed.error();
    }
    return success();
}

} // namespace lcm::storage::detail
