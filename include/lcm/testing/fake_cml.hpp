// An in-process fake of CML's authentication and licensing API for tests, examples and
// benchmarks: a transport-neutral core (`fake_cml`, `fake_cml_instance`) and a
// `cml_client` that calls the core directly (`fake_cml_client`).
#pragma once

#include <lcm/controller/cml_client.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/domain/time.hpp>
#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/testing/detail/fake_cml_support.hpp>
#include <lcm/transport/cml_json.hpp>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/unordered/unordered_flat_map.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <shared_mutex>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace lcm::testing {

/// The time source of the fake: registration delays and bearer token lifetimes are
/// measured against it, so tests can move time forward without waiting.
using fake_cml_clock = std::function<timestamp()>;

/// A clock that moves only when `advance` is called. Thread-safe.
class manual_clock {
public:
    explicit manual_clock(timestamp start = timestamp{std::chrono::sys_days{std::chrono::year{2026} / 1 / 1}})
        : micros_(start.time_since_epoch().count())
    {
    }

    timestamp now() const noexcept { return timestamp{std::chrono::microseconds{micros_.load()}}; }

    void advance(std::chrono::microseconds step) noexcept { micros_ += step.count(); }

    /// Returns a `fake_cml_clock` that reads this clock, which must outlive it.
    fake_cml_clock function() noexcept
    {
        return [this] { return now(); };
    }

private:
    std::atomic<std::int64_t> micros_;
};

/// A CML user account. Users without `admin` get 403 on the licensing calls.
struct fake_cml_user {
    std::string username;
    secret password;
    bool admin = true;
};

/// Faults the fake injects. Rates are probabilities per request, drawn from a generator
/// seeded with `seed` and the instance name, so a fixed seed gives the same sequence on
/// every run for each instance.
struct fake_cml_faults {
    /// Time `fake_cml_client` waits, cancellably, before each call reaches the instance.
    std::chrono::steady_clock::duration latency{};
    /// Share of requests that get 503 without being applied.
    double server_error_rate = 0.0;
    /// Share of registration and deregistration requests that get 409 without being applied.
    double conflict_rate = 0.0;
    /// Share of requests whose connection drops before the instance receives them.
    double drop_before_apply_rate = 0.0;
    /// Share of requests that the instance applies, but whose response is lost.
    double drop_after_apply_rate = 0.0;
    std::uint64_t seed = 1;
};

/// Places in the fake where `fake_cml_options::hook` is called.
enum class fake_cml_hook_point {
    /// An instance accepted a registration (204), even if the response is then dropped.
    registration_accepted,
    /// An instance deregistered (204 or 202), even if the response is then dropped.
    deregistration_applied,
};

/// Configuration of a `fake_cml`, fixed at construction except for the faults.
struct fake_cml_options {
    std::vector<fake_cml_user> users = {{"admin", secret("fake-cml-password"), true}};
    /// Time from an accepted registration until its outcome shows in the licensing status.
    /// Zero shows it on the next call, without reading the clock.
    std::chrono::microseconds registration_delay{0};
    /// Returns true for license tokens that the Cisco licensing service rejects, so the
    /// registration ends `FAILED`. Empty accepts every token of the right format.
    std::function<bool(const secret& token)> token_rejected;
    /// Lifetime of bearer tokens. Empty keeps them valid until revoked, which saves a
    /// clock read per call; CML's own default is 24 hours.
    std::optional<std::chrono::microseconds> token_lifetime;
    /// Empty uses the system clock.
    fake_cml_clock clock;
    /// Faults of every instance until changed with `set_faults`.
    fake_cml_faults faults;
    /// Called on the thread that made the request, after the instance applied it and
    /// released its lock, with the point and the instance name. A test may throw from it
    /// to simulate a controller crash at that point; the exception leaves the call. It
    /// must not call a `fake_cml_client` for the same endpoint, whose lock is held.
    std::function<void(fake_cml_hook_point point, std::string_view instance_name)> hook;
};

/// The body of a reply without one (204, or 400 with an empty body).
struct fake_cml_no_body {};

/// Delivery of a request and its response.
enum class fake_cml_delivery {
    delivered,
    /// The connection dropped before the instance saw the request.
    dropped_before_apply,
    /// The instance applied the request, but the response was lost.
    dropped_after_apply,
};

