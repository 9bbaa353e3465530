// lcm-control-plane: the control plane's HTTP API on the store that `--db` names: an
// SQLite file by default, PostgreSQL for several replicas, or memory.
#include "database_flag.hpp"
#include "program_support.hpp"

#include <lcm/application/control_plane.hpp>
#include <lcm/application/logging_event_sink.hpp>
#include <lcm/metrics.hpp>
#include <lcm/transport/control_plane_api.hpp>
#include <lcm/transport/http_metrics.hpp>
#include <lcm/transport/http_server.hpp>

#include <boost/asio/io_context.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace {

namespace po = boost::program_options;
using namespace lcm;
using namespace lcm::examples;

constexpr std::string_view program_name = "lcm-control-plane";

po::options_description make_flags()
{
    const transport::http_server_options server_defaults;
    const transport::control_plane_api_options api_defaults;
    po::options_description flags(
        "Flags (each also read from LCM_CONTROL_PLANE_<FLAG>, e.g. LCM_CONTROL_PLANE_LISTEN)");
    // clang-format off
    flags.add_options()
        ("help", "print this help and exit")
        ("listen", po::value<std::string>()->default_value("127.0.0.1:8080"),
         "ADDRESS:PORT to listen on; port 0 picks a free port. The first line of stdout is "
         "'listening on http://ADDRESS:PORT'")
        ("api-key-file", po::value<std::string>(),
         "file whose first line is the key worker-controllers send as X-API-Key (required)")
        ("admin-token-file", po::value<std::string>(),
         "file whose first line is the bearer token of the public /api/workers routes (required)")
        ("max-connections", po::value<std::size_t>()->default_value(server_defaults.max_connections),
         "maximum number of open connections; further ones get 503")
        ("max-body-size", po::value<std::size_t>()->default_value(server_defaults.max_body_size),
         "maximum request body in bytes; larger requests get 413")
        ("idle-timeout", po::value<std::int64_t>()->default_value(server_defaults.idle_timeout.count()),
         "milliseconds a keep-alive connection may wait for its next request")
        ("request-timeout", po::value<std::int64_t>()->default_value(server_defaults.request_timeout.count()),
         "milliseconds a client has to send a whole request")
        ("shutdown-timeout", po::value<std::int64_t>()->default_value(server_defaults.shutdown_timeout.count()),
         "milliseconds in-flight requests may take after SIGINT or SIGTERM; held change-feed requests "
         "return at once")
        ("max-change-wait", po::value<std::int64_t>()->default_value(api_defaults.max_change_wait.count()),
         "maximum milliseconds a change-feed request may wait")
        ("db", po::value<std::string>()->default_value(std::string(default_database)),
         "where workers and license intents are stored: 'memory' (lost on exit), 'sqlite:PATH' (a file, "
         "created when missing; PATH is relative to the working directory) or 'postgres:CONNINFO' (a libpq "
         "URL or key=value string, for several replicas; empty to use libpq's PG* variables). A password "
         "in CONNINFO is never logged, but prefer PGPASSFILE or this flag's variable to the command line")
        ("db-schema", po::value<std::string>()->default_value(""),
         "with --db postgres:...: the PostgreSQL schema of lcm's tables, created when missing (at most 59 "
         "bytes); empty for the first schema of the server's search_path. Every replica of one control plane "
         "uses the same schema, and separate schemas keep control planes apart in one database")
        ("log-level", po::value<std::string>()->default_value("info"),
         "trace, debug, info, warning, error or off; logs go to stderr");
    // clang-format on
    return flags;
}

std::chrono::milliseconds read_positive_milliseconds(const po::variables_map& values, const char* flag)
{
    const auto count = values[flag].as<std::int64_t>();
    if (count <= 0) {
        throw usage_error("--" + std::string(flag) + " must be a positive number of milliseconds, got " +
                          std::to_string(count));
    }
    return std::chrono::milliseconds(count);
}

std::string optional_flag(const po::variables_map& values, const char* flag)
{
    return values.count(flag) ? values[flag].as<std::string>() : std::string();
}

int run(int argc, char** argv)
{
    const auto flags = make_flags();
    const auto values = parse_flags(argc, argv, flags, "LCM_CONTROL_PLANE_");
    if (values.count("help")) {
        print_help(program_name, "Serves the lcm control-plane API and stores its workers as --db says.", flags);
        return 0;
    }

    const auto log = make_stderr_logger(parse_log_level(values["log-level"].as<std::string>()));
    transport::http_server_options server_options;
    set_listen_address(values["listen"].as<std::string>(), server_options);
    server_options.max_connections = values["max-connections"].as<std::size_t>();
    server_options.max_body_size = values["max-body-size"].as<std::size_t>();
    server_options.idle_timeout = read_positive_milliseconds(values, "idle-timeout");
    server_options.request_timeout = read_positive_milliseconds(values, "request-timeout");
    server_options.shutdown_timeout = read_positive_milliseconds(values, "shutdown-timeout");

    transport::control_plane_api_options api_options;
    api_options.api_key = read_secret_file(optional_flag(values, "api-key-file"), "api-key-file");
    api_options.admin_token = read_secret_file(optional_flag(values, "admin-token-file"), "admin-token-file");
    api_options.max_change_wait = read_positive_milliseconds(values, "max-change-wait");
    api_options.default_change_wait = std::min(api_options.default_change_wait, api_options.max_change_wait);

    // GET /metrics serves the request metrics of every route and the count of domain events.
    const auto registry = std::make_shared<metrics::prometheus_registry>();
    api_options.on_request = transport::make_request_metrics_observer(registry);
    api_options.metrics_text = [registry] { return registry->text(); };

    auto database = parse_database_flag(values["db"].as<std::string>());
    set_database_schema(database, values["db-schema"].as<std::string>());
    auto repository = open_database(database, log);
    // Every domain event becomes one log line, which gives operators each worker's timeline.
    application::logging_event_sink sink(log, registry);
    application::control_plane plane(repository, sink, log);
    transport::control_plane_api api(plane, std::move(api_options), log);
    // On SIGINT or SIGTERM, held change-feed requests return the current sequence at once, so
    // the stop need not wait for --shutdown-timeout.
    server_options.on_stop = [&api] { api.end_change_waits(); };
    boost::asio::io_context context;
    transport::http_server server(context.get_executor(), server_options, api.handler(), log);
    listen_or_throw(server, values["listen"].as<std::string>());

    log.info("control plane starting", {{"listen", values["listen"].as<std::string>()},
                                        {"storage", database.describe()},
                                        {"schema", database.schema}});
    serve_until_signal(context, server, "http", log);
    log.info("control plane stopped", {{"storage", database.describe()}});
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    return run_program(program_name, [&] { return run(argc, argv); });
}
