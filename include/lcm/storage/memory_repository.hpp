// An in-memory worker repository for tests, examples and single-process deployments.
#pragma once

#include <lcm/application/worker_repository.hpp>
#include <lcm/domain/worker.hpp>
#include <lcm/error.hpp>
#include <lcm/storage/change_notifier.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/unordered/unordered_flat_map.hpp>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
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
        co_return domain::cml_worker::restore(it->second.state);
    }

    boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker)
    {
        {
            std::lock_guard lock(mutex_);
            if (workers_.contains(worker.id())) {
                co_return errc::already_exists;
            }
            record stored{worker.state(), pending_.end()};
            stored.state.version = 1;
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
            if (stored.state.version != worker.version()) {
                co_return errc::version_conflict;
            }
            // Most saves (claims, starts) keep the pending key, and re-inserting it would cost
            // an allocation and a tree search.
            const bool reindex = pending_key_of(stored.state) != pending_key_of(worker.state());
            if (reindex) {
                unindex_pending(stored);
            }
            // Assigning the fields reuses the stored strings' buffers and leaves the events behind.
            stored.state = worker.state();
            version = worker.version() + 1;
            stored.state.version = version;
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
            page.push_back(restore(workers_.find(*it)->second.state));
        }
        co_return page;
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit)
    {
        std::vector<domain::cml_worker> page;
        std::lock_guard lock(mutex_);
        // Reserved, because growing a page of 100,000 workers would move each of them twice on average.
        page.reserve(std::min(limit, pending_.size()));
        for (auto it = pending_.begin(); it != pending_.end() && page.size() < limit; ++it) {
            page.push_back(restore(workers_.find(std::get<1>(*it))->second.state));
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

    using pending_set = std::set<pending_key, std::less<>>;

    // A stored worker and its entry in `pending_`, or `pending_.end()` when no operation is
    // pending. Keeping the entry saves a tree search when the operation finishes, which
    // with 100,000 pending workers is a chain of cache misses.
    struct record {
        domain::cml_worker::fields state;
        pending_set::iterator pending;
    };

    void index_pending(record& stored)
    {
        if (const auto key = pending_key_of(stored.state)) {
            stored.pending = pending_.emplace(std::get<0>(*key), std::string(std::get<1>(*key))).first;
        }
    }

    void unindex_pending(record& stored)
    {
        if (stored.pending != pending_.end()) {
            pending_.erase(stored.pending);
            stored.pending = pending_.end();
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
    boost::unordered_flat_map<std::string, record, string_hash, std::equal_to<>> workers_;
    std::set<std::string, std::less<>> ordered_ids_;
    pending_set pending_;
    change_notifier notifier_;
};

static_assert(application::worker_repository<memory_repository>);

} // namespace lcm::storage