/// An HTTP-like reply of the fake: the status code and either the typed body (2xx) or
/// CML's error body, which is empty for some 4xx as on real CML.
template <class Body>
struct fake_cml_reply {
    int status = 200;
    Body body{};
    std::optional<transport::cml_error_body> error;
    fake_cml_delivery delivery = fake_cml_delivery::delivered;
};

/// Calls an instance received and registrations it accepted, from the moment it was created.
struct fake_cml_counters {
    /// Requests per route, counted on arrival, including rejected ones and injected faults
    /// other than `drop_before_apply_rate`.
    std::array<std::uint64_t, cml_call_count> received{};
    /// Registration POSTs accepted with 204, including those whose response was dropped.
    std::uint64_t accepted_registrations = 0;
    /// Deregistrations applied with 204 or 202, including those whose response was dropped.
    std::uint64_t deregistrations = 0;

    std::uint64_t received_calls(cml_call call) const noexcept { return received[static_cast<std::size_t>(call)]; }
};

/// One fake CML host with the licensing state machine of CML 2.9.
///
/// Every operation mirrors one HTTP call, takes the bearer token as a client sends it,
/// and returns the reply a server would send, so an HTTP server can serve an instance
/// without logic of its own. Registration is accepted with 204 and completes on a later
/// call, once `registration_delay` has passed on the fake's clock.
///
/// Thread safety: all member functions may be called concurrently; one mutex per
/// instance serializes the state, and counters are read without it.
class fake_cml_instance {
public:
    fake_cml_instance(std::string name, const fake_cml_options& options, const fake_cml_faults& faults)
        : options_(options), name_(std::move(name)), token_random_(detail::stable_hash(name_))
    {
        build_token_prefixes();
        // Most hosts hold one or two live tokens; reserved here, so that a login does not allocate.
        tokens_.reserve(2);
        apply_faults(faults);
    }

    fake_cml_instance(const fake_cml_instance&) = delete;
    fake_cml_instance& operator=(const fake_cml_instance&) = delete;

    const std::string& name() const noexcept { return name_; }

    /// `POST /authenticate`: 200 with a new JWT-looking bearer token, or 403 when the user
    /// does not exist or the password is wrong.
    fake_cml_reply<secret> authenticate(std::string_view username, std::string_view password)
    {
        std::unique_lock lock(mutex_);
        fake_cml_reply<secret> reply;
        if (begin_request(cml_call::authenticate, false, reply)) {
            return reply;
        }

        const auto* user = find_user(username);
        if (user == nullptr || !user->password.equals(password)) {
            set_error(reply, 403, "Authentication failed!");
        }
        else {
            reply.body = issue_token(*user);
        }
        end_request(reply);
        return reply;
    }

    /// `GET /licensing`: 200 with the licensing status.
    fake_cml_reply<cml_licensing_status> get_licensing_status(std::string_view bearer)
    {
        fake_cml_reply<cml_licensing_status> reply;
        auto answer = get_licensing_status(bearer, reply.body);
        reply.status = answer.status;
        reply.error = std::move(answer.error);
        reply.delivery = answer.delivery;
        return reply;
    }

    /// `GET /licensing`, with the status written into `status` on 200, so that a caller can
    /// keep it where it needs it without moving it.
    fake_cml_reply<fake_cml_no_body> get_licensing_status(std::string_view bearer, cml_licensing_status& status)
    {
        std::unique_lock lock(mutex_);
        fake_cml_reply<fake_cml_no_body> reply;
        if (begin_request(cml_call::get_licensing_status, false, reply) || !authorize(bearer, reply)) {
            return reply;
        }

        settle_registration();
        fill_status(status);
        end_request(reply);
        return reply;
    }

    /// `POST /licensing/registration`: 204 when accepted; 400 when the token does not
    /// match CML's format; 409 while a registration is in progress, or when registered
    /// and `reregister` is false.
    fake_cml_reply<fake_cml_no_body> register_license(std::string_view bearer, const secret& token, bool reregister)
    {
        std::unique_lock lock(mutex_);
        fake_cml_reply<fake_cml_no_body> reply;
        if (begin_request(cml_call::register_license, true, reply) || !authorize(bearer, reply)) {
            return reply;
        }

        settle_registration();
        if (!is_valid_license_token(token.reveal())) {
            set_error(reply, 400, "Invalid token: expected 1 to 256 characters of [a-zA-Z0-9+/%=-]");
        }
        else if (registration_in_progress() || (registered() && !reregister)) {
            set_error(reply, 409, "(re)registration cannot be requested at this time");
        }
        else {
            accept_registration(token);
            reply.status = 204;
        }
        end_request(reply);
        const bool accepted = reply.status == 204;
        lock.unlock();

        if (accepted) {
            call_hook(fake_cml_hook_point::registration_accepted);
        }
        return reply;
    }

