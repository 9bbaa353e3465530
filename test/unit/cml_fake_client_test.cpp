// The fake CML through `fake_cml_client`, as a worker-controller uses it.
#include <lcm/testing/fake_cml.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/bind_cancellation_slot.hpp>
#include <boost/asio/cancellation_signal.hpp>
#include <boost/asio/co_spawn.hpp>
#include <boost/asio/experimental/concurrent_channel.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <catch2/catch.hpp>

#include <atomic>
#include <mutex>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

using namespace std::chrono_literals;
using boost::asio::awaitable;
using lcm::cml_authorization_status;
using lcm::cml_call;
using lcm::cml_registration_status;
using lcm::result;

namespace {

const lcm::cml_endpoint lab1{"http://127.0.0.1:8080/instances/lab-1"};
const lcm::secret valid_token("NjM0ZTc3YjEtMGQ2OS00ZTFjLTg5ZTMtZGQ1MGQ+/%=-");

lcm::cml_credentials admin() { return {"admin", lcm::secret("fake-cml-password")}; }

// Collects every log line, at every level, so that tests can search them for secrets.
class captured_log {
public:
    lcm::logger make_logger()
    {
        return lcm::logger(lcm::log_level::trace, [this](const lcm::log_record& record) {
            std::lock_guard lock(mutex_);
            lines_.push_back(lcm::format_log_line(record));
        });
    }

    bool contains(std::string_view text) const
    {
        std::lock_guard lock(mutex_);
        for (const auto& line : lines_) {
            if (line.find(text) != std::string::npos) {
                return true;
            }
        }
        return false;
    }

private:
    mutable std::mutex mutex_;
    std::vector<std::string> lines_;
};

// Coroutines under test await outside Catch2's assertion macros, because GCC 12 evaluates
// a `co_await` written inside REQUIRE more than once.
//
// Boost 1.81's co_spawn needs a default-constructible result type, which `lcm::result`
// is not, so coroutines under test hand their result out through an optional.
template <class T>
awaitable<std::optional<T>> wrap_optional(awaitable<T> task)
{
    co_return co_await std::move(task);
}

template <class T>
T run(awaitable<T> task)
{
    boost::asio::io_context context;
    return *lcm::testing::run_with_timeout(context, wrap_optional(std::move(task)));
}

} // namespace

TEST_CASE("fake client fails with wrong password", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    captured_log log;
    lcm::testing::fake_cml_client client(cml, {"admin", lcm::secret("wrong-password")}, log.make_logger());

    const auto [login, status] = run([&]() -> awaitable<std::pair<result<void>, result<lcm::cml_licensing_status>>> {
        auto first = co_await client.authenticate(lab1);
        auto second = co_await client.get_licensing_status(lab1);
        co_return std::pair{first, second};
    }());

    CHECK(login.error() == lcm::errc::unauthorized);
    CHECK(status.error() == lcm::errc::unauthorized);
    const auto counters = cml.instance(lab1).counters();
    CHECK(counters.received_calls(cml_call::authenticate) == 2);
    CHECK(counters.received_calls(cml_call::get_licensing_status) == 0);
    CHECK_FALSE(log.contains("wrong-password"));
}

TEST_CASE("fake client logs in again after 401", "[cml][fake]")
{
    lcm::testing::manual_clock clock;
    lcm::testing::fake_cml_options options;
    options.clock = clock.function();
    options.token_lifetime = 24h;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());
    auto& instance = cml.instance(lab1);

    const auto [expired, revoked] = run([&]() -> awaitable<std::pair<result<void>, result<void>>> {
        auto login = co_await client.authenticate(lab1);
        REQUIRE(login);
        clock.advance(25h);
        auto after_expiry = co_await client.register_license(lab1, valid_token, false);
        instance.revoke_tokens();
        auto status = co_await client.get_licensing_status(lab1);
        co_return std::pair{after_expiry, status ? result<void>(boost::outcome_v2::success()) : status.error()};
    }());

    CHECK(expired);
    CHECK(revoked);
    const auto counters = instance.counters();
    CHECK(counters.received_calls(cml_call::authenticate) == 3);
    CHECK(counters.received_calls(cml_call::register_license) == 2);
    CHECK(counters.received_calls(cml_call::get_licensing_status) == 2);
    CHECK(counters.accepted_registrations == 1);
}

