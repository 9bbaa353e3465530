// The reconcile loop: a fixed set of worker coroutines that pull keys from a work_queue and run the
// user's reconcile on them, with timeouts, backoff, resync, metrics, logging and graceful stop.
#pragma once

#include <lcm/log.hpp>
#include <lcm/metrics.hpp>
#include <lcm/reconcile/action.hpp>
#include <lcm/reconcile/clock.hpp>
#include <lcm/reconcile/detail/controller_metrics.hpp>
#include <lcm/reconcile/detail/handler_model.hpp>
#include <lcm/reconcile/handler.hpp>
#include <lcm/reconcile/work_queue.hpp>

#include <boost/asio/any_completion_handler.hpp>
#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/bind_executor.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/strand.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace lcm::reconcile {

/// Settings of a reconciler. Every default is chosen for reconciles that call other hosts over HTTP.
struct reconciler_options {
    /// The `controller` label of the metrics and the `controller` field of log records.
    std::string name = "reconciler";

    /// Number of worker coroutines, which is the maximum number of reconciles at the same time.
    /// With 16, one hung host occupies one slot while the other keys proceed. controller-runtime's
    /// default of 1 would let it block the whole fleet for up to `reconcile_timeout`. Must be at least 1.
    std::size_t max_concurrent_reconciles = 16;

    /// Retry backoff of failed keys; see `backoff_policy` for its defaults.
    backoff_policy backoff;

    /// Maximum requeue, retry or retry-after delay. Longer requests are clamped to it.
    duration max_delay = std::chrono::hours(24);

    /// When set, a key that keeps failing for this long goes to the terminal-failure hook.
    std::optional<duration> retry_deadline;

    /// Time after which one reconcile is cancelled and retried with `errc::timeout`; no value
    /// disables it. One minute is far more than a CML API call needs, and frees a slot held by a
    /// hung connection within a minute.
    std::optional<duration> reconcile_timeout = std::chrono::minutes(1);

    /// Period of the resync that lists all keys and queues those without pending work. It catches
    /// missed change notifications. Zero lists only once, at startup.
    duration resync_period = std::chrono::minutes(10);

    /// Time that running reconciles get to finish after a stop request before they are cancelled.
    /// 30 s matches Kubernetes' default termination grace period.
    duration stop_grace_period = std::chrono::seconds(30);

    /// Seed of the backoff jitter; a random one when empty. Tests fix it to get repeatable delays.
    std::optional<std::uint64_t> jitter_seed;

    lcm::logger log;

    /// Registry that receives the metrics. When empty, no metrics are kept.
    std::shared_ptr<metrics::registry> metrics;
};

/// Report of the work that a stopped reconciler left undone.
template <class Key>
struct stop_report {
    /// Keys that still had work: queued, waiting for a requeue or retry, or interrupted by the stop.
    /// The reconciler drops no key without listing it here.
    std::vector<Key> pending;
    /// Reconciles cancelled because they outlived the grace period; their keys are in `pending`.
    std::size_t cancelled = 0;
};

namespace detail {

template <class Key, class Spec, class Status, class Clock>
class reconciler_core : public std::enable_shared_from_this<reconciler_core<Key, Spec, Status, Clock>> {
public:
    using queue_type = work_queue<Key>;
    using lease_type = typename queue_type::lease;
    using timer_type = typename Clock::timer_type;
    using strand_type = boost::asio::strand<boost::asio::any_io_executor>;
    using wake_handler = boost::asio::any_completion_handler<void()>;

    reconciler_core(boost::asio::any_io_executor executor,
                    std::unique_ptr<handler_base<Key, Spec, Status>> handler, reconciler_options options,
                    Clock clock)
        : executor_(std::move(executor)),
          control_(boost::asio::make_strand(executor_)),
          clock_(std::move(clock)),
          options_(validate(std::move(options))),
          handler_(std::move(handler)),
          metrics_(options_.metrics ? *options_.metrics : null_metrics(), options_.name),
          queue_(queue_options(options_)),
          pump_timer_(clock_.make_timer(control_)),
          resync_timer_(clock_.make_timer(control_)),
          stop_timer_(clock_.make_timer(control_)),
          exit_timer_(clock_.make_timer(control_))
    {
        workers_.reserve(options_.max_concurrent_reconciles);
        for (std::size_t i = 0; i < options_.max_concurrent_reconciles; ++i) {
            workers_.push_back(std::make_unique<worker>(executor_, clock_));
        }
        metrics_.max_concurrent->set(static_cast<double>(options_.max_concurrent_reconciles));
    }

