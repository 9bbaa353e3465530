// The SQLite schema of `sqlite_repository` as an ordered list of migrations.
#pragma once

#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/detail/sqlite_connection.hpp>

#include <sqlite3.h>

#include <array>
#include <cstdint>
#include <string>

namespace lcm::storage::detail {

/// One step of the schema. `version` is the `PRAGMA user_version` after the step.
struct sqlite_migration {
    int version;
    const char* sql;
};

/// Every migration, oldest first. Append new steps; never edit a released one, because
/// existing database files have already applied it.
inline constexpr std::array sqlite_migrations{
    sqlite_migration{1, R"sql(
        CREATE TABLE workers (
            id TEXT PRIMARY KEY NOT NULL,
            version INTEGER NOT NULL,
            pending INTEGER NOT NULL,
            requested_at INTEGER,
            record TEXT NOT NULL
        ) WITHOUT ROWID;
        -- Only rows with a pending operation are indexed, so list_pending reads as many
        -- index entries as there are pending operations, in the order it returns them.
        CREATE INDEX workers_pending ON workers (requested_at, id) WHERE pending = 1;
    )sql"},
};

inline constexpr int sqlite_schema_version = sqlite_migrations.back().version;

/// Brings the schema of `connection` to `sqlite_schema_version` in one IMMEDIATE
/// transaction, so two processes opening a new file at once do not both create it.
/// A file whose schema is newer than this build knows is rejected with
/// `errc::invalid_argument`, because this code could misread or damage its rows.
inline result<void> migrate_sqlite_schema(sqlite_connection& connection, const logger& log)
{
    auto fail = [&](const char* step) -> result<void> {
        const int code = sqlite3_extended_errcode(connection.handle());
        log.error("SQLite schema migration failed", {{"step", step}, {"error", connection.message()}});
        connection.execute("ROLLBACK");
        return sqlite_errc(code);
    };

    if (connection.execute("BEGIN IMMEDIATE") != SQLITE_OK) {
        return fail("begin");
    }

    std::int64_t current = 0;
    {
        sqlite_statement read_version(connection.handle(), "PRAGMA user_version");
        if (read_version.step() != SQLITE_ROW) {
            return fail("read user_version");
        }
        current = read_version.column_int(0);
    }
    if (current > sqlite_schema_version) {
        log.error("SQLite database schema is newer than this build supports; open it with a newer lcm",
                  {{"schema_version", std::to_string(current)},
                   {"supported_version", std::to_string(sqlite_schema_version)}});
        connection.execute("ROLLBACK");
        return errc::invalid_argument;
    }

    for (const auto& migration : sqlite_migrations) {
        if (migration.version <= current) {
            continue;
        }
        if (connection.execute(migration.sql) != SQLITE_OK) {
            return fail("apply migration");
        }
        // PRAGMA takes no bound parameters; the version is a constant of this file.
        const auto set_version = "PRAGMA user_version = " + std::to_string(migration.version);
        if (connection.execute(set_version.c_str()) != SQLITE_OK) {
            return fail("set user_version");
        }
        log.info("SQLite schema migrated", {{"schema_version", std::to_string(migration.version)}});
    }

    if (connection.execute("COMMIT") != SQLITE_OK) {
        return fail("commit");
    }
    return success();
}

} // namespace lcm::storage::detail
