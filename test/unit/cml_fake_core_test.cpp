// The fake CML's core, called as an HTTP server would call it.
#include <lcm/testing/fake_cml.hpp>

#include <catch2/catch.hpp>

#include <algorithm>
#include <string>

using namespace std::chrono_literals;
using lcm::cml_authorization_status;
using lcm::cml_registration_status;

namespace {

const lcm::secret valid_token("NjM0ZTc3YjEtMGQ2OS00ZTFjLTg5ZTMtZGQ1MGQ+/%=-");

std::string log_in(lcm::testing::fake_cml_instance& instance)
{
    auto reply = instance.authenticate("admin", "fake-cml-password");
    REQUIRE(reply.status == 200);
    return reply.body.reveal();
}

bool is_base64url(std::string_view part)
{
    return !part.empty() && part.find_first_not_of("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_") ==
                                std::string_view::npos;
}

} // namespace

TEST_CASE("fake core issues JWT-looking tokens", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");

    const auto first = log_in(instance);
    const auto second = log_in(instance);

    CHECK(first != second);
    const auto dot1 = first.find('.');
    const auto dot2 = first.find('.', dot1 + 1);
    REQUIRE(dot2 != std::string::npos);
    CHECK(first.find('.', dot2 + 1) == std::string::npos);
    CHECK(is_base64url(std::string_view(first).substr(0, dot1)));
    CHECK(is_base64url(std::string_view(first).substr(dot1 + 1, dot2 - dot1 - 1)));
    CHECK(is_base64url(std::string_view(first).substr(dot2 + 1)));
    CHECK(first.rfind("eyJ", 0) == 0);
}

TEST_CASE("fake core rejects bad credentials", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");

    const auto wrong_password = instance.authenticate("admin", "guess");
    const auto unknown_user = instance.authenticate("nobody", "fake-cml-password");

    CHECK(wrong_password.status == 403);
    REQUIRE(wrong_password.error);
    CHECK(wrong_password.error->code == 403);
    CHECK(unknown_user.status == 403);
    CHECK(instance.counters().received_calls(lcm::cml_call::authenticate) == 2);
}

TEST_CASE("fake core answers 401 to bad tokens", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");
    auto& other = cml.instance("lab-2");
    const auto bearer = log_in(instance);

    CHECK(instance.get_licensing_status("").status == 401);
    CHECK(instance.get_licensing_status("eyJ.eyJ.abc").status == 401);
    CHECK(other.get_licensing_status(bearer).status == 401);
    CHECK(instance.get_licensing_status(bearer).status == 200);

    instance.revoke_tokens();

    CHECK(instance.get_licensing_status(bearer).status == 401);
}

TEST_CASE("fake core expires tokens by clock", "[cml][fake]")
{
    lcm::testing::manual_clock clock;
    lcm::testing::fake_cml_options options;
    options.clock = clock.function();
    options.token_lifetime = 300s;
    lcm::testing::fake_cml cml(options);
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);

    clock.advance(299s);
    CHECK(instance.get_licensing_status(bearer).status == 200);

    clock.advance(1s);
    CHECK(instance.get_licensing_status(bearer).status == 401);
}

TEST_CASE("fake core forbids non-admin users", "[cml][fake]")
{
    lcm::testing::fake_cml_options options;
    options.users.push_back({"viewer", lcm::secret("viewer-password"), false});
    lcm::testing::fake_cml cml(options);
    auto& instance = cml.instance("lab-1");

    const auto login = instance.authenticate("viewer", "viewer-password");
    REQUIRE(login.status == 200);

    CHECK(instance.get_licensing_status(login.body.reveal()).status == 403);
    CHECK(instance.register_license(login.body.reveal(), valid_token, false).status == 403);
    CHECK(instance.deregister_license(login.body.reveal()).status == 403);
    CHECK(instance.counters().accepted_registrations == 0);
}