    const Clock& clock() const noexcept { return clock_; }

    bool enqueue(Key key, std::optional<duration> delay)
    {
        const time_point now = clock_.now();
        std::vector<std::pair<worker*, wake_handler>> wakes;
        bool rearm = false;
        {
            std::lock_guard lock(mutex_);
            if (closed_) {
                return false;
            }
            const bool added =
                delay ? queue_.add_after(std::move(key), *delay, now) : queue_.add(std::move(key), now);
            if (added) {
                metrics_.adds->increment();
            }
            wakes = take_idle_workers(1);
            rearm = pump_needs_rearm();
            update_depth();
        }
        wake_workers(std::move(wakes));
        if (rearm) {
            rearm_pump();
        }
        return true;
    }

    void request_stop()
    {
        bool running = false;
        {
            std::lock_guard lock(mutex_);
            stop_requested_ = true;
            running = started_ && !closed_;
        }
        // A run() that starts later finds the flag; one that has returned needs nothing.
        if (running) {
            boost::asio::post(control_, [self = this->shared_from_this()] { self->stop_timer_.cancel(); });
        }
    }

    queue_stats stats() const
    {
        std::lock_guard lock(mutex_);
        return queue_.stats();
    }

    // Static and holding `self`, so that the state outlives a reconciler destroyed while it runs.
    static boost::asio::awaitable<stop_report<Key>> run(std::shared_ptr<reconciler_core> self)
    {
        co_return co_await boost::asio::co_spawn(self->control_, self->control_loop(), boost::asio::use_awaitable);
    }

private:
    struct worker {
        worker(const boost::asio::any_io_executor& executor, const Clock& clock)
            : strand(boost::asio::make_strand(executor)), watchdog(clock.make_timer(strand))
        {
        }

        strand_type strand;
        timer_type watchdog;
        boost::asio::cancellation_signal cancel_signal;
        // Guarded by the core's mutex: the suspended worker's continuation while it is idle. It is
        // emplaced and reset, never assigned, because any_completion_handler's move assignment
        // recurses without end in Boost 1.81.
        // NOTE: the continuation's coroutine frame owns a reference to the core. When the
        // io_context stops for good while the reconciler runs, nothing breaks that cycle and the
        // core leaks, so stop the reconciler before abandoning its io_context.
        std::optional<wake_handler> wake;
        // The members below are touched only on `strand`.
        bool busy = false;
        bool watchdog_armed = false;
        bool coroutine_done = false;
        bool cancel_emitted = false;
        bool timed_out = false;
        bool cancelled_by_stop = false;
        time_point deadline{};
    };

    // Work a worker does before it gives other handlers on its strand's threads a turn. A reconcile
    // that completes at once never suspends, and without this one worker would hold a thread of the
    // io_context, and the timers that run on it, until the queue is empty.
    static constexpr unsigned yield_interval = 32;

    // Awaiting a coroutine or an operation throws once the awaiting coroutine is cancelled, so the
    // control coroutines check the cancellation state directly instead.
    static constexpr auto cancellation_none = boost::asio::cancellation_type::none;

    static metrics::registry& null_metrics()
    {
        static metrics::null_registry registry;
        return registry;
    }

    static std::string describe(const std::exception_ptr& thrown)
    {
        try {
            std::rethrow_exception(thrown);
        } catch (const std::exception& exception) {
            return exception.what();
        } catch (...) {
            return "exception of unknown type";
        }
    }

    static reconciler_options validate(reconciler_options options)
    {
        if (options.max_concurrent_reconciles == 0) {
            throw std::invalid_argument("reconciler '" + options.name + "': max_concurrent_reconciles must be at least 1");
        }
        return options;
    }

