// The CMLWorker aggregate: a CML host, its lifecycle status and its license, with every
// guard of the license operations inside.
#pragma once

#include <lcm/domain/events.hpp>
#include <lcm/domain/license.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/error.hpp>

#include <boost/url/parse.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

// Set under ThreadSanitizer, with g++ or clang.
#if defined(__SANITIZE_THREAD__)
#define LCM_DETAIL_THREAD_SANITIZER 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define LCM_DETAIL_THREAD_SANITIZER 1
#endif
#endif
#ifndef LCM_DETAIL_THREAD_SANITIZER
#define LCM_DETAIL_THREAD_SANITIZER 0
#endif

namespace lcm::domain {

/// The maximum length of a worker id and of a worker name.
inline constexpr std::size_t max_worker_id_length = 64;
inline constexpr std::size_t max_worker_name_length = 128;

/// Checks a worker id: 1 to 64 characters of `[A-Za-z0-9._-]`, so ids are safe in URLs and logs.
inline bool is_valid_worker_id(std::string_view id) noexcept
{
    if (id.empty() || id.size() > max_worker_id_length) {
        return false;
    }
    return std::all_of(id.begin(), id.end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' ||
               c == '-';
    });
}

/// Checks a CML base URL: absolute `http` or `https` with a host, and no credentials, query
/// or fragment. Credentials belong in the controller's configuration, because the URL is
/// shown in events and public views.
inline bool is_valid_cml_url(std::string_view url) noexcept
{
    auto parsed = boost::urls::parse_absolute_uri(url);
    if (!parsed) {
        return false;
    }
    const auto scheme = parsed->scheme_id();
    return (scheme == boost::urls::scheme::http || scheme == boost::urls::scheme::https) &&
           !parsed->encoded_host().empty() && !parsed->has_userinfo() && !parsed->has_query() &&
           !parsed->has_fragment();
}

namespace detail {

inline bool is_valid_worker_name(std::string_view name) noexcept
{
    if (name.empty() || name.size() > max_worker_name_length) {
        return false;
    }
    return std::none_of(name.begin(), name.end(), [](char c) { return static_cast<unsigned char>(c) < 0x20 || c == 0x7f; });
}

inline void redact_in_place(std::string& text, const std::optional<secret>& value)
{
    if (value) {
        text = redact_secret(text, *value);
    }
}

} // namespace detail

/// The CMLWorker aggregate root.
///
/// Every method that changes state checks its guards first and changes nothing when one
/// fails. Successful changes record domain events, which the caller takes with
/// `take_events()` after the worker was saved. The aggregate does no I/O and is not
/// thread-safe: each caller works on its own copy and saves it with the version it read.
class cml_worker {
public:
    /// Every field of the aggregate except its uncommitted events.
    struct fields {
        std::string id;
        std::string name;
        std::string cml_url;
        worker_status status = worker_status::pending;
        worker_status desired_status = worker_status::running;
        cml_license license;
        /// The version of the stored row this state was read from; 0 before the first save.
        std::uint64_t version = 0;
        timestamp created_at{};
        timestamp updated_at{};

        friend bool operator==(const fields&, const fields&) = default;
    };

    /// Creates a new, unsaved worker and records `worker_created`.
    /// Fails with `errc::invalid_argument` on a malformed id, name or URL.
    static result<cml_worker> create(std::string id, std::string name, std::string cml_url, worker_status status,
                                     std::string_view initiated_by, timestamp now = now_utc())
    {
        if (!is_valid_worker_id(id) || !detail::is_valid_worker_name(name) || !is_valid_cml_url(cml_url)) {
            return errc::invalid_argument;
        }
        fields state;
        state.id = std::move(id);
        state.name = std::move(name);
        state.cml_url = std::move(cml_url);
        state.status = status;
        state.created_at = now;
        state.updated_at = now;

        cml_worker worker(std::move(state));
        worker.events_.push_back(worker_created{
            {worker.state_.id, 0, now, std::string(initiated_by)}, worker.state_.name, worker.state_.cml_url, status});
        return worker;
    }