TEST_CASE("fake core registration lifecycle", "[cml][fake]")
{
    lcm::testing::manual_clock clock;
    lcm::testing::fake_cml_options options;
    options.clock = clock.function();
    options.registration_delay = 20s;
    lcm::testing::fake_cml cml(options);
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);

    const auto initial = instance.get_licensing_status(bearer);
    REQUIRE(initial.status == 200);
    CHECK(initial.body.registration_status == cml_registration_status::not_registered);
    CHECK(initial.body.authorization_status == cml_authorization_status::eval);

    CHECK(instance.register_license(bearer, valid_token, false).status == 204);
    CHECK(instance.get_licensing_status(bearer).body.registration_status == cml_registration_status::in_progress);

    // A registration in progress blocks both a new registration and a deregistration.
    const auto busy = instance.register_license(bearer, valid_token, true);
    CHECK(busy.status == 409);
    REQUIRE(busy.error);
    CHECK(busy.error->code == 409);
    CHECK(instance.deregister_license(bearer).status == 409);

    clock.advance(20s);
    const auto done = instance.get_licensing_status(bearer);
    CHECK(done.body.registration_status == cml_registration_status::completed);
    CHECK(done.body.authorization_status == cml_authorization_status::in_compliance);
    CHECK(done.body.smart_account.has_value());
    CHECK(done.body.virtual_account.has_value());
    CHECK(done.body.registration_expires > clock.now());
    CHECK(done.body.authorization_expires > clock.now());
    CHECK(done.body.features.size() >= 2);
    CHECK(done.body.registration_failure.empty());

    CHECK(instance.register_license(bearer, valid_token, false).status == 409);
    CHECK(instance.counters().accepted_registrations == 1);
    CHECK(instance.counters().received_calls(lcm::cml_call::register_license) == 3);
}

TEST_CASE("fake core honours reregister", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);
    REQUIRE(instance.register_license(bearer, valid_token, false).status == 204);
    REQUIRE(instance.licensing_status().registration_status == cml_registration_status::completed);

    CHECK(instance.register_license(bearer, valid_token, true).status == 204);
    CHECK(instance.counters().accepted_registrations == 2);
    CHECK(instance.licensing_status().registration_status == cml_registration_status::completed);
}

TEST_CASE("fake core deregistration outcomes", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);

    const auto not_registered = instance.deregister_license(bearer);
    CHECK(not_registered.status == 400);
    CHECK_FALSE(not_registered.error);

    REQUIRE(instance.register_license(bearer, valid_token, false).status == 204);
    REQUIRE(instance.licensing_status().registration_status == cml_registration_status::completed);
    CHECK(instance.deregister_license(bearer).status == 204);
    const auto after = instance.licensing_status();
    CHECK(after.registration_status == cml_registration_status::not_registered);
    CHECK(after.authorization_status == cml_authorization_status::eval);
    CHECK(after.features.empty());
    CHECK_FALSE(after.smart_account);
    CHECK_FALSE(after.registration_expires);

    REQUIRE(instance.register_license(bearer, valid_token, false).status == 204);
    instance.set_licensing_service_reachable(false);
    // The registration was due while the service was up, but completes only on the next call.
    CHECK(instance.deregister_license(bearer).status == 409);
    CHECK(instance.licensing_status().registration_status == cml_registration_status::retry_in_progress);
    instance.set_licensing_service_reachable(true);
    CHECK(instance.licensing_status().registration_status == cml_registration_status::completed);
    instance.set_licensing_service_reachable(false);
    CHECK(instance.deregister_license(bearer).status == 202);
    CHECK(instance.licensing_status().registration_status == cml_registration_status::not_registered);
    CHECK(instance.counters().deregistrations == 2);
}

TEST_CASE("fake core rejects malformed tokens", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);

    const auto reply = instance.register_license(bearer, lcm::secret("not a token!"), false);

    CHECK(reply.status == 400);
    REQUIRE(reply.error);
    CHECK(reply.error->description.find("not a token") == std::string::npos);
    CHECK(instance.counters().accepted_registrations == 0);
}