    static work_queue_options queue_options(const reconciler_options& options)
    {
        work_queue_options result;
        result.backoff = options.backoff;
        result.max_delay = options.max_delay;
        result.retry_deadline = options.retry_deadline;
        result.jitter_seed = options.jitter_seed ? *options.jitter_seed
                                                 : (std::uint64_t{std::random_device{}()} << 32) ^ std::random_device{}();
        return result;
    }

    // --- Called with mutex_ held ---------------------------------------------------------------

    // Takes up to `limit` idle workers for the ready keys; wake them after unlocking.
    std::vector<std::pair<worker*, wake_handler>> take_idle_workers(std::size_t limit)
    {
        std::vector<std::pair<worker*, wake_handler>> wakes;
        limit = std::min(limit, queue_.stats().ready);
        while (wakes.size() < limit && !idle_.empty()) {
            worker* woken = idle_.back();
            idle_.pop_back();
            wakes.emplace_back(woken, std::move(*woken->wake));
            woken->wake.reset();
        }
        return wakes;
    }

    bool pump_needs_rearm()
    {
        const auto due = queue_.next_due();
        if (!due || *due >= pump_due_) {
            return false;
        }
        pump_due_ = *due;
        return true;
    }

    void update_depth() { metrics_.depth->set(static_cast<double>(queue_.stats().ready)); }

    // --- Wake-ups -------------------------------------------------------------------------------

    static void wake_worker(worker* woken, wake_handler wake)
    {
        if (woken != nullptr) {
            boost::asio::post(woken->strand, std::move(wake));
        }
    }

    static void wake_workers(std::vector<std::pair<worker*, wake_handler>> wakes)
    {
        for (auto& [woken, wake] : wakes) {
            wake_worker(woken, std::move(wake));
        }
    }

    void rearm_pump()
    {
        boost::asio::post(control_, [self = this->shared_from_this()] { self->pump_timer_.cancel(); });
    }

    auto wait_for_work(worker& self)
    {
        return boost::asio::async_initiate<const boost::asio::use_awaitable_t<>, void()>(
            [this, &self](auto handler) {
                std::unique_lock lock(mutex_);
                queue_.promote_due(clock_.now());
                if (stopping_ || queue_.has_ready()) {
                    lock.unlock();
                    boost::asio::post(self.strand, std::move(handler));
                    return;
                }
                self.wake.emplace(std::move(handler));
                idle_.push_back(&self);
            },
            boost::asio::use_awaitable);
    }

    // --- Workers --------------------------------------------------------------------------------

    void spawn_workers()
    {
        auto self = this->shared_from_this();
        for (auto& owned : workers_) {
            worker& target = *owned;
            auto on_exit = [self, &target](std::exception_ptr failure) { self->on_worker_exit(target, failure); };
            boost::asio::co_spawn(target.strand, work(target),
                                  boost::asio::bind_cancellation_slot(target.cancel_signal.slot(),
                                                                      boost::asio::bind_executor(target.strand, on_exit)));
        }
    }

