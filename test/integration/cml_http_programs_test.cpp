// lcm-fake-cml and lcm-control-plane as child processes on 127.0.0.1: the bound address on
// the first line of stdout, a few requests, a clean exit on SIGTERM (also with a long-poll
// held), --help and bad flags of all three programs, and no secret in their output.
#if defined(LCM_FAKE_CML_PROGRAM) && defined(LCM_CONTROL_PLANE_PROGRAM) && defined(LCM_WORKER_CONTROLLER_PROGRAM)

#include "cml_http_test_support.hpp"
#include "program_test_support.hpp"
#include "tls_test_support.hpp"

#include <catch2/catch.hpp>

#include <boost/url/parse.hpp>

#include <chrono>
#include <csignal>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <unistd.h>

using namespace lcm;
using namespace lcm::test;

namespace {

http_request make_admin_request(http::verb method, std::string target, std::string body = {})
{
    return make_request(method, target, credentials::admin, std::move(body));
}

} // namespace

TEST_CASE("fake cml program serves instances", "[integration]")
{
    secret_files files;
    const auto password_file = files.write("password", cml_password + "\n");
    // The listen address comes from the environment, the rest from flags.
    child_process child(LCM_FAKE_CML_PROGRAM,
                        {"--password-file", password_file, "--reject-token-prefix", "REJECT", "--log-level", "debug"},
                        {"LCM_FAKE_CML_LISTEN=127.0.0.1:0"});
    const auto port = read_port(child);

    asio::io_context context;
    log_capture logs;
    transport::cml_http_client client(context.get_executor(), test_client_options(), logs.make_logger());
    const cml_endpoint lab{"http://127.0.0.1:" + std::to_string(port) + "/instances/lab-1"};
    const cml_endpoint other{"http://127.0.0.1:" + std::to_string(port) + "/instances/lab-2"};

    auto body = [&]() -> asio::awaitable<void> {
        const secret good(license_token);
        auto registered = co_await client.register_license(lab, good, false);
        REQUIRE(registered);
        auto status = co_await client.get_licensing_status(lab);
        REQUIRE(status);
        CHECK(status.value().registration_status == cml_registration_status::completed);

        const secret bad(rejected_license_token);
        auto rejected = co_await client.register_license(other, bad, false);
        REQUIRE(rejected);
        auto failed = co_await client.get_licensing_status(other);
        REQUIRE(failed);
        CHECK(failed.value().registration_status == cml_registration_status::failed);

        http_request counters_request{http::verb::get, "/_fake/counters", 11};
        auto counters = co_await send(port, std::move(counters_request));
        REQUIRE(counters.result() == http::status::ok);
        CHECK(json_of(counters).at("accepted_registrations").to_number<std::uint64_t>() == 2);
        CHECK(json_of(counters).at("instances").to_number<std::uint64_t>() == 2);
        client.close_idle_connections();
    };
    testing::run_with_timeout(context, body());

    stop_cleanly(child);
    CHECK(child.standard_error().find("fake CML stopped") != std::string::npos);
    check_output_free_of(child, {cml_password, license_token, rejected_license_token, std::string(bearer_prefix)});
    check_no_secrets_logged(logs);
}

TEST_CASE("fake cml program serves https", "[integration]")
{
    secret_files files;
    const auto password_file = files.write("password", cml_password);
    const auto& certificates = get_test_certificates();
    child_process child(LCM_FAKE_CML_PROGRAM, {"--listen", "127.0.0.1:0", "--password-file", password_file,
                                               "--tls-cert", certificates.server_certificate, "--tls-key",
                                               certificates.server_key});
    auto line = child.read_first_line(start_timeout);
    REQUIRE(line);
    REQUIRE(line->starts_with("listening on https://127.0.0.1:"));
    const auto origin = line->substr(std::string_view("listening on ").size());

    asio::io_context context;
    log_capture logs;
    auto options = test_client_options();
    options.ca_file = certificates.ca_file;
    transport::cml_http_client client(context.get_executor(), options, logs.make_logger());
    const cml_endpoint lab{origin + "/instances/lab-1"};

    auto body = [&]() -> asio::awaitable<void> {
        auto status = co_await client.get_licensing_status(lab);
        CHECK(status);
        client.close_idle_connections();
    };
    testing::run_with_timeout(context, body());
    stop_cleanly(child);
}