TEST_CASE("fake clients keep sessions per instance", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    lcm::testing::fake_cml_client first(cml, admin());
    lcm::testing::fake_cml_client second(cml, admin());
    const lcm::cml_endpoint lab2{"http://127.0.0.1:8080/instances/lab-2"};

    const auto reads = run([&]() -> awaitable<std::vector<bool>> {
        std::vector<bool> succeeded;
        for (int round = 0; round < 2; ++round) {
            auto by_first = co_await first.get_licensing_status(lab1);
            succeeded.push_back(by_first.has_value());
            auto by_second = co_await second.get_licensing_status(lab1);
            succeeded.push_back(by_second.has_value());
            auto other_host = co_await first.get_licensing_status(lab2);
            succeeded.push_back(other_host.has_value());
        }
        // A call with a revoked token logs in again, once.
        cml.instance(lab1).revoke_tokens();
        auto after_revoke = co_await first.get_licensing_status(lab1);
        succeeded.push_back(after_revoke.has_value());
        co_return succeeded;
    }());

    REQUIRE(reads.size() == 7);
    for (std::size_t i = 0; i < reads.size(); ++i) {
        INFO("read " << i);
        CHECK(reads[i]);
    }
    // One login per client and instance, and one more after the revocation.
    CHECK(cml.instance(lab1).counters().received_calls(cml_call::authenticate) == 3);
    CHECK(cml.instance(lab2).counters().received_calls(cml_call::authenticate) == 1);
    CHECK(cml.instance(lab1).counters().received_calls(cml_call::get_licensing_status) == 6);
}

TEST_CASE("fake client gives up after second 401", "[cml][fake]")
{
    lcm::testing::fake_cml_options options;
    // Every token is expired on issue, so the retry after the re-login fails too.
    options.token_lifetime = 0s;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());

    const auto status = run(client.get_licensing_status(lab1));

    CHECK(status.error() == lcm::errc::unauthorized);
    const auto counters = cml.instance(lab1).counters();
    CHECK(counters.received_calls(cml_call::authenticate) == 2);
    CHECK(counters.received_calls(cml_call::get_licensing_status) == 2);
}

TEST_CASE("fake client registration completes later", "[cml][fake]")
{
    lcm::testing::manual_clock clock;
    lcm::testing::fake_cml_options options;
    options.clock = clock.function();
    options.registration_delay = 45s;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());

    const auto [accepted, early, late] = run(
        [&]() -> awaitable<std::tuple<result<void>, result<lcm::cml_licensing_status>,
                                      result<lcm::cml_licensing_status>>> {
            auto registration = co_await client.register_license(lab1, valid_token, false);
            clock.advance(44s);
            auto before = co_await client.get_licensing_status(lab1);
            clock.advance(1s);
            auto after = co_await client.get_licensing_status(lab1);
            co_return std::tuple{registration, before, after};
        }());

    CHECK(accepted);
    REQUIRE(early);
    CHECK(early.value().registration_status == cml_registration_status::in_progress);
    REQUIRE(late);
    CHECK(late.value().registration_status == cml_registration_status::completed);
    CHECK(late.value().authorization_status == cml_authorization_status::in_compliance);
    CHECK(late.value().features.size() >= 2);
    CHECK(late.value().product_license == "CML_Enterprise");
}