TEST_CASE("fake core fails rejected tokens", "[cml][fake]")
{
    lcm::testing::fake_cml_options options;
    options.token_rejected = [](const lcm::secret& token) { return token.reveal().rfind("BAD", 0) == 0; };
    lcm::testing::fake_cml cml(options);
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);
    const lcm::secret bad_token("BADtoken123");

    REQUIRE(instance.register_license(bearer, bad_token, false).status == 204);
    const auto failed = instance.get_licensing_status(bearer).body;

    CHECK(failed.registration_status == cml_registration_status::failed);
    CHECK(failed.authorization_status == cml_authorization_status::eval);
    CHECK(failed.registration_failure.reveal().find("BADtoken123") != std::string::npos);
    CHECK(failed.registration_failure.redacted(bad_token).find("BADtoken123") == std::string::npos);

    // A failed registration may be retried with another token.
    CHECK(instance.register_license(bearer, valid_token, false).status == 204);
    const auto retried = instance.licensing_status();
    CHECK(retried.registration_status == cml_registration_status::completed);
    CHECK(retried.registration_failure.empty());
}

TEST_CASE("fake core instances are independent", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& first = cml.instance("lab-1");
    auto& second = cml.instance(lcm::cml_endpoint{"http://127.0.0.1:8080/instances/lab-2"});

    REQUIRE(first.register_license(log_in(first), valid_token, false).status == 204);

    CHECK(&cml.instance("lab-1") == &first);
    CHECK(&cml.instance(lcm::cml_endpoint{"http://127.0.0.1:9/instances/lab-2/"}) == &second);
    CHECK(second.name() == "lab-2");
    CHECK(first.licensing_status().registration_status == cml_registration_status::completed);
    CHECK(second.licensing_status().registration_status == cml_registration_status::not_registered);
    CHECK(cml.instance_count() == 2);
    CHECK(cml.total_counters().accepted_registrations == 1);
    CHECK(lcm::testing::fake_cml::instance_name("https://cml.example.com") == "https://cml.example.com");
}

TEST_CASE("fake core faults follow the seed", "[cml][fake]")
{
    lcm::testing::fake_cml_faults faults;
    faults.server_error_rate = 0.3;
    faults.seed = 42;
    lcm::testing::fake_cml first;
    lcm::testing::fake_cml second;
    auto& one = first.instance("lab-1");
    auto& two = second.instance("lab-1");
    const auto bearer_one = log_in(one);
    const auto bearer_two = log_in(two);
    first.set_faults(faults);
    second.set_faults(faults);

    std::string sequence_one;
    std::string sequence_two;
    for (int i = 0; i < 200; ++i) {
        sequence_one += one.get_licensing_status(bearer_one).status == 503 ? 'E' : '.';
        sequence_two += two.get_licensing_status(bearer_two).status == 503 ? 'E' : '.';
    }

    CHECK(sequence_one == sequence_two);
    const auto errors = std::count(sequence_one.begin(), sequence_one.end(), 'E');
    CHECK(errors > 20);
    CHECK(errors < 120);
    CHECK(one.counters().received_calls(lcm::cml_call::get_licensing_status) == 200);
}

TEST_CASE("fake core injects conflicts on mutations", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);
    lcm::testing::fake_cml_faults faults;
    faults.conflict_rate = 1.0;
    instance.set_faults(faults);

    CHECK(instance.register_license(bearer, valid_token, false).status == 409);
    CHECK(instance.get_licensing_status(bearer).status == 200);
    CHECK(instance.counters().accepted_registrations == 0);
}

TEST_CASE("fake core drops connections", "[cml][fake]")
{
    lcm::testing::fake_cml cml;
    auto& instance = cml.instance("lab-1");
    const auto bearer = log_in(instance);
    lcm::testing::fake_cml_faults faults;

    faults.drop_before_apply_rate = 1.0;
    instance.set_faults(faults);
    CHECK(instance.register_license(bearer, valid_token, false).delivery ==
          lcm::testing::fake_cml_delivery::dropped_before_apply);
    CHECK(instance.counters().accepted_registrations == 0);

    faults.drop_before_apply_rate = 0.0;
    faults.drop_after_apply_rate = 1.0;
    instance.set_faults(faults);
    CHECK(instance.register_license(bearer, valid_token, false).delivery ==
          lcm::testing::fake_cml_delivery::dropped_after_apply);
    CHECK(instance.counters().accepted_registrations == 1);
    CHECK(instance.licensing_status().registration_status == cml_registration_status::completed);
}
