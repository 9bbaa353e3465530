// The generic HTTP server over real sockets: time and size limits, the connection limit,
// handler failures and the graceful stop.
#include "http_test_support.hpp"

#include <boost/asio/detached.hpp>
#include <boost/asio/write.hpp>

#include <catch2/catch.hpp>

#include <chrono>
#include <optional>
#include <string>

using namespace lcm;
using namespace lcm::test;
using http::verb;

namespace {

transport::request_handler ok_handler()
{
    return [](http_request) -> asio::awaitable<http_response> {
        boost::json::object body{{"ok", true}};
        co_return transport::make_json_response(http::status::ok, body);
    };
}

asio::awaitable<void> write_text(boost::beast::tcp_stream& stream, std::string text)
{
    co_await asio::async_write(stream, asio::buffer(text), asio::use_awaitable);
}

} // namespace

TEST_CASE("server cuts off slow client", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    transport::http_server_options options;
    options.request_timeout = std::chrono::milliseconds(200);
    running_server server(context, options, ok_handler(), logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
            auto stream = co_await connect_to(server.port());
            co_await write_text(stream, "POST /x HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nabc");
            const auto started = std::chrono::steady_clock::now();
            const auto closed = co_await read_until_closed(stream);
            const auto elapsed = std::chrono::steady_clock::now() - started;

            CHECK(closed != asio::error::timed_out);
            CHECK(elapsed >= std::chrono::milliseconds(150));
            CHECK(elapsed < std::chrono::seconds(3));
            co_await server.stop();
        }(),
        std::chrono::seconds(10));
    CHECK(!logs.lines_with("request timed out").empty());
}

TEST_CASE("server closes idle connection", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    transport::http_server_options options;
    options.idle_timeout = std::chrono::milliseconds(200);
    running_server server(context, options, ok_handler(), logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
            auto stream = co_await connect_to(server.port());
            auto request = make_request(verb::get, "/", credentials::none);
            auto response = co_await exchange(stream, std::move(request));
            CHECK(response.result_int() == 200);
            CHECK(response.keep_alive());

            const auto closed = co_await read_until_closed(stream);
            CHECK(closed != asio::error::timed_out);
            co_await server.stop();
        }(),
        std::chrono::seconds(10));
}

TEST_CASE("server enforces connection limit", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    transport::http_server_options options;
    options.max_connections = 2;
    running_server server(context, options, ok_handler(), logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
        // A completed request on each proves that the server counts both connections.
        auto first = co_await connect_to(server.port());
        auto first_request = make_request(verb::get, "/", credentials::none);
        auto first_response = co_await exchange(first, std::move(first_request));
        CHECK(first_response.result_int() == 200);
        auto second = co_await connect_to(server.port());
        auto second_request = make_request(verb::get, "/", credentials::none);
        auto second_response = co_await exchange(second, std::move(second_request));
        CHECK(second_response.result_int() == 200);

        auto third = co_await connect_to(server.port());
        auto third_request = make_request(verb::get, "/", credentials::none);
        auto rejected = co_await exchange(third, std::move(third_request));
        CHECK(rejected.result_int() == 503);
        CHECK(code_of(rejected) == "unavailable");
        CHECK(!rejected.keep_alive());
        auto third_closed = co_await read_until_closed(third);
        CHECK(third_closed != asio::error::timed_out);

        auto again_request = make_request(verb::get, "/", credentials::none);
        auto again = co_await exchange(first, std::move(again_request));
        CHECK(again.result_int() == 200);
        co_await server.stop();
    }());
    CHECK(!logs.lines_with("too many connections").empty());
}

TEST_CASE("server rejects oversized header", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    transport::http_server_options options;
    options.max_header_size = 512;
    running_server server(context, options, ok_handler(), logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
        auto request = make_request(verb::get, "/", credentials::none);
        request.set("X-Padding", std::string(1024, 'p'));
        auto response = co_await send(server.port(), std::move(request));
        CHECK(response.result_int() == 413);
        CHECK(code_of(response) == "payload_too_large");
        co_await server.stop();
    }());
}