    /// Rebuilds a stored worker, without events. Fails with `errc::invalid_argument` when the
    /// fields break an invariant of the aggregate, for example a corrupt row. `error_field`,
    /// when given, receives the record name of the first such field, e.g. `license.pending_token`.
    static result<cml_worker> restore(fields state, std::string* error_field = nullptr)
    {
        if (const auto field = find_broken_invariant(state); !field.empty()) {
            if (error_field) {
                *error_field = field;
            }
            return errc::invalid_argument;
        }
        return cml_worker(std::move(state));
    }

    const fields& state() const noexcept { return state_; }

    /// Moves the fields out of a worker that is no longer needed, leaving its strings empty.
    fields release_state() && noexcept { return std::move(state_); }
    const std::string& id() const noexcept { return state_.id; }
    const std::string& name() const noexcept { return state_.name; }
    const std::string& cml_url() const noexcept { return state_.cml_url; }
    worker_status status() const noexcept { return state_.status; }
    worker_status desired_status() const noexcept { return state_.desired_status; }
    const cml_license& license() const noexcept { return state_.license; }
    std::uint64_t version() const noexcept { return state_.version; }
    timestamp created_at() const noexcept { return state_.created_at; }
    timestamp updated_at() const noexcept { return state_.updated_at; }

    /// Whether transitions change license fields in place while no copy shares them. False
    /// under ThreadSanitizer, which does not model the fence that makes this safe and would
    /// report the reads of owners that released the fields as races.
#if LCM_DETAIL_THREAD_SANITIZER
    static constexpr bool edits_in_place = false;
#else
    static constexpr bool edits_in_place = true;
#endif

    /// Returns a counter that grows with every change of the state, so that comparing two of its
    /// values shows whether a method changed the worker in between. It is not stored.
    std::uint64_t revision() const noexcept { return revision_; }

    /// Returns the events recorded since the worker was created or restored.
    const std::vector<domain_event>& events() const noexcept { return events_; }

    /// Moves the recorded events out, leaving none.
    std::vector<domain_event> take_events() noexcept { return std::exchange(events_, {}); }

    /// Sets the version after a repository saved this state. Only repositories call this.
    void set_version(std::uint64_t version) noexcept { state_.version = version; }

    /// Copies the fields of `saved`, without its events. Repositories that keep aggregates call
    /// this to store a worker they saved.
    void assign_state(const cml_worker& saved) { state_ = saved.state_; }

    /// Compares the state and ignores uncommitted events.
    friend bool operator==(const cml_worker& lhs, const cml_worker& rhs) noexcept { return lhs.state_ == rhs.state_; }

    /// Records a new lifecycle status reported by the infrastructure.
    /// A change to the current status is a no-op without an event.
    void change_status(worker_status status, std::string_view initiated_by, timestamp now = now_utc())
    {
        if (status == state_.status) {
            return;
        }
        event_in_place<worker_status_changed> event(events_);
        event->header = {state_.id, 0, now, std::string(initiated_by)};
        event->previous_status = state_.status;
        event->status = status;
        event.commit();
        state_.status = status;
        touch(now);
    }

    /// Records the intent to register `token` on this worker and returns the operation id.
    ///
    /// Fails with `invalid_token` for a token outside CML's format, `worker_not_running`,
    /// `operation_in_progress` while another operation is pending, and `already_registered`
    /// when the worker holds a license and `reregister` is false. Repeating the pending
    /// request with the same token and flag returns the same operation id and records nothing.
    result<std::uint64_t> request_license_registration(secret token, bool reregister, std::string_view initiated_by,
                                                       timestamp now = now_utc())
    {
        const auto& license = *state_.license.state_;
        if (!is_valid_license_token(token.reveal())) {
            return errc::invalid_token;
        }
        if (license.pending_operation == license_operation::registration && license.pending_token == token &&
            license.reregister == reregister) {
            return license.operation_id;
        }
        if (state_.status != worker_status::running) {
            return errc::worker_not_running;
        }
        if (license.pending_operation != license_operation::none) {
            return errc::operation_in_progress;
        }
        if (license.status == license_status::registered && !reregister) {
            return errc::already_registered;
        }

        std::string requested_by(initiated_by);
        event_in_place<license_registration_requested> event(events_);
        event->header = {state_.id, license.operation_id + 1, now, requested_by};
        event->reregister = reregister;
        auto& next = edit_license();
        event.commit();
        begin_operation(next, license_operation::registration, std::move(requested_by), now);
        next.pending_token = std::move(token);
        next.reregister = reregister;
        touch(now);
        return next.operation_id;
    }

