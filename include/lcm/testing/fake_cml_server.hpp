// The routes that serve the in-process fake CML over HTTP(S): CML's authentication and
// licensing routes for any number of instances, plus admin routes that read counters and
// set faults.
#pragma once

#include <lcm/controller/cml_client.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/testing/fake_cml.hpp>
#include <lcm/transport/cml_json.hpp>
#include <lcm/transport/http_message.hpp>
#include <lcm/transport/http_server.hpp>
#include <lcm/transport/router.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json/object.hpp>
#include <boost/json/parse.hpp>

#include <chrono>
#include <cstdint>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lcm::testing {

/// The routes that serve a `fake_cml` through an `http_server`, over HTTP/1.1 or HTTPS.
///
/// Instance `<name>` has the base URL `<scheme>://<address>:<port>/instances/<name>` (see
/// `fake_cml_base_url`) and is created on its first request. Its routes follow CML 2.9:
///
/// - `POST <base>/api/v0/authenticate` with `{"username", "password"}` returns the bearer
///   token as a JSON string, or 403.
/// - `GET <base>/api/v0/licensing` returns the `LicensingStatus`.
/// - `POST <base>/api/v0/licensing/registration` with `{"token", "reregister"}` returns 204,
///   400 or 409.
/// - `DELETE <base>/api/v0/licensing/deregistration` returns 204, 202, 400 without a body, or 409.
///
/// Errors have CML's body `{"code", "description"}`. Each request first waits the instance's
/// injected latency. A dropped request (`drop_before_apply_rate`, `drop_after_apply_rate`)
/// closes the connection without a response.
///
/// Admin routes for tests, without authentication, so serve them on loopback only:
///
/// - `GET /_fake/counters`: the sum over all instances and the number of instances.
/// - `GET /_fake/instances/<name>/counters`: one instance's counters.
/// - `PUT /_fake/faults` and `PUT /_fake/instances/<name>/faults` with `{"latency_ms",
///   "error_rate", "conflict_rate", "drop_before_apply_rate", "drop_after_apply_rate",
///   "seed"}`, each optional and 0 when missing: replace the faults of all instances or one.
///
/// Counters are `{"received": {"authenticate", "get_licensing_status", "register_license",
/// "deregister_license"}, "accepted_registrations", "deregistrations"}`.
///
/// Thread safety: `handler()` may serve several servers and threads at once; the fake is
/// thread-safe. The `fake_cml` and this object must outlive every server that uses the
/// handler. Logging: every fault change. Bodies, passwords and tokens are never logged.
class fake_cml_api {
public:
    explicit fake_cml_api(fake_cml& cml, logger log = {}) : cml_(cml), log_(std::move(log)) { add_routes(); }

    fake_cml_api(const fake_cml_api&) = delete;
    fake_cml_api& operator=(const fake_cml_api&) = delete;

    /// Returns the handler to give to `http_server`.
    transport::request_handler handler()
    {
        return [this](transport::http_request request) { return router_.dispatch(std::move(request)); };
    }

    /// Returns every route, for documentation checks.
    std::vector<transport::route_info> routes() const { return router_.routes(); }

private:
    using request_context = transport::request_context;
    using http_response = transport::http_response;
    using route_handler = transport::router::handler;

    void add_routes()
    {
        using transport::http::verb;
        router_.add(verb::post, "/instances/{instance}/api/v0/authenticate",
                    [this](request_context& c) { return authenticate(c); });
        router_.add(verb::get, "/instances/{instance}/api/v0/licensing",
                    [this](request_context& c) { return get_licensing_status(c); });
        router_.add(verb::post, "/instances/{instance}/api/v0/licensing/registration",
                    [this](request_context& c) { return register_license(c); });
        router_.add(verb::delete_, "/instances/{instance}/api/v0/licensing/deregistration",
                    [this](request_context& c) { return deregister_license(c); });

        router_.add(verb::get, "/_fake/counters", [this](request_context& c) { return total_counters(c); });
        router_.add(verb::get, "/_fake/instances/{instance}/counters",
                    [this](request_context& c) { return instance_counters(c); });
        router_.add(verb::put, "/_fake/faults", [this](request_context& c) { return set_faults(c); });
        router_.add(verb::put, "/_fake/instances/{instance}/faults",
                    [this](request_context& c) { return set_faults(c); });
    }

