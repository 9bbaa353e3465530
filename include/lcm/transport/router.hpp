// A table of routes (method and path pattern) that dispatches requests to coroutine handlers.
#pragma once

#include <lcm/error.hpp>
#include <lcm/transport/http_message.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/url/parse.hpp>
#include <boost/url/url.hpp>

#include <chrono>
#include <functional>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lcm::transport {

/// One entry of a router's table, as `router::routes()` lists it.
struct route_info {
    http::verb method;
    /// The path pattern, with `{name}` for a variable segment, as in OpenAPI.
    std::string pattern;

    friend bool operator==(const route_info&, const route_info&) = default;
};

/// A request with its target parsed and the variable segments of the matched route.
struct request_context {
    http_request request;
    /// The parsed target: path and query, percent-decoding left to the accessors.
    boost::urls::url target;
    /// The pattern of the matched route, for metrics labels.
    std::string_view route;

    /// Returns the decoded value of the path variable `name`; empty when the route has none.
    std::string_view path_parameter(std::string_view name) const noexcept
    {
        for (const auto& [key, value] : path_parameters) {
            if (key == name) {
                return value;
            }
        }
        return {};
    }

    /// Returns the decoded value of the first query parameter `name`, if present.
    std::optional<std::string> query_parameter(std::string_view name) const
    {
        const boost::urls::url_view view = target;
        auto params = view.params();
        auto it = params.find(name);
        if (it == params.end()) {
            return std::nullopt;
        }
        return std::string((*it).value);
    }

    std::vector<std::pair<std::string, std::string>> path_parameters;
};

/// Summary of one routed request, passed to the router's observer.
struct request_summary {
    http::verb method;
    /// The matched pattern, or empty when no route matched; never the raw path, so a
    /// metrics label set stays bounded.
    std::string_view route;
    unsigned status = 0;
    std::chrono::steady_clock::duration duration{};
};

/// Matches a request's method and path against the table and awaits the route's handler.
///
/// A path that matches no pattern gets 404 (`not_found`), and so does a known path with a
/// method it does not have. Build the table before the first `dispatch`; after that
/// the router is read-only and `dispatch` may run concurrently.
class router {
public:
    using handler = std::function<boost::asio::awaitable<http_response>(request_context&)>;
    using observer = std::function<void(const request_summary&)>;

    /// Adds a route. A segment `{name}` matches any one non-empty segment.
    void add(http::verb method, std::string pattern, handler route_handler)
    {
        auto segments = split(pattern);
        entries_.push_back(entry{{method, std::move(pattern)}, std::move(segments), std::move(route_handler)});
    }

    /// Sets the function called after every dispatched request, for example to count requests.
    void set_observer(observer callback) { observer_ = std::move(callback); }

    /// Returns the table in the order the routes were added.
    std::vector<route_info> routes() const
    {
        std::vector<route_info> table;
        for (const auto& route : entries_) {
            table.push_back(route.info);
        }
        return table;
    }

    /// Finds the route for the request and awaits its handler.
    boost::asio::awaitable<http_response> dispatch(http_request request) const
    {
        const auto started = std::chrono::steady_clock::now();
        const auto method = request.method();
        std::string_view matched;
        auto response = co_await route(std::move(request), matched);
        if (observer_) {
            observer_(request_summary{method, matched, response.result_int(), std::chrono::steady_clock::now() - started});
        }
        co_return response;
    }

private:
    struct entry {
        route_info info;
        std::vector<std::string> segments;
        handler route_handler;
    };

    static std::vector<std::string> split(std::string_view path)
    {
        std::vector<std::string> segments;
        std::size_t position = 1;
        while (position <= path.size()) {
            auto next = path.find('/', position);
            if (next == std::string_view::npos) {
                next = path.size();
            }
            segments.emplace_back(path.substr(position, next - position));
            position = next + 1;
        }
        return segments;
    }

    static bool is_variable(std::string_view segment) noexcept
    {
        return segment.size() > 2 && segment.front() == '{' && segment.back() == '}';
    }

    static bool match(const entry& route, const std::vector<std::string>& segments,
                      std::vector<std::pair<std::string, std::string>>& parameters)
    {
        if (route.segments.size() != segments.size()) {
            return false;
        }
        parameters.clear();
        for (std::size_t i = 0; i < segments.size(); ++i) {
            const auto& pattern = route.segments[i];
            if (is_variable(pattern)) {
                if (segments[i].empty()) {
                    return false;
                }
                parameters.emplace_back(pattern.substr(1, pattern.size() - 2), segments[i]);
            }
            else if (pattern != segments[i]) {
                return false;
            }
        }
        return true;
    }

    boost::asio::awaitable<http_response> route(http_request request, std::string_view& matched) const
    {
        auto target = boost::urls::parse_origin_form(request.target());
        if (!target) {
            co_return make_error_response(errc::invalid_argument, "malformed request target");
        }

        request_context context{std::move(request), boost::urls::url(*target), {}, {}};
        std::vector<std::string> segments;
        for (auto segment : context.target.segments()) {
            segments.push_back(std::move(segment));
        }
        if (segments.empty()) {
            segments.emplace_back();
        }

        for (const auto& route : entries_) {
            if (route.info.method == context.request.method() && match(route, segments, context.path_parameters)) {
                matched = route.info.pattern;
                context.route = matched;
                co_return co_await route.route_handler(context);
            }
        }
        co_return make_error_response(errc::not_found, "no route for " + std::string(context.request.method_string()) +
                                                           " " + std::string(context.target.path()));
    }

    std::vector<entry> entries_;
    observer observer_;
};

} // namespace lcm::transport
