// The control plane's HTTP API: the public routes for operators, the internal routes for
// worker-controllers, health and metrics.
#pragma once

#include <lcm/application/control_plane.hpp>
#include <lcm/controller/control_plane_client.hpp>
#include <lcm/domain/json.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/transport/detail/wire.hpp>
#include <lcm/transport/http_message.hpp>
#include <lcm/transport/http_server.hpp>
#include <lcm/transport/router.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/json/parse.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace lcm::transport {

/// Credentials, page sizes and hooks of `control_plane_api`.
struct control_plane_api_options {
    /// The bearer token of the public routes (`Authorization: Bearer ...`). When empty,
    /// every public request is rejected with 401.
    secret admin_token;
    /// The key of the internal routes (`X-API-Key`). When empty, every internal request is
    /// rejected with 401.
    secret api_key;
    /// Page size of `GET /api/workers` and `GET /api/internal/license-tasks` without `limit`.
    std::size_t default_page_size = 50;
    /// Maximum accepted `limit`.
    std::size_t max_page_size = 500;
    /// Wait of `GET /api/internal/changes?after=N` without `timeout_ms`.
    std::chrono::milliseconds default_change_wait{25'000};
    /// Maximum accepted `timeout_ms` of the change feed; keep it below the clients' request timeout.
    std::chrono::milliseconds max_change_wait{60'000};
    /// Added to the repository's change sequence in the change feed. Empty: a random value
    /// from 2^32 to 2^52 per `control_plane_api` object. Its repository counts from 0 again
    /// after a restart, but the sequences the feed returns then differ from the one that a
    /// waiting controller kept, so that controller does not wait for a change that has
    /// already happened.
    std::optional<std::uint64_t> change_sequence_base;
    /// Returns the Prometheus text exposition that `GET /metrics` serves. Without it the route
    /// returns an empty exposition.
    std::function<std::string()> metrics_text;
    /// Called after every request with the matched route pattern, status and duration, for
    /// request metrics.
    router::observer on_request;
};

/// The routes of the control plane over HTTP, bound to a `control_plane`.
///
/// Public routes (`/api/workers...`) need `Authorization: Bearer <admin token>`; internal
/// routes (`/api/internal/...`) need `X-API-Key`. Both are compared in constant time for
/// equal lengths. `/health` and `/metrics` are open. Errors are `{"code", "message"}` with
/// the status `lcm::http_status` gives. Responses of the public routes redact every token;
/// internal task responses carry the pending token, which a controller must send to CML.
///
/// Thread safety and cancellation: those of the control plane; build and hand out the
/// handler before serving. The object must outlive every server that uses its handler.
/// A server that stops should call `end_change_waits()` through `http_server_options::on_stop`,
/// because otherwise a held change-feed request keeps its connection open until the
/// server's `shutdown_timeout`.
template <application::worker_repository Repository, application::event_sink Sink>
class control_plane_api {
public:
    control_plane_api(application::control_plane<Repository, Sink>& plane, control_plane_api_options options,
                      logger log = {})
        : plane_(plane), options_(std::move(options)), log_(std::move(log)),
          sequence_base_(options_.change_sequence_base ? *options_.change_sequence_base : random_sequence_base())
    {
        add_routes();
        router_.set_observer(options_.on_request);
    }

    control_plane_api(const control_plane_api&) = delete;
    control_plane_api& operator=(const control_plane_api&) = delete;

    /// Returns the handler to give to `http_server`.
    request_handler handler()
    {
        return [this](http_request request) { return router_.dispatch(std::move(request)); };
    }

    /// Ends the wait of every change-feed request, which then returns the current sequence at
    /// once, as if its `timeout_ms` had elapsed. Later requests do not wait either. Call it
    /// when the servers that use the handler stop. Thread-safe.
    void end_change_waits()
    {
        std::vector<std::shared_ptr<end_channel>> woken;
        {
            std::lock_guard lock(end_mutex_);
            change_waits_ended_ = true;
            woken.swap(end_waiters_);
        }
        for (auto& channel : woken) {
            channel->try_send(boost::system::error_code{});
        }
    }

    /// Returns the value that the change feed adds to the repository's change sequence.
    std::uint64_t change_sequence_base() const noexcept { return sequence_base_; }

    /// Returns every registered route, for documentation checks.
    std::vector<route_info> routes() const { return router_.routes(); }

private:
    enum class access { open, admin, internal };

    using route_handler = std::function<boost::asio::awaitable<http_response>(request_context&)>;
    using end_channel = boost::asio::experimental::concurrent_channel<void(boost::system::error_code)>;

    /// The `initiated_by` values recorded for requests of each route group.
    static constexpr std::string_view public_caller = "api";
    static constexpr std::string_view internal_caller = "worker-controller";

    void add(http::verb method, std::string pattern, access level, route_handler handler)
    {
        router_.add(method, std::move(pattern),
                    [this, level, inner = std::move(handler)](request_context& context) -> boost::asio::awaitable<http_response> {
                        if (!authorized(context.request, level)) {
                            log_.info("request rejected: missing or invalid credentials",
                                      {{"route", std::string(context.route)},
                                       {"scheme", level == access::admin ? "bearer" : "api_key"}});
                            auto response = make_error_response(errc::unauthorized);
                            if (level == access::admin) {
                                response.set(http::field::www_authenticate, "Bearer");
                            }
                            co_return response;
                        }
                        co_return co_await inner(context);
                    });
    }

    void add_routes()
    {
        using http::verb;
        add(verb::get, "/health", access::open, [this](request_context& c) { return health(c); });
        add(verb::get, "/metrics", access::open, [this](request_context& c) { return metrics(c); });

        add(verb::post, "/api/workers", access::admin, [this](request_context& c) { return add_worker(c); });
        add(verb::get, "/api/workers", access::admin, [this](request_context& c) { return list_workers(c); });
        add(verb::get, "/api/workers/{worker_id}", access::admin, [this](request_context& c) { return get_worker(c); });
        add(verb::post, "/api/workers/{worker_id}/license", access::admin,
            [this](request_context& c) { return request_registration(c); });
        add(verb::delete_, "/api/workers/{worker_id}/license", access::admin,
            [this](request_context& c) { return request_deregistration(c); });

        add(verb::get, "/api/internal/license-tasks", access::internal,
            [this](request_context& c) { return list_tasks(c); });
        add(verb::get, "/api/internal/workers/{worker_id}/license-task", access::internal,
            [this](request_context& c) { return get_task(c); });
        add(verb::post, "/api/internal/workers/{worker_id}/license/claim", access::internal,
            [this](request_context& c) { return claim_operation(c); });
        add(verb::post, "/api/internal/workers/{worker_id}/operations/{operation_id}/start", access::internal,
            [this](request_context& c) { return start_operation(c); });
        add(verb::post, "/api/internal/workers/{worker_id}/operations/{operation_id}/complete-registration",
            access::internal, [this](request_context& c) { return complete_registration(c); });
        add(verb::post, "/api/internal/workers/{worker_id}/operations/{operation_id}/complete-deregistration",
            access::internal, [this](request_context& c) { return complete_deregistration(c); });
        add(verb::post, "/api/internal/workers/{worker_id}/operations/{operation_id}/fail", access::internal,
            [this](request_context& c) { return fail_operation(c); });
        add(verb::get, "/api/internal/changes", access::internal, [this](request_context& c) { return changes(c); });
    }

    bool authorized(const http_request& request, access level) const
    {
        if (level == access::open) {
            return true;
        }
        if (level == access::internal) {
            auto key = request.find("X-API-Key");
            return key != request.end() && !options_.api_key.empty() && options_.api_key.equals(key->value());
        }
        auto header = request.find(http::field::authorization);
        if (header == request.end()) {
            return false;
        }
        constexpr std::string_view scheme = "bearer ";
        const std::string_view value = header->value();
        if (value.size() <= scheme.size() || !domain::detail::iequals(value.substr(0, scheme.size()), scheme)) {
            return false;
        }
        return !options_.admin_token.empty() && options_.admin_token.equals(value.substr(scheme.size()));
    }

    // --- request parsing -------------------------------------------------------------

    /// Parses the body, which must be a JSON object. An empty body is an empty object when
    /// `required` is false; a non-empty body must be sent as `application/json`. The result
    /// is a `value`, not an `object`, because `json_reader` keeps a pointer to what it reads.
    static result<boost::json::value> json_body(const request_context& context, bool required)
    {
        const auto& body = context.request.body();
        if (body.empty() && !required) {
            return boost::json::value(boost::json::object{});
        }
        auto type = context.request.find(http::field::content_type);
        if (type == context.request.end() || !is_json(type->value())) {
            return errc::unsupported_media_type;
        }
        boost::system::error_code error;
        auto value = boost::json::parse(body, error);
        if (error || !value.is_object()) {
            return errc::invalid_argument;
        }
        return value;
    }

    static bool is_json(std::string_view content_type)
    {
        auto media = content_type.substr(0, content_type.find(';'));
        while (!media.empty() && (media.back() == ' ' || media.back() == '\t')) {
            media.remove_suffix(1);
        }
        return domain::detail::iequals(media, json_content_type);
    }

    /// Returns the 400 response for a body that `json_body` rejected.
    static http_response body_error(const boost::system::error_code& error)
    {
        if (error == errc::invalid_argument) {
            return make_error_response(error, "request body is not a valid JSON object");
        }
        return make_error_response(error);
    }

    static result<std::uint64_t> parse_unsigned(std::string_view text)
    {
        std::uint64_t value = 0;
        const auto* end = text.data() + text.size();
        auto [position, error] = std::from_chars(text.data(), end, value);
        if (text.empty() || error != std::errc{} || position != end) {
            return errc::invalid_argument;
        }
        return value;
    }

    /// Reads the query parameter `limit`: `default_page_size` when absent, otherwise 1 to `max_page_size`.
    result<std::size_t> page_limit(const request_context& context) const
    {
        auto text = context.query_parameter("limit");
        if (!text) {
            return options_.default_page_size;
        }
        auto value = parse_unsigned(*text);
        if (!value || value.value() == 0 || value.value() > options_.max_page_size) {
            return errc::invalid_argument;
        }
        return static_cast<std::size_t>(value.value());
    }

    static http_response limit_error(std::size_t max)
    {
        return make_error_response(errc::invalid_argument,
                                   "query parameter 'limit' must be an integer from 1 to " + std::to_string(max));
    }

    static http_response field_error(std::string_view field, std::string_view expected)
    {
        return make_error_response(errc::invalid_argument,
                                   "field '" + std::string(field) + "' is missing or not " + std::string(expected));
    }

    static result<std::uint64_t> operation_id_of(const request_context& context)
    {
        return parse_unsigned(context.path_parameter("operation_id"));
    }

    static http_response operation_id_error()
    {
        return make_error_response(errc::invalid_argument, "path parameter 'operation_id' must be an unsigned integer");
    }

    /// Reads the operation id from the path, and the JSON body of a step report with its
    /// optional `fence`. Returns the error response when any is invalid, and nothing otherwise.
    static std::optional<http_response> read_report(const request_context& context, bool body_required,
                                                    domain::operation_key& key, boost::json::value& body)
    {
        auto parsed_id = operation_id_of(context);
        if (!parsed_id) {
            return operation_id_error();
        }
        auto parsed_body = json_body(context, body_required);
        if (!parsed_body) {
            return body_error(parsed_body.error());
        }
        auto fence = detail::decode_fence(parsed_body.value());
        if (!fence) {
            return field_error("fence", "an unsigned integer");
        }
        key = domain::operation_key(parsed_id.value(), fence.value());
        body = std::move(parsed_body).value();
        return std::nullopt;
    }

    /// Builds the error response of a failed command, and logs failures that are not the client's fault.
    http_response command_error(const request_context& context, const boost::system::error_code& error) const
    {
        if (error == errc::cancelled) {
            // The server cancels a request only when it closes the connection while it stops,
            // and it logs that itself.
            log_.debug("request cancelled", {{"route", std::string(context.route)},
                                             {"worker_id", std::string(context.path_parameter("worker_id"))}});
        }
        else if (http_status(error) >= 500) {
            log_.error("request failed", {{"route", std::string(context.route)},
                                          {"worker_id", std::string(context.path_parameter("worker_id"))},
                                          {"error", error.message()}});
        }
        return make_error_response(error);
    }

    // --- open routes -----------------------------------------------------------------

    boost::asio::awaitable<http_response> health(request_context&)
    {
        boost::json::object body{{"status", "ok"}};
        co_return make_json_response(http::status::ok, body);
    }

    boost::asio::awaitable<http_response> metrics(request_context&)
    {
        http_response response{http::status::ok, 11};
        response.set(http::field::content_type, "text/plain; version=0.0.4; charset=utf-8");
        if (options_.metrics_text) {
            response.body() = options_.metrics_text();
        }
        response.prepare_payload();
        co_return response;
    }

    // --- public routes ---------------------------------------------------------------

    boost::asio::awaitable<http_response> add_worker(request_context& context)
    {
        auto body = json_body(context, true);
        if (!body) {
            co_return body_error(body.error());
        }
        domain::detail::json_reader reader(body.value());

        application::add_worker_request request;
        request.id = reader.optional_string("id").value_or("");
        request.name = reader.string("name");
        if (reader.failed()) {
            co_return field_error("name", "a string");
        }
        request.cml_url = reader.string("cml_url");
        if (reader.failed()) {
            co_return field_error("cml_url", "a string");
        }
        if (reader.find("status")) {
            request.status = reader.enumeration("status", domain::parse_worker_status, domain::worker_status::unknown);
            if (reader.failed()) {
                co_return field_error("status", "a worker status such as \"running\"");
            }
        }
        request.initiated_by = std::string(public_caller);

        auto added = co_await plane_.add_worker(std::move(request));
        if (!added) {
            if (added.error() == errc::invalid_argument) {
                co_return make_error_response(added.error(),
                                              "invalid worker: 'id' must be 1 to 64 of [A-Za-z0-9._-], 'name' 1 to "
                                              "128 printable characters, 'cml_url' an http(s) URL without query");
            }
            co_return command_error(context, added.error());
        }
        auto response = make_json_response(http::status::created, domain::to_public_json(added.value()));
        response.set(http::field::location, "/api/workers/" + added.value().id());
        co_return response;
    }

    boost::asio::awaitable<http_response> list_workers(request_context& context)
    {
        auto limit = page_limit(context);
        if (!limit) {
            co_return limit_error(options_.max_page_size);
        }
        const auto after = context.query_parameter("after").value_or("");
        auto page = co_await plane_.repository().list(after, limit.value());
        if (!page) {
            co_return command_error(context, page.error());
        }

        boost::json::array workers;
        for (const auto& worker : page.value()) {
            workers.push_back(domain::to_public_json(worker));
        }
        boost::json::value next = nullptr;
        if (page.value().size() == limit.value()) {
            next = boost::json::string(page.value().back().id());
        }
        boost::json::object body{{"workers", std::move(workers)}, {"next_after", std::move(next)}};
        co_return make_json_response(http::status::ok, body);
    }

    boost::asio::awaitable<http_response> get_worker(request_context& context)
    {
        auto worker = co_await plane_.get_worker(context.path_parameter("worker_id"));
        if (!worker) {
            co_return command_error(context, worker.error());
        }
        co_return make_json_response(http::status::ok, domain::to_public_json(worker.value()));
    }

    boost::asio::awaitable<http_response> request_registration(request_context& context)
    {
        auto body = json_body(context, true);
        if (!body) {
            co_return body_error(body.error());
        }
        const auto& fields = body.value().get_object();
        const auto* token = fields.if_contains("token");
        if (!token || !token->is_string()) {
            co_return field_error("token", "a string");
        }
        bool reregister = false;
        if (const auto* flag = fields.if_contains("reregister"); flag && !flag->is_null()) {
            if (!flag->is_bool()) {
                co_return field_error("reregister", "a boolean");
            }
            reregister = flag->get_bool();
        }

        secret license_token{std::string(token->get_string())};
        std::string worker_id(context.path_parameter("worker_id"));
        std::string caller(public_caller);
        auto accepted = co_await plane_.request_registration(std::move(worker_id), std::move(license_token),
                                                             reregister, std::move(caller));
        co_return accepted_response(context, accepted);
    }

    boost::asio::awaitable<http_response> request_deregistration(request_context& context)
    {
        std::string worker_id(context.path_parameter("worker_id"));
        std::string caller(public_caller);
        auto accepted = co_await plane_.request_deregistration(std::move(worker_id), std::move(caller));
        co_return accepted_response(context, accepted);
    }

    http_response accepted_response(const request_context& context,
                                    const result<application::operation_accepted>& accepted) const
    {
        if (!accepted) {
            if (accepted.error() == errc::invalid_token) {
                return make_error_response(accepted.error(),
                                           "invalid license token: expected 1 to 256 characters of [A-Za-z0-9+/%=-]");
            }
            return command_error(context, accepted.error());
        }
        const auto& operation = accepted.value();
        boost::json::object body{{"worker_id", operation.worker_id},
                                 {"operation_id", operation.operation_id},
                                 {"operation", to_string(operation.operation)},
                                 {"status", "pending"}};
        auto response = make_json_response(http::status::accepted, body);
        response.set(http::field::location, "/api/workers/" + operation.worker_id);
        return response;
    }

    // --- internal routes -------------------------------------------------------------

    boost::asio::awaitable<http_response> list_tasks(request_context& context)
    {
        auto limit = page_limit(context);
        if (!limit) {
            co_return limit_error(options_.max_page_size);
        }
        auto workers = co_await plane_.repository().list_pending(limit.value());
        if (!workers) {
            co_return command_error(context, workers.error());
        }
        boost::json::array tasks;
        for (const auto& worker : workers.value()) {
            if (auto task = controller::task_of(worker)) {
                tasks.push_back(detail::encode_task(*task));
            }
        }
        boost::json::object body{{"tasks", std::move(tasks)}};
        co_return make_json_response(http::status::ok, body);
    }

    boost::asio::awaitable<http_response> get_task(request_context& context)
    {
        auto worker = co_await plane_.get_worker(context.path_parameter("worker_id"));
        if (!worker) {
            co_return command_error(context, worker.error());
        }
        boost::json::value task = nullptr;
        if (auto pending = controller::task_of(worker.value())) {
            task = detail::encode_task(*pending);
        }
        boost::json::object body{{"task", std::move(task)}};
        co_return make_json_response(http::status::ok, body);
    }

    /// The maximum lease a claim may request.
    static constexpr std::chrono::hours max_lease{1};

    /// Claims the worker's pending operation for `holder`, or renews the holder's claim.
    /// Responds with the task, which carries `fence` and `claim_expires_at`, or with 409
    /// `claimed` and the other controller's claim while that claim is unexpired.
    boost::asio::awaitable<http_response> claim_operation(request_context& context)
    {
        auto body = json_body(context, true);
        if (!body) {
            co_return body_error(body.error());
        }
        domain::detail::json_reader reader(body.value());
        auto holder = reader.string("holder");
        if (reader.failed() || holder.empty() || holder.size() > domain::max_claim_holder_length) {
            co_return field_error("holder", "a string of 1 to " + std::to_string(domain::max_claim_holder_length) +
                                                " characters");
        }
        const auto* seconds = body.value().get_object().if_contains("lease_seconds");
        const double lease_seconds = seconds && seconds->is_number() ? seconds->to_number<double>() : 0.0;
        const auto max_seconds = std::chrono::duration<double>(max_lease).count();
        if (!(lease_seconds >= 0.001 && lease_seconds <= max_seconds)) {
            co_return field_error("lease_seconds", "a number from 0.001 to " +
                                                       std::to_string(static_cast<int>(max_seconds)));
        }
        const auto lease = std::chrono::milliseconds(static_cast<std::int64_t>(lease_seconds * 1000.0));

        std::string worker_id(context.path_parameter("worker_id"));
        auto decision = co_await plane_.claim_operation(std::move(worker_id), std::move(holder), lease);
        if (!decision) {
            co_return command_error(context, decision.error());
        }
        const auto claim = controller::claim_of(decision.value());
        if (!claim.task) {
            const auto error = make_error_code(errc::claimed);
            boost::json::object answer{{"code", error_name(error)}, {"message", error.message()}};
            detail::encode_foreign_claim(answer, claim);
            co_return make_json_response(static_cast<http::status>(http_status(error)), answer);
        }
        boost::json::object answer{{"task", detail::encode_task(*claim.task)},
                                   {"claim_remaining_ms", claim.remaining.count()}};
        co_return make_json_response(http::status::ok, answer);
    }

    boost::asio::awaitable<http_response> start_operation(request_context& context)
    {
        domain::operation_key key;
        boost::json::value body;
        if (auto rejected = read_report(context, false, key, body)) {
            co_return std::move(*rejected);
        }
        std::string worker_id(context.path_parameter("worker_id"));
        auto started = co_await plane_.start_operation(std::move(worker_id), key);
        co_return worker_response(context, started);
    }

    boost::asio::awaitable<http_response> complete_registration(request_context& context)
    {
        domain::operation_key key;
        boost::json::value body;
        if (auto rejected = read_report(context, true, key, body)) {
            co_return std::move(*rejected);
        }
        std::string field;
        auto details = detail::decode_details(body, field);
        if (!details) {
            co_return field_error(field, "of the documented type");
        }
        std::string worker_id(context.path_parameter("worker_id"));
        auto completed = co_await plane_.complete_registration(std::move(worker_id), key, std::move(details).value());
        co_return worker_response(context, completed);
    }

    boost::asio::awaitable<http_response> complete_deregistration(request_context& context)
    {
        domain::operation_key key;
        boost::json::value body;
        if (auto rejected = read_report(context, false, key, body)) {
            co_return std::move(*rejected);
        }
        std::optional<std::string> warning;
        if (const auto* text = body.get_object().if_contains("warning"); text && !text->is_null()) {
            if (!text->is_string()) {
                co_return field_error("warning", "a string or null");
            }
            warning = std::string(text->get_string());
        }
        std::string worker_id(context.path_parameter("worker_id"));
        auto completed = co_await plane_.complete_deregistration(std::move(worker_id), key, std::move(warning));
        co_return worker_response(context, completed);
    }

    boost::asio::awaitable<http_response> fail_operation(request_context& context)
    {
        domain::operation_key key;
        boost::json::value body;
        if (auto rejected = read_report(context, true, key, body)) {
            co_return std::move(*rejected);
        }
        domain::detail::json_reader reader(body);
        auto code = reader.string("code");
        if (reader.failed() || code.empty()) {
            co_return field_error("code", "a non-empty string");
        }
        auto message = reader.string("message");
        if (reader.failed()) {
            co_return field_error("message", "a string");
        }
        std::string worker_id(context.path_parameter("worker_id"));
        auto failed = co_await plane_.fail_operation(std::move(worker_id), key, std::move(code), std::move(message));
        co_return worker_response(context, failed);
    }

    http_response worker_response(const request_context& context, const result<domain::cml_worker>& worker) const
    {
        if (!worker) {
            return command_error(context, worker.error());
        }
        return make_json_response(http::status::ok, domain::to_public_json(worker.value()));
    }

    /// Returns the current change sequence. With `after`, it first waits until the sequence
    /// passes `after`, `timeout_ms` elapses or `end_change_waits()` is called, and returns
    /// `after` itself on timeout.
    /// For any other `after`, such as one that an earlier process of the control plane
    /// returned, it returns the current sequence at once, so the controller resynchronizes.
    /// Sequences in the feed are the repository's plus `sequence_base_`.
    boost::asio::awaitable<http_response> changes(request_context& context)
    {
        auto& repository = plane_.repository();
        const auto current = sequence_base_ + repository.change_sequence();
        auto after_text = context.query_parameter("after");
        if (!after_text) {
            co_return sequence_response(current);
        }
        auto after = parse_unsigned(*after_text);
        if (!after) {
            co_return make_error_response(errc::invalid_argument, "query parameter 'after' must be an unsigned integer");
        }
        auto wait = options_.default_change_wait;
        if (auto timeout_text = context.query_parameter("timeout_ms")) {
            auto timeout = parse_unsigned(*timeout_text);
            if (!timeout || timeout.value() > static_cast<std::uint64_t>(options_.max_change_wait.count())) {
                co_return make_error_response(errc::invalid_argument,
                                              "query parameter 'timeout_ms' must be an integer from 0 to " +
                                                  std::to_string(options_.max_change_wait.count()));
            }
            wait = std::chrono::milliseconds(timeout.value());
        }
        if (current != after.value() || wait.count() == 0) {
            co_return sequence_response(current);
        }

        using namespace boost::asio::experimental::awaitable_operators;
        boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, wait);
        // The first to finish cancels the others. The race is a named local because g++ 12
        // mishandles temporaries with destructors inside a co_await expression.
        auto race = repository.wait_for_change(after.value() - sequence_base_) ||
                    timer.async_wait(boost::asio::use_awaitable) || wait_until_change_waits_end();
        auto outcome = co_await std::move(race);
        if (outcome.index() == 1) {
            co_return sequence_response(after.value());
        }
        if (outcome.index() == 2) {
            co_return sequence_response(sequence_base_ + repository.change_sequence());
        }
        auto& changed = std::get<0>(outcome);
        if (!changed) {
            co_return command_error(context, changed.error());
        }
        co_return sequence_response(sequence_base_ + changed.value());
    }

    /// Returns once `end_change_waits()` has been called, at once if it already was. Terminal
    /// cancellation ends the wait with an exception.
    boost::asio::awaitable<void> wait_until_change_waits_end()
    {
        auto channel = std::make_shared<end_channel>(co_await boost::asio::this_coro::executor, 1);
        {
            std::lock_guard lock(end_mutex_);
            if (change_waits_ended_) {
                co_return;
            }
            end_waiters_.push_back(channel);
        }

        auto [error] = co_await channel->async_receive(boost::asio::as_tuple(boost::asio::use_awaitable));
        if (error) {
            std::lock_guard lock(end_mutex_);
            std::erase(end_waiters_, channel);
            throw boost::system::system_error(error);
        }
    }

    static std::uint64_t random_sequence_base()
    {
        std::random_device random;
        const std::uint64_t bits = (std::uint64_t{random()} << 32) | random();
        constexpr std::uint64_t lowest = std::uint64_t{1} << 32;
        constexpr std::uint64_t highest = std::uint64_t{1} << 52;
        return lowest + bits % (highest - lowest);
    }

    static http_response sequence_response(std::uint64_t sequence)
    {
        boost::json::object body{{"sequence", sequence}};
        return make_json_response(http::status::ok, body);
    }

    application::control_plane<Repository, Sink>& plane_;
    control_plane_api_options options_;
    logger log_;
    std::uint64_t sequence_base_;
    router router_;
    std::mutex end_mutex_;
    bool change_waits_ended_ = false;
    /// The change-feed requests that wait, woken by `end_change_waits()`.
    std::vector<std::shared_ptr<end_channel>> end_waiters_;
};

} // namespace lcm::transport