    fake_cml_instance& instance_of(const request_context& context)
    {
        return cml_.instance(context.path_parameter("instance"));
    }

    /// Returns the token of `Authorization: Bearer <token>`, or an empty view.
    static std::string_view bearer_of(const transport::http_request& request)
    {
        static constexpr std::string_view scheme = "Bearer ";
        const auto it = request.find(transport::http::field::authorization);
        if (it == request.end()) {
            return {};
        }
        const auto value = std::string_view(it->value().data(), it->value().size());
        return value.substr(0, scheme.size()) == scheme ? value.substr(scheme.size()) : std::string_view{};
    }

    /// Waits the instance's injected latency. Closing the connection cancels the wait.
    static boost::asio::awaitable<void> wait_latency(const fake_cml_instance& instance)
    {
        const auto latency = instance.latency();
        if (latency.count() <= 0) {
            co_return;
        }
        boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, latency);
        co_await timer.async_wait(boost::asio::use_awaitable);
    }

    static http_response cml_error(int status, std::string_view description)
    {
        http_response response{static_cast<transport::http::status>(status), 11};
        response.set(transport::http::field::content_type, transport::json_content_type);
        response.body() = transport::encode_error_body(transport::cml_error_body{status, std::string(description)});
        return response;
    }

    /// Converts a reply of the fake core; `encode` serializes the body of a 2xx reply.
    template <class Body, class Encode>
    static http_response to_response(const fake_cml_reply<Body>& reply, Encode encode)
    {
        if (reply.delivery != fake_cml_delivery::delivered) {
            throw transport::connection_dropped();
        }
        if (reply.error) {
            return cml_error(reply.status, reply.error->description);
        }
        http_response response{static_cast<transport::http::status>(reply.status), 11};
        if (reply.status >= 200 && reply.status < 300 && reply.status != 204) {
            response.set(transport::http::field::content_type, transport::json_content_type);
            response.body() = encode(reply.body);
        }
        return response;
    }

    static std::string no_body(const fake_cml_no_body&) { return {}; }

    // -----------------------------------------------------------------------------------
    // CML routes

    boost::asio::awaitable<http_response> authenticate(request_context& context)
    {
        auto& instance = instance_of(context);
        co_await wait_latency(instance);
        auto credentials = transport::decode_authenticate_request(context.request.body());
        if (!credentials) {
            co_return cml_error(400, "Invalid input: expected {\"username\": 1 to 32 characters, \"password\"}");
        }
        auto reply = instance.authenticate(credentials.value().username, credentials.value().password.reveal());
        co_return to_response(reply, [](const secret& bearer) { return transport::encode_authenticate_response(bearer); });
    }

    boost::asio::awaitable<http_response> get_licensing_status(request_context& context)
    {
        auto& instance = instance_of(context);
        co_await wait_latency(instance);
        auto reply = instance.get_licensing_status(bearer_of(context.request));
        co_return to_response(reply, [&instance](const cml_licensing_status& status) {
            return transport::encode_licensing_status(status, instance.name());
        });
    }

    boost::asio::awaitable<http_response> register_license(request_context& context)
    {
        auto& instance = instance_of(context);
        co_await wait_latency(instance);
        auto request = transport::decode_registration_request(context.request.body());
        if (!request) {
            co_return cml_error(400, "Invalid input: expected {\"token\": string, \"reregister\": boolean}");
        }
        auto reply =
            instance.register_license(bearer_of(context.request), request.value().token, request.value().reregister);
        co_return to_response(reply, no_body);
    }

    boost::asio::awaitable<http_response> deregister_license(request_context& context)
    {
        auto& instance = instance_of(context);
        co_await wait_latency(instance);
        auto reply = instance.deregister_license(bearer_of(context.request));
        co_return to_response(reply, no_body);
    }

    // -----------------------------------------------------------------------------------
    // Admin routes

    static boost::json::object counters_to_json(const fake_cml_counters& counters)
    {
        boost::json::object received;
        received["authenticate"] = counters.received_calls(cml_call::authenticate);
        received["get_licensing_status"] = counters.received_calls(cml_call::get_licensing_status);
        received["register_license"] = counters.received_calls(cml_call::register_license);
        received["deregister_license"] = counters.received_calls(cml_call::deregister_license);
        boost::json::object body;
        body["received"] = std::move(received);
        body["accepted_registrations"] = counters.accepted_registrations;
        body["deregistrations"] = counters.deregistrations;
        return body;
    }

    boost::asio::awaitable<http_response> total_counters(request_context&)
    {
        auto body = counters_to_json(cml_.total_counters());
        body["instances"] = cml_.instance_count();
        co_return transport::make_json_response(transport::http::status::ok, body);
    }

    boost::asio::awaitable<http_response> instance_counters(request_context& context)
    {
        auto& instance = instance_of(context);
        auto body = counters_to_json(instance.counters());
        body["instance"] = instance.name();
        co_return transport::make_json_response(transport::http::status::ok, body);
    }

    /// Reads a fault setting; a missing key is 0. Fails unless the value is a number in
    /// `[0, max]`.
    static result<double> fault_value(const boost::json::object& body, std::string_view key, double max)
    {
        const auto* value = body.if_contains(key);
        if (value == nullptr) {
            return 0.0;
        }
        boost::system::error_code error;
        const auto number = value->to_number<double>(error);
        if (error || number < 0 || number > max) {
            return make_error_code(errc::invalid_argument);
        }
        return number;
    }

    static result<fake_cml_faults> decode_faults(std::string_view text)
    {
        boost::system::error_code error;
        auto value = boost::json::parse(text, error);
        if (error || !value.is_object()) {
            return make_error_code(errc::invalid_argument);
        }
        const auto& body = value.get_object();
        fake_cml_faults faults;
        BOOST_OUTCOME_TRY(auto latency_ms, fault_value(body, "latency_ms", 3'600'000.0));
        BOOST_OUTCOME_TRY(faults.server_error_rate, fault_value(body, "error_rate", 1.0));
        BOOST_OUTCOME_TRY(faults.conflict_rate, fault_value(body, "conflict_rate", 1.0));
        BOOST_OUTCOME_TRY(faults.drop_before_apply_rate, fault_value(body, "drop_before_apply_rate", 1.0));
        BOOST_OUTCOME_TRY(faults.drop_after_apply_rate, fault_value(body, "drop_after_apply_rate", 1.0));
        BOOST_OUTCOME_TRY(auto seed, fault_value(body, "seed", 9.0e15));
        faults.latency = std::chrono::duration_cast<std::chrono::steady_clock::duration>(
            std::chrono::duration<double, std::milli>(latency_ms));
        faults.seed = seed > 0 ? static_cast<std::uint64_t>(seed) : 1;
        return faults;
    }

    boost::asio::awaitable<http_response> set_faults(request_context& context)
    {
        auto faults = decode_faults(context.request.body());
        if (!faults) {
            co_return transport::make_error_response(
                errc::invalid_argument, "expected a JSON object of fault rates in [0, 1] and latency_ms");
        }
        const auto name = context.path_parameter("instance");
        if (name.empty()) {
            cml_.set_faults(faults.value());
        }
        else {
            cml_.instance(name).set_faults(faults.value());
        }
        log_.info("fake CML faults changed", {{"instance", name.empty() ? std::string("*") : std::string(name)},
                                              {"error_rate", std::to_string(faults.value().server_error_rate)},
                                              {"conflict_rate", std::to_string(faults.value().conflict_rate)},
                                              {"drop_before_apply_rate",
                                               std::to_string(faults.value().drop_before_apply_rate)},
                                              {"drop_after_apply_rate", std::to_string(faults.value().drop_after_apply_rate)}});
        co_return http_response{transport::http::status::no_content, 11};
    }

    fake_cml& cml_;
    const logger log_;
    transport::router router_;
};

/// Returns the base URL of instance `name` on a server listening at `endpoint`, such as
/// `http://127.0.0.1:8080/instances/lab-1`.
inline std::string fake_cml_base_url(const boost::asio::ip::tcp::endpoint& endpoint, bool tls, std::string_view name)
{
    const auto address = endpoint.address();
    const auto host = address.is_v6() ? "[" + address.to_string() + "]" : address.to_string();
    return std::string(tls ? "https://" : "http://") + host + ":" + std::to_string(endpoint.port()) + "/instances/" +
           std::string(name);
}

} // namespace lcm::testing