TEST_CASE("fake client reads status in place", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    lcm::testing::fake_cml_client client(cml, admin());
    lcm::testing::fake_cml_client wrong_password(cml, {"admin", lcm::secret("not-the-password")});

    // Each in-place read goes into the same object. A copy of it after each read is compared with
    // a fresh read by value.
    struct reads {
        result<void> registered;
        lcm::cml_licensing_status after_registration;
        result<lcm::cml_licensing_status> registered_by_value;
        result<void> deregistered;
        lcm::cml_licensing_status after_deregistration;
        result<lcm::cml_licensing_status> deregistered_by_value;
        result<void> refused;
    };
    const auto outcome = run([&]() -> awaitable<reads> {
        lcm::cml_licensing_status status;
        auto accepted = co_await client.register_license(lab1, valid_token, false);
        REQUIRE(accepted);
        auto registered = co_await lcm::read_licensing_status(client, lab1, status);
        auto after_registration = status;
        auto registered_by_value = co_await client.get_licensing_status(lab1);

        auto released = co_await client.deregister_license(lab1);
        REQUIRE(released);
        auto deregistered = co_await lcm::read_licensing_status(client, lab1, status);
        auto after_deregistration = status;
        auto deregistered_by_value = co_await client.get_licensing_status(lab1);

        auto refused = co_await lcm::read_licensing_status(wrong_password, lab1, status);
        co_return reads{registered,   after_registration,    registered_by_value, deregistered,
                        after_deregistration, deregistered_by_value, refused};
    }());

    CHECK(outcome.registered);
    REQUIRE(outcome.registered_by_value);
    CHECK(outcome.after_registration == outcome.registered_by_value.value());
    CHECK(outcome.after_registration.registration_status == cml_registration_status::completed);
    CHECK_FALSE(outcome.after_registration.features.empty());
    CHECK(outcome.after_registration.smart_account.has_value());

    CHECK(outcome.deregistered);
    REQUIRE(outcome.deregistered_by_value);
    CHECK(outcome.after_deregistration == outcome.deregistered_by_value.value());
    CHECK(outcome.after_deregistration.registration_status == cml_registration_status::not_registered);
    CHECK(outcome.after_deregistration.features.empty());
    CHECK_FALSE(outcome.after_deregistration.smart_account.has_value());

    REQUIRE_FALSE(outcome.refused);
    CHECK(outcome.refused.error() == lcm::errc::unauthorized);
}

TEST_CASE("fake client rejected token stays secret", "[cml][fake]")
{
    lcm::testing::fake_cml_options options;
    options.token_rejected = [](const lcm::secret& token) { return token == valid_token; };
    lcm::testing::fake_cml cml(options);
    captured_log log;
    lcm::testing::fake_cml_client client(cml, admin(), log.make_logger());

    const auto status = run([&]() -> awaitable<result<lcm::cml_licensing_status>> {
        auto registration = co_await client.register_license(lab1, valid_token, false);
        REQUIRE(registration);
        co_return co_await client.get_licensing_status(lab1);
    }());

    REQUIRE(status);
    const auto& failure = status.value().registration_failure;
    CHECK(status.value().registration_status == cml_registration_status::failed);
    CHECK(failure.reveal().find(valid_token.reveal()) != std::string::npos);
    CHECK(failure.redacted(valid_token).find(valid_token.reveal()) == std::string::npos);
    std::ostringstream printed;
    printed << failure;
    CHECK(printed.str().find(valid_token.reveal()) == std::string::npos);
    CHECK_FALSE(log.contains(valid_token.reveal()));
}