TEST_CASE("server rejects malformed request", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    running_server server(context, {}, ok_handler(), logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
        auto stream = co_await connect_to(server.port());
        co_await write_text(stream, "GET / HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n");
        boost::beast::flat_buffer buffer;
        http_response response;
        co_await http::async_read(stream, buffer, response, asio::use_awaitable);
        CHECK(response.result_int() == 400);
        CHECK(code_of(response) == "invalid_argument");
        co_await server.stop();
    }());
}

TEST_CASE("server maps handler exception to 500", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    auto failing = [](http_request) -> asio::awaitable<http_response> {
        throw std::logic_error("handler bug");
        co_return http_response{};
    };
    running_server server(context, {}, failing, logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
        auto request = make_request(verb::get, "/", credentials::none);
        auto response = co_await send(server.port(), std::move(request));
        CHECK(response.result_int() == 500);
        CHECK(code_of(response) == "internal");
        CHECK(response.body().find("handler bug") == std::string::npos);
        co_await server.stop();
    }());
    CHECK(!logs.lines_with("request handler failed").empty());
}

TEST_CASE("server stop finishes in-flight request", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    event entered(context.get_executor());
    event release(context.get_executor());
    auto held = [&](http_request) -> asio::awaitable<http_response> {
        entered.set();
        co_await release.wait();
        boost::json::object body{{"finished", true}};
        co_return transport::make_json_response(http::status::ok, body);
    };
    running_server server(context, {}, held, logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
            const auto port = server.port();
            auto idle = co_await connect_to(port);

            std::optional<http_response> in_flight;
            event answered(co_await asio::this_coro::executor);
            asio::co_spawn(
                co_await asio::this_coro::executor,
                [&]() -> asio::awaitable<void> {
                    auto request = make_request(verb::get, "/slow", credentials::none);
                    in_flight = co_await send(port, std::move(request));
                    answered.set();
                },
                asio::detached);
            co_await entered.wait();

            server.server().stop();
            // The idle connection is closed at once, while the held request goes on.
            auto idle_closed = co_await read_until_closed(idle);
            CHECK(idle_closed != asio::error::timed_out);
            CHECK(!answered.is_set());
            CHECK(!server.stopped());

            release.set();
            co_await answered.wait();
            REQUIRE(in_flight);
            CHECK(in_flight->result_int() == 200);
            CHECK(!in_flight->keep_alive());
            co_await server.stop();

            boost::beast::tcp_stream refused(co_await asio::this_coro::executor);
            auto [error] = co_await refused.async_connect(
                asio::ip::tcp::endpoint(asio::ip::make_address("127.0.0.1"), port), asio::as_tuple(asio::use_awaitable));
            CHECK(error);
        }(),
        std::chrono::seconds(10));
}

TEST_CASE("server stop closes stuck requests", "[integration]")
{
    asio::io_context context;
    log_capture logs;
    event entered(context.get_executor());
    event never(context.get_executor());
    auto stuck = [&](http_request) -> asio::awaitable<http_response> {
        entered.set();
        co_await never.wait();
        co_return http_response{};
    };
    transport::http_server_options options;
    options.shutdown_timeout = std::chrono::milliseconds(100);
    running_server server(context, options, stuck, logs.make_logger());

    run_served(context, server, [&]() -> asio::awaitable<void> {
            auto stream = co_await connect_to(server.port());
            auto request = make_request(verb::get, "/stuck", credentials::none);
            request.set(http::field::host, "127.0.0.1");
            request.prepare_payload();
            co_await http::async_write(stream, request, asio::use_awaitable);
            co_await entered.wait();

            co_await server.stop();
            auto closed = co_await read_until_closed(stream);
            CHECK(closed != asio::error::timed_out);
        }(),
        std::chrono::seconds(10));
    CHECK(!logs.lines_with("shutdown timeout").empty());
}