    /// `DELETE /licensing/deregistration`: 204 when deregistered; 202 when the licensing
    /// service is unreachable, which still deregisters locally; 400 with no body when not
    /// registered; 409 while a registration is in progress.
    fake_cml_reply<fake_cml_no_body> deregister_license(std::string_view bearer)
    {
        std::unique_lock lock(mutex_);
        fake_cml_reply<fake_cml_no_body> reply;
        if (begin_request(cml_call::deregister_license, true, reply) || !authorize(bearer, reply)) {
            return reply;
        }

        settle_registration();
        if (registration_in_progress()) {
            set_error(reply, 409, "deregistration cannot be requested at this time");
        }
        else if (registration_ == cml_registration_status::not_registered) {
            reply.status = 400;
        }
        else {
            // NOTE: a FAILED registration deregisters with 204 here; whether CML 2.9 responds
            // with 204 or 400 in that state is not documented.
            reset_registration();
            reply.status = licensing_service_reachable_ ? 204 : 202;
            deregistrations_.fetch_add(1, std::memory_order_relaxed);
        }
        end_request(reply);
        const bool applied = reply.status == 204 || reply.status == 202;
        lock.unlock();

        if (applied) {
            call_hook(fake_cml_hook_point::deregistration_applied);
        }
        return reply;
    }

    /// The state an in-process client keeps for this host: its bearer token, and a mutex that
    /// serializes its calls to this host. It belongs to the client, not to the host.
    struct client_session {
        explicit client_session(fake_cml_instance& of) : host(&of) {}

        fake_cml_instance* const host;
        std::mutex mutex;
        std::optional<secret> bearer;
    };

    /// Returns the session of the client numbered `client` (see `fake_cml::add_client`), creating
    /// it on first use. It lives beside the host, as long as the host, so that the client finds it
    /// with the host lookup it makes anyway.
    client_session& session_of(std::size_t client)
    {
        std::lock_guard lock(mutex_);
        if (client >= client_sessions_.size()) {
            client_sessions_.resize(client + 1);
        }
        auto& slot = client_sessions_[client];
        if (!slot) {
            slot = std::make_unique<client_session>(*this);
        }
        return *slot;
    }

    // -----------------------------------------------------------------------------------
    // Controls and inspection for tests; none of them is counted as a call.

    /// Returns the licensing status as `GET /licensing` would, without authentication.
    cml_licensing_status licensing_status()
    {
        std::lock_guard lock(mutex_);
        settle_registration();
        return make_status();
    }

    /// Revokes every bearer token issued so far, as a logout or password change does, so they get 401.
    void revoke_tokens()
    {
        std::lock_guard lock(mutex_);
        tokens_.clear();
    }

    /// Revokes one bearer token, so it gets 401.
    void revoke_token(std::string_view bearer)
    {
        std::lock_guard lock(mutex_);
        if (auto found = find_token(bearer); found != tokens_.end()) {
            tokens_.erase(found);
        }
    }

    /// While unreachable, deregistration responds with 202, and registrations that are due
    /// stay `RETRY_IN_PROGRESS` until the service is reachable again.
    void set_licensing_service_reachable(bool reachable)
    {
        std::lock_guard lock(mutex_);
        licensing_service_reachable_ = reachable;
    }

    /// Replaces this instance's faults and restarts its random sequence from the seed.
    void set_faults(const fake_cml_faults& faults)
    {
        std::lock_guard lock(mutex_);
        apply_faults(faults);
    }

    /// The latency `fake_cml_client` waits before each call.
    std::chrono::steady_clock::duration latency() const noexcept
    {
        return std::chrono::steady_clock::duration{latency_.load(std::memory_order_relaxed)};
    }