TEST_CASE("control plane program serves api", "[integration]")
{
    secret_files files;
    const auto api_key_file = files.write("api-key", api_key + "\n");
    const auto admin_token_file = files.write("admin-token", admin_token + "\n");
    const auto database = "sqlite:" + files.path("workers.db");
    child_process child(LCM_CONTROL_PLANE_PROGRAM, {"--listen", "127.0.0.1:0", "--api-key-file", api_key_file,
                                                    "--admin-token-file", admin_token_file, "--db", database});
    const auto port = read_port(child);

    asio::io_context context;
    auto body = [&]() -> asio::awaitable<void> {
        http_request health{http::verb::get, "/health", 11};
        auto healthy = co_await send(port, std::move(health));
        CHECK(healthy.result() == http::status::ok);

        auto add = make_admin_request(http::verb::post, "/api/workers",
                                      R"({"id": "w1", "name": "lab 1", "cml_url": "https://127.0.0.1:9443"})");
        auto added = co_await send(port, std::move(add));
        CHECK(added.result() == http::status::created);

        auto registration = make_admin_request(http::verb::post, "/api/workers/w1/license",
                                               R"({"token": ")" + license_token + R"("})");
        auto accepted = co_await send(port, std::move(registration));
        CHECK(accepted.result() == http::status::accepted);
        CHECK(accepted.body().find(license_token) == std::string::npos);

        auto unauthorized = make_request(http::verb::get, "/api/workers", credentials::none);
        auto rejected = co_await send(port, std::move(unauthorized));
        CHECK(rejected.result() == http::status::unauthorized);
    };
    // NOTE: on a loaded machine this test failed a few times with "Connection reset by peer",
    // when the program crashed on a corrupted heap (segfaults in the kernel log). The likely
    // cause was a database call's channel destroyed on a pool thread after the io_context that
    // opened the database. blocking_call.hpp now prevents that, but no test reproduces it. A
    // failure prints how the program ended and its log.
    try {
        testing::run_with_timeout(context, body());
    }
    catch (const std::exception& error) {
        const auto ended = child.wait_for_exit(std::chrono::milliseconds(200));
        FAIL("request failed: " << error.what() << "\nprogram "
                                << (ended ? "exited with status " + std::to_string(*ended) : std::string("still runs"))
                                << " (128 + N is signal N)\nstderr: " << child.standard_error());
    }

    stop_cleanly(child);
    CHECK(child.standard_error().find("control plane stopped") != std::string::npos);
    check_output_free_of(child, {api_key, admin_token, license_token});
}

TEST_CASE("control plane stops during long-poll", "[integration]")
{
    secret_files files;
    const auto api_key_file = files.write("api-key", api_key + "\n");
    const auto admin_token_file = files.write("admin-token", admin_token + "\n");
    // The held long-poll must not keep the program running until the 60 s shutdown timeout.
    child_process child(LCM_CONTROL_PLANE_PROGRAM,
                        {"--listen", "127.0.0.1:0", "--api-key-file", api_key_file, "--admin-token-file",
                         admin_token_file, "--db", "memory", "--shutdown-timeout", "60000"});
    const auto port = read_port(child);

    asio::io_context context;
    auto body = [&]() -> asio::awaitable<void> {
        auto sequence_request = make_request(http::verb::get, "/api/internal/changes", credentials::internal);
        auto sequence_response = co_await send(port, std::move(sequence_request));
        REQUIRE(sequence_response.result() == http::status::ok);
        const auto current = json_of(sequence_response).at("sequence").to_number<std::uint64_t>();

        auto poll = co_await connect_to(port);
        const auto target = "/api/internal/changes?after=" + std::to_string(current) + "&timeout_ms=60000";
        auto poll_request = make_request(http::verb::get, target, credentials::internal);
        poll_request.set(http::field::host, "127.0.0.1");
        poll_request.prepare_payload();
        co_await http::async_write(poll, poll_request, asio::use_awaitable);

        // The program serves both connections on one thread and reads the long-poll first,
        // so the long-poll is held by the time the /health response arrives.
        http_request health{http::verb::get, "/health", 11};
        auto healthy = co_await send(port, std::move(health));
        REQUIRE(healthy.result() == http::status::ok);

        child.send_signal(SIGTERM);
        poll.expires_after(exit_timeout);
        boost::beast::flat_buffer buffer;
        http_response answered;
        co_await http::async_read(poll, buffer, answered, asio::use_awaitable);
        CHECK(answered.result() == http::status::ok);
        CHECK(json_of(answered).at("sequence").to_number<std::uint64_t>() == current);
    };
    testing::run_with_timeout(context, body(), std::chrono::seconds(20));

    const auto status = child.wait_for_exit(exit_timeout);
    INFO("stderr: " << child.standard_error());
    REQUIRE(status);
    CHECK(*status == 0);
    CHECK(child.standard_error().find("control plane stopped") != std::string::npos);
    CHECK(child.standard_error().find("level=error") == std::string::npos);
    CHECK(child.standard_error().find("outlived the shutdown timeout") == std::string::npos);
}

TEST_CASE("programs print help", "[integration]")
{
    struct help_case {
        const char* program;
        const char* listen_flag;
    };
    const help_case cases[] = {{LCM_FAKE_CML_PROGRAM, "--listen"},
                               {LCM_CONTROL_PLANE_PROGRAM, "--listen"},
                               {LCM_WORKER_CONTROLLER_PROGRAM, "--metrics-listen"}};
    for (const auto& [program, listen_flag] : cases) {
        INFO(program);
        child_process child(program, {"--help"});
        const auto status = child.wait_for_exit(exit_timeout);
        REQUIRE(status);
        CHECK(*status == 0);
        CHECK(child.standard_output().find(listen_flag) != std::string::npos);
        CHECK(child.standard_output().find("--log-level") != std::string::npos);
    }
}

TEST_CASE("programs reject bad flags", "[integration]")
{
    for (const auto* program : {LCM_FAKE_CML_PROGRAM, LCM_CONTROL_PLANE_PROGRAM, LCM_WORKER_CONTROLLER_PROGRAM}) {
        INFO(program);
        child_process child(program, {"--no-such-flag"});
        const auto status = child.wait_for_exit(exit_timeout);
        REQUIRE(status);
        CHECK(*status == 2);
        CHECK(child.standard_error().find("no-such-flag") != std::string::npos);
        CHECK(child.standard_error().find("--help") != std::string::npos);
        CHECK(child.standard_output().empty());
    }
}

TEST_CASE("programs reject bad values", "[integration]")
{
    secret_files files;
    const auto password_file = files.write("password", cml_password);
    const std::vector<std::vector<std::string>> cases = {
        {"--password-file", password_file, "--listen", "127.0.0.1"},
        {"--password-file", password_file, "--error-rate", "1.5"},
        {"--password-file", password_file, "--tls-cert", password_file},
        {"--listen", "127.0.0.1:0"},
    };
    for (const auto& arguments : cases) {
        INFO(arguments.back());
        child_process child(LCM_FAKE_CML_PROGRAM, arguments);
        const auto status = child.wait_for_exit(exit_timeout);
        REQUIRE(status);
        CHECK(*status == 2);
        CHECK_FALSE(child.standard_error().empty());
        check_output_free_of(child, {cml_password});
    }
}

TEST_CASE("control plane rejects empty key file", "[integration]")
{
    secret_files files;
    const auto empty_file = files.write("empty", "\n");
    const auto admin_token_file = files.write("admin-token", admin_token);
    const auto missing_file = files.write("unused", "") + ".missing";

    child_process empty(LCM_CONTROL_PLANE_PROGRAM, {"--listen", "127.0.0.1:0", "--api-key-file", empty_file,
                                                    "--admin-token-file", admin_token_file});
    auto status = empty.wait_for_exit(exit_timeout);
    REQUIRE(status);
    CHECK(*status == 2);
    CHECK(empty.standard_error().find("--api-key-file file " + empty_file + " is empty") != std::string::npos);

    child_process missing(LCM_CONTROL_PLANE_PROGRAM, {"--listen", "127.0.0.1:0", "--api-key-file", missing_file,
                                                      "--admin-token-file", admin_token_file});
    status = missing.wait_for_exit(exit_timeout);
    REQUIRE(status);
    CHECK(*status == 2);
    CHECK(missing.standard_error().find("cannot read --api-key-file file " + missing_file) != std::string::npos);

    const auto api_key_file = files.write("api-key", api_key);
    child_process absent(LCM_CONTROL_PLANE_PROGRAM, {"--listen", "127.0.0.1:0", "--api-key-file", api_key_file});
    status = absent.wait_for_exit(exit_timeout);
    REQUIRE(status);
    CHECK(*status == 2);
    CHECK(absent.standard_error().find("missing --admin-token-file") != std::string::npos);
    check_output_free_of(absent, {api_key});
}

namespace {

/// The files and flags of one lcm-control-plane on a database.
struct control_plane_files {
    secret_files files;
    std::string api_key_file = files.write("api-key", api_key + "\n");
    std::string admin_token_file = files.write("admin-token", admin_token + "\n");

    std::vector<std::string> flags() const
    {
        return {"--listen", "127.0.0.1:0", "--api-key-file", api_key_file, "--admin-token-file", admin_token_file};
    }
};

/// Adds worker `id` through the admin API and returns the response status.
http::status add_worker(unsigned short port, const std::string& id)
{
    asio::io_context context;
    const auto body = R"({"id": ")" + id + R"(", "name": "lab", "cml_url": "https://127.0.0.1:9443"})";
    auto request = make_admin_request(http::verb::post, "/api/workers", body);
    auto response = testing::run_with_timeout(context, send(port, std::move(request)));
    return response.result();
}

/// Reads worker `id` through the admin API and returns the response status.
http::status get_worker(unsigned short port, const std::string& id)
{
    asio::io_context context;
    auto request = make_admin_request(http::verb::get, "/api/workers/" + id);
    auto response = testing::run_with_timeout(context, send(port, std::move(request)));
    return response.result();
}

} // namespace

TEST_CASE("control plane keeps workers in sqlite", "[integration]")
{
    control_plane_files setup;
    const auto path = setup.files.path("workers.db");
    // The database comes from the environment variable, the rest from flags.
    const std::vector<std::string> environment = {"LCM_CONTROL_PLANE_DB=sqlite:" + path};

    {
        child_process first(LCM_CONTROL_PLANE_PROGRAM, setup.flags(), environment);
        const auto port = read_port(first);
        CHECK(add_worker(port, "w1") == http::status::created);
        stop_cleanly(first);
        CHECK(first.standard_error().find("storage=sqlite:" + path) != std::string::npos);
    }
    CHECK(std::filesystem::exists(path));

    child_process second(LCM_CONTROL_PLANE_PROGRAM, setup.flags(), environment);
    const auto port = read_port(second);
    CHECK(get_worker(port, "w1") == http::status::ok);
    CHECK(add_worker(port, "w1") == http::status::conflict);
    stop_cleanly(second);
}

TEST_CASE("control plane memory store starts empty", "[integration]")
{
    control_plane_files setup;
    auto flags = setup.flags();
    flags.insert(flags.end(), {"--db", "memory"});

    for (int run = 0; run < 2; ++run) {
        INFO("run " << run);
        child_process child(LCM_CONTROL_PLANE_PROGRAM, flags);
        const auto port = read_port(child);
        CHECK(add_worker(port, "w1") == http::status::created);
        stop_cleanly(child);
        CHECK(child.standard_error().find("storage=memory") != std::string::npos);
    }
}

TEST_CASE("control plane rejects bad db values", "[integration]")
{
    control_plane_files setup;
    const std::string password = "db-Passw0rd-77c1";
    struct bad_value {
        std::vector<std::string> flags;
        std::string message;
    };
    const std::vector<bad_value> cases = {
        {{"--db", "sqlite:"}, "the file path is missing"},
        {{"--db", "mysql://lcm:" + password + "@127.0.0.1/lcm"}, "invalid --db value of kind 'mysql'"},
        {{"--db", "host=127.0.0.1 password=" + password}, "invalid --db value;"},
        {{"--db", ""}, "invalid --db value;"},
        {{"--db", "memory", "--db-schema", "lcm"}, "--db-schema applies to --db postgres:CONNINFO only"},
        {{"--db", "sqlite:" + setup.files.path("x.db"), "--db-schema", "lcm"}, "but --db is sqlite:"},
        // The length is checked before any connection, so no server is needed.
        {{"--db", "postgres:host=127.0.0.1 port=1", "--db-schema", std::string(60, 's')},
         "--db-schema is 60 bytes long; the maximum is 59"},
    };
    for (const auto& [more_flags, message] : cases) {
        auto flags = setup.flags();
        flags.insert(flags.end(), more_flags.begin(), more_flags.end());
        INFO("flags: " << more_flags[1] << (more_flags.size() > 2 ? " " + more_flags.back() : std::string()));
        child_process child(LCM_CONTROL_PLANE_PROGRAM, flags);
        const auto status = child.wait_for_exit(exit_timeout);
        REQUIRE(status);
        CHECK(*status == 2);
        INFO("stderr: " << child.standard_error());
        CHECK(child.standard_error().find(message) != std::string::npos);
        check_output_free_of(child, {password});
    }
}

TEST_CASE("control plane hides the db password", "[integration]")
{
    control_plane_files setup;
    const std::string password = "db-Passw0rd-3e8f";
    // Nothing listens on port 1 of 127.0.0.1. The second URL is one that libpq cannot parse,
    // and libpq's own message about it would quote the password.
    const std::vector<std::string> values = {
        "postgres:postgresql://lcm:" + password + "@127.0.0.1:1/lcm",
        "postgresql://lcm:" + password + "@[::1",
        "postgres:host=127.0.0.1 port=1 user=lcm password=" + password + " dbname=lcm",
    };
    for (const auto& value : values) {
        INFO("--db " << value);
        auto flags = setup.flags();
        flags.insert(flags.end(), {"--db", value, "--log-level", "trace"});
        child_process child(LCM_CONTROL_PLANE_PROGRAM, flags);
        const auto status = child.wait_for_exit(exit_timeout);
        REQUIRE(status);
        CHECK(*status == 1);
        INFO("stderr: " << child.standard_error());
        CHECK(child.standard_error().find("opening the PostgreSQL database failed") != std::string::npos);
        check_output_free_of(child, {password});
    }
}

TEST_CASE("control plane serves api on postgres", "[integration][postgres]")
{
    if (!postgres_available()) {
        return;
    }
    const auto url = postgres_test_url();
    const auto password = postgres_test_password();
    control_plane_files setup;
    // Tables go to the test database's default schema, which other runs may share, so the
    // worker id is new for every run.
    const auto id = "w-" + std::to_string(::getpid()) + "-" +
                    std::to_string(std::chrono::steady_clock::now().time_since_epoch().count());
    auto flags = setup.flags();
    flags.insert(flags.end(), {"--db", "postgres:" + url});

    {
        child_process first(LCM_CONTROL_PLANE_PROGRAM, flags);
        const auto port = read_port(first);
        CHECK(add_worker(port, id) == http::status::created);
        stop_cleanly(first);
        CHECK(first.standard_error().find("storage=postgres") != std::string::npos);
        check_output_free_of(first, {password});
    }

    // A second process on the same database reads the worker, so the state is in PostgreSQL.
    child_process second(LCM_CONTROL_PLANE_PROGRAM, flags);
    const auto port = read_port(second);
    CHECK(get_worker(port, id) == http::status::ok);
    stop_cleanly(second);
    check_output_free_of(second, {password, api_key, admin_token});
}

#endif