    /// Records the intent to deregister this worker's license and returns the operation id.
    ///
    /// Fails with `worker_not_running`, `operation_in_progress` while another operation is
    /// pending, and `not_registered` unless the license is registered or in evaluation.
    /// Repeating the pending request returns the same operation id and records nothing.
    result<std::uint64_t> request_license_deregistration(std::string_view initiated_by, timestamp now = now_utc())
    {
        const auto& license = *state_.license.state_;
        if (license.pending_operation == license_operation::deregistration) {
            return license.operation_id;
        }
        if (state_.status != worker_status::running) {
            return errc::worker_not_running;
        }
        if (license.pending_operation != license_operation::none) {
            return errc::operation_in_progress;
        }
        if (!state_.license.holds_license()) {
            return errc::not_registered;
        }

        std::string requested_by(initiated_by);
        event_in_place<license_deregistration_requested> event(events_);
        event->header = {state_.id, license.operation_id + 1, now, requested_by};
        auto& next = edit_license();
        event.commit();
        begin_operation(next, license_operation::deregistration, std::move(requested_by), now);
        touch(now);
        return next.operation_id;
    }

    /// Claims the pending operation for `holder` until `now + lease` and returns the claim's fence.
    ///
    /// A new claim, taken when the operation is unclaimed or another holder's claim expired
    /// (expiry at or before `now`), increases the fence and records `license_operation_claimed`.
    /// The same holder renewing keeps its fence and records nothing. A renewal moves the expiry
    /// to `now + lease` only when less than half of `lease` remains, so a controller that renews
    /// at every reconcile changes the worker about once per half lease. Fails with
    /// `invalid_argument` for an empty or over-long holder or a lease that is not positive,
    /// `not_found` when no operation is pending, and `claimed` while another holder's claim is
    /// unexpired. `license().claim_holder()` and `license().claim_expires_at()` then name that
    /// claim.
    result<std::uint64_t> claim_license_operation(std::string_view holder, std::chrono::microseconds lease,
                                                  timestamp now = now_utc())
    {
        const auto& license = *state_.license.state_;
        if (holder.empty() || holder.size() > max_claim_holder_length || lease <= std::chrono::microseconds::zero()) {
            return errc::invalid_argument;
        }
        if (license.pending_operation == license_operation::none) {
            return errc::not_found;
        }
        const auto expires_at = now + lease;
        if (license.claim_holder == holder) {
            if (*license.claim_expires_at - now >= lease / 2) {
                return license.fence;
            }
            edit_license().claim_expires_at = expires_at;
            touch(now);
            return state_.license.fence();
        }
        if (!license.claim_holder.empty() && *license.claim_expires_at > now) {
            return errc::claimed;
        }

        const auto fence = license.fence + 1;
        std::string new_holder(holder);
        event_in_place<license_operation_claimed> event(events_);
        fill_header(event->header, now);
        event->holder = new_holder;
        event->fence = fence;
        event->expires_at = expires_at;
        auto& next = edit_license();
        event.commit();
        next.claim_holder = std::move(new_holder);
        next.claim_expires_at = expires_at;
        next.fence = fence;
        touch(now);
        return fence;
    }

    /// Marks the pending operation as started, before a controller makes its first call to CML.
    /// Starting an operation that is already in progress succeeds and records nothing, so a
    /// controller that restarted can resume. Fails with `stale_operation` for any operation
    /// but the pending one, `claim_lost` when `key.fence` is not the current claim's fence
    /// (see `check_claim`), and `worker_not_running`.
    result<void> start_license_operation(operation_key key, timestamp now = now_utc())
    {
        const auto& license = *state_.license.state_;
        if (key.operation_id != license.operation_id || license.pending_operation == license_operation::none) {
            return errc::stale_operation;
        }
        BOOST_OUTCOME_TRY(check_claim(key));
        if (license.operation_in_progress) {
            return success();
        }
        if (state_.status != worker_status::running) {
            return errc::worker_not_running;
        }

        if (license.pending_operation == license_operation::registration) {
            start_operation<license_registration_started>(now);
        }
        else {
            start_operation<license_deregistration_started>(now);
        }
        return success();
    }

