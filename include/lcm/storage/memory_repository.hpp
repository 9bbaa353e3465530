// An in-memory worker repository for tests, examples and single-process deployments.
#pragma once

#include <lcm/application/worker_repository.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>
#include <lcm/storage/change_notifier.hpp>

#include <boost/asio/awaitable.hpp>

#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <unordered_map>
#include <tuple>
#include <vector>

namespace lcm::storage {

/// Keeps workers in memory; nothing survives the process.
///
/// Thread safety: every member may be called concurrently; one mutex guards the state and
/// no coroutine suspends while holding it. Cancellation: only `wait_for_change` suspends.
class memory_repository {
public:
    boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id)
    {
        std::lock_guard lock(mutex_);
        auto it = workers_.find(id);
        if (it == workers_.end()) {
            co_return errc::not_found;
        }
        co_return domain::cml_worker::restore(it->second);
    }

    boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker)
    {
        {
            std::lock_guard lock(mutex_);
            if (workers_.contains(worker.id())) {
                co_return errc::already_exists;
            }
            auto stored = worker.state();
            stored.version = 1;
            index_pending(stored);
            ordered_ids_.insert(worker.id());
            workers_.emplace(worker.id(), std::move(stored));
        }
        notifier_.notify();
        co_return std::uint64_t{1};
    }

    boost::asio::awaitable<result<std::uint64_t>> update(const domain::cml_worker& worker)
    {
        std::uint64_t version = 0;
        {
            std::lock_guard lock(mutex_);
            auto it = workers_.find(worker.id());
            if (it == workers_.end()) {
                co_return errc::not_found;
            }
            auto& stored = it->second;
            if (stored.version != worker.version()) {
                co_return errc::version_conflict;
            }
            // Most saves (claims, starts) keep the pending key, and re-inserting it would cost
            // an allocation and two tree searches.
            const bool reindex = pending_key_of(stored) != pending_key_of(worker.state());
            if (reindex) {
                unindex_pending(stored);
            }
            // Assigning the fields reuses the stored strings' buffers and leaves the events behind.
            stored = worker.state();
            version = worker.version() + 1;
            stored.version = version;
            if (reindex) {
                index_pending(stored);
            }
        }
        notifier_.notify();
        co_return version;
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list(std::string_view after_id, std::size_t limit)
    {
        std::vector<domain::cml_worker> page;
        std::lock_guard lock(mutex_);
        for (auto it = ordered_ids_.upper_bound(after_id); it != ordered_ids_.end() && page.size() < limit; ++it) {
            page.push_back(restore(workers_.find(*it)->second));
        }
        co_return page;
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit)
    {
        std::vector<domain::cml_worker> page;
        std::lock_guard lock(mutex_);
        for (auto it = pending_.begin(); it != pending_.end() && page.size() < limit; ++it) {
            page.push_back(restore(workers_.find(std::get<1>(*it))->second));
        }
        co_return page;
    }

    std::uint64_t change_sequence() const { return notifier_.sequence(); }

    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        return notifier_.wait_for_change(after);
    }

    /// Returns the number of stored workers.
    std::size_t size() const
    {
        std::lock_guard lock(mutex_);
        return workers_.size();
    }

    /// Returns the number of workers with a pending license operation.
    std::size_t pending_count() const
    {
        std::lock_guard lock(mutex_);
        return pending_.size();
    }

private:
    // Pending operations ordered by request time, then id, so the oldest request comes first.
    using pending_key = std::tuple<timestamp, std::string>;

    // The key of a worker in `pending_`, or nothing without a pending operation. It refers to
    // the worker's id, so that comparing keys copies no string.
    static std::optional<std::tuple<timestamp, std::string_view>> pending_key_of(const domain::cml_worker::fields& worker)
    {
        const auto& license = worker.license;
        if (!license.has_pending_operation()) {
            return std::nullopt;
        }
        return std::tuple<timestamp, std::string_view>{license.requested_at().value_or(timestamp{}), worker.id};
    }

    void index_pending(const domain::cml_worker::fields& worker)
    {
        if (const auto key = pending_key_of(worker)) {
            pending_.emplace(std::get<0>(*key), std::string(std::get<1>(*key)));
        }
    }

    void unindex_pending(const domain::cml_worker::fields& worker)
    {
        if (const auto key = pending_key_of(worker)) {
            if (const auto found = pending_.find(*key); found != pending_.end()) {
                pending_.erase(found);
            }
        }
    }

    // Stored fields satisfy the aggregate's invariants, because they were saved from a worker.
    static domain::cml_worker restore(const domain::cml_worker::fields& stored)
    {
        return domain::cml_worker::restore(stored).value();
    }

    struct string_hash {
        using is_transparent = void;
        std::size_t operator()(std::string_view text) const noexcept { return std::hash<std::string_view>{}(text); }
    };

    mutable std::mutex mutex_;
    // Lookups by id go through the hash map; listing in id order goes through the ordered set.
    std::unordered_map<std::string, domain::cml_worker::fields, string_hash, std::equal_to<>> workers_;
    std::set<std::string, std::less<>> ordered_ids_;
    std::set<pending_key, std::less<>> pending_;
    change_notifier notifier_;
};

static_assert(application::worker_repository<memory_repository>);

} // namespace lcm::storage
