// The CML HTTP client against the fake CML served over HTTPS with a throwaway test CA:
// verification with and without the CA, insecure mode and host name mismatch.
#include "cml_http_test_support.hpp"
#include "tls_test_support.hpp"

#include <catch2/catch.hpp>

#include <string>

using namespace lcm;
using namespace lcm::test;

namespace {

transport::http_server_options tls_server_options(const std::string& certificate, const std::string& key)
{
    transport::http_server_options options;
    options.tls_context = make_server_tls_context(certificate, key);
    return options;
}

transport::http_server_options valid_tls_server_options()
{
    const auto& certificates = get_test_certificates();
    return tls_server_options(certificates.server_certificate, certificates.server_key);
}

transport::cml_http_client_options client_trusting_test_ca()
{
    auto options = test_client_options();
    options.ca_file = get_test_certificates().ca_file;
    return options;
}

} // namespace

TEST_CASE("tls client verifies test CA", "[integration]")
{
    served_fake_cml f(test_cml_options(), valid_tls_server_options(), client_trusting_test_ca());
    const auto endpoint = f.endpoint("lab-1");
    REQUIRE(endpoint.base_url.starts_with("https://127.0.0.1:"));

    auto body = [&]() -> asio::awaitable<void> {
        auto secret_token = secret(license_token);
        auto registered = co_await f.client.register_license(endpoint, secret_token, false);
        REQUIRE(registered);
        auto status = co_await f.client.get_licensing_status(endpoint);
        REQUIRE(status);
        CHECK(status.value().registration_status == cml_registration_status::completed);
        // Keep-alive works over TLS too: one handshake for the login and both calls.
        CHECK(f.server.server().accepted_connections() == 1);
    };
    run_served(f.context, f.server, body());
    CHECK(f.logs.lines_with("verification is off").empty());
    check_no_secrets_logged(f.logs);
}

TEST_CASE("tls client verifies localhost name", "[integration]")
{
    served_fake_cml f(test_cml_options(), valid_tls_server_options(), client_trusting_test_ca());
    // A host name goes through the resolver, sends SNI and is checked against the DNS name.
    const cml_endpoint endpoint{"https://localhost:" + std::to_string(f.server_port()) + "/instances/lab-1"};

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        CHECK(login);
    };
    run_served(f.context, f.server, body());
}

TEST_CASE("tls client rejects unknown CA", "[integration]")
{
    // Without the test CA the client uses the system's store, which does not contain it.
    served_fake_cml f(test_cml_options(), valid_tls_server_options(), test_client_options());
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        CHECK(login.error() == errc::unavailable);
        auto status = co_await f.client.get_licensing_status(endpoint);
        CHECK(status.error() == errc::unavailable);
    };
    run_served(f.context, f.server, body());
    const auto failures = f.logs.lines_with("TLS handshake with CML failed");
    REQUIRE(failures.size() == 2);
    CHECK(failures.front().find("certificate verify failed") != std::string::npos);
    CHECK(f.cml.instance("lab-1").counters().received_calls(cml_call::authenticate) == 0);
    check_no_secrets_logged(f.logs);
}

TEST_CASE("tls client insecure mode warns once", "[integration]")
{
    auto options = test_client_options();
    options.insecure_skip_tls_verify = true;
    served_fake_cml f(test_cml_options(), valid_tls_server_options(), options);
    const auto first = f.endpoint("lab-1");
    const auto second = f.endpoint("lab-2");

    auto body = [&]() -> asio::awaitable<void> {
        auto one = co_await f.client.get_licensing_status(first);
        CHECK(one);
        // Without reuse every call opens a connection, and still the warning comes once.
        f.client.close_idle_connections();
        auto two = co_await f.client.get_licensing_status(second);
        CHECK(two);
        CHECK(f.server.server().accepted_connections() == 2);
    };
    run_served(f.context, f.server, body());
    const auto warnings = f.logs.lines_with("TLS certificate verification is off");
    REQUIRE(warnings.size() == 1);
    CHECK(warnings.front().find("host=https://127.0.0.1:") != std::string::npos);
    check_no_secrets_logged(f.logs);
}

TEST_CASE("tls client rejects host name mismatch", "[integration]")
{
    const auto& certificates = get_test_certificates();
    auto server_options = tls_server_options(certificates.wrong_name_certificate, certificates.wrong_name_key);
    served_fake_cml f(test_cml_options(), server_options, client_trusting_test_ca());
    const auto endpoint = f.endpoint("lab-1");

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        CHECK(login.error() == errc::unavailable);
    };
    run_served(f.context, f.server, body());
    const auto failures = f.logs.lines_with("TLS handshake with CML failed");
    REQUIRE(failures.size() == 1);
    CHECK(failures.front().find("certificate verify failed") != std::string::npos);
}

TEST_CASE("tls server drops plain HTTP client", "[integration]")
{
    served_fake_cml f(test_cml_options(), valid_tls_server_options(), test_client_options());
    const cml_endpoint endpoint{"http://127.0.0.1:" + std::to_string(f.server_port()) + "/instances/lab-1"};

    auto body = [&]() -> asio::awaitable<void> {
        auto login = co_await f.client.authenticate(endpoint);
        CHECK_FALSE(login);
    };
    run_served(f.context, f.server, body());
    CHECK(f.logs.lines_with("TLS handshake failed").size() == 1);
}
