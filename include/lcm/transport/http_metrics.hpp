// Request metrics of an HTTP server, recorded through a router's observer.
#pragma once

#include <lcm/metrics.hpp>
#include <lcm/transport/http_message.hpp>
#include <lcm/transport/router.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <utility>

namespace lcm::transport {

/// Bucket bounds in seconds of `http_server_request_duration_seconds`: the default buckets of
/// the Prometheus client libraries, plus 30 s and 60 s for change-feed requests that wait.
inline constexpr double request_duration_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                                      1.0,   2.5,  5.0,   10.0, 30.0, 60.0};

/// Returns an observer for `router::set_observer` (or `control_plane_api_options::on_request`)
/// that records every routed request in `registry`:
///
/// - `http_server_requests_total{method, route, status}`, a counter;
/// - `http_server_request_duration_seconds{method, route}`, a histogram of the time from
///   dispatch until the handler returned its response.
///
/// `route` is the matched pattern such as `/api/workers/{worker_id}`, or `unmatched` for a
/// request that matched no route, so the number of series stays bounded whatever paths
/// clients send. The observer may be called from several threads at once.
inline router::observer make_request_metrics_observer(std::shared_ptr<metrics::registry> registry)
{
    return [registry = std::move(registry)](const request_summary& summary) {
        const std::string method(http::to_string(summary.method));
        const std::string route = summary.route.empty() ? std::string("unmatched") : std::string(summary.route);
        registry
            ->get_counter("http_server_requests_total", "Total number of HTTP requests by method, route and status",
                          {{"method", method}, {"route", route}, {"status", std::to_string(summary.status)}})
            ->increment();
        registry
            ->get_histogram("http_server_request_duration_seconds", "Duration of HTTP requests in seconds",
                            {{"method", method}, {"route", route}}, request_duration_buckets)
            ->observe(std::chrono::duration<double>(summary.duration).count());
    };
}

} // namespace lcm::transport
