// The reconcile work queue: every scheduling decision, without I/O, driven by explicit time points.
#pragma once

#include <lcm/reconcile/action.hpp>
#include <lcm/reconcile/backoff.hpp>

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
/// - An untracked key has no entry: memory is proportional to the keys with pending work.
///
/// Thread safety: none. The caller serializes all calls; `lease::key()` stays valid until `finish`.
template <class Key, class Hash = std::hash<Key>, class KeyEqual = std::equal_to<Key>>
class work_queue {
    struct entry;
    // Entries live on the heap, so that leases and the queues can point to them, and an open
    // addressing index finds them. With a million keys queued this is about twice as fast as a
    // std::unordered_map, whose every lookup walks a linked bucket.
    struct entry_hash;
    struct entry_equal;
    using index_type = boost::unordered_flat_set<entry*, entry_hash, entry_equal>;

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

    explicit work_queue(work_queue_options options = {}) : options_(std::move(options)), jitter_(options_.jitter_seed)
    {
    }

    // Leases and the internal queues point to the entries.
    work_queue(const work_queue&) = delete;
    work_queue& operator=(const work_queue&) = delete;

    ~work_queue()
    {
        for (entry* state : index_) {
            delete state;
        }
    }

    const work_queue_options& options() const noexcept { return options_; }

    /// Requests a reconcile of `key` now. Returns whether this queued the key or moved its time
    /// earlier; false means the request was merged into one already pending.
    bool add(Key key, time_point now) { return request(std::move(key), now, now); }

    /// Requests a reconcile of `key` after `delay`, clamped to [0, max_delay].
    bool add_after(Key key, duration delay, time_point now)
    {
        return request(std::move(key), delay_from(now, delay), now);
    }

    /// Requests a reconcile of `key` now unless the key is already ready, delayed or running.
    /// A periodic resync uses this, so that it does not cut short a key's backoff or requeue delay.
    bool add_if_idle(Key key, time_point now)
    {
        if (index_.find(key) != index_.end()) {
            return false;
        }
        return request(std::move(key), now, now);
    }

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
        return lease(node, std::max(now - state.ready_since, duration::zero()), state.failures);
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

    queue_stats stats() const noexcept { return {ready_.size(), delayed_.size(), running_, index_.size()}; }

private:
    struct entry {
        enum class state : std::uint8_t { ready, delayed, running };

        explicit entry(Key&& name) : key(std::move(name)) {}

        const Key key;
        state current = state::ready;
        // Requested again while running. `due` is then the earliest requested time.
        bool dirty = false;
        std::uint32_t failures = 0;
        std::size_t heap_index = 0;
        // Breaks ties between equal due times in request order, which keeps promotion fair.
        std::uint64_t sequence = 0;
        time_point due{};
        time_point ready_since{};
        time_point first_failure{};
    };

    struct entry_hash {
        using is_transparent = void;

        std::size_t operator()(const entry* state) const { return Hash()(state->key); }
        std::size_t operator()(const Key& key) const { return Hash()(key); }
    };

    struct entry_equal {
        using is_transparent = void;

        bool operator()(const entry* a, const entry* b) const { return KeyEqual()(a->key, b->key); }
        bool operator()(const Key& a, const entry* b) const { return KeyEqual()(a, b->key); }
        bool operator()(const entry* a, const Key& b) const { return KeyEqual()(a->key, b); }
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

    bool request(Key&& key, time_point due, time_point now)
    {
        const auto position = index_.find(key);
        if (position == index_.end()) {
            auto created = std::make_unique<entry>(std::move(key));
            index_.insert(created.get());
            schedule(*created.release(), due, now);
            return true;
        }
        entry& state = **position;

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
        state.heap_index = delayed_.size();
        delayed_.push_back(&node);
        sift_up(state.heap_index);
    }

    void make_ready(entry& node, time_point since)
    {
        node.current = entry::state::ready;
        node.ready_since = since;
        ready_.push_back(&node);
    }

    void forget(entry& state)
    {
        index_.erase(&state);
        delete &state;
    }

    void release_memory_if_empty()
    {
        if (!index_.empty() || index_.bucket_count() < shrink_threshold) {
            return;
        }
        index_ = index_type();
        std::deque<entry*>().swap(ready_);
        std::vector<entry*>().swap(delayed_);
    }

    // A binary min-heap of delayed nodes in which each entry stores its index, so that a key moved
    // earlier can leave the heap at once instead of leaving a stale copy behind.
    void heap_place(std::size_t index, entry* node) noexcept
    {
        delayed_[index] = node;
        node->heap_index = index;
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
    index_type index_;
    std::deque<entry*> ready_;
    std::vector<entry*> delayed_;
    std::size_t running_ = 0;
    std::uint64_t next_sequence_ = 0;
};

} // namespace lcm::reconcile
