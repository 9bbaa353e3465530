// The reconcile work queue: every scheduling decision, without I/O, driven by explicit time points.
#pragma once

#include <lcm/reconcile/action.hpp>
#include <lcm/reconcile/backoff.hpp>
#include <lcm/reconcile/detail/slab_pool.hpp>

#include <boost/unordered/unordered_flat_set.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <limits>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

namespace lcm::reconcile {

struct work_queue_options {
    backoff_policy backoff;

    /// Maximum delay of any requeue, retry or retry-after hint. Longer requests are clamped to it,
    /// so a reconcile that asks for `hours::max()` runs again within a day instead of never.
    duration max_delay = std::chrono::hours(24);

    /// When set, a key whose consecutive failures span this long goes to the terminal-failure hook
    /// at its next failure instead of being retried. The last retry is scheduled no later than the
    /// deadline, so giving up does not wait for a long backoff delay first.
    std::optional<duration> retry_deadline;

    /// Seed of the jitter. Tests fix it; the reconciler draws a random one by default.
    std::uint64_t jitter_seed = 0x6c636d5f6a6974ULL;
};

/// Counts of keys by state.
struct queue_stats {
    /// Keys waiting for a worker; this is `workqueue_depth`.
    std::size_t ready = 0;
    /// Keys waiting for their requeue or retry time. They hold no worker.
    std::size_t delayed = 0;
    /// Keys being reconciled.
    std::size_t running = 0;
    /// Keys with any state. Idle keys have none, so this is the queue's memory in entries.
    std::size_t tracked = 0;
};

/// Outcome of `work_queue::finish` for one key: where the key went and whether it failed.
struct finish_result {
    enum class placement { forgotten, ready, delayed };

    placement next = placement::forgotten;
    /// When the key becomes ready again, unless it was forgotten.
    time_point due{};
    /// The attempt failed and a retry is scheduled.
    bool retry_scheduled = false;
    /// The key goes to the terminal-failure hook: a terminal error or an exceeded retry deadline.
    bool gave_up = false;
    bool deadline_exceeded = false;
    /// Consecutive failed attempts of the key, including this one.
    std::uint32_t failures = 0;
};

/// A work queue with the semantics of client-go's rate-limited workqueue, minus its known faults.
///
/// - A key is ready (queued for a worker), delayed (waiting for a time), running, or untracked.
/// - Adding a queued key does nothing. Adding a running key marks it dirty, so it runs once more
///   after `finish`; it never runs twice at the same time.
/// - A key requested at two times keeps the earlier one. Ready keys are served first in, first out,
///   and a requeued or retried key goes to the back, so a failing key cannot starve the others.
/// - Only `finish` of an attempt that ran changes the failure count; success of any kind resets it.
/// - An untracked key has no entry. Entries come in chunks of 256, and a chunk is freed when its
///   last key is done, so memory follows the keys with pending work. One key that stays delayed or
///   running keeps its whole chunk, though: about 20 KB with `std::string` keys.
///
/// Thread safety: none. The caller serializes all calls; `lease::key()` stays valid until `finish`.
template <class Key, class Hash = std::hash<Key>, class KeyEqual = std::equal_to<Key>>
class work_queue {
    struct entry;
    // Entries live in a slab pool, so that leases and the queues can point to them and keys queued
    // one after another sit next to each other in memory. The open-addressing index stores each
    // entry's handle with a 32-bit hash of its key: growing the index and erasing an entry then
    // read only the index, never the entries or their keys, which are cold with a million keys queued.
    using pool_type = detail::slab_pool<entry>;
    struct index_slot;
    struct key_probe;
    struct slot_hash;
    struct slot_equal;
    using index_type = boost::unordered_flat_set<index_slot, slot_hash, slot_equal>;

public:
    using key_type = Key;

    /// A key handed to a worker by `pop`, to be handed back through `finish`.
    class lease {
    public:
        const Key& key() const noexcept { return node_->key; }

        /// How long the key was ready before `pop`; this is `workqueue_queue_duration_seconds`.
        duration queue_time() const noexcept { return queue_time_; }

        /// Consecutive failures before this attempt; non-zero means this attempt is a retry.
        std::uint32_t previous_failures() const noexcept { return previous_failures_; }

    private:
        friend class work_queue;

        lease(entry* node, duration queue_time, std::uint32_t previous_failures) noexcept
            : node_(node), queue_time_(queue_time), previous_failures_(previous_failures)
        {
        }