    fake_cml_counters counters() const noexcept
    {
        fake_cml_counters snapshot;
        for (std::size_t i = 0; i < cml_call_count; ++i) {
            snapshot.received[i] = received_[i].load(std::memory_order_relaxed);
        }
        snapshot.accepted_registrations = accepted_registrations_.load(std::memory_order_relaxed);
        snapshot.deregistrations = deregistrations_.load(std::memory_order_relaxed);
        return snapshot;
    }

private:
    // The last, random part of a token in base64url: 24 bytes.
    static constexpr std::size_t signature_length = detail::base64url_length(24);

    // A token is its user's prefix and its signature, so only the signature is kept, without
    // an allocation.
    struct issued_token {
        std::array<char, signature_length> signature;
        const fake_cml_user* user;
        timestamp expires;
    };

    std::vector<issued_token>::iterator find_token(std::string_view bearer)
    {
        return std::find_if(tokens_.begin(), tokens_.end(), [this, bearer](const issued_token& token) {
            const auto& prefix = token_prefix(*token.user);
            return bearer.size() == prefix.size() + signature_length && bearer.starts_with(prefix) &&
                   bearer.ends_with(std::string_view(token.signature.data(), signature_length));
        });
    }

    timestamp now() const { return options_.clock ? options_.clock() : now_utc(); }

    void apply_faults(const fake_cml_faults& faults)
    {
        faults_ = faults;
        faults_active_ = faults.server_error_rate > 0 || faults.conflict_rate > 0 ||
                         faults.drop_before_apply_rate > 0 || faults.drop_after_apply_rate > 0;
        fault_random_ = detail::random_generator(faults.seed ^ detail::stable_hash(name_));
        latency_.store(faults.latency.count(), std::memory_order_relaxed);
    }

    template <class Body>
    static void set_error(fake_cml_reply<Body>& reply, int status, std::string_view description)
    {
        reply.status = status;
        reply.error = transport::cml_error_body{status, std::string(description)};
    }

    // Counts the request and draws the faults that keep it from being applied. Returns
    // true when the reply is final.
    template <class Body>
    bool begin_request(cml_call call, bool mutation, fake_cml_reply<Body>& reply)
    {
        if (!faults_active_) {
            received_[static_cast<std::size_t>(call)].fetch_add(1, std::memory_order_relaxed);
            return false;
        }
        if (fault_random_.chance(faults_.drop_before_apply_rate)) {
            reply.delivery = fake_cml_delivery::dropped_before_apply;
            return true;
        }
        received_[static_cast<std::size_t>(call)].fetch_add(1, std::memory_order_relaxed);
        if (fault_random_.chance(faults_.server_error_rate)) {
            set_error(reply, 503, "Service unavailable");
            return true;
        }
        if (mutation && fault_random_.chance(faults_.conflict_rate)) {
            set_error(reply, 409, "operation cannot be requested at this time");
            return true;
        }
        return false;
    }

    template <class Body>
    void end_request(fake_cml_reply<Body>& reply)
    {
        if (faults_active_ && fault_random_.chance(faults_.drop_after_apply_rate)) {
            reply.delivery = fake_cml_delivery::dropped_after_apply;
        }
    }

    const fake_cml_user* find_user(std::string_view username) const noexcept
    {
        for (const auto& user : options_.users) {
            if (user.username == username) {
                return &user;
            }
        }
        return nullptr;
    }

    // A JWT-looking token: three base64url parts. The payload names the user and the
    // instance; the last part is random, so that tokens differ and cannot be guessed from
    // their order.
    secret issue_token(const fake_cml_user& user)
    {
        std::array<char, 24> signature{};
        for (std::size_t i = 0; i < signature.size(); i += 8) {
            const auto bits = token_random_.next();
            for (std::size_t j = 0; j < 8; ++j) {
                signature[i + j] = static_cast<char>(bits >> (8 * j));
            }
        }

        const auto& prefix = token_prefix(user);
        std::string token;
        token.reserve(prefix.size() + detail::base64url_length(signature.size()));
        token.append(prefix);
        detail::append_base64url(token, std::string_view(signature.data(), signature.size()));

        const auto expires =
            options_.token_lifetime ? now() + *options_.token_lifetime : timestamp{timestamp::duration::max()};
        auto& issued = tokens_.emplace_back(issued_token{{}, &user, expires});
        std::copy(token.end() - signature_length, token.end(), issued.signature.begin());
        return secret(std::move(token));
    }