    boost::asio::awaitable<void> work(worker& self)
    {
        unsigned since_yield = 0;
        // A key leased when the previous one finished, and the time of that lease.
        std::optional<lease_type> next;
        time_point next_started{};
        for (;;) {
            std::optional<lease_type> item = next;
            // A worker that leased this key at its last finish is still counted as active.
            const bool still_active = item.has_value();
            time_point started = next_started;
            next.reset();
            if (!item) {
                started = clock_.now();
                {
                    std::lock_guard lock(mutex_);
                    if (stopping_) {
                        co_return;
                    }
                    item = queue_.pop(started);
                    update_depth();
                }
                if (!item) {
                    co_await wait_for_work(self);
                    continue;
                }
            }

            begin_attempt(self, *item, started, still_active);
            action outcome = action::done();
            std::exception_ptr failure;
            const char* stage = "read_spec";
            try {
                const Key& key = item->key();
                auto spec = co_await handler_->read_spec(key);
                if (!spec) {
                    outcome = action::retry(spec.error());
                } else if (spec.value() && handler_->reads_status_in_place()) {
                    stage = "read_status";
                    std::optional<Status> status;
                    auto read = co_await handler_->read_status(key, *spec.value(), status);
                    if (!read) {
                        outcome = action::retry(read.error());
                    } else {
                        stage = "reconcile";
                        outcome = co_await handler_->reconcile(key, *spec.value(), *status);
                    }
                } else if (spec.value()) {
                    stage = "read_status";
                    auto status = co_await handler_->read_status(key, *spec.value());
                    if (!status) {
                        outcome = action::retry(status.error());
                    } else {
                        stage = "reconcile";
                        outcome = co_await handler_->reconcile(key, *spec.value(), status.value());
                    }
                }
            } catch (...) {
                failure = std::current_exception();
            }
            outcome = end_attempt(self, *item, outcome, failure, stage);
            if (self.cancel_emitted) {
                // The cancellation was meant for that attempt only; later awaits must not see it.
                self.cancel_emitted = false;
                co_await boost::asio::this_coro::reset_cancellation_state();
            }

            // Unless the worker yields after this key, it leases the next one in the same critical
            // section as the finish, which saves a lock and a clock read per key.
            const time_point finished = clock_.now();
            const bool lease_next = since_yield + 1 < yield_interval;
            auto gave_up = finish_attempt(*item, outcome, started, finished, lease_next ? &next : nullptr);
            next_started = finished;
            if (!next) {
                metrics_.active_workers->add(-1);
            }
            if (gave_up) {
                co_await run_terminal_hook(gave_up->first, gave_up->second);
            }

            if (++since_yield == yield_interval) {
                since_yield = 0;
                co_await boost::asio::post(self.strand, boost::asio::use_awaitable);
            }
        }
    }

    // The active-workers gauge changes only when a worker starts or stops working through keys,
    // not between two keys it handles back to back, which saves two atomic updates per key.
    void begin_attempt(worker& self, const lease_type& item, time_point now, bool still_active)
    {
        metrics_.queue_duration->observe(to_seconds(item.queue_time()));
        if (!still_active) {
            metrics_.active_workers->add(1);
        }
        self.busy = true;
        self.timed_out = false;
        self.cancelled_by_stop = false;
        if (!options_.reconcile_timeout) {
            return;
        }
        const duration timeout = std::max(*options_.reconcile_timeout, duration::zero());
        self.deadline = timeout > time_point::max() - now ? time_point::max() : now + timeout;
        if (!self.watchdog_armed) {
            arm_watchdog(self);
        }
    }

    // The watchdog is armed lazily: it stays set for an earlier deadline and, when it fires, re-arms
    // for the current one. So a reconcile that completes at once costs no timer operation.
    void arm_watchdog(worker& self)
    {
        self.watchdog_armed = true;
        self.watchdog.expires_at(self.deadline);
        self.watchdog.async_wait(boost::asio::bind_executor(
            self.strand, [core = this->shared_from_this(), &self](boost::system::error_code) {
                core->on_watchdog(self);
            }));
    }

    void on_watchdog(worker& self)
    {
        self.watchdog_armed = false;
        if (self.coroutine_done) {
            worker_exited();
            return;
        }
        if (!self.busy) {
            return;
        }
        if (clock_.now() < self.deadline) {
            arm_watchdog(self);
            return;
        }
        self.timed_out = true;
        self.cancel_emitted = true;
        self.cancel_signal.emit(boost::asio::cancellation_type::terminal);
    }

    action end_attempt(worker& self, const lease_type& item, action outcome, std::exception_ptr failure,
                       const char* stage)
    {
        self.busy = false;

        const bool failed = failure || outcome.type() == action::kind::retry ||
                            outcome.type() == action::kind::terminal_error;
        if (self.timed_out && failed) {
            return action::retry(make_error_code(errc::timeout));
        }
        if (self.cancelled_by_stop && failed) {
            return action::retry(make_error_code(errc::cancelled));
        }
        if (!failure) {
            return outcome;
        }

        // An exception that is not a system_error has no error code; state_not_recoverable is the
        // closest generic one, and the log record carries the exception's text.
        boost::system::error_code error = boost::system::errc::make_error_code(boost::system::errc::state_not_recoverable);
        try {
            std::rethrow_exception(failure);
        } catch (const boost::system::system_error& thrown) {
            error = thrown.code();
        } catch (...) {
        }
        if (options_.log.enabled(log_level::error)) {
            options_.log.error("reconcile threw an exception; retrying with backoff",
                               {{"controller", options_.name},
                                {"key", format_key(item.key())},
                                {"stage", stage},
                                {"exception", describe(failure)}});
        }
        return action::retry(error);
    }