        entry* node_;
        duration queue_time_;
        std::uint32_t previous_failures_;
    };

    explicit work_queue(work_queue_options options = {})
        : options_(std::move(options)), jitter_(options_.jitter_seed), index_(make_index())
    {
    }

    // Leases and the internal queues point to the entries, and the index to the pool.
    work_queue(const work_queue&) = delete;
    work_queue& operator=(const work_queue&) = delete;

    const work_queue_options& options() const noexcept { return options_; }

    /// Requests a reconcile of `key` now. Returns whether this queued the key or moved its time
    /// earlier; false means the request was merged into one already pending.
    bool add(Key key, time_point now)
    {
        const std::uint32_t hash = hash_key(key);
        return request(std::move(key), hash, now, now);
    }

    /// Requests a reconcile of `key` after `delay`, clamped to [0, max_delay].
    bool add_after(Key key, duration delay, time_point now)
    {
        const std::uint32_t hash = hash_key(key);
        return request(std::move(key), hash, delay_from(now, delay), now);
    }

    /// Requests a reconcile of `key` now unless the key is already ready, delayed or running.
    /// A periodic resync uses this, so that it does not cut short a key's backoff or requeue delay.
    bool add_if_idle(Key key, time_point now)
    {
        const std::uint32_t hash = hash_key(key);
        if (index_.find(key_probe{hash, &key}) != index_.end()) {
            return false;
        }
        create_entry(std::move(key), hash, now, now);
        return true;
    }

    /// Makes room in the index for `count` more keys, so that adding a long list of keys grows
    /// it once instead of step by step.
    void reserve(std::size_t count) { index_.reserve(index_.size() + count); }

    /// Moves the delayed keys that are due at `now` to the back of the ready queue, earliest first.
    /// Returns how many it moved.
    std::size_t promote_due(time_point now)
    {
        std::size_t promoted = 0;
        while (!delayed_.empty() && delayed_.front()->due <= now) {
            entry* node = delayed_.front();
            heap_remove(0);
            make_ready(*node, node->due);
            ++promoted;
        }
        return promoted;
    }

    /// Hands the next ready key to a worker, after promoting due keys. The key is running until `finish`.
    std::optional<lease> pop(time_point now)
    {
        promote_due(now);
        if (ready_.empty()) {
            return std::nullopt;
        }
        entry* node = ready_.front();
        ready_.pop_front();
        entry& state = *node;
        state.current = entry::state::running;
        state.dirty = false;
        ++running_;
        return lease(node, std::max(now - state.due, duration::zero()), state.failures);
    }

    /// Records the outcome of a running key and schedules what follows: forget it, requeue it,
    /// retry it with backoff, or give up. A request that arrived while it ran is merged in, and the
    /// earlier of the two times wins. The lease is invalid afterwards.
    finish_result finish(const lease& item, const action& outcome, time_point now)
    {
        entry& state = *item.node_;
        --running_;

        finish_result result;
        std::optional<time_point> due;
        switch (outcome.type()) {
        case action::kind::done:
            state.failures = 0;
            break;
        case action::kind::requeue_after:
            state.failures = 0;
            due = delay_from(now, outcome.delay());
            break;
        case action::kind::retry:
            due = record_failure(state, outcome, now, result);
            break;
        case action::kind::terminal_error:
            result.gave_up = true;
            result.failures = saturating_increment(state.failures);
            state.failures = 0;
            break;
        }

        if (state.dirty) {
            due = due ? std::min(*due, state.due) : state.due;
        }
        if (!due) {
            forget(state);
            release_memory_if_empty();
            return result;
        }

        state.dirty = false;
        schedule(state, *due, now);
        result.next = *due <= now ? finish_result::placement::ready : finish_result::placement::delayed;
        result.due = *due;
        return result;
    }

    /// Earliest time at which a delayed key becomes ready, if any key is delayed.
    std::optional<time_point> next_due() const
    {
        if (delayed_.empty()) {
            return std::nullopt;
        }
        return delayed_.front()->due;
    }

    bool has_ready() const noexcept { return !ready_.empty(); }

    /// Removes every ready and delayed key and returns them: ready keys in queue order, then delayed
    /// keys by due time. Running keys stay; they return to the queue at `finish` if work follows.
    std::vector<Key> take_pending()
    {
        std::vector<Key> keys;
        keys.reserve(ready_.size() + delayed_.size());
        std::vector<entry*> delayed = delayed_;
        std::sort(delayed.begin(), delayed.end(),
                  [](const entry* a, const entry* b) { return earlier(*a, *b); });
        for (entry* node : ready_) {
            keys.push_back(node->key);
            forget(*node);
        }
        for (entry* node : delayed) {
            keys.push_back(node->key);
            forget(*node);
        }
        ready_.clear();
        delayed_.clear();
        release_memory_if_empty();
        return keys;
    }