    // Returns the header and payload part of `user`'s tokens, with the dot that follows it.
    const std::string& token_prefix(const fake_cml_user& user) const
    {
        return token_prefixes_[static_cast<std::size_t>(&user - options_.users.data())];
    }

    // Builds the token prefix of each user once, when the instance is created: in a fleet of
    // 100,000 hosts, most are logged in to once.
    void build_token_prefixes()
    {
        static constexpr std::string_view header = "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.";
        token_prefixes_.reserve(options_.users.size());
        for (const auto& user : options_.users) {
            std::string payload;
            payload.reserve(24 + user.username.size() + name_.size());
            payload.append(R"({"sub":")").append(user.username).append(R"(","iss":")").append(name_).append(R"("})");
            auto& prefix = token_prefixes_.emplace_back();
            prefix.reserve(header.size() + detail::base64url_length(payload.size()) + 1);
            prefix.append(header);
            detail::append_base64url(prefix, payload);
            prefix.push_back('.');
        }
    }

    // Sets 401 for a missing, unknown, revoked or expired token and 403 for a user without
    // admin rights, and returns false in both cases.
    template <class Body>
    bool authorize(std::string_view bearer, fake_cml_reply<Body>& reply)
    {
        const auto found = find_token(bearer);
        if (found == tokens_.end()) {
            set_error(reply, 401, "No valid authorization token provided");
            return false;
        }
        if (options_.token_lifetime && now() >= found->expires) {
            tokens_.erase(found);
            set_error(reply, 401, "Authorization token expired");
            return false;
        }
        if (!found->user->admin) {
            set_error(reply, 403, "User does not have admin rights");
            return false;
        }
        return true;
    }

    bool registration_in_progress() const noexcept
    {
        return registration_ == cml_registration_status::in_progress ||
               registration_ == cml_registration_status::retry_in_progress;
    }

    bool registered() const noexcept { return registration_ == cml_registration_status::completed; }

    void accept_registration(const secret& token)
    {
        registration_ = cml_registration_status::in_progress;
        attempted_at_ = now();
        completes_at_ = *attempted_at_ + options_.registration_delay;
        pending_failure_.clear();
        if (options_.token_rejected && options_.token_rejected(token)) {
            // Real CML quotes the token in this text, which is why the fake does too.
            pending_failure_ = "Failed to register with ID token " + token.reveal() +
                               ": the token is invalid, expired or revoked";
        }
        accepted_registrations_.fetch_add(1, std::memory_order_relaxed);
    }

    // Completes a registration whose delay has passed. Computing this on each call keeps
    // the fake free of timers, and a zero delay never reads the clock.
    void settle_registration()
    {
        if (!registration_in_progress()) {
            return;
        }
        if (options_.registration_delay.count() > 0 && now() < completes_at_) {
            return;
        }
        if (!licensing_service_reachable_) {
            registration_ = cml_registration_status::retry_in_progress;
            return;
        }
        if (!pending_failure_.empty()) {
            registration_ = cml_registration_status::failed;
            failure_ = std::move(pending_failure_);
            pending_failure_.clear();
            return;
        }
        registration_ = cml_registration_status::completed;
        succeeded_at_ = completes_at_;
        authorization_ = cml_authorization_status::in_compliance;
        registration_expires_ = completes_at_ + std::chrono::days{365};
        authorization_expires_ = completes_at_ + std::chrono::days{90};
        failure_.clear();
    }

    void reset_registration()
    {
        registration_ = cml_registration_status::not_registered;
        authorization_ = cml_authorization_status::eval;
        registration_expires_.reset();
        authorization_expires_.reset();
        failure_.clear();
    }

    cml_licensing_status make_status() const
    {
        cml_licensing_status status;
        fill_status(status);
        return status;
    }

    // Overwrites every field of `status`, so that a reply's body is written in place instead of
    // being built and moved into it.
    void fill_status(cml_licensing_status& status) const
    {
        status.registration_status = registration_;
        status.registration_status_text.clear();
        status.authorization_status = authorization_;
        status.authorization_status_text.clear();
        status.registration_attempted = attempted_at_;
        status.registration_succeeded = succeeded_at_;
        status.product_license = "CML_Enterprise";
        status.is_enterprise = true;
        status.registration_failure = failure_.empty() ? cml_failure_reason() : cml_failure_reason(failure_);
        if (authorization_ == cml_authorization_status::in_compliance) {
            // Short texts stay within the small-string buffer, so copying a status allocates
            // only the feature vector.
            status.smart_account = "example.com";
            status.virtual_account = "Default";
            status.registration_expires = registration_expires_;
            status.authorization_expires = authorization_expires_;
            status.features = licensed_features();
        }
        else {
            status.smart_account.reset();
            status.virtual_account.reset();
            status.registration_expires.reset();
            status.authorization_expires.reset();
            status.features.clear();
        }
    }