    // Records the outcome in the queue and the metrics. When `next` is set and the key did not give
    // up, also leases the next ready key into it, unless the reconciler is stopping. Returns the key
    // and failure when the key gave up, for the terminal-failure hook.
    std::optional<std::pair<Key, terminal_failure>> finish_attempt(const lease_type& item, const action& outcome,
                                                                   time_point started, time_point now,
                                                                   std::optional<lease_type>* next)
    {
        metrics_.reconcile_time->observe(to_seconds(now - started));
        count_result(outcome);

        // The lease's key dies with its entry in finish(), so a failing key is copied first.
        std::optional<Key> failed_key;
        if (outcome.type() == action::kind::retry || outcome.type() == action::kind::terminal_error) {
            failed_key.emplace(item.key());
        }

        finish_result result;
        bool rearm = false;
        {
            std::lock_guard lock(mutex_);
            result = queue_.finish(item, outcome, now);
            if (next != nullptr && !result.gave_up && !stopping_) {
                *next = queue_.pop(now);
            }
            rearm = pump_needs_rearm();
            update_depth();
        }
        if (rearm) {
            rearm_pump();
        }

        if (result.retry_scheduled) {
            metrics_.retries->increment();
            log_retry(*failed_key, outcome, result, now);
        }
        if (!result.gave_up) {
            return std::nullopt;
        }
        metrics_.terminal_errors->increment();
        terminal_failure failure{outcome.error(), result.failures, result.deadline_exceeded};
        if (options_.log.enabled(log_level::error)) {
            options_.log.error(result.deadline_exceeded ? "reconcile failed past its retry deadline; giving up"
                                                        : "reconcile failed with a terminal error; giving up",
                               {{"controller", options_.name},
                                {"key", format_key(*failed_key)},
                                {"error", outcome.error().message()},
                                {"attempts", std::to_string(result.failures)}});
        }
        return std::pair<Key, terminal_failure>(std::move(*failed_key), failure);
    }

    void count_result(const action& outcome)
    {
        switch (outcome.type()) {
        case action::kind::done:
            metrics_.success->increment();
            break;
        case action::kind::requeue_after:
            (outcome.delay() > duration::zero() ? metrics_.requeue_after : metrics_.requeue)->increment();
            break;
        case action::kind::retry:
        case action::kind::terminal_error:
            metrics_.error->increment();
            metrics_.errors->increment();
            break;
        }
    }

    void log_retry(const Key& key, const action& outcome, const finish_result& result, time_point now) const
    {
        if (!options_.log.enabled(log_level::warning)) {
            return;
        }
        const auto retry_in = std::chrono::duration_cast<std::chrono::milliseconds>(result.due - now);
        options_.log.warning("reconcile failed; retrying",
                             {{"controller", options_.name},
                              {"key", format_key(key)},
                              {"error", outcome.error().message()},
                              {"attempt", std::to_string(result.failures)},
                              {"retry_in_ms", std::to_string(retry_in.count())}});
    }

    boost::asio::awaitable<void> run_terminal_hook(const Key& key, const terminal_failure& failure)
    {
        std::exception_ptr thrown;
        try {
            co_await handler_->on_terminal_failure(key, failure);
        } catch (...) {
            thrown = std::current_exception();
        }
        if (thrown && options_.log.enabled(log_level::error)) {
            options_.log.error("terminal-failure hook threw an exception",
                               {{"controller", options_.name},
                                {"key", format_key(key)},
                                {"exception", describe(thrown)}});
        }
    }

    void on_worker_exit(worker& self, std::exception_ptr failure)
    {
        if (failure) {
            std::lock_guard lock(mutex_);
            if (!worker_failure_) {
                worker_failure_ = failure;
            }
        }
        self.coroutine_done = true;
        if (self.watchdog_armed) {
            // on_watchdog reports the exit once the cancelled wait has completed.
            self.watchdog.cancel();
            return;
        }
        worker_exited();
    }

