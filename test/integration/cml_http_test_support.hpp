// Helpers of the CML HTTP client tests: the fake CML served on 127.0.0.1, a client of it,
// and a server that accepts connections and never responds.
#pragma once

#include "http_test_support.hpp"

#include <lcm/testing/fake_cml.hpp>
#include <lcm/testing/fake_cml_server.hpp>
#include <lcm/transport/cml_http_client.hpp>

#include <boost/asio/ip/tcp.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <list>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::test {

// Distinct values, so a test can search every captured log line for them. Bearer tokens of
// the fake all start with the JWT header `eyJ`.
inline const std::string cml_username = "admin";
inline const std::string cml_password = "cml-Passw0rd-4d2a91";
inline const std::string rejected_license_token = "REJECT-token-3b9e55aa";
inline constexpr std::string_view bearer_prefix = "eyJ";

/// Fake CML options with the test user, a user without admin rights, and tokens that start
/// with `REJECT` rejected by the licensing service.
inline testing::fake_cml_options test_cml_options()
{
    testing::fake_cml_options options;
    options.users = {{cml_username, secret(cml_password), true}, {"viewer", secret(cml_password), false}};
    options.token_rejected = [](const secret& token) { return token.reveal().starts_with("REJECT"); };
    return options;
}

inline transport::cml_http_client_options test_client_options()
{
    transport::cml_http_client_options options;
    options.credentials = cml_credentials{cml_username, secret(cml_password)};
    options.connect_timeout = std::chrono::seconds(5);
    options.request_timeout = std::chrono::seconds(5);
    options.total_timeout = std::chrono::seconds(10);
    return options;
}

/// Checks that no captured log line contains the CML password, a bearer token or a license token.
inline void check_no_secrets_logged(const log_capture& logs)
{
    for (const auto& line : logs.lines()) {
        INFO(line);
        CHECK(line.find(cml_password) == std::string::npos);
        CHECK(line.find(bearer_prefix) == std::string::npos);
        CHECK(line.find(license_token) == std::string::npos);
        CHECK(line.find(rejected_license_token) == std::string::npos);
    }
}

/// A fake CML served over HTTP (or HTTPS with `server_options.tls_context`) on 127.0.0.1,
/// and a CML HTTP client of it.
struct served_fake_cml {
    explicit served_fake_cml(testing::fake_cml_options cml_options = test_cml_options(),
                             transport::http_server_options server_options = {},
                             transport::cml_http_client_options client_options = test_client_options())
        : tls(server_options.tls_context != nullptr),
          cml(std::move(cml_options)),
          api(cml, logs.make_logger()),
          server(context, std::move(server_options), api.handler(), logs.make_logger()),
          client(context.get_executor(), std::move(client_options), logs.make_logger())
    {
    }

    cml_endpoint endpoint(std::string_view name) const
    {
        return cml_endpoint{testing::fake_cml_base_url(server_endpoint(), tls, name)};
    }

    boost::asio::ip::tcp::endpoint server_endpoint() const
    {
        return {boost::asio::ip::make_address("127.0.0.1"), server_port()};
    }

    unsigned short server_port() const { return server.port(); }

    const bool tls;
    asio::io_context context;
    log_capture logs;
    testing::fake_cml cml;
    testing::fake_cml_api api;
    running_server server;
    transport::cml_http_client client;
};

/// Accepts connections on 127.0.0.1 and keeps them open without reading or answering, so
/// a client's TLS handshake or request never completes.
class silent_server {
public:
    explicit silent_server(asio::io_context& context)
        : acceptor_(context, asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), 0))
    {
    }

    unsigned short port() const { return acceptor_.local_endpoint().port(); }

    /// Accepts until `stop()`.
    asio::awaitable<void> run()
    {
        for (;;) {
            auto [error, socket] = co_await acceptor_.async_accept(asio::as_tuple(asio::use_awaitable));
            if (error) {
                co_return;
            }
            sockets_.push_back(std::move(socket));
        }
    }

    void stop()
    {
        boost::system::error_code ignored;
        acceptor_.close(ignored);
        sockets_.clear();
    }

    std::size_t accepted() const noexcept { return sockets_.size(); }

private:
    asio::ip::tcp::acceptor acceptor_;
    std::list<asio::ip::tcp::socket> sockets_;
};

} // namespace lcm::test