    queue_stats stats() const noexcept { return {ready_.size(), delayed_.size(), running_, pool_.size()}; }

private:
    struct entry {
        enum class state : std::uint8_t { ready, delayed, running };

        entry(Key&& name, std::uint32_t key_hash) : key(std::move(name)), hash(key_hash) {}

        const Key key;
        // One time whose meaning follows the state, so that an entry fits in 80 bytes with a
        // `std::string` key. Ready: since when the key is ready. Delayed: when it becomes ready.
        // Running: the earliest time requested while it runs, when `dirty`.
        time_point due{};
        time_point first_failure{};
        // Breaks ties between equal due times in request order, which keeps promotion fair.
        std::uint64_t sequence = 0;
        // A pool handle is 32 bits wide, so the heap never contains more entries than this counts.
        std::uint32_t heap_index = 0;
        std::uint32_t failures = 0;
        // `hash_key(key)` and the entry's own pool handle: together its slot in the index.
        const std::uint32_t hash;
        std::uint32_t handle = 0;
        state current = state::ready;
        // Requested again while running.
        bool dirty = false;
    };

    struct index_slot {
        std::uint32_t hash;
        typename pool_type::handle handle;
    };

    // Looks an entry up by key, with the key's hash computed once by the caller.
    struct key_probe {
        std::uint32_t hash;
        const Key* key;
    };

    // The index rehashes from the stored 32-bit hash. boost::unordered mixes it before use,
    // because this hasher is not marked as avalanching.
    struct slot_hash {
        using is_transparent = void;

        std::size_t operator()(const index_slot& slot) const noexcept { return slot.hash; }
        std::size_t operator()(const key_probe& probe) const noexcept { return probe.hash; }
    };

    // Slots are equal when they hold the same entry. A probe matches the slot of an equal key, and
    // compares the stored hash first, so that it reads the entry's key only on a likely match.
    struct slot_equal {
        using is_transparent = void;

        const pool_type* pool;

        bool operator()(const index_slot& a, const index_slot& b) const noexcept { return a.handle == b.handle; }
        bool operator()(const key_probe& probe, const index_slot& slot) const
        {
            return probe.hash == slot.hash && KeyEqual()(*probe.key, (*pool)[slot.handle].key);
        }
        bool operator()(const index_slot& slot, const key_probe& probe) const { return (*this)(probe, slot); }
    };

    // Below this many buckets an emptied index keeps its memory, because reallocating it for every
    // burst would cost more than it saves.
    static constexpr std::size_t shrink_threshold = 4096;

    static bool earlier(const entry& a, const entry& b) noexcept
    {
        return a.due < b.due || (a.due == b.due && a.sequence < b.sequence);
    }

    static std::uint32_t saturating_increment(std::uint32_t value) noexcept
    {
        return value == std::numeric_limits<std::uint32_t>::max() ? value : value + 1;
    }

    duration clamp_delay(duration delay) const noexcept
    {
        return std::clamp(delay, duration::zero(), std::max(options_.max_delay, duration::zero()));
    }

    time_point delay_from(time_point now, duration delay) const noexcept
    {
        const duration clamped = clamp_delay(delay);
        if (clamped > time_point::max() - now) {
            return time_point::max();
        }
        return now + clamped;
    }

    // Counts a failed attempt and returns its retry time, or nothing when the key gives up.
    std::optional<time_point> record_failure(entry& state, const action& outcome, time_point now,
                                             finish_result& result)
    {
        if (state.failures == 0) {
            state.first_failure = now;
        }
        state.failures = saturating_increment(state.failures);
        result.failures = state.failures;

        const auto& deadline = options_.retry_deadline;
        if (deadline && now - state.first_failure >= *deadline) {
            result.gave_up = true;
            result.deadline_exceeded = true;
            state.failures = 0;
            return std::nullopt;
        }

        const duration delay = outcome.retry_after()
                                   ? *outcome.retry_after()
                                   : jitter_.uniform(options_.backoff.window(state.failures));
        time_point retry_at = delay_from(now, delay);
        if (deadline) {
            retry_at = std::min(retry_at, delay_from(state.first_failure, *deadline));
        }
        result.retry_scheduled = true;
        return retry_at;
    }