    void worker_exited()
    {
        bool last = false;
        {
            std::lock_guard lock(mutex_);
            last = --live_workers_ == 0;
        }
        if (last) {
            boost::asio::post(control_, [self = this->shared_from_this()] { self->exit_timer_.cancel(); });
        }
    }

    // --- Control strand: startup, resync, delayed keys and stop -----------------------------------

    boost::asio::awaitable<stop_report<Key>> control_loop()
    {
        {
            std::lock_guard lock(mutex_);
            if (started_) {
                throw std::logic_error("reconciler '" + options_.name + "' can run only once");
            }
            started_ = true;
            live_workers_ = workers_.size();
        }
        options_.log.info("reconciler started",
                          {{"controller", options_.name}, {"workers", std::to_string(workers_.size())}});
        spawn_workers();

        {
            using namespace boost::asio::experimental::awaitable_operators;
            co_await (pump_delayed_keys() || resync() || wait_for_stop_request());
        }
        // A cancellation of run() ends the group above; the stop that follows must still await.
        co_await boost::asio::this_coro::reset_cancellation_state();

        const std::size_t cancelled_count = co_await stop_workers();
        co_return finish_stop(cancelled_count);
    }

    boost::asio::awaitable<void> wait_for_stop_request()
    {
        const auto state = co_await boost::asio::this_coro::cancellation_state;
        for (;;) {
            {
                std::lock_guard lock(mutex_);
                if (stop_requested_) {
                    co_return;
                }
            }
            stop_timer_.expires_at(time_point::max());
            co_await stop_timer_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
            if (state.cancelled() != cancellation_none) {
                co_return;
            }
        }
    }

    boost::asio::awaitable<void> pump_delayed_keys()
    {
        const auto state = co_await boost::asio::this_coro::cancellation_state;
        for (;;) {
            time_point due;
            {
                std::lock_guard lock(mutex_);
                due = queue_.next_due().value_or(time_point::max());
                pump_due_ = due;
            }
            pump_timer_.expires_at(due);
            auto [error] = co_await pump_timer_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
            if (state.cancelled() != cancellation_none) {
                std::lock_guard lock(mutex_);
                pump_due_ = time_point::min();
                co_return;
            }
            if (!error) {
                promote_and_wake();
            }
        }
    }

    void promote_and_wake()
    {
        std::vector<std::pair<worker*, wake_handler>> wakes;
        {
            std::lock_guard lock(mutex_);
            queue_.promote_due(clock_.now());
            update_depth();
            wakes = take_idle_workers(idle_.size());
        }
        wake_workers(std::move(wakes));
    }

    boost::asio::awaitable<void> resync()
    {
        const auto state = co_await boost::asio::this_coro::cancellation_state;
        std::uint32_t failures = 0;
        for (;;) {
            auto listed = co_await list_keys();
            if (state.cancelled() != cancellation_none) {
                co_return;
            }

            duration next = options_.resync_period;
            if (listed) {
                failures = 0;
                enqueue_listed(std::move(listed).value());
                if (next <= duration::zero()) {
                    next = duration::max();
                }
            } else {
                next = options_.backoff.window(++failures);
                if (options_.log.enabled(log_level::warning)) {
                    options_.log.warning("listing keys failed; retrying",
                                         {{"controller", options_.name},
                                          {"error", listed.error().message()},
                                          {"attempt", std::to_string(failures)}});
                }
            }

            const time_point now = clock_.now();
            resync_timer_.expires_at(next > time_point::max() - now ? time_point::max() : now + next);
            co_await resync_timer_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
            if (state.cancelled() != cancellation_none) {
                co_return;
            }
        }
    }

    boost::asio::awaitable<result<std::vector<Key>>> list_keys()
    {
        std::exception_ptr thrown;
        try {
            co_return co_await handler_->list_keys();
        } catch (...) {
            thrown = std::current_exception();
        }
        const auto state = co_await boost::asio::this_coro::cancellation_state;
        const bool cancelled = state.cancelled() != cancellation_none;
        if (!cancelled && options_.log.enabled(log_level::error)) {
            options_.log.error("listing keys threw an exception",
                               {{"controller", options_.name}, {"exception", describe(thrown)}});
        }
        co_return boost::system::errc::make_error_code(boost::system::errc::state_not_recoverable);
    }

