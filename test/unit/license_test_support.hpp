// A license controller wired to an in-memory control plane and a fake CML fleet, with both
// clocks under the test's control, and helpers that drive time until a condition holds.
#pragma once

#include <lcm/application/control_plane.hpp>
#include <lcm/controller/control_plane_client.hpp>
#include <lcm/controller/license_reconciler.hpp>
#include <lcm/log.hpp>
#include <lcm/reconcile/manual_clock.hpp>
#include <lcm/storage/memory_repository.hpp>
#include <lcm/testing/fake_cml.hpp>

#include <boost/asio/as_tuple.hpp>
#include <boost/asio/awaitable.hpp>
#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <chrono>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

namespace license_test {

using namespace std::chrono_literals;
using boost::asio::awaitable;
using lcm::application::memory_event_sink;
using lcm::storage::memory_repository;
using control_plane_type = lcm::application::control_plane<memory_repository, memory_event_sink>;
using plane_client_type = lcm::controller::in_process_control_plane_client<memory_repository, memory_event_sink>;

/// Every log line of every component, formatted as the production sink would write it, so
/// that tests can search them for secrets. Thread-safe; copies share the lines.
class captured_lines {
public:
    lcm::logger make_logger() const
    {
        return lcm::logger(lcm::log_level::trace, [state = state_](const lcm::log_record& record) {
            auto line = lcm::format_log_line(record);
            std::lock_guard lock(state->mutex);
            state->lines.push_back(std::move(line));
        });
    }

    std::vector<std::string> lines() const
    {
        std::lock_guard lock(state_->mutex);
        return state_->lines;
    }

    /// Returns the first line that contains `text`, or nothing.
    std::optional<std::string> find(std::string_view text) const
    {
        std::lock_guard lock(state_->mutex);
        for (const auto& line : state_->lines) {
            if (line.find(text) != std::string::npos) {
                return line;
            }
        }
        return std::nullopt;
    }

    std::size_t count(std::string_view text) const
    {
        std::lock_guard lock(state_->mutex);
        std::size_t found = 0;
        for (const auto& line : state_->lines) {
            if (line.find(text) != std::string::npos) {
                ++found;
            }
        }
        return found;
    }

private:
    struct state {
        std::mutex mutex;
        std::vector<std::string> lines;
    };

    std::shared_ptr<state> state_ = std::make_shared<state>();
};

/// A `cml_client` around `fake_cml_client` that lets a test act just before a registration
/// or deregistration is sent and after a registration returned, and replace the result of a
/// call for chosen endpoints. The callbacks run on the calling coroutine's thread.
class scripted_cml_client {
public:
    using before_call = std::function<void(lcm::cml_call call, const lcm::cml_endpoint& endpoint)>;
    using override_result =
        std::function<std::optional<boost::system::error_code>(lcm::cml_call call, const lcm::cml_endpoint& endpoint)>;

    explicit scripted_cml_client(lcm::testing::fake_cml_client& inner) : inner_(inner) {}

    using after_registration =
        std::function<void(const lcm::cml_endpoint& endpoint, const lcm::secret& token, const lcm::result<void>& posted)>;

    before_call before;
    override_result replace;
    after_registration after_register;
    /// Returns true for a registration that hangs, as a POST to an unresponsive CML host
    /// does: it waits until cancelled and never reaches the fake.
    std::function<bool(const lcm::cml_endpoint& endpoint)> hang_registration;
    /// Called when a hung registration was cancelled.
    std::function<void()> on_hang_cancelled;

    awaitable<lcm::result<void>> authenticate(const lcm::cml_endpoint& endpoint)
    {
        return inner_.authenticate(endpoint);
    }

    awaitable<lcm::result<lcm::cml_licensing_status>> get_licensing_status(const lcm::cml_endpoint& endpoint)
    {
        if (auto error = replaced(lcm::cml_call::get_licensing_status, endpoint)) {
            co_return *error;
        }
        co_return co_await inner_.get_licensing_status(endpoint);
    }

    awaitable<lcm::result<void>> register_license(const lcm::cml_endpoint& endpoint, const lcm::secret& token,
                                                  bool reregister)
    {
        if (auto error = replaced(lcm::cml_call::register_license, endpoint)) {
            co_return *error;
        }
        if (before) {
            before(lcm::cml_call::register_license, endpoint);
        }
        if (hang_registration && hang_registration(endpoint)) {
            co_return co_await hang();
        }
        auto posted = co_await inner_.register_license(endpoint, token, reregister);
        if (after_register) {
            after_register(endpoint, token, posted);
        }
        co_return posted;
    }