    // Folds the key's hash to 32 bits, so that an index slot with its handle takes 8 bytes.
    static std::uint32_t hash_key(const Key& key)
    {
        const std::size_t full = Hash()(key);
        return static_cast<std::uint32_t>(full ^ (full >> 16 >> 16));
    }

    index_type make_index() const { return index_type(0, slot_hash(), slot_equal{&pool_}); }

    bool request(Key&& key, std::uint32_t hash, time_point due, time_point now)
    {
        const auto position = index_.find(key_probe{hash, &key});
        if (position == index_.end()) {
            create_entry(std::move(key), hash, due, now);
            return true;
        }
        entry& state = pool_[position->handle];

        switch (state.current) {
        case entry::state::ready:
            return false;
        case entry::state::delayed:
            if (due >= state.due) {
                return false;
            }
            heap_remove(state.heap_index);
            schedule(state, due, now);
            return true;
        case entry::state::running:
            if (state.dirty && due >= state.due) {
                return false;
            }
            state.dirty = true;
            state.due = due;
            return true;
        }
        return false;
    }

    void create_entry(Key&& key, std::uint32_t hash, time_point due, time_point now)
    {
        const auto handle = pool_.create(std::move(key), hash);
        entry& created = pool_[handle];
        created.handle = handle;
        try {
            index_.insert(index_slot{hash, handle});
            schedule(created, due, now);
        } catch (...) {
            index_.erase(index_slot{hash, handle});
            pool_.destroy(handle);
            throw;
        }
    }

    void schedule(entry& node, time_point due, time_point now)
    {
        if (due <= now) {
            make_ready(node, now);
            return;
        }
        entry& state = node;
        state.current = entry::state::delayed;
        state.due = due;
        state.sequence = next_sequence_++;
        state.heap_index = static_cast<std::uint32_t>(delayed_.size());
        delayed_.push_back(&node);
        sift_up(state.heap_index);
    }

    void make_ready(entry& node, time_point since)
    {
        node.current = entry::state::ready;
        node.due = since;
        ready_.push_back(&node);
    }

    void forget(entry& state)
    {
        index_.erase(index_slot{state.hash, state.handle});
        pool_.destroy(state.handle);
    }

    // After a burst, frees the index, the queues and the pool's last chunk. The pool frees its
    // other chunks by itself as they empty.
    void release_memory_if_empty()
    {
        if (!index_.empty() || index_.bucket_count() < shrink_threshold) {
            return;
        }
        index_ = make_index();
        pool_.release_if_empty();
        std::deque<entry*>().swap(ready_);
        std::vector<entry*>().swap(delayed_);
    }

    // A binary min-heap of delayed nodes in which each entry stores its index, so that a key moved
    // earlier can leave the heap at once instead of leaving a stale copy behind.
    void heap_place(std::size_t index, entry* node) noexcept
    {
        delayed_[index] = node;
        node->heap_index = static_cast<std::uint32_t>(index);
    }

    void sift_up(std::size_t index) noexcept
    {
        entry* node = delayed_[index];
        while (index > 0) {
            const std::size_t parent = (index - 1) / 2;
            if (!earlier(*node, *delayed_[parent])) {
                break;
            }
            heap_place(index, delayed_[parent]);
            index = parent;
        }
        heap_place(index, node);
    }

    void sift_down(std::size_t index) noexcept
    {
        entry* node = delayed_[index];
        const std::size_t size = delayed_.size();
        for (;;) {
            std::size_t child = 2 * index + 1;
            if (child >= size) {
                break;
            }
            if (child + 1 < size && earlier(*delayed_[child + 1], *delayed_[child])) {
                ++child;
            }
            if (!earlier(*delayed_[child], *node)) {
                break;
            }
            heap_place(index, delayed_[child]);
            index = child;
        }
        heap_place(index, node);
    }

    void heap_remove(std::size_t index) noexcept
    {
        entry* last = delayed_.back();
        delayed_.pop_back();
        if (index == delayed_.size()) {
            return;
        }
        heap_place(index, last);
        sift_down(index);
        sift_up(last->heap_index);
    }

    work_queue_options options_;
    jitter_source jitter_;
    // Declared before the index, whose equality predicate points to it.
    pool_type pool_;
    index_type index_;
    std::deque<entry*> ready_;
    std::vector<entry*> delayed_;
    std::size_t running_ = 0;
    std::uint64_t next_sequence_ = 0;
};

} // namespace lcm::reconcile
