// RAII wrappers over libpq for `postgres_repository`: connecting without leaking the URL,
// parameterized statements, and the mapping of PostgreSQL errors to `lcm::errc`.
#pragma once

#include <lcm/domain/secret.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>

#include <libpq-fe.h>

#include <algorithm>
#include <chrono>
#include <initializer_list>
#include <new>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lcm::storage::detail {

/// The parts of a connection URL that may be logged, and the password to redact from
/// libpq's messages. The URL itself is a secret and is never logged.
struct postgres_endpoint {
    std::string host;
    std::string port;
    std::string dbname;
    std::optional<secret> password;
    /// False when libpq cannot parse the URL. Then the password is unknown, so `redact`
    /// cannot remove it, and libpq's messages about the URL must not be logged at all.
    bool valid = false;

    static postgres_endpoint from_url(const std::string& url)
    {
        postgres_endpoint endpoint;
        char* error = nullptr;
        PQconninfoOption* options = PQconninfoParse(url.c_str(), &error);
        // libpq's parse error may quote part of the URL, password included, so it is dropped.
        PQfreemem(error);
        if (options == nullptr) {
            endpoint.host = "<unparsable URL>";
            return endpoint;
        }
        endpoint.valid = true;
        for (auto* option = options; option->keyword != nullptr; ++option) {
            if (option->val == nullptr) {
                continue;
            }
            const std::string_view keyword = option->keyword;
            if (keyword == "host" || (keyword == "hostaddr" && endpoint.host.empty())) {
                endpoint.host = option->val;
            }
            else if (keyword == "port") {
                endpoint.port = option->val;
            }
            else if (keyword == "dbname") {
                endpoint.dbname = option->val;
            }
            else if (keyword == "password" && *option->val != '\0') {
                endpoint.password.emplace(option->val);
            }
        }
        PQconninfoFree(options);
        return endpoint;
    }

    /// Returns `text` with the password replaced by `<redacted>`.
    std::string redact(std::string_view text) const
    {
        return password ? redact_secret(text, *password) : std::string(text);
    }
};

/// Connection settings shared by every connection of one repository.
struct postgres_settings {
    /// A libpq connection URL or key/value string; a secret.
    std::string url;
    /// The schema for lcm's tables; empty for the server's default search path.
    std::string schema;
    std::string application_name;
    std::chrono::milliseconds statement_timeout{5000};
    std::chrono::milliseconds connect_timeout{5000};
    postgres_endpoint endpoint;
};

/// One result of `PQexecParams`, freed on destruction.
class postgres_result {
public:
    explicit postgres_result(PGresult* handle) noexcept : handle_(handle) {}
    postgres_result(postgres_result&& other) noexcept : handle_(std::exchange(other.handle_, nullptr)) {}
    postgres_result& operator=(postgres_result&& other) noexcept
    {
        std::swap(handle_, other.handle_);
        return *this;
    }
    ~postgres_result() { PQclear(handle_); }

    PGresult* handle() const noexcept { return handle_; }
    int rows() const { return PQntuples(handle_); }
    std::string_view text(int row, int column) const
    {
        return {PQgetvalue(handle_, row, column), static_cast<std::size_t>(PQgetlength(handle_, row, column))};
    }
    /// Returns the rows that an INSERT or UPDATE changed.
    int changed_rows() const
    {
        const std::string_view count = PQcmdTuples(handle_);
        return count.empty() ? 0 : std::stoi(std::string(count));
    }

private:
    PGresult* handle_;
};

/// Maps a PostgreSQL SQLSTATE to `lcm::errc`. Statement and lock timeouts are `timeout`;
/// a unique violation is `already_exists`; everything else leaves the database unusable
/// for this call and is `unavailable`.
inline errc postgres_errc(std::string_view sqlstate) noexcept
{
    if (sqlstate == "57014" || sqlstate == "55P03") {
        return errc::timeout;
    }
    if (sqlstate == "23505") {
        return errc::already_exists;
    }
    return errc::unavailable;
}

/// One libpq connection. Not thread-safe: the repository lends it to one pool thread at a
/// time. It remembers whether the server connection was lost, and how many statements
/// succeeded since `begin_operation`, so a caller can tell when a retry is safe.
class postgres_connection {
public:
    postgres_connection() = default;
    postgres_connection(const postgres_connection&) = delete;
    postgres_connection& operator=(const postgres_connection&) = delete;
    ~postgres_connection() { PQfinish(connection_); }

    void close() noexcept { PQfinish(std::exchange(connection_, nullptr)); }

    bool healthy() const noexcept { return connection_ != nullptr && PQstatus(connection_) == CONNECTION_OK; }
    PGconn* handle() const noexcept { return connection_; }