    void enqueue_listed(std::vector<Key> keys)
    {
        const time_point now = clock_.now();
        std::vector<std::pair<worker*, wake_handler>> wakes;
        {
            std::lock_guard lock(mutex_);
            queue_.reserve(keys.size());
            for (auto& key : keys) {
                if (queue_.add_if_idle(std::move(key), now)) {
                    metrics_.adds->increment();
                }
            }
            update_depth();
            wakes = take_idle_workers(idle_.size());
        }
        wake_workers(std::move(wakes));
    }

    bool all_workers_exited()
    {
        std::lock_guard lock(mutex_);
        return live_workers_ == 0;
    }

    // Stops taking work, waits up to the grace period for running reconciles, then cancels them and
    // waits for them to return. Returns how many it cancelled.
    boost::asio::awaitable<std::size_t> stop_workers()
    {
        std::vector<std::pair<worker*, wake_handler>> idle;
        {
            std::lock_guard lock(mutex_);
            stopping_ = true;
            for (worker* waiting : idle_) {
                idle.emplace_back(waiting, std::move(*waiting->wake));
                waiting->wake.reset();
            }
            idle_.clear();
        }
        wake_workers(std::move(idle));
        options_.log.info("reconciler stopping",
                          {{"controller", options_.name},
                           {"grace_period_ms", std::to_string(std::chrono::duration_cast<std::chrono::milliseconds>(
                                                                  options_.stop_grace_period)
                                                                  .count())}});

        if (!all_workers_exited()) {
            const time_point now = clock_.now();
            const duration grace = std::max(options_.stop_grace_period, duration::zero());
            exit_timer_.expires_at(grace > time_point::max() - now ? time_point::max() : now + grace);
            co_await exit_timer_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        }

        // Workers hold references into this object, so run() must not return before they do, and
        // a further cancellation of run() must not end the waits below.
        co_await boost::asio::this_coro::reset_cancellation_state(boost::asio::disable_cancellation());
        std::size_t cancelled_count = 0;
        if (!all_workers_exited()) {
            cancelled_count = co_await cancel_running();
        }
        while (!all_workers_exited()) {
            exit_timer_.expires_at(time_point::max());
            co_await exit_timer_.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        }
        co_return cancelled_count;
    }

    boost::asio::awaitable<std::size_t> cancel_running()
    {
        std::size_t count = 0;
        for (auto& owned : workers_) {
            worker& target = *owned;
            // Each worker's state belongs to its strand; hop there to read it and emit.
            count += co_await boost::asio::co_spawn(
                target.strand,
                [&target]() -> boost::asio::awaitable<std::size_t> {
                    if (!target.busy) {
                        co_return 0;
                    }
                    target.cancelled_by_stop = true;
                    target.cancel_emitted = true;
                    target.cancel_signal.emit(boost::asio::cancellation_type::terminal);
                    co_return 1;
                },
                boost::asio::use_awaitable);
        }
        if (count > 0) {
            options_.log.warning("cancelled reconciles still running after the grace period",
                                 {{"controller", options_.name}, {"cancelled", std::to_string(count)}});
        }
        co_return count;
    }

    stop_report<Key> finish_stop(std::size_t cancelled_count)
    {
        stop_report<Key> report;
        report.cancelled = cancelled_count;
        std::exception_ptr failure;
        {
            std::lock_guard lock(mutex_);
            closed_ = true;
            report.pending = queue_.take_pending();
            failure = worker_failure_;
            update_depth();
        }
        options_.log.info("reconciler stopped",
                          {{"controller", options_.name},
                           {"pending", std::to_string(report.pending.size())},
                           {"cancelled", std::to_string(cancelled_count)}});
        if (failure) {
            std::rethrow_exception(failure);
        }
        return report;
    }

    boost::asio::any_io_executor executor_;
    strand_type control_;
    Clock clock_;
    reconciler_options options_;
    std::unique_ptr<handler_base<Key, Spec, Status>> handler_;
    controller_metrics metrics_;
    std::vector<std::unique_ptr<worker>> workers_;