    /// Records that CML completed the registration of the current operation, and ends its claim.
    /// A repeated completion succeeds and records nothing. Fails with `operation_not_started`
    /// before `start_license_operation`, `stale_operation` for any other operation, and
    /// `claim_lost` for a fence other than the current claim's.
    result<void> complete_license_registration(operation_key key, registration_details details,
                                               timestamp now = now_utc())
    {
        BOOST_OUTCOME_TRY(check_finish(key, license_operation::registration, operation_outcome::completed));
        if (already_finished(key.operation_id, license_operation::registration, operation_outcome::completed)) {
            return success();
        }

        event_in_place<license_registration_completed> event(events_);
        fill_header(event->header, now);
        event->expiry_date = details.expiry_date;
        event->smart_account = details.smart_account;
        event->virtual_account = details.virtual_account;
        event->authorization_status = details.authorization_status;
        event->features.reserve(details.features.size());
        for (const auto& feature : details.features) {
            event->features.push_back(feature.name);
        }
        auto& next = edit_license();
        event.commit();
        finish_operation(next, operation_outcome::completed, now);
        next.status = license_status::registered;
        next.token = std::exchange(next.pending_token, std::nullopt);
        next.expiry_date = details.expiry_date;
        next.smart_account = std::move(details.smart_account);
        next.virtual_account = std::move(details.virtual_account);
        next.authorization_status = std::move(details.authorization_status);
        next.features = std::move(details.features);
        next.cml_info = std::move(details.cml_info);
        touch(now);
        return success();
    }

    /// Records that the registration of the current operation failed; the license keeps its
    /// previous status and token. The pending operation may fail before it started, for
    /// example when the worker stopped. The message is stored with every token redacted.
    /// A repeated failure succeeds and records nothing; any other operation is `stale_operation`,
    /// and a fence other than the current claim's is `claim_lost`. The claim ends.
    result<void> fail_license_registration(operation_key key, std::string error_code, std::string message,
                                           timestamp now = now_utc())
    {
        return fail_operation(key, license_operation::registration, std::move(error_code),
                              std::move(message), now);
    }

    /// Records that CML deregistered the license of the current operation. `warning` carries
    /// CML's text when the Cisco licensing service could not be told. A repeated completion
    /// succeeds and records nothing. Fails like `complete_license_registration`.
    result<void> complete_license_deregistration(operation_key key, std::optional<std::string> warning,
                                                 timestamp now = now_utc())
    {
        BOOST_OUTCOME_TRY(check_finish(key, license_operation::deregistration, operation_outcome::completed));
        if (already_finished(key.operation_id, license_operation::deregistration, operation_outcome::completed)) {
            return success();
        }

        if (warning) {
            detail::redact_in_place(*warning, state_.license.token());
        }
        event_in_place<license_deregistration_completed> event(events_);
        fill_header(event->header, now);
        event->warning = warning;
        auto& next = edit_license();
        event.commit();
        finish_operation(next, operation_outcome::completed, now);
        next.status = license_status::unregistered;
        next.token.reset();
        next.expiry_date.reset();
        next.smart_account.clear();
        next.virtual_account.clear();
        next.authorization_status.clear();
        next.features.clear();
        next.cml_info = nullptr;
        next.last_warning = std::move(warning);
        touch(now);
        return success();
    }

    /// Records that the deregistration of the current operation failed; the license stays.
    /// Fails like `fail_license_registration`.
    result<void> fail_license_deregistration(operation_key key, std::string error_code, std::string message,
                                             timestamp now = now_utc())
    {
        return fail_operation(key, license_operation::deregistration, std::move(error_code),
                              std::move(message), now);
    }

private:
    explicit cml_worker(fields state) : state_(std::move(state)) {}