    /// (Re)connects and applies the session settings. Logs a failure with host, port and
    /// database name, and libpq's message with the password redacted.
    result<void> connect(const postgres_settings& settings, const logger& log)
    {
        close();
        const auto connect_seconds = std::to_string(
            std::max<long long>(2, std::chrono::ceil<std::chrono::seconds>(settings.connect_timeout).count()));
        // expand_dbname = 1 lets `dbname` carry the whole URL; later keywords override it.
        const char* keywords[] = {"dbname",          "connect_timeout", "application_name", "keepalives",
                                  "keepalives_idle", "keepalives_interval", "keepalives_count", nullptr};
        const char* values[] = {settings.url.c_str(), connect_seconds.c_str(), settings.application_name.c_str(),
                                "1",                  "10",                    "5",
                                "3",                  nullptr};
        connection_ = PQconnectdbParams(keywords, values, 1);
        // libpq prints notices such as "relation already exists, skipping" to stderr by
        // default, and lcm never writes to stderr.
        PQsetNoticeProcessor(connection_, [](void*, const char*) {}, nullptr);
        if (!healthy()) {
            const auto& endpoint = settings.endpoint;
            // libpq quotes an unparsable URL in its message, password included.
            const auto message = endpoint.valid ? endpoint.redact(error_message())
                                                : std::string("the connection URL is invalid");
            log.warning("connecting to PostgreSQL failed", {{"host", endpoint.host},
                                                            {"port", endpoint.port},
                                                            {"dbname", endpoint.dbname},
                                                            {"error", message}});
            PQfinish(std::exchange(connection_, nullptr));
            return errc::unavailable;
        }

        const auto timeout = std::to_string(settings.statement_timeout.count());
        std::string search_path;
        if (!settings.schema.empty()) {
            search_path = quote_identifier(settings.schema);
        }
        const char* sql = "SELECT set_config('statement_timeout', $1, false), set_config('lock_timeout', $1, false), "
                          "set_config('search_path', CASE WHEN $2 = '' THEN current_setting('search_path') ELSE $2 END, "
                          "false)";
        begin_operation();
        auto configured = execute(sql, {timeout, search_path}, log);
        if (!configured) {
            return configured.error();
        }
        return success();
    }

    /// Starts counting the statements of one repository operation.
    void begin_operation() noexcept
    {
        succeeded_ = 0;
        lost_ = false;
    }

    /// Returns whether the connection broke before any statement of the operation succeeded,
    /// so that nothing was committed and the operation may run again on a new connection.
    bool lost_before_work() const noexcept { return lost_ && succeeded_ == 0; }

    /// Runs one parameterized statement; parameters are text, `std::nullopt` is NULL.
    result<postgres_result> execute(const char* sql, std::initializer_list<std::optional<std::string>> parameters,
                                    const logger& log)
    {
        std::vector<const char*> values;
        values.reserve(parameters.size());
        for (const auto& parameter : parameters) {
            values.push_back(parameter ? parameter->c_str() : nullptr);
        }
        postgres_result outcome(PQexecParams(connection_, sql, static_cast<int>(values.size()), nullptr,
                                             values.data(), nullptr, nullptr, 0));
        return check(std::move(outcome), log);
    }

    /// Runs a constant script without parameters, possibly several statements (migrations).
    result<postgres_result> execute_script(const char* sql, const logger& log)
    {
        return check(postgres_result(PQexec(connection_, sql)), log);
    }

    /// Quotes `name` as an SQL identifier, for the few statements (LISTEN, CREATE SCHEMA)
    /// that take an identifier and so cannot take a bound parameter.
    std::string quote_identifier(const std::string& name) const
    {
        char* quoted = PQescapeIdentifier(connection_, name.c_str(), name.size());
        if (quoted == nullptr) {
            throw std::bad_alloc();
        }
        std::string out = quoted;
        PQfreemem(quoted);
        return out;
    }

    /// Ends a transaction that an earlier failure or timeout left open.
    void reset_transaction(const logger& log)
    {
        if (healthy() && PQtransactionStatus(connection_) != PQTRANS_IDLE) {
            // A ROLLBACK that fails leaves the connection broken, and the next operation
            // that takes it reconnects.
            [[maybe_unused]] auto rolled_back = execute("ROLLBACK", {}, log);
        }
    }

private:
    std::string error_message() const
    {
        std::string message = connection_ ? PQerrorMessage(connection_) : "out of memory";
        while (!message.empty() && (message.back() == '\n' || message.back() == ' ')) {
            message.pop_back();
        }
        return message;
    }

    result<postgres_result> check(postgres_result outcome, const logger& log)
    {
        const auto status = PQresultStatus(outcome.handle());
        if (status == PGRES_COMMAND_OK || status == PGRES_TUPLES_OK) {
            ++succeeded_;
            return outcome;
        }

        if (!healthy()) {
            lost_ = true;
            log.warning("PostgreSQL connection lost", {{"error", error_message()}});
            return errc::unavailable;
        }
        const char* state = PQresultErrorField(outcome.handle(), PG_DIAG_SQLSTATE);
        const char* primary = PQresultErrorField(outcome.handle(), PG_DIAG_MESSAGE_PRIMARY);
        const std::string sqlstate = state ? state : "";
        // Only the primary message is logged: DETAIL and CONTEXT may quote parameter
        // values, and a record parameter contains license tokens.
        if (sqlstate != "23505") {
            log.warning("PostgreSQL statement failed", {{"sqlstate", sqlstate}, {"error", primary ? primary : ""}});
        }
        return postgres_errc(sqlstate);
    }

    PGconn* connection_ = nullptr;
    int succeeded_ = 0;
    bool lost_ = false;
};

} // namespace lcm::storage::detail
