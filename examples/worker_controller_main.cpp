// lcm-worker-controller: the license reconciler over HTTP. It takes pending license operations
// from the control plane's internal API and carries them out on each worker's CML host.
#include "program_support.hpp"

#include <lcm/controller/license_reconciler.hpp>
#include <lcm/metrics.hpp>
#include <lcm/transport/cml_http_client.hpp>
#include <lcm/transport/control_plane_http_client.hpp>
#include <lcm/transport/http_metrics.hpp>
#include <lcm/transport/http_server.hpp>
#include <lcm/transport/router.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/json/object.hpp>
#include <boost/url/parse.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

namespace {

namespace po = boost::program_options;
using namespace lcm;
using namespace lcm::examples;

constexpr std::string_view program_name = "lcm-worker-controller";

po::options_description make_flags()
{
    po::options_description flags(
        "Flags (each also read from LCM_WORKER_CONTROLLER_<FLAG>, e.g. LCM_WORKER_CONTROLLER_CONTROL_PLANE)");
    // clang-format off
    flags.add_options()
        ("help", "print this help and exit")
        ("control-plane", po::value<std::string>()->default_value("http://127.0.0.1:8080"),
         "base URL of the control plane's API (http only)")
        ("api-key-file", po::value<std::string>(),
         "file whose first line is the key sent to the control plane as X-API-Key (required)")
        ("cml-username", po::value<std::string>()->default_value("admin"),
         "CML user the controller logs in as on every CML host; it needs admin rights")
        ("cml-password-file", po::value<std::string>(),
         "file whose first line is the CML user's password (required)")
        ("cml-ca-file", po::value<std::string>()->default_value(""),
         "PEM file of the authorities that sign the CML hosts' certificates; empty uses the system store")
        ("cml-insecure", po::bool_switch(),
         "skip certificate verification of CML hosts (lab hosts with self-signed certificates only)")
        ("concurrency", po::value<std::size_t>()->default_value(16),
         "maximum number of workers reconciled at the same time")
        ("poll-interval", po::value<std::int64_t>()->default_value(1500),
         "milliseconds between two reads of CML's status while a registration runs")
        ("operation-deadline", po::value<std::int64_t>()->default_value(300),
         "seconds after its request at which a license operation fails with a timeout")
        ("resync-period", po::value<std::int64_t>()->default_value(600),
         "seconds between two full listings of pending operations")
        ("controller-id", po::value<std::string>()->default_value(""),
         "id under which this controller claims operations; it must differ between controllers. "
         "Empty: HOSTNAME-PID-RANDOM")
        ("lease", po::value<std::int64_t>()->default_value(30000),
         "milliseconds a claim on an operation lasts without renewal, and so how soon another controller "
         "takes over the operations of a controller that stopped; more than twice --poll-interval")
        ("threads", po::value<std::size_t>()->default_value(1), "number of I/O threads")
        ("metrics-listen", po::value<std::string>()->default_value("127.0.0.1:8081"),
         "ADDRESS:PORT of the server of GET /metrics and GET /health; port 0 picks a free port. "
         "The first line of stdout is 'listening on http://ADDRESS:PORT'")
        ("log-level", po::value<std::string>()->default_value("info"),
         "trace, debug, info, warning, error or off; logs go to stderr");
    // clang-format on
    return flags;
}

std::int64_t read_positive(const po::variables_map& values, const char* flag)
{
    const auto count = values[flag].as<std::int64_t>();
    if (count <= 0) {
        throw usage_error("--" + std::string(flag) + " must be positive, got " + std::to_string(count));
    }
    return count;
}

std::string optional_flag(const po::variables_map& values, const char* flag)
{
    return values.count(flag) ? values[flag].as<std::string>() : std::string();
}

/// Builds the routes of the metrics server: `GET /health` and `GET /metrics` with the
/// reconciler's metrics and the server's own request metrics.
transport::router make_metrics_routes(const std::shared_ptr<metrics::prometheus_registry>& registry)
{
    using transport::http_response;
    using transport::request_context;
    namespace http = transport::http;

    transport::router routes;
    routes.add(http::verb::get, "/health", [](request_context&) -> boost::asio::awaitable<http_response> {
        boost::json::object body{{"status", "ok"}};
        co_return transport::make_json_response(http::status::ok, body);
    });
    routes.add(http::verb::get, "/metrics", [registry](request_context&) -> boost::asio::awaitable<http_response> {
        http_response response{http::status::ok, 11};
        response.set(http::field::content_type, metrics::prometheus_registry::content_type);
        response.body() = registry->text();
        response.prepare_payload();
        co_return response;
    });
    routes.set_observer(transport::make_request_metrics_observer(registry));
    return routes;
}

/// Reads `--control-plane` into the client's host and port.
void set_control_plane(const std::string& text, transport::control_plane_http_client_options& options)
{
    auto url = boost::urls::parse_absolute_uri(text);
    if (!url || url->scheme_id() != boost::urls::scheme::http || url->encoded_host().empty() ||
        url->has_userinfo()) {
        throw usage_error("invalid --control-plane value '" + text + "'; expected http://HOST:PORT");
    }
    options.host = std::string(url->encoded_host());
    options.port = url->has_port() ? url->port_number() : 80;
}

int run(int argc, char** argv)
{
    const auto flags = make_flags();
    const auto values = parse_flags(argc, argv, flags, "LCM_WORKER_CONTROLLER_");
    if (values.count("help")) {
        print_help(program_name, "Carries out pending license operations on the workers' CML hosts.", flags);
        return 0;
    }

    const auto log = make_stderr_logger(parse_log_level(values["log-level"].as<std::string>()));
    const auto thread_count = values["threads"].as<std::size_t>();
    if (thread_count == 0 || values["concurrency"].as<std::size_t>() == 0) {
        throw usage_error("--threads and --concurrency must be at least 1");
    }

    transport::control_plane_http_client_options control_plane_options;
    set_control_plane(values["control-plane"].as<std::string>(), control_plane_options);
    control_plane_options.api_key = read_secret_file(optional_flag(values, "api-key-file"), "api-key-file");

    transport::cml_http_client_options cml_options;
    cml_options.credentials.username = values["cml-username"].as<std::string>();
    cml_options.credentials.password = read_secret_file(optional_flag(values, "cml-password-file"), "cml-password-file");
    cml_options.ca_file = values["cml-ca-file"].as<std::string>();
    cml_options.insecure_skip_tls_verify = values["cml-insecure"].as<bool>();

    controller::license_controller_options options;
    options.license.poll_interval = std::chrono::milliseconds(read_positive(values, "poll-interval"));
    options.license.decision.operation_deadline = std::chrono::seconds(read_positive(values, "operation-deadline"));
    options.license.lease = std::chrono::milliseconds(read_positive(values, "lease"));
    if (options.license.lease <= 2 * options.license.poll_interval) {
        throw usage_error("--lease (" + std::to_string(options.license.lease.count()) +
                          " ms) must be more than twice --poll-interval (" +
                          std::to_string(options.license.poll_interval.count()) + " ms)");
    }
    options.license.controller_id = values["controller-id"].as<std::string>();
    if (options.license.controller_id.empty()) {
        options.license.controller_id = controller::default_controller_id();
    }
    if (options.license.controller_id.size() > domain::max_claim_holder_length) {
        throw usage_error("--controller-id must be at most " + std::to_string(domain::max_claim_holder_length) +
                          " characters");
    }
    options.license.log = log;
    options.reconciler.max_concurrent_reconciles = values["concurrency"].as<std::size_t>();
    options.reconciler.resync_period = std::chrono::seconds(read_positive(values, "resync-period"));
    options.reconciler.log = log;
    const auto registry = std::make_shared<metrics::prometheus_registry>();
    options.reconciler.metrics = registry;

    transport::http_server_options metrics_server_options;
    const auto metrics_listen = values["metrics-listen"].as<std::string>();
    set_listen_address(metrics_listen, metrics_server_options);

    boost::asio::io_context context(static_cast<int>(thread_count));
    transport::control_plane_http_client control_plane(context.get_executor(), control_plane_options, log);
    transport::cml_http_client cml(context.get_executor(), cml_options, log);
    controller::license_controller controller(context.get_executor(), cml, control_plane, options);
    const auto metrics_routes = make_metrics_routes(registry);
    auto metrics_handler = [&metrics_routes](transport::http_request request) {
        return metrics_routes.dispatch(std::move(request));
    };
    transport::http_server metrics_server(context.get_executor(), metrics_server_options, metrics_handler, log);
    listen_or_throw(metrics_server, metrics_listen);
    print_listening(metrics_server, "http");

    boost::asio::signal_set signals(context, SIGINT, SIGTERM);
    signals.async_wait([&](const boost::system::error_code& error, int signal_number) {
        if (error) {
            return;
        }
        log.info("stop requested", {{"signal", signal_number == SIGINT ? "SIGINT" : "SIGTERM"}});
        controller.request_stop();
    });

    log.info("worker-controller starting", {{"control_plane", values["control-plane"].as<std::string>()},
                                            {"controller_id", options.license.controller_id},
                                            {"lease_ms", std::to_string(options.license.lease.count())},
                                            {"concurrency", std::to_string(options.reconciler.max_concurrent_reconciles)},
                                            {"metrics_listen", metrics_listen}});
    std::exception_ptr failure;
    std::exception_ptr metrics_failure;
    std::size_t left_pending = 0;
    boost::asio::co_spawn(context, metrics_server.run(),
                          [&](std::exception_ptr error) { metrics_failure = error; });
    // The metrics server stops with the controller, so /metrics responds until the last reconcile ended.
    boost::asio::co_spawn(context, controller.run(),
                          [&](std::exception_ptr error, reconcile::stop_report<std::string> report) {
                              failure = error;
                              left_pending = report.pending.size();
                              signals.cancel();
                              metrics_server.stop();
                          });
    std::vector<std::thread> helpers;
    for (std::size_t i = 1; i < thread_count; ++i) {
        helpers.emplace_back([&context] { context.run(); });
    }
    context.run();
    for (auto& helper : helpers) {
        helper.join();
    }
    if (failure) {
        std::rethrow_exception(failure);
    }
    if (metrics_failure) {
        std::rethrow_exception(metrics_failure);
    }
    // Operations left pending stay recorded in the control plane, with this controller's
    // claims; another controller takes them over once the claims expire.
    log.info("worker-controller stopped", {{"left_pending", std::to_string(left_pending)}});
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    return run_program(program_name, [&] { return run(argc, argv); });
}
