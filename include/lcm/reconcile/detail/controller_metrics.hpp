// The metrics of one reconciler, named as controller-runtime and client-go's workqueue name theirs,
// so that existing dashboards and alerts work unchanged.
#pragma once

#include <lcm/metrics.hpp>
#include <lcm/reconcile/action.hpp>

#include <chrono>
#include <memory>
#include <string>
#include <vector>

namespace lcm::reconcile::detail {

// controller-runtime's buckets for controller_runtime_reconcile_time_seconds (in its
// pkg/internal/controller/metrics/metrics.go): fine below one second, where most reconciles end.
inline constexpr double reconcile_time_buckets[] = {
    0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.25, 1.5,
    1.75,  2.0,  2.5,   3.0,  3.5, 4.0,  4.5, 5,    6,   7,    8,   9,    10,  15,  20,  25,  30,  40,  50,  60};

inline double to_seconds(duration value) noexcept { return std::chrono::duration<double>(value).count(); }

struct controller_metrics {
    controller_metrics(metrics::registry& registry, const std::string& controller)
    {
        const metrics::labels by_controller{{"controller", controller}};
        // client-go's workqueue metrics carry the queue's name as well; the queue is named after
        // its controller, as in controller-runtime.
        const metrics::labels by_queue{{"controller", controller}, {"name", controller}};
        auto reconcile_total = [&](const char* result) {
            return registry.get_counter("controller_runtime_reconcile_total",
                                        "Total number of reconciliations per controller",
                                        {{"controller", controller}, {"result", result}});
        };
        success = reconcile_total("success");
        error = reconcile_total("error");
        requeue = reconcile_total("requeue");
        requeue_after = reconcile_total("requeue_after");
        errors = registry.get_counter("controller_runtime_reconcile_errors_total",
                                      "Total number of reconciliation errors per controller", by_controller);
        terminal_errors = registry.get_counter("controller_runtime_terminal_reconcile_errors_total",
                                               "Total number of terminal reconciliation errors per controller",
                                               by_controller);
        reconcile_time = registry.get_histogram("controller_runtime_reconcile_time_seconds",
                                                "Length of time per reconciliation per controller", by_controller,
                                                reconcile_time_buckets);
        max_concurrent = registry.get_gauge("controller_runtime_max_concurrent_reconciles",
                                            "Maximum number of concurrent reconciles per controller",
                                            by_controller);
        active_workers = registry.get_gauge("controller_runtime_active_workers",
                                            "Number of currently used workers per controller", by_controller);
        depth = registry.get_gauge("workqueue_depth", "Current depth of workqueue", by_queue);
        adds = registry.get_counter("workqueue_adds_total", "Total number of adds handled by workqueue", by_queue);
        retries = registry.get_counter("workqueue_retries_total", "Total number of retries handled by workqueue",
                                       by_queue);
        // client-go's buckets: 10 ns to 1000 s, a factor of ten apart.
        const std::vector<double> queue_buckets = metrics::exponential_buckets(10e-9, 10, 12);
        queue_duration = registry.get_histogram("workqueue_queue_duration_seconds",
                                                "How long in seconds an item stays in workqueue before being requested",
                                                by_queue, queue_buckets);
    }

    std::shared_ptr<metrics::counter> success;
    std::shared_ptr<metrics::counter> error;
    std::shared_ptr<metrics::counter> requeue;
    std::shared_ptr<metrics::counter> requeue_after;
    std::shared_ptr<metrics::counter> errors;
    std::shared_ptr<metrics::counter> terminal_errors;
    std::shared_ptr<metrics::histogram> reconcile_time;
    std::shared_ptr<metrics::gauge> max_concurrent;
    std::shared_ptr<metrics::gauge> active_workers;
    std::shared_ptr<metrics::gauge> depth;
    std::shared_ptr<metrics::counter> adds;
    std::shared_ptr<metrics::counter> retries;
    std::shared_ptr<metrics::histogram> queue_duration;
};

} // namespace lcm::reconcile::detail