    awaitable<lcm::result<lcm::cml_deregistration_outcome>> deregister_license(const lcm::cml_endpoint& endpoint)
    {
        if (auto error = replaced(lcm::cml_call::deregister_license, endpoint)) {
            co_return *error;
        }
        if (before) {
            before(lcm::cml_call::deregister_license, endpoint);
        }
        co_return co_await inner_.deregister_license(endpoint);
    }

private:
    awaitable<lcm::result<void>> hang()
    {
        boost::asio::steady_timer forever(co_await boost::asio::this_coro::executor, std::chrono::hours(24));
        auto [error] = co_await forever.async_wait(boost::asio::as_tuple(boost::asio::use_awaitable));
        if (error != boost::asio::error::operation_aborted) {
            throw std::logic_error("a hung registration ended without cancellation");
        }
        if (on_hang_cancelled) {
            on_hang_cancelled();
        }
        co_return lcm::make_error_code(lcm::errc::cancelled);
    }

    std::optional<boost::system::error_code> replaced(lcm::cml_call call, const lcm::cml_endpoint& endpoint) const
    {
        if (!replace) {
            return std::nullopt;
        }
        return replace(call, endpoint);
    }

    lcm::testing::fake_cml_client& inner_;
};

static_assert(lcm::cml_client<scripted_cml_client>);

using controller_type =
    lcm::controller::license_controller<scripted_cml_client, plane_client_type, lcm::reconcile::manual_clock>;
using handler_type = lcm::controller::license_handler<scripted_cml_client, plane_client_type>;

inline std::string cml_url_of(const std::string& worker_id)
{
    return "http://127.0.0.1:8080/instances/" + worker_id;
}

/// The control plane, the fake CML fleet and the clocks of one test. The fake CML's clock
/// starts at the current UTC time, because the control plane stamps `requested_at` and
/// `started_at` with the real clock and the reconciler compares them with CML's stamps.
/// The same clock is the controller's wall clock, so advancing it moves deadlines too.
struct license_fixture {
    /// `cml_start` sets the fake CML's clock, which starts at the current UTC time by default.
    explicit license_fixture(lcm::testing::fake_cml_options options = {}, lcm::timestamp cml_start = lcm::now_utc())
        : cml_clock(cml_start),
          cml(with_clock(std::move(options), cml_clock)),
          cml_client(cml, {"admin", lcm::secret("fake-cml-password")}, log.make_logger()),
          scripted(cml_client)
    {
    }

    license_fixture(const license_fixture&) = delete;
    license_fixture& operator=(const license_fixture&) = delete;

    /// Options for tests: fixed jitter, no resync after the startup sweep, no reconcile
    /// timeout and no stop grace period, so a failed test stops at once.
    lcm::controller::license_controller_options controller_options(std::size_t concurrency = 4) const
    {
        lcm::controller::license_controller_options options;
        options.reconciler.max_concurrent_reconciles = concurrency;
        options.reconciler.jitter_seed = 11;
        options.reconciler.resync_period = lcm::reconcile::duration::zero();
        options.reconciler.reconcile_timeout.reset();
        options.reconciler.stop_grace_period = lcm::reconcile::duration::zero();
        options.reconciler.log = log.make_logger();
        options.license.poll_interval = 1500ms;
        options.license.wall_clock = [clock = &cml_clock] { return clock->now(); };
        // A fixed id, so that a controller a test restarts renews its own claims at once.
        options.license.controller_id = "controller-1";
        options.license.log = log.make_logger();
        return options;
    }

    std::unique_ptr<controller_type> make_controller(const lcm::controller::license_controller_options& options)
    {
        return make_controller(context.get_executor(), options);
    }

    std::unique_ptr<controller_type> make_controller(const boost::asio::any_io_executor& executor,
                                                     const lcm::controller::license_controller_options& options)
    {
        return std::make_unique<controller_type>(executor, scripted, plane_client, options, loop_clock);
    }

    std::unique_ptr<controller_type> make_controller(std::size_t concurrency = 4)
    {
        return make_controller(controller_options(concurrency));
    }

    /// Moves both clocks forward, so that requeues, backoff and CML's delays all see the step.
    void advance(std::chrono::microseconds step)
    {
        cml_clock.advance(step);
        loop_clock.advance(step);
    }

    lcm::testing::fake_cml_instance& instance(const std::string& worker_id)
    {
        return cml.instance(lcm::cml_endpoint{cml_url_of(worker_id)});
    }