TEST_CASE("fake client maps registration errors", "[cml][fake]")
{
    lcm::testing::manual_clock clock;
    lcm::testing::fake_cml_options options;
    options.clock = clock.function();
    options.registration_delay = 10s;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());

    const auto outcomes = run([&]() -> awaitable<std::vector<result<void>>> {
        std::vector<result<void>> results;
        results.push_back(co_await client.register_license(lab1, lcm::secret("spaces are invalid"), false));
        results.push_back(co_await client.register_license(lab1, valid_token, false));
        results.push_back(co_await client.register_license(lab1, valid_token, true));
        clock.advance(10s);
        results.push_back(co_await client.register_license(lab1, valid_token, false));
        results.push_back(co_await client.register_license(lab1, valid_token, true));
        co_return results;
    }());

    REQUIRE(outcomes.size() == 5);
    CHECK(outcomes[0].error() == lcm::errc::invalid_token);
    CHECK(outcomes[1]);
    CHECK(outcomes[2].error() == lcm::errc::operation_in_progress);
    CHECK(outcomes[3].error() == lcm::errc::operation_in_progress);
    CHECK(outcomes[4]);
    CHECK(cml.instance(lab1).counters().accepted_registrations == 2);
}

TEST_CASE("fake client deregistration outcomes", "[cml][fake]")
{
    lcm::testing::manual_clock clock;
    lcm::testing::fake_cml_options options;
    options.clock = clock.function();
    options.registration_delay = 10s;
    lcm::testing::fake_cml cml(options);
    captured_log log;
    lcm::testing::fake_cml_client client(cml, admin(), log.make_logger());
    auto& instance = cml.instance(lab1);
    using outcome = result<lcm::cml_deregistration_outcome>;

    const auto outcomes = run([&]() -> awaitable<std::vector<outcome>> {
        std::vector<outcome> results;
        results.push_back(co_await client.deregister_license(lab1));
        auto first_registration = co_await client.register_license(lab1, valid_token, false);
        REQUIRE(first_registration);
        results.push_back(co_await client.deregister_license(lab1));
        clock.advance(10s);
        results.push_back(co_await client.deregister_license(lab1));
        auto second_registration = co_await client.register_license(lab1, valid_token, false);
        REQUIRE(second_registration);
        clock.advance(10s);
        instance.set_licensing_service_reachable(false);
        results.push_back(co_await client.deregister_license(lab1));
        co_return results;
    }());

    REQUIRE(outcomes.size() == 4);
    CHECK(outcomes[0].value() == lcm::cml_deregistration_outcome::already_deregistered);
    CHECK(outcomes[1].error() == lcm::errc::operation_in_progress);
    CHECK(lcm::is_transient_cml_error(outcomes[1].error()));
    CHECK(outcomes[2].value() == lcm::cml_deregistration_outcome::deregistered);
    // The second registration was still due when the service became unreachable.
    CHECK(outcomes[3].error() == lcm::errc::operation_in_progress);
    instance.set_licensing_service_reachable(true);
    REQUIRE(instance.licensing_status().registration_status == cml_registration_status::completed);
    instance.set_licensing_service_reachable(false);

    const auto local = run(client.deregister_license(lab1));

    CHECK(local.value() == lcm::cml_deregistration_outcome::deregistered_locally);
    CHECK(log.contains("level=warning"));
    const auto status = instance.licensing_status();
    CHECK(status.registration_status == cml_registration_status::not_registered);
    CHECK(status.authorization_status == cml_authorization_status::eval);
}

TEST_CASE("fake client seeded error rates", "[cml][fake]")
{
    lcm::testing::fake_cml_faults faults;
    faults.server_error_rate = 0.25;
    faults.seed = 7;
    auto outcomes_of = [&faults] {
        lcm::testing::fake_cml cml;
        lcm::testing::fake_cml_client client(cml, admin());
        return run([&]() -> awaitable<std::string> {
            auto login = co_await client.authenticate(lab1);
            REQUIRE(login);
            cml.set_faults(faults);
            std::string sequence;
            for (int i = 0; i < 100; ++i) {
                auto status = co_await client.get_licensing_status(lab1);
                sequence += status ? '.' : (status.error() == lcm::errc::unavailable ? 'U' : '?');
            }
            co_return sequence;
        }());
    };

    const auto first = outcomes_of();
    const auto second = outcomes_of();

    CHECK(first == second);
    CHECK(first.find('?') == std::string::npos);
    CHECK(first.find('U') != std::string::npos);
    CHECK(first.find('.') != std::string::npos);
}