    /// Returns the record name of the first field that breaks an invariant, or an empty view.
    /// A pending token exists exactly while a registration is pending, so that no token
    /// outlives the operation that needed it.
    static std::string_view find_broken_invariant(const fields& state) noexcept
    {
        const auto& license = state.license.state();
        const bool pending = license.pending_operation != license_operation::none;
        if (!is_valid_worker_id(state.id)) {
            return "id";
        }
        if (license.operation_in_progress && !pending) {
            return "license.operation_in_progress";
        }
        if ((license.pending_operation == license_operation::registration) != license.pending_token.has_value()) {
            return "license.pending_token";
        }
        if (pending && license.operation_id == 0) {
            return "license.operation_id";
        }
        if (!license.claim_holder.empty() && (!pending || license.fence == no_fence)) {
            return "license.claim_holder";
        }
        if (license.claim_holder.empty() == license.claim_expires_at.has_value()) {
            return "license.claim_expires_at";
        }
        return {};
    }

    /// An event that a transition builds in place at the end of the recorded events, which saves
    /// moving it there. The transition fills it, calls what may still throw, and commits it before
    /// it changes the state. An event that was not committed is removed again, so a transition
    /// that throws records nothing.
    template <class Event>
    class event_in_place {
    public:
        explicit event_in_place(std::vector<domain_event>& events) : events_(events)
        {
            events_.reserve(events_.size() + 1);
            // Cannot throw: the room is reserved and an event's default constructor does not throw.
            event_ = &std::get<Event>(events_.emplace_back(std::in_place_type<Event>));
        }

        event_in_place(const event_in_place&) = delete;
        event_in_place& operator=(const event_in_place&) = delete;

        ~event_in_place()
        {
            if (!committed_) {
                events_.pop_back();
            }
        }

        Event* operator->() const noexcept { return event_; }

        void commit() noexcept { committed_ = true; }

    private:
        std::vector<domain_event>& events_;
        Event* event_ = nullptr;
        bool committed_ = false;
    };

    /// Fills the header of an event about the current operation.
    void fill_header(event_header& header, timestamp now) const
    {
        header.worker_id = state_.id;
        header.operation_id = state_.license.operation_id();
        header.occurred_at = now;
        header.initiated_by = state_.license.requested_by();
    }

    /// Records the start of the pending operation with `Event`, its kind's started event.
    template <class Event>
    void start_operation(timestamp now)
    {
        const auto attempt = state_.license.attempts() + 1;
        event_in_place<Event> event(events_);
        fill_header(event->header, now);
        event->attempt = attempt;
        auto& next = edit_license();
        event.commit();
        next.operation_in_progress = true;
        next.started_at = now;
        next.attempts = attempt;
        touch(now);
    }

    /// Records the failure of the pending operation with `Event`, its kind's failed event.
    template <class Event>
    void record_failure(operation_error error, timestamp now)
    {
        event_in_place<Event> event(events_);
        fill_header(event->header, now);
        event->error = error;
        auto& next = edit_license();
        event.commit();
        finish_operation(next, operation_outcome::failed, now);
        next.pending_token.reset();
        next.last_error = std::move(error);
        touch(now);
    }

    /// Sets the fields of a new operation in `next`. Changes nothing that can throw.
    static void begin_operation(cml_license::fields& next, license_operation kind, std::string&& requested_by,
                                timestamp now) noexcept
    {
        next.pending_operation = kind;
        next.pending_token.reset();
        next.reregister = false;
        next.operation_in_progress = false;
        next.operation_id += 1;
        next.requested_by = std::move(requested_by);
        next.requested_at = now;
        next.started_at.reset();
        next.finished_at.reset();
        next.attempts = 0;
        next.last_error.reset();
        next.last_warning.reset();
        next.claim_holder.clear();
        next.claim_expires_at.reset();
    }

    /// Sets the fields of a finished operation in `next`. Changes nothing that can throw.
    static void finish_operation(cml_license::fields& next, operation_outcome outcome, timestamp now) noexcept
    {
        next.last_operation = next.pending_operation;
        next.last_outcome = outcome;
        next.pending_operation = license_operation::none;
        next.operation_in_progress = false;
        next.reregister = false;
        next.finished_at = now;
        next.last_error.reset();
        // Released rather than cleared, so that a finished worker keeps no buffer for a holder.
        std::string().swap(next.claim_holder);
        next.claim_expires_at.reset();
    }