    awaitable<void> add_worker(const std::string& worker_id)
    {
        lcm::application::add_worker_request request{worker_id, "worker " + worker_id, cml_url_of(worker_id),
                                                     lcm::domain::worker_status::running, "test"};
        auto added = co_await plane.add_worker(std::move(request));
        if (!added) {
            throw std::runtime_error("adding " + worker_id + " failed: " + added.error().message());
        }
    }

    awaitable<lcm::result<lcm::application::operation_accepted>> request_registration(const std::string& worker_id,
                                                                                       const std::string& token,
                                                                                       bool reregister = false)
    {
        lcm::secret secret_token(token);
        std::string worker = worker_id;
        std::string requester = "test";
        co_return co_await plane.request_registration(std::move(worker), std::move(secret_token), reregister,
                                                      std::move(requester));
    }

    awaitable<lcm::result<lcm::application::operation_accepted>> request_deregistration(const std::string& worker_id)
    {
        std::string worker = worker_id;
        std::string requester = "test";
        co_return co_await plane.request_deregistration(std::move(worker), std::move(requester));
    }

    awaitable<lcm::domain::cml_worker> worker(const std::string& worker_id)
    {
        auto found = co_await plane.get_worker(worker_id);
        if (!found) {
            throw std::runtime_error("reading " + worker_id + " failed: " + found.error().message());
        }
        co_return std::move(found).value();
    }

    boost::asio::io_context context;
    captured_lines log;
    memory_repository repository;
    memory_event_sink sink;
    // Claims are timed with the fake CML's clock, so advancing it lets leases expire.
    control_plane_type plane{repository, sink, log.make_logger(), claim_clock_options()};
    plane_client_type plane_client{plane};
    lcm::testing::manual_clock cml_clock;
    lcm::reconcile::manual_clock loop_clock;
    lcm::testing::fake_cml cml;
    lcm::testing::fake_cml_client cml_client;
    scripted_cml_client scripted;

private:
    lcm::application::control_plane_options claim_clock_options()
    {
        lcm::application::control_plane_options options;
        // Called only after construction, when cml_clock exists.
        options.clock = [this] { return cml_clock.now(); };
        return options;
    }

    static lcm::testing::fake_cml_options with_clock(lcm::testing::fake_cml_options options,
                                                     lcm::testing::manual_clock& clock)
    {
        options.clock = clock.function();
        return options;
    }
};

/// Lets every handler that is ready run, `rounds` times over.
inline awaitable<void> settle(int rounds = 50)
{
    auto executor = co_await boost::asio::this_coro::executor;
    for (int i = 0; i < rounds; ++i) {
        co_await boost::asio::post(executor, boost::asio::use_awaitable);
    }
}

/// Advances both clocks by `step` until `condition` holds, letting the controller run in
/// between. Throws after `max_steps` steps, naming `description`.
template <class Condition>
awaitable<void> advance_until(license_fixture& fixture, Condition condition, const char* description,
                              std::chrono::microseconds step = 500ms, int max_steps = 2000)
{
    co_await settle();
    for (int i = 0; i < max_steps; ++i) {
        if (condition()) {
            co_return;
        }
        fixture.advance(step);
        co_await settle();
    }
    throw std::runtime_error(std::string("condition not reached: ") + description);
}

/// Advances until no worker has a pending license operation.
inline awaitable<void> advance_until_settled(license_fixture& fixture, std::chrono::microseconds step = 500ms,
                                             int max_steps = 2000)
{
    co_await advance_until(
        fixture, [&fixture] { return fixture.repository.pending_count() == 0; }, "no pending license operation", step,
        max_steps);
}

/// Runs `controller` and `body` together and stops the controller when `body` returns.
/// When `body` throws, the controller is stopped too and the exception propagates.
inline awaitable<lcm::reconcile::stop_report<std::string>> run_controller(controller_type& controller,
                                                                           awaitable<void> body)
{
    auto body_then_stop = [](controller_type& target, awaitable<void> steps) -> awaitable<void> {
        std::exception_ptr failure;
        try {
            co_await std::move(steps);
        }
        catch (...) {
            failure = std::current_exception();
        }
        target.request_stop();
        if (failure) {
            std::rethrow_exception(failure);
        }
    };
    using namespace boost::asio::experimental::awaitable_operators;
    co_return co_await (controller.run() && body_then_stop(controller, std::move(body)));
}

} // namespace license_test