    // The features of a licensed host, built once: copying them is cheaper than building them
    // from string literals at every status read.
    static const std::vector<cml_feature>& licensed_features()
    {
        static const std::vector<cml_feature> features{
            cml_feature{"CML_ENTERPRISE", "CML Enterprise", "", "1.0", "IN_COMPLIANCE", 1, 1, 1, {}, {}},
            cml_feature{"CML_NODE_COUNT", "CML Nodes", "", "1.0", "IN_COMPLIANCE", 0, 0, 20, {}, {}}};
        return features;
    }

    void call_hook(fake_cml_hook_point point) const
    {
        if (options_.hook) {
            options_.hook(point, name_);
        }
    }

    // The members that every call reads come first, so that they share the first cache lines of
    // an instance, which is cold at the first call to each of 100,000 hosts.
    mutable std::mutex mutex_;
    std::atomic<std::chrono::steady_clock::rep> latency_{0};
    bool faults_active_ = false;
    bool licensing_service_reachable_ = true;
    cml_registration_status registration_ = cml_registration_status::not_registered;
    cml_authorization_status authorization_ = cml_authorization_status::eval;
    // A vector, because a host has one or two live tokens and 100,000 hosts each with a hash
    // table would take far more memory. Tokens are searched linearly.
    // NOTE: tokens leave only when revoked or presented after expiry, so a test that logs in
    // to one instance thousands of times makes each call search all of them.
    std::vector<issued_token> tokens_;
    // Indexed like `options_.users`.
    std::vector<std::string> token_prefixes_;
    std::array<std::atomic<std::uint64_t>, cml_call_count> received_{};
    // Indexed by client number (see `session_of`).
    std::vector<std::unique_ptr<client_session>> client_sessions_;
    const fake_cml_options& options_;

    timestamp completes_at_{};
    std::optional<timestamp> attempted_at_;
    std::optional<timestamp> succeeded_at_;
    std::optional<timestamp> registration_expires_;
    std::optional<timestamp> authorization_expires_;
    std::string failure_;
    // The failure text of the registration in progress; empty when it is going to succeed.
    std::string pending_failure_;

    const std::string name_;
    detail::random_generator token_random_;
    fake_cml_faults faults_;
    detail::random_generator fault_random_;
    std::atomic<std::uint64_t> accepted_registrations_{0};
    std::atomic<std::uint64_t> deregistrations_{0};
};

/// A fleet of independent fake CML hosts, keyed by name and created on first use.
///
/// Thread safety: all member functions may be called concurrently. Instances live as
/// long as the registry, so references to them stay valid.
class fake_cml {
public:
    explicit fake_cml(fake_cml_options options = {}) : options_(std::move(options)), faults_(options_.faults) {}

    fake_cml(const fake_cml&) = delete;
    fake_cml& operator=(const fake_cml&) = delete;

    const fake_cml_options& options() const noexcept { return options_; }

    /// Returns the instance called `name`, creating it on first use.
    fake_cml_instance& instance(std::string_view name)
    {
        {
            std::shared_lock lock(mutex_);
            if (auto found = instances_.find(name); found != instances_.end()) {
                return *found->second;
            }
        }
        std::unique_lock lock(mutex_);
        auto [position, inserted] = instances_.try_emplace(std::string(name));
        if (inserted) {
            position->second = std::make_unique<fake_cml_instance>(position->first, options_, faults_);
        }
        return *position->second;
    }

    /// Returns the instance an endpoint addresses, creating it on first use.
    fake_cml_instance& instance(const cml_endpoint& endpoint) { return instance(instance_name(endpoint.base_url)); }

    /// Returns the instance name in a base URL: the path segment after `/instances/`, as in
    /// `http://127.0.0.1:8080/instances/lab-1`, or else the whole URL.
    static std::string_view instance_name(std::string_view base_url) noexcept
    {
        static constexpr std::string_view marker = "/instances/";
        const auto found = base_url.rfind(marker);
        if (found == std::string_view::npos) {
            return base_url;
        }
        auto name = base_url.substr(found + marker.size());
        return name.substr(0, name.find('/'));
    }

