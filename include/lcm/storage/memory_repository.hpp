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
#include <memory_resource>
#include <mutex>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <tuple>
#include <utility>
#include <vector>

namespace lcm::storage {

/// Keeps workers in memory; nothing survives the process.
///
/// Besides the `worker_repository` members it lends a stored worker for a change in place
/// (`borrow`), which saves the copies of `get` and `update`; see `application::lending_worker_repository`.
///
/// Thread safety: every member may be called concurrently; one mutex guards the state and
/// no coroutine suspends while holding it. Cancellation: only `wait_for_change` suspends.
class memory_repository {
    struct record;

public:
    /// A stored worker lent for a change in place, with the repository locked until the loan
    /// ends. `save()` keeps the change under the next version. A loan must end before its
    /// holder suspends, and its holder must not call the repository meanwhile. Nothing may
    /// change the worker after `save()`. A change that fails or throws must leave the worker as
    /// it was, as the aggregate's methods do, because a loan keeps no copy to put back: copying
    /// the worker is the cost it avoids.
    class loan {
    public:
        loan(loan&& other) noexcept
            : repository_(other.repository_),
              record_(std::exchange(other.record_, nullptr)),
              lock_(std::move(other.lock_)),
              revision_(other.revision_),
              pending_before_(other.pending_before_),
              saved_(other.saved_)
        {
        }

        loan& operator=(loan&&) = delete;

        ~loan()
        {
            if (record_ == nullptr) {
                return;
            }
            lock_.unlock();
            if (saved_) {
                repository_->notifier_.notify();
            }
        }

        domain::cml_worker& worker() noexcept { return record_->worker; }

        /// Returns whether the worker recorded an event or changed a field since the loan began.
        bool changed() const noexcept
        {
            return !record_->worker.events().empty() || record_->worker.revision() != revision_;
        }

        /// Keeps the change: stores the worker with the next version, and returns the events it
        /// recorded, which the stored worker does not keep.
        std::vector<domain::domain_event> save()
        {
            auto& stored = *record_;
            // Most saves (claims, starts) keep the pending key, and re-inserting it would cost
            // an allocation and a tree search.
            if (pending_since(stored.worker) != pending_before_) {
                repository_->unindex_pending(stored);
                repository_->index_pending(stored);
            }
            stored.worker.set_version(stored.worker.version() + 1);
            saved_ = true;
            return stored.worker.take_events();
        }

    private:
        friend class memory_repository;

        loan(memory_repository& repository, record& stored, std::unique_lock<std::mutex> lock)
            : repository_(&repository),
              record_(&stored),
              lock_(std::move(lock)),
              revision_(stored.worker.revision()),
              pending_before_(pending_since(stored.worker))
        {
        }

        memory_repository* repository_;
        record* record_;
        std::unique_lock<std::mutex> lock_;
        std::uint64_t revision_;
        // The request time of the pending operation when the loan began. The id never changes,
        // so comparing the time shows whether the pending key changed.
        std::optional<timestamp> pending_before_;
        bool saved_ = false;
    };

    boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id)
    {
        std::lock_guard lock(mutex_);
        auto it = workers_.find(id);
        if (it == workers_.end()) {
            co_return errc::not_found;
        }
        co_return it->second.worker;
    }

    /// Lends the stored worker for a change in place, or fails with `errc::not_found` for an
    /// unknown id. Blocks while another loan or call has the lock.
    result<loan> borrow(std::string_view id)
    {
        std::unique_lock lock(mutex_);
        auto it = workers_.find(id);
        if (it == workers_.end()) {
            return errc::not_found;
        }
        return loan(*this, it->second, std::move(lock));
    }

    boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker)
    {
        {
            std::lock_guard lock(mutex_);
            if (workers_.contains(worker.id())) {
                co_return errc::already_exists;
            }
            record stored{worker, pending_.end()};
            stored.worker.take_events();
            stored.worker.set_version(1);
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
            if (stored.worker.version() != worker.version()) {
                co_return errc::version_conflict;
            }
            // The id is the same, so comparing the request times compares the pending keys.
            const bool reindex = pending_since(stored.worker) != pending_since(worker);
            if (reindex) {
                unindex_pending(stored);
            }
            // Assigning the fields reuses the stored strings' buffers and leaves the events behind.
            stored.worker.assign_state(worker);
            version = worker.version() + 1;
            stored.worker.set_version(version);
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
            page.push_back(workers_.find(*it)->second.worker);
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
            page.push_back(workers_.find(std::get<1>(*it))->second.worker);
        }
        co_return page;
    }

    /// Returns the ids of up to `limit` workers with a pending license operation, in the order
    /// of `list_pending`, without copying the workers.
    boost::asio::awaitable<result<std::vector<std::string>>> list_pending_ids(std::size_t limit)
    {
        std::vector<std::string> ids;
        std::lock_guard lock(mutex_);
        ids.reserve(std::min(limit, pending_.size()));
        for (auto it = pending_.begin(); it != pending_.end() && ids.size() < limit; ++it) {
            ids.push_back(std::get<1>(*it));
        }
        co_return ids;
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

    // The request time of a worker's pending operation, the first part of its key in
    // `pending_`, or nothing without a pending operation.
    static std::optional<timestamp> pending_since(const domain::cml_worker& worker)
    {
        const auto& license = worker.license();
        if (!license.has_pending_operation()) {
            return std::nullopt;
        }
        return license.requested_at().value_or(timestamp{});
    }

    // The nodes come from a pool, so that the nodes of workers added one after another sit next
    // to each other, and listing 100,000 pending workers reads memory in order instead of
    // missing the cache at every node. The pool keeps the memory of the largest set it held.
    using pending_set = std::set<pending_key, std::less<>, std::pmr::polymorphic_allocator<pending_key>>;

    // A stored worker, without events, and its entry in `pending_`, or `pending_.end()` when no
    // operation is pending. Keeping the entry saves a tree search when the operation finishes,
    // which with 100,000 pending workers is a chain of cache misses.
    struct record {
        domain::cml_worker worker;
        pending_set::iterator pending;
    };

    void index_pending(record& stored)
    {
        if (const auto since = pending_since(stored.worker)) {
            stored.pending = pending_.emplace(*since, stored.worker.id()).first;
        }
    }

    void unindex_pending(record& stored)
    {
        if (stored.pending != pending_.end()) {
            pending_.erase(stored.pending);
            stored.pending = pending_.end();
        }
    }

    struct string_hash {
        using is_transparent = void;
        std::size_t operator()(std::string_view text) const noexcept { return std::hash<std::string_view>{}(text); }
    };

    mutable std::mutex mutex_;
    // Lookups by id go through the hash map; listing in id order goes through the ordered set.
    boost::unordered_flat_map<std::string, record, string_hash, std::equal_to<>> workers_;
    std::set<std::string, std::less<>> ordered_ids_;
    std::pmr::unsynchronized_pool_resource pending_nodes_;
    pending_set pending_{&pending_nodes_};
    change_notifier notifier_;
};

static_assert(application::lending_worker_repository<memory_repository>);

} // namespace lcm::storage