TEST_CASE("fake client loses applied registration", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    lcm::testing::fake_cml_client client(cml, admin());
    auto& instance = cml.instance(lab1);

    const auto [lost, repeated] = run([&]() -> awaitable<std::pair<result<void>, result<void>>> {
        auto login = co_await client.authenticate(lab1);
        REQUIRE(login);
        lcm::testing::fake_cml_faults faults;
        faults.drop_after_apply_rate = 1.0;
        instance.set_faults(faults);
        auto first = co_await client.register_license(lab1, valid_token, false);
        instance.set_faults({});
        auto second = co_await client.register_license(lab1, valid_token, false);
        co_return std::pair{first, second};
    }());

    CHECK(lost.error() == lcm::errc::unavailable);
    CHECK(repeated.error() == lcm::errc::operation_in_progress);
    CHECK(instance.counters().accepted_registrations == 1);
    CHECK(instance.licensing_status().registration_status == cml_registration_status::completed);
}

TEST_CASE("fake client drops before apply", "[cml][fake]")
{
    lcm::testing::fake_cml_faults faults;
    faults.drop_before_apply_rate = 1.0;
    lcm::testing::fake_cml_options options;
    options.faults = faults;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());

    const auto registration = run(client.register_license(lab1, valid_token, false));

    CHECK(registration.error() == lcm::errc::unavailable);
    CHECK(cml.instance(lab1).counters().accepted_registrations == 0);
    CHECK(cml.instance(lab1).counters().received_calls(cml_call::authenticate) == 0);
}

TEST_CASE("fake client latency is cancellable", "[cml][fake]")
{
    lcm::testing::fake_cml_faults faults;
    faults.latency = 1h;
    lcm::testing::fake_cml_options options;
    options.faults = faults;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());

    const auto outcome = run([&]() -> awaitable<result<void>> {
        auto executor = co_await boost::asio::this_coro::executor;
        boost::asio::cancellation_signal signal;
        std::optional<result<void>> registration;
        boost::asio::co_spawn(executor, wrap_optional(client.register_license(lab1, valid_token, false)),
                              boost::asio::bind_cancellation_slot(
                                  signal.slot(), [&](std::exception_ptr, std::optional<result<void>> done) {
                                      registration = std::move(done);
                                  }));

        // On one thread, the posted handler runs after the spawned call reached its timer.
        co_await boost::asio::post(executor, boost::asio::use_awaitable);
        REQUIRE_FALSE(registration);
        signal.emit(boost::asio::cancellation_type::terminal);
        co_await boost::asio::post(executor, boost::asio::use_awaitable);
        REQUIRE(registration);
        co_return *registration;
    }());

    CHECK(outcome.error() == lcm::errc::cancelled);
    CHECK(cml.instance(lab1).counters().received_calls(cml_call::register_license) == 0);
}

TEST_CASE("fake client waits injected latency", "[cml][fake]")
{
    lcm::testing::fake_cml_faults faults;
    faults.latency = 5ms;
    lcm::testing::fake_cml_options options;
    options.faults = faults;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());

    const auto started = std::chrono::steady_clock::now();
    const auto status = run(client.get_licensing_status(lab1));

    CHECK(status);
    CHECK(std::chrono::steady_clock::now() - started >= 5ms);
}