    mutable std::mutex mutex_;
    // Guarded by mutex_.
    queue_type queue_;
    std::vector<worker*> idle_;
    std::size_t live_workers_ = 0;
    // The expiry the pump waits for; min() while no pump runs, so that no caller asks it to re-arm.
    time_point pump_due_ = time_point::min();
    bool started_ = false;
    bool stop_requested_ = false;
    bool stopping_ = false;
    bool closed_ = false;
    std::exception_ptr worker_failure_;

    // Used only on control_.
    timer_type pump_timer_;
    timer_type resync_timer_;
    timer_type stop_timer_;
    timer_type exit_timer_;
};

} // namespace detail

/// A controller loop for keys `Key`, desired state `Spec` and observed state `Status`.
///
/// Keys come from `enqueue` (change notifications), from a resync that lists all keys periodically,
/// and from the same listing at startup. `max_concurrent_reconciles` long-lived worker coroutines
/// pull keys from a `work_queue`, so a key waiting for its requeue or retry time occupies no worker.
/// Each worker runs on its own strand of the given executor, so a multi-threaded `io_context` runs
/// reconciles of different keys in parallel.
///
/// Lifetime: like any Asio I/O object, destroy the reconciler before its execution context. It may
/// be destroyed while `run()` is in progress, which requests a stop; the internal state then lives
/// until `run()` returns.
/// Thread safety: `enqueue`, `enqueue_after`, `request_stop` and `stats` may be called from any
/// thread at the same time.
template <class Spec, class Status, reconcile_key Key = std::string, reconcile_clock Clock = steady_clock>
class reconciler {
public:
    using key_type = Key;
    using spec_type = Spec;
    using status_type = Status;
    using clock_type = Clock;

    /// Creates a reconciler that calls `handler`. Nothing runs before `run()`, but keys may be
    /// enqueued already. Throws `std::invalid_argument` for invalid options.
    template <class Handler>
        requires reconcile_handler<Handler, Key, Spec, Status>
    reconciler(boost::asio::any_io_executor executor, Handler handler, reconciler_options options = {},
               Clock clock = Clock())
        : core_(std::make_shared<core_type>(
              std::move(executor),
              std::make_unique<detail::handler_model<Handler, Key, Spec, Status>>(std::move(handler)),
              std::move(options), std::move(clock)))
    {
    }

    reconciler(const reconciler&) = delete;
    reconciler& operator=(const reconciler&) = delete;

    ~reconciler() { core_->request_stop(); }

    /// Requests a reconcile of `key` as soon as a worker is free. A key already queued is not queued
    /// twice; a key being reconciled runs once more afterwards. Returns false, and drops nothing
    /// silently, only when `run()` has already returned.
    bool enqueue(Key key) { return core_->enqueue(std::move(key), std::nullopt); }

    /// Requests a reconcile of `key` after `delay`, clamped to [0, max_delay]. When the key is
    /// already requested for an earlier time, the earlier time wins.
    template <class Rep, class Period>
    bool enqueue_after(Key key, std::chrono::duration<Rep, Period> delay)
    {
        return core_->enqueue(std::move(key), saturating_duration(delay));
    }

    /// Asks `run()` to stop: take no more work, give running reconciles `stop_grace_period` to
    /// finish, cancel the rest, and return the keys left undone. Cancelling `run()` does the same.
    void request_stop() { core_->request_stop(); }

    /// Runs the startup sweep, the resync, the workers and the delayed-key timer until a stop is
    /// requested or `run()` is cancelled, then stops gracefully and returns what was left undone.
    /// May be awaited once. A second cancellation during the grace period cancels running reconciles
    /// at once. `run()` still waits until each of them has returned, so a reconcile that ignores
    /// cancellation delays it.
    boost::asio::awaitable<stop_report<Key>> run() { return core_type::run(core_); }

    /// Current counts of keys by state.
    queue_stats stats() const { return core_->stats(); }

    const Clock& clock() const noexcept { return core_->clock(); }

private:
    using core_type = detail::reconciler_core<Key, Spec, Status, Clock>;

    std::shared_ptr<core_type> core_;
};

} // namespace lcm::reconcile
