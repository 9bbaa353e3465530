// lcm-fake-cml: serves any number of fake CML instances over HTTP or HTTPS, for tests,
// demos and load runs of worker-controllers.
#include "program_support.hpp"

#include <lcm/testing/fake_cml.hpp>
#include <lcm/testing/fake_cml_server.hpp>
#include <lcm/transport/http_server.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/ssl/context.hpp>

#include <chrono>
#include <cstdint>
#include <memory>
#include <string>

namespace {

namespace po = boost::program_options;
using namespace lcm;
using namespace lcm::examples;

constexpr std::string_view program_name = "lcm-fake-cml";

po::options_description make_flags()
{
    po::options_description flags("Flags (each also read from LCM_FAKE_CML_<FLAG>, e.g. LCM_FAKE_CML_LISTEN)");
    // clang-format off
    flags.add_options()
        ("help", "print this help and exit")
        ("listen", po::value<std::string>()->default_value("127.0.0.1:0"),
         "ADDRESS:PORT to listen on; port 0 picks a free port. The first line of stdout is "
         "'listening on <scheme>://ADDRESS:PORT'")
        ("username", po::value<std::string>()->default_value("admin"), "name of the CML user, 1 to 32 characters")
        ("password-file", po::value<std::string>(), "file whose first line is the CML user's password (required)")
        ("registration-delay", po::value<std::int64_t>()->default_value(0),
         "milliseconds from an accepted registration until its outcome shows in GET /licensing")
        ("token-lifetime", po::value<std::int64_t>()->default_value(0),
         "seconds a bearer token stays valid; 0 keeps it valid until the process ends")
        ("reject-token-prefix", po::value<std::string>(),
         "license tokens that start with this text end as FAILED registrations")
        ("latency", po::value<std::int64_t>()->default_value(0), "milliseconds each request waits before it is handled")
        ("error-rate", po::value<double>()->default_value(0.0), "share of requests answered 503, from 0 to 1")
        ("conflict-rate", po::value<double>()->default_value(0.0),
         "share of registrations and deregistrations answered 409, from 0 to 1")
        ("drop-rate", po::value<double>()->default_value(0.0),
         "share of requests whose connection is closed before they are applied, from 0 to 1")
        ("drop-after-apply-rate", po::value<double>()->default_value(0.0),
         "share of requests that are applied but whose connection is closed without a response, from 0 to 1")
        ("seed", po::value<std::uint64_t>()->default_value(1), "seed of the fault injection's random sequence")
        ("tls-cert", po::value<std::string>(), "PEM certificate chain; with --tls-key, serve HTTPS")
        ("tls-key", po::value<std::string>(), "PEM private key of --tls-cert")
        ("log-level", po::value<std::string>()->default_value("info"),
         "trace, debug, info, warning, error or off; logs go to stderr");
    // clang-format on
    return flags;
}

double read_rate(const po::variables_map& values, const char* flag)
{
    const auto rate = values[flag].as<double>();
    if (!(rate >= 0.0 && rate <= 1.0)) {
        throw usage_error("--" + std::string(flag) + " must be between 0 and 1, got " + std::to_string(rate));
    }
    return rate;
}

std::chrono::milliseconds read_milliseconds(const po::variables_map& values, const char* flag)
{
    const auto count = values[flag].as<std::int64_t>();
    if (count < 0) {
        throw usage_error("--" + std::string(flag) + " must not be negative, got " + std::to_string(count));
    }
    return std::chrono::milliseconds(count);
}

testing::fake_cml_options read_fake_options(const po::variables_map& values)
{
    const auto username = values["username"].as<std::string>();
    if (username.empty() || username.size() > 32) {
        throw usage_error("--username must have 1 to 32 characters");
    }
    const auto password_file = values.count("password-file") ? values["password-file"].as<std::string>() : "";

    testing::fake_cml_options options;
    options.users = {{username, read_secret_file(password_file, "password-file"), true}};
    options.registration_delay = read_milliseconds(values, "registration-delay");
    if (const auto lifetime = values["token-lifetime"].as<std::int64_t>(); lifetime > 0) {
        options.token_lifetime = std::chrono::seconds(lifetime);
    }
    if (values.count("reject-token-prefix")) {
        options.token_rejected = [prefix = values["reject-token-prefix"].as<std::string>()](const secret& token) {
            return token.reveal().starts_with(prefix);
        };
    }
    options.faults.latency = read_milliseconds(values, "latency");
    options.faults.server_error_rate = read_rate(values, "error-rate");
    options.faults.conflict_rate = read_rate(values, "conflict-rate");
    options.faults.drop_before_apply_rate = read_rate(values, "drop-rate");
    options.faults.drop_after_apply_rate = read_rate(values, "drop-after-apply-rate");
    options.faults.seed = values["seed"].as<std::uint64_t>();
    return options;
}

/// Returns a TLS context for `--tls-cert` and `--tls-key`, or null when neither is set.
std::shared_ptr<boost::asio::ssl::context> read_tls_context(const po::variables_map& values)
{
    const bool has_certificate = values.count("tls-cert") > 0;
    if (has_certificate != (values.count("tls-key") > 0)) {
        throw usage_error("--tls-cert and --tls-key must be given together");
    }
    if (!has_certificate) {
        return nullptr;
    }
    auto context = std::make_shared<boost::asio::ssl::context>(boost::asio::ssl::context::tls_server);
    boost::system::error_code error;
    context->use_certificate_chain_file(values["tls-cert"].as<std::string>(), error);
    if (error) {
        throw usage_error("cannot load --tls-cert " + values["tls-cert"].as<std::string>() + ": " + error.message());
    }
    context->use_private_key_file(values["tls-key"].as<std::string>(), boost::asio::ssl::context::pem, error);
    if (error) {
        throw usage_error("cannot load --tls-key " + values["tls-key"].as<std::string>() + ": " + error.message());
    }
    return context;
}

int run(int argc, char** argv)
{
    const auto flags = make_flags();
    const auto values = parse_flags(argc, argv, flags, "LCM_FAKE_CML_");
    if (values.count("help")) {
        print_help(program_name, "Serves fake CML instances at <scheme>://ADDRESS:PORT/instances/<name>.", flags);
        return 0;
    }

    const auto log = make_stderr_logger(parse_log_level(values["log-level"].as<std::string>()));
    transport::http_server_options server_options;
    set_listen_address(values["listen"].as<std::string>(), server_options);
    server_options.tls_context = read_tls_context(values);
    const bool tls = server_options.tls_context != nullptr;

    testing::fake_cml cml(read_fake_options(values));
    testing::fake_cml_api api(cml, log);
    boost::asio::io_context context;
    transport::http_server server(context.get_executor(), server_options, api.handler(), log);
    listen_or_throw(server, values["listen"].as<std::string>());

    log.info("fake CML starting", {{"listen", values["listen"].as<std::string>()},
                                   {"tls", tls ? "on" : "off"},
                                   {"username", cml.options().users.front().username}});
    serve_until_signal(context, server, tls ? "https" : "http", log);
    const auto totals = cml.total_counters();
    log.info("fake CML stopped", {{"instances", std::to_string(cml.instance_count())},
                                  {"accepted_registrations", std::to_string(totals.accepted_registrations)}});
    return 0;
}

} // namespace

int main(int argc, char** argv)
{
    return run_program(program_name, [&] { return run(argc, argv); });
}