    /// Replaces the faults of every instance, including those created later.
    void set_faults(const fake_cml_faults& faults)
    {
        std::unique_lock lock(mutex_);
        faults_ = faults;
        for (auto& entry : instances_) {
            entry.second->set_faults(faults);
        }
    }

    /// Returns a number for a new in-process client, under which each instance keeps that
    /// client's session.
    std::size_t add_client() noexcept { return next_client_.fetch_add(1, std::memory_order_relaxed); }

    std::size_t instance_count() const
    {
        std::shared_lock lock(mutex_);
        return instances_.size();
    }

    /// Returns the sum of the counters of all instances.
    fake_cml_counters total_counters() const
    {
        fake_cml_counters total;
        std::shared_lock lock(mutex_);
        for (const auto& entry : instances_) {
            const auto counters = entry.second->counters();
            for (std::size_t i = 0; i < cml_call_count; ++i) {
                total.received[i] += counters.received[i];
            }
            total.accepted_registrations += counters.accepted_registrations;
            total.deregistrations += counters.deregistrations;
        }
        return total;
    }

private:
    const fake_cml_options options_;
    mutable std::shared_mutex mutex_;
    fake_cml_faults faults_;
    boost::unordered_flat_map<std::string, std::unique_ptr<fake_cml_instance>, detail::string_hash, std::equal_to<>>
        instances_;
    std::atomic<std::size_t> next_client_{0};
};

/// A `cml_client` that calls a `fake_cml` in-process, without HTTP or JSON, and maps the
/// replies with `map_cml_status` exactly as the HTTP client does.
///
/// It logs in as one user and caches one bearer token per instance, in a session the instance
/// keeps for it (see `fake_cml_instance::session_of`). A reply of 401 makes it log in again
/// once and repeat the request once. A dropped connection fails with `unavailable`, whether
/// or not the instance applied the request.
///
/// Each call first waits the instance's injected latency on a timer, if any. That wait is
/// the only suspension point. Cancelling it fails the call with `cancelled`, and the
/// request never reaches the instance.
///
/// Thread safety: calls may run concurrently on a multi-threaded `io_context`. Calls for
/// the same endpoint take turns on a mutex, held only while the instance is called.
class fake_cml_client {
public:
    fake_cml_client(fake_cml& cml, cml_credentials credentials, logger log = {})
        : cml_(cml), client_(cml.add_client()), credentials_(std::move(credentials)), log_(std::move(log))
    {
    }

    fake_cml_client(const fake_cml_client&) = delete;
    fake_cml_client& operator=(const fake_cml_client&) = delete;

    /// Logs in to the endpoint and caches the new bearer token in place of the old one.
    boost::asio::awaitable<result<void>> authenticate(const cml_endpoint& endpoint)
    {
        auto& current = session_for(endpoint);
        if (current.host->latency().count() > 0 && co_await wait_latency(*current.host)) {
            co_return make_error_code(errc::cancelled);
        }

        std::lock_guard lock(current.mutex);
        co_return log_in(current);
    }

    boost::asio::awaitable<result<cml_licensing_status>> get_licensing_status(const cml_endpoint& endpoint)
    {
        auto& current = session_for(endpoint);
        if (current.host->latency().count() > 0 && co_await wait_latency(*current.host)) {
            co_return make_error_code(errc::cancelled);
        }

        // The instance writes the status straight into the result, which saves a move of it.
        result<cml_licensing_status> answer(std::in_place_type<cml_licensing_status>);
        if (auto read = read_status(current, answer.value()); !read) {
            co_return read.error();
        }
        co_return std::move(answer);
    }

    /// Reads the status into `status`, overwriting every field on success (see
    /// `cml_client_reads_in_place`).
    boost::asio::awaitable<result<void>> get_licensing_status(const cml_endpoint& endpoint, cml_licensing_status& status)
    {
        auto& current = session_for(endpoint);
        if (current.host->latency().count() > 0 && co_await wait_latency(*current.host)) {
            co_return make_error_code(errc::cancelled);
        }
        co_return read_status(current, status);
    }

