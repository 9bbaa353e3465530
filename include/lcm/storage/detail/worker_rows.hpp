// The row form of a worker shared by the SQL adapters: the `to_record` JSON document plus
// the columns that queries filter and sort on.
#pragma once

#include <lcm/domain/json.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>

#include <boost/json/parse.hpp>
#include <boost/json/serialize.hpp>

#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>

namespace lcm::storage::detail {

/// A worker as one table row. `record` contains license tokens in clear text, so it must
/// never be logged.
struct worker_row {
    std::string id;
    std::uint64_t version = 0;
    bool pending = false;
    /// The request time of the pending operation, in microseconds since the Unix epoch;
    /// empty when no operation is pending.
    std::optional<std::int64_t> requested_at;
    std::string record;
};

/// Encodes `worker` as it is stored with `version`, without its uncommitted events.
inline worker_row encode_row(const domain::cml_worker& worker, std::uint64_t version)
{
    auto stored = worker;
    stored.take_events();
    stored.set_version(version);

    worker_row row;
    row.id = stored.id();
    row.version = version;
    row.pending = stored.license().has_pending_operation();
    if (row.pending) {
        // The in-memory repository sorts a pending operation without a request time first,
        // so the SQL adapters store the epoch for it.
        const auto requested_at = stored.license().requested_at().value_or(timestamp{});
        row.requested_at = requested_at.time_since_epoch().count();
    }
    row.record = boost::json::serialize(domain::to_record(stored));
    return row;
}

/// Decodes a stored row. The version column wins over the version inside the document,
/// because only the column is compared on update. A row that does not decode, or whose
/// document names another id, is corrupt: it is logged with its id (never its content)
/// and returned as `errc::invalid_argument`.
inline result<domain::cml_worker> decode_row(std::string_view id, std::uint64_t version, std::string_view record,
                                             const logger& log)
{
    boost::system::error_code parse_error;
    const auto document = boost::json::parse(record, parse_error);
    if (parse_error) {
        log.error("stored worker is corrupt: record is not valid JSON",
                  {{"worker_id", std::string(id)}, {"error", parse_error.message()}});
        return errc::invalid_argument;
    }

    std::string error_field;
    auto worker = domain::from_record(document, &error_field);
    if (!worker) {
        log.error("stored worker is corrupt: record field is missing or invalid",
                  {{"worker_id", std::string(id)}, {"field", error_field}});
        return errc::invalid_argument;
    }
    if (worker.value().id() != id) {
        log.error("stored worker is corrupt: record id differs from the row id",
                  {{"worker_id", std::string(id)}, {"record_id", worker.value().id()}});
        return errc::invalid_argument;
    }
    worker.value().set_version(version);
    return worker;
}

} // namespace lcm::storage::detail
