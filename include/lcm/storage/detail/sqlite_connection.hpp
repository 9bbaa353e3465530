// Thin RAII wrappers over the SQLite C API, used by `sqlite_repository` on its pool threads.
#pragma once

#include <lcm/error.hpp>

#include <sqlite3.h>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>

namespace lcm::storage::detail {

/// Maps an SQLite result code to `lcm::errc`. Lock waits that outlast the busy timeout and
/// statements interrupted at their deadline are timeouts; everything that keeps the
/// database from working (I/O, full disk, unopenable file) is `unavailable`, and a
/// malformed database file is `invalid_argument`.
inline errc sqlite_errc(int code) noexcept
{
    switch (code & 0xff) {
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
    case SQLITE_INTERRUPT: return errc::timeout;
    case SQLITE_CORRUPT:
    case SQLITE_NOTADB: return errc::invalid_argument;
    default: return errc::unavailable;
    }
}

/// One prepared statement. Not thread-safe; used by one thread at a time with its connection.
class sqlite_statement {
public:
    sqlite_statement(sqlite3* db, std::string_view sql) : db_(db)
    {
        last_code_ = sqlite3_prepare_v2(db, sql.data(), static_cast<int>(sql.size()), &statement_, nullptr);
    }

    sqlite_statement(const sqlite_statement&) = delete;
    sqlite_statement& operator=(const sqlite_statement&) = delete;
    ~sqlite_statement() { sqlite3_finalize(statement_); }

    /// Returns whether preparing succeeded; `code()` holds the error otherwise.
    bool prepared() const noexcept { return statement_ != nullptr; }

    void bind(int index, std::string_view text)
    {
        sqlite3_bind_text(statement_, index, text.data(), static_cast<int>(text.size()), SQLITE_TRANSIENT);
    }

    void bind(int index, std::int64_t value) { sqlite3_bind_int64(statement_, index, value); }

    void bind(int index, std::optional<std::int64_t> value)
    {
        if (value) {
            bind(index, *value);
        }
        else {
            sqlite3_bind_null(statement_, index);
        }
    }

    /// Steps once. Returns `SQLITE_ROW`, `SQLITE_DONE` or an error code, also kept in `code()`.
    int step()
    {
        last_code_ = sqlite3_step(statement_);
        return last_code_;
    }

    std::int64_t column_int(int index) const { return sqlite3_column_int64(statement_, index); }

    std::string_view column_text(int index) const
    {
        const auto* text = reinterpret_cast<const char*>(sqlite3_column_text(statement_, index));
        if (text == nullptr) {
            return {};
        }
        return {text, static_cast<std::size_t>(sqlite3_column_bytes(statement_, index))};
    }

    int code() const noexcept { return last_code_; }

    /// Returns SQLite's message for the last error. SQLite's messages name tables and
    /// constraints but never bound values, so they are safe to log.
    std::string message() const { return sqlite3_errmsg(db_); }

private:
    sqlite3* db_;
    sqlite3_stmt* statement_ = nullptr;
    int last_code_ = SQLITE_OK;
};

/// One database connection with its per-call deadline. Not thread-safe: the repository
/// lends each connection to one pool thread at a time.
class sqlite_connection {
public:
    sqlite_connection() = default;
    sqlite_connection(const sqlite_connection&) = delete;
    sqlite_connection& operator=(const sqlite_connection&) = delete;
    ~sqlite_connection() { sqlite3_close_v2(db_); }

    /// Opens (or creates) `path`. Returns the SQLite result code; `message()` explains a failure.
    int open(const std::string& path)
    {
        const int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
        const int code = sqlite3_open_v2(path.c_str(), &db_, flags, nullptr);
        if (code == SQLITE_OK) {
            sqlite3_extended_result_codes(db_, 1);
            // Every few hundred virtual machine steps SQLite asks whether to go on, which
            // lets a statement stop at its deadline with SQLITE_INTERRUPT.
            sqlite3_progress_handler(db_, 1000, &sqlite_connection::past_deadline, this);
        }
        return code;
    }

    sqlite3* handle() const noexcept { return db_; }

    std::string message() const { return db_ ? sqlite3_errmsg(db_) : "out of memory"; }

    /// Bounds the statements that follow, and their lock waits, by `deadline`.
    void set_deadline(std::chrono::steady_clock::time_point deadline)
    {
        deadline_ = deadline;
        const auto remaining =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        sqlite3_busy_timeout(db_, static_cast<int>(std::max<std::int64_t>(remaining.count(), 1)));
    }

    /// Runs SQL without parameters, such as pragmas and schema statements.
    int execute(const char* sql) { return sqlite3_exec(db_, sql, nullptr, nullptr, nullptr); }

    /// Returns the rows changed by the last INSERT, UPDATE or DELETE.
    int changes() const { return sqlite3_changes(db_); }

private:
    static int past_deadline(void* self) noexcept
    {
        return std::chrono::steady_clock::now() >= static_cast<sqlite_connection*>(self)->deadline_ ? 1 : 0;
    }

    sqlite3* db_ = nullptr;
    std::chrono::steady_clock::time_point deadline_ = std::chrono::steady_clock::time_point::max();
};

} // namespace lcm::storage::detail
