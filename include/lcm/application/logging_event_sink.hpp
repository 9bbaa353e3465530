// An event sink that writes every domain event to the log, so operators can follow each
// worker's timeline, and counts the events by type.
#pragma once

#include <lcm/application/event_sink.hpp>
#include <lcm/domain/events.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/log.hpp>
#include <lcm/metrics.hpp>

#include <boost/asio/awaitable.hpp>

#include <memory>
#include <cstddef>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace lcm::application {

/// Logs each event at info level as one record with the message `domain event`, the fields
/// `event` (its type), `worker_id`, `operation_id`, `initiated_by` and `occurred_at`, and the
/// event's own fields, such as `error_code` and `error_message` of a failure.
///
/// Events carry no token, and failure messages are stored with the token redacted, so the
/// log contains no secret. With a registry, it also counts `lcm_domain_events_total{type}`.
/// Thread-safe when the logger's sink is.
class logging_event_sink {
public:
    explicit logging_event_sink(logger log, std::shared_ptr<metrics::registry> registry = {})
        : log_(std::move(log))
    {
        if (registry) {
            register_counters(*registry, std::make_index_sequence<std::variant_size_v<domain::domain_event>>());
        }
    }

    boost::asio::awaitable<void> publish(std::vector<domain::domain_event> events)
    {
        for (const auto& event : events) {
            record(event);
        }
        co_return;
    }

private:
    // Looks up one counter per event type once, so that publishing does no registry lookup.
    template <std::size_t... Index>
    void register_counters(metrics::registry& registry, std::index_sequence<Index...>)
    {
        (counters_.push_back(registry.get_counter(
             "lcm_domain_events_total", "Total number of domain events published, by type",
             {{"type", std::string(std::variant_alternative_t<Index, domain::domain_event>::type)}})),
         ...);
    }

    void record(const domain::domain_event& event) const
    {
        if (!counters_.empty()) {
            counters_[event.index()]->increment();
        }
        if (log_.enabled(log_level::info)) {
            std::visit([this](const auto& alternative) { log_event(alternative); }, event);
        }
    }

    /// Logs the header fields that every event has, then `details`.
    template <class Event, class... Details>
    void write(const Event& event, Details... details) const
    {
        const auto& header = event.header;
        log_.info("domain event", {log_field{"event", std::string(Event::type)},
                                   log_field{"worker_id", header.worker_id},
                                   log_field{"operation_id", std::to_string(header.operation_id)},
                                   log_field{"initiated_by", header.initiated_by},
                                   log_field{"occurred_at", format_timestamp(header.occurred_at)},
                                   std::move(details)...});
    }

    void log_event(const domain::worker_created& event) const
    {
        write(event, log_field{"name", event.name}, log_field{"cml_url", event.cml_url},
              log_field{"status", std::string(to_string(event.status))});
    }

    void log_event(const domain::worker_status_changed& event) const
    {
        write(event, log_field{"previous_status", std::string(to_string(event.previous_status))},
              log_field{"status", std::string(to_string(event.status))});
    }

    void log_event(const domain::license_registration_requested& event) const
    {
        write(event, log_field{"reregister", event.reregister ? "true" : "false"});
    }

    void log_event(const domain::license_registration_started& event) const
    {
        write(event, log_field{"attempt", std::to_string(event.attempt)});
    }

    void log_event(const domain::license_registration_completed& event) const
    {
        write(event,
              log_field{"expiry_date", event.expiry_date ? format_timestamp(*event.expiry_date) : "none"},
              log_field{"authorization_status", event.authorization_status},
              log_field{"features", std::to_string(event.features.size())});
    }

    void log_event(const domain::license_registration_failed& event) const
    {
        write(event, log_field{"error_code", event.error.code}, log_field{"error_message", event.error.message});
    }

    void log_event(const domain::license_deregistration_requested& event) const { write(event); }

    void log_event(const domain::license_deregistration_started& event) const
    {
        write(event, log_field{"attempt", std::to_string(event.attempt)});
    }

    void log_event(const domain::license_deregistration_completed& event) const
    {
        write(event, log_field{"warning", event.warning.value_or("none")});
    }

    void log_event(const domain::license_deregistration_failed& event) const
    {
        write(event, log_field{"error_code", event.error.code}, log_field{"error_message", event.error.message});
    }

    void log_event(const domain::license_operation_claimed& event) const
    {
        write(event, log_field{"holder", event.holder}, log_field{"fence", std::to_string(event.fence)},
              log_field{"expires_at", format_timestamp(event.expires_at)});
    }

    logger log_;
    // Indexed by the alternative of `domain::domain_event`; empty without a registry.
    std::vector<std::shared_ptr<metrics::counter>> counters_;
};

static_assert(event_sink<logging_event_sink>);

} // namespace lcm::application