    bool already_finished(std::uint64_t operation_id, license_operation kind, operation_outcome outcome) const noexcept
    {
        const auto& license = *state_.license.state_;
        return operation_id == license.operation_id && license.pending_operation == license_operation::none &&
               license.last_operation == kind && license.last_outcome == outcome;
    }

    /// Checks that a report under `key.fence` comes from the current claim. The fence must be
    /// the fence of the last claim, even when that claim expired, as long as no other controller
    /// took the operation over: classic fencing, which only a newer claim invalidates.
    /// `no_fence` is accepted only while no controller has claimed the operation. After the operation
    /// finished, the claim is gone and the last fence (or `no_fence`) still names it, so a
    /// repeated report is accepted.
    result<void> check_claim(operation_key key) const
    {
        const auto& license = *state_.license.state_;
        if (key.fence == no_fence && license.claim_holder.empty()) {
            return success();
        }
        if (key.fence != license.fence) {
            return errc::claim_lost;
        }
        return success();
    }

    /// Checks that `key` may finish with `outcome`: it is pending (and started, for a
    /// completion), or it already finished the same way, and its fence is current.
    result<void> check_finish(operation_key key, license_operation kind, operation_outcome outcome) const
    {
        const auto& license = *state_.license.state_;
        if (already_finished(key.operation_id, kind, outcome)) {
            return check_claim(key);
        }
        if (key.operation_id != license.operation_id || license.pending_operation != kind) {
            return errc::stale_operation;
        }
        BOOST_OUTCOME_TRY(check_claim(key));
        if (outcome == operation_outcome::completed && !license.operation_in_progress) {
            return errc::operation_not_started;
        }
        return success();
    }

    result<void> fail_operation(operation_key key, license_operation kind, std::string error_code,
                                std::string message, timestamp now)
    {
        BOOST_OUTCOME_TRY(check_finish(key, kind, operation_outcome::failed));
        if (already_finished(key.operation_id, kind, operation_outcome::failed)) {
            return success();
        }

        const auto& license = state_.license.state();
        // The longer token goes first: when one token contains the other, redacting the shorter
        // one first would leave the rest of the longer one in clear text.
        const auto pending_length = license.pending_token ? license.pending_token->reveal().size() : 0;
        const auto token_length = license.token ? license.token->reveal().size() : 0;
        const auto& longer = pending_length >= token_length ? license.pending_token : license.token;
        const auto& shorter = pending_length >= token_length ? license.token : license.pending_token;
        detail::redact_in_place(message, longer);
        detail::redact_in_place(message, shorter);
        operation_error error{std::move(error_code), std::move(message)};
        if (kind == license_operation::registration) {
            record_failure<license_registration_failed>(std::move(error), now);
        }
        else {
            record_failure<license_deregistration_failed>(std::move(error), now);
        }
        return success();
    }

    /// Returns the license fields for a transition to change. They are the shared fields
    /// themselves when this worker holds the only reference to them, and otherwise a copy that
    /// replaces them first, so that no other copy of the worker ever sees a change. A
    /// transition prepares everything that can throw (strings, its event in `event_in_place`)
    /// before it calls this, commits the event after, and changes the fields only with
    /// operations that cannot throw, so a failure leaves the worker as it was.
    cml_license::fields& edit_license()
    {
        auto& shared = state_.license.state_;
#if !LCM_DETAIL_THREAD_SANITIZER
        if (shared.use_count() == 1) {
            // Other owners may have released their references on other threads. The fence
            // orders their reads of the fields before these writes.
            std::atomic_thread_fence(std::memory_order_acquire);
            return const_cast<cml_license::fields&>(*shared);
        }
#endif
        // Not a const object, so that a later transition may change it in place.
        auto copy = std::make_shared<cml_license::fields>(*shared);
        auto& unshared = *copy;
        shared = std::move(copy);
        return unshared;
    }

    /// Records a change of the state at `now`.
    void touch(timestamp now) noexcept
    {
        state_.updated_at = now;
        ++revision_;
    }

    fields state_;
    std::vector<domain_event> events_;
    std::uint64_t revision_ = 0;
};

} // namespace lcm::domain