TEST_CASE("fake client crash hook", "[cml][fake]")
{
    struct simulated_crash : std::runtime_error {
        using std::runtime_error::runtime_error;
    };
    std::vector<std::pair<lcm::testing::fake_cml_hook_point, std::string>> points;
    lcm::testing::fake_cml_options options;
    options.hook = [&points](lcm::testing::fake_cml_hook_point point, std::string_view instance) {
        points.emplace_back(point, std::string(instance));
        if (point == lcm::testing::fake_cml_hook_point::registration_accepted) {
            throw simulated_crash("controller crashed after the registration POST");
        }
    };
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client crashed(cml, admin());

    CHECK_THROWS_AS(run(crashed.register_license(lab1, valid_token, false)), simulated_crash);

    lcm::testing::fake_cml_client restarted(cml, admin());
    const auto [status, deregistration] =
        run([&]() -> awaitable<std::pair<result<lcm::cml_licensing_status>, result<lcm::cml_deregistration_outcome>>> {
            auto read = co_await restarted.get_licensing_status(lab1);
            auto removed = co_await restarted.deregister_license(lab1);
            co_return std::pair{read, removed};
        }());

    REQUIRE(status);
    CHECK(status.value().registration_status == cml_registration_status::completed);
    CHECK(deregistration.value() == lcm::cml_deregistration_outcome::deregistered);
    REQUIRE(points.size() == 2);
    CHECK(points[0].first == lcm::testing::fake_cml_hook_point::registration_accepted);
    CHECK(points[0].second == "lab-1");
    CHECK(points[1].first == lcm::testing::fake_cml_hook_point::deregistration_applied);
    CHECK(cml.instance(lab1).counters().accepted_registrations == 1);
}

TEST_CASE("fake client on two threads", "[cml][fake]")
{
    constexpr int instances = 8;
    constexpr int callers = 25;
    lcm::testing::manual_clock clock;
    lcm::testing::fake_cml_options options;
    options.clock = clock.function();
    options.registration_delay = 1s;
    lcm::testing::fake_cml cml(options);
    lcm::testing::fake_cml_client client(cml, admin());
    std::vector<lcm::cml_endpoint> endpoints;
    for (int i = 0; i < instances; ++i) {
        endpoints.push_back({"http://127.0.0.1:8080/instances/lab-" + std::to_string(i)});
    }
    boost::asio::io_context context;

    // Every caller tries to register its instance. CML accepts one and responds 409 to the
    // rest. Catch2's assertions are not thread-safe, so callers only count what they see.
    std::atomic<int> unexpected{0};
    const auto accepted = lcm::testing::run_with_timeout(
        context,
        [&]() -> awaitable<int> {
            auto executor = co_await boost::asio::this_coro::executor;
            boost::asio::experimental::concurrent_channel<void(boost::system::error_code, bool)> done(
                executor, instances * callers);
            for (int i = 0; i < instances * callers; ++i) {
                const auto* endpoint = &endpoints[static_cast<std::size_t>(i % instances)];
                boost::asio::co_spawn(
                    executor,
                    [&client, &unexpected, endpoint]() -> awaitable<bool> {
                        if (!co_await client.get_licensing_status(*endpoint)) {
                            ++unexpected;
                        }
                        auto registration = co_await client.register_license(*endpoint, valid_token, false);
                        if (!registration && registration.error() != lcm::errc::operation_in_progress) {
                            ++unexpected;
                        }
                        co_return registration.has_value();
                    },
                    [&done, &unexpected](std::exception_ptr error, bool registered) {
                        if (error) {
                            ++unexpected;
                        }
                        done.try_send(boost::system::error_code{}, !error && registered);
                    });
            }
            int total = 0;
            for (int i = 0; i < instances * callers; ++i) {
                total += co_await done.async_receive(boost::asio::use_awaitable) ? 1 : 0;
            }
            co_return total;
        }(),
        lcm::testing::default_test_timeout, 2);

    CHECK(unexpected == 0);
    CHECK(accepted == instances);
    const auto totals = cml.total_counters();
    CHECK(totals.accepted_registrations == instances);
    CHECK(totals.received_calls(cml_call::register_license) == instances * callers);
    CHECK(totals.received_calls(cml_call::get_licensing_status) == instances * callers);
    CHECK(totals.received_calls(cml_call::authenticate) == instances);
}