    boost::asio::awaitable<result<void>> register_license(const cml_endpoint& endpoint, const secret& token,
                                                          bool reregister)
    {
        auto& current = session_for(endpoint);
        if (current.host->latency().count() > 0 && co_await wait_latency(*current.host)) {
            co_return make_error_code(errc::cancelled);
        }

        auto reply = exchange(current, [&token, reregister](fake_cml_instance& host, std::string_view bearer) {
            return host.register_license(bearer, token, reregister);
        });
        if (!reply) {
            co_return reply.error();
        }
        if (auto mapped = map_cml_status(cml_call::register_license, reply.value().status); !mapped) {
            co_return mapped.error();
        }
        co_return result<void>(boost::outcome_v2::success());
    }

    boost::asio::awaitable<result<cml_deregistration_outcome>> deregister_license(const cml_endpoint& endpoint)
    {
        auto& current = session_for(endpoint);
        if (current.host->latency().count() > 0 && co_await wait_latency(*current.host)) {
            co_return make_error_code(errc::cancelled);
        }

        auto reply = exchange(current, [](fake_cml_instance& host, std::string_view bearer) {
            return host.deregister_license(bearer);
        });
        if (!reply) {
            co_return reply.error();
        }
        auto mapped = map_cml_status(cml_call::deregister_license, reply.value().status);
        if (!mapped) {
            co_return mapped.error();
        }
        co_return deregistration_outcome_of(mapped.value(), endpoint, log_);
    }

private:
    using session = fake_cml_instance::client_session;

    session& session_for(const cml_endpoint& endpoint) { return cml_.instance(endpoint).session_of(client_); }

    // Returns true when the wait was cancelled. Callers skip it without latency, which
    // saves a coroutine frame per call.
    static boost::asio::awaitable<bool> wait_latency(const fake_cml_instance& instance)
    {
        boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, instance.latency());
        boost::system::error_code error;
        co_await timer.async_wait(boost::asio::redirect_error(boost::asio::use_awaitable, error));
        co_return error == boost::asio::error::operation_aborted;
    }

    result<void> read_status(session& current, cml_licensing_status& status)
    {
        auto reply = exchange(current, [&status](fake_cml_instance& host, std::string_view bearer) {
            return host.get_licensing_status(bearer, status);
        });
        if (!reply) {
            return reply.error();
        }
        if (auto mapped = map_cml_status(cml_call::get_licensing_status, reply.value().status); !mapped) {
            return mapped.error();
        }
        return boost::outcome_v2::success();
    }

    // Logs in with the client's credentials; the caller holds the session's mutex.
    result<void> log_in(session& current)
    {
        current.bearer.reset();
        auto reply = current.host->authenticate(credentials_.username, credentials_.password.reveal());
        if (reply.delivery != fake_cml_delivery::delivered) {
            return make_error_code(errc::unavailable);
        }
        if (auto mapped = map_cml_status(cml_call::authenticate, reply.status); !mapped) {
            log_.warning("CML login failed",
                         {{"instance", current.host->name()}, {"status", std::to_string(reply.status)}});
            return mapped.error();
        }
        current.bearer = std::move(reply.body);
        return boost::outcome_v2::success();
    }

    // Sends one request with the cached bearer token, logging in first when there is none,
    // and once more after a 401. Returns `unavailable` when the connection dropped.
    template <class Send>
    auto exchange(session& current, Send send) -> result<decltype(send(*current.host, std::string_view{}))>
    {
        std::lock_guard lock(current.mutex);
        if (!current.bearer) {
            if (auto login = log_in(current); !login) {
                return login.error();
            }
        }

        auto reply = send(*current.host, current.bearer->reveal());
        if (reply.delivery == fake_cml_delivery::delivered && reply.status == 401) {
            log_.debug("CML rejected the bearer token; logging in again", {{"instance", current.host->name()}});
            if (auto login = log_in(current); !login) {
                return login.error();
            }
            reply = send(*current.host, current.bearer->reveal());
        }
        if (reply.delivery != fake_cml_delivery::delivered) {
            return make_error_code(errc::unavailable);
        }
        return reply;
    }

    fake_cml& cml_;
    // This client's number, under which each instance keeps its session.
    const std::size_t client_;
    const cml_credentials credentials_;
    const logger log_;
};

static_assert(cml_client<fake_cml_client>);
static_assert(cml_client_reads_in_place<fake_cml_client>);

} // namespace lcm::testing
