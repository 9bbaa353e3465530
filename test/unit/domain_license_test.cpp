// Tests of the license value object, the enum text forms, the token format and `secret`.
#include "domain_test_support.hpp"

#include <lcm/domain/events.hpp>
#include <lcm/domain/license.hpp>
#include <lcm/domain/secret.hpp>
#include <lcm/log.hpp>

#include <catch2/catch.hpp>

#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

using namespace lcm::domain;
using lcm::errc;

namespace {

template <class Enum>
struct text_case {
    Enum value;
    std::string_view text;
};

/// Checks that every value prints as its text and parses back from it in any case, and that
/// each text in `unknown` is rejected.
template <class Enum, class Parse>
void check_text_forms(const std::vector<text_case<Enum>>& cases, Parse parse, const std::vector<std::string>& unknown)
{
    for (const auto& [value, text] : cases) {
        CAPTURE(text);
        CHECK(to_string(value) == text);

        const auto parsed = parse(text);
        REQUIRE(parsed);
        CHECK(parsed.value() == value);

        std::string upper(text);
        for (auto& c : upper) {
            c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
        }
        const auto parsed_upper = parse(upper);
        REQUIRE(parsed_upper);
        CHECK(parsed_upper.value() == value);

        std::string mixed(text);
        mixed[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(mixed[0])));
        const auto parsed_mixed = parse(mixed);
        REQUIRE(parsed_mixed);
        CHECK(parsed_mixed.value() == value);
    }
    for (const auto& text : unknown) {
        CAPTURE(text);
        const auto parsed = parse(text);
        REQUIRE_FALSE(parsed);
        CHECK(parsed.error() == errc::invalid_argument);
    }
}

} // namespace

TEST_CASE("license_status text forms", "[domain]")
{
    check_text_forms<license_status>({{license_status::unregistered, "unregistered"},
                                      {license_status::registered, "registered"},
                                      {license_status::evaluation, "evaluation"},
                                      {license_status::expired, "expired"},
                                      {license_status::invalid, "invalid"}},
                                     parse_license_status,
                                     {"", "register", "registered ", " registered", "REGISTERED_", "none", "unknown"});
}

TEST_CASE("license_operation text forms", "[domain]")
{
    check_text_forms<license_operation>({{license_operation::none, "none"},
                                         {license_operation::registration, "register"},
                                         {license_operation::deregistration, "deregister"}},
                                        parse_license_operation,
                                        {"", "registration", "deregistration", "unregister", "none ", "null"});
}

TEST_CASE("operation_outcome text forms", "[domain]")
{
    check_text_forms<operation_outcome>({{operation_outcome::none, "none"},
                                         {operation_outcome::completed, "completed"},
                                         {operation_outcome::failed, "failed"}},
                                        parse_operation_outcome, {"", "complete", "failure", "succeeded"});
}

TEST_CASE("worker_status text forms", "[domain]")
{
    check_text_forms<worker_status>({{worker_status::pending, "pending"},
                                     {worker_status::provisioning, "provisioning"},
                                     {worker_status::starting, "starting"},
                                     {worker_status::running, "running"},
                                     {worker_status::draining, "draining"},
                                     {worker_status::stopping, "stopping"},
                                     {worker_status::stopped, "stopped"},
                                     {worker_status::terminating, "terminating"},
                                     {worker_status::terminated, "terminated"},
                                     {worker_status::failed, "failed"},
                                     {worker_status::unknown, "unknown"}},
                                    parse_worker_status, {"", "run", "started", "runningx", "un known", "0"});
}

TEST_CASE("license token format boundaries", "[domain]")
{
    const std::vector<std::string> valid = {
        "a",
        "Z",
        "0",
        "+",
        "/",
        "%",
        "=",
        "-",
        "abc+def",
        "abc/def",
        "abc%2Bdef",
        "abc==",
        "abc-def",
        std::string(255, 'x'),
        std::string(256, 'x'),
        lcm::domain::testing::first_token,
    };
    const std::vector<std::string> invalid = {
        "",
        std::string(257, 'x'),
        std::string(1000, 'A'),
        "abc def",
        " abc",
        "abc ",
        "abc_def",
        "abc.def",
        "abc\tdef",
        "abc\ndef",
        std::string("abc\0def", 7),
        "abc*def",
        "abc:def",
        "abc\"def",
        "<redacted>",
        "caf\xc3\xa9",
        "\xff",
    };

    for (const auto& token : valid) {
        CAPTURE(token);
        CHECK(is_valid_license_token(token));
    }
    for (const auto& token : invalid) {
        CAPTURE(token);
        CHECK_FALSE(is_valid_license_token(token));
    }
}

TEST_CASE("cml_license defaults to unregistered", "[domain]")
{
    const cml_license license;

    CHECK(license.status() == license_status::unregistered);
    CHECK_FALSE(license.token());
    CHECK_FALSE(license.pending_token());
    CHECK(license.pending_operation() == license_operation::none);
    CHECK_FALSE(license.has_pending_operation());
    CHECK_FALSE(license.operation_in_progress());
    CHECK(license.operation_id() == 0);
    CHECK(license.attempts() == 0);
    CHECK(license.last_operation() == license_operation::none);
    CHECK(license.last_outcome() == operation_outcome::none);
    CHECK_FALSE(license.holds_license());
    CHECK(license.cml_info().is_null());
}

TEST_CASE("cml_license holds license by status", "[domain]")
{
    const std::vector<std::pair<license_status, bool>> cases = {
        {license_status::unregistered, false}, {license_status::registered, true}, {license_status::evaluation, true},
        {license_status::expired, false},      {license_status::invalid, false},
    };
    for (const auto& [status, holds] : cases) {
        CAPTURE(to_string(status));
        cml_license::fields state;
        state.status = status;
        CHECK(cml_license(state).holds_license() == holds);
    }
}

TEST_CASE("cml_license copy is a snapshot", "[domain]")
{
    auto worker = lcm::domain::testing::running_worker();
    const cml_license before = worker.license();

    const auto operation_id =
        worker.request_license_registration(lcm::secret(lcm::domain::testing::first_token), false, "admin",
                                            lcm::domain::testing::at(1));
    REQUIRE(operation_id);

    CHECK(before.operation_id() == 0);
    CHECK_FALSE(before.pending_token());
    CHECK(before.pending_operation() == license_operation::none);
    CHECK(worker.license().pending_operation() == license_operation::registration);
    CHECK_FALSE(before == worker.license());
}

TEST_CASE("secret prints as redacted", "[domain]")
{
    const lcm::secret token(lcm::domain::testing::first_token);

    std::ostringstream out;
    out << token;
    CHECK(out.str() == "<redacted>");
    CHECK(Catch::Detail::stringify(token) == "<redacted>");
    CHECK(boost::json::serialize(boost::json::value_from(token)) == "\"<redacted>\"");
    CHECK(token.reveal() == lcm::domain::testing::first_token);
}

TEST_CASE("secret needs reveal for text", "[domain]")
{
    // A log field takes plain text, so only an explicit reveal() can put a secret into a log.
    CHECK_FALSE(std::is_convertible_v<lcm::secret, std::string>);
    CHECK_FALSE(std::is_convertible_v<lcm::secret, std::string_view>);
    CHECK_FALSE(std::is_convertible_v<lcm::secret, const char*>);
    CHECK_FALSE(std::is_convertible_v<std::string, lcm::secret>);
    CHECK_FALSE(std::is_constructible_v<lcm::log_field, std::string_view, lcm::secret>);
}

TEST_CASE("secret compares by value", "[domain]")
{
    const lcm::secret token("abc123");

    CHECK(token == lcm::secret("abc123"));
    CHECK_FALSE(token == lcm::secret("abc124"));
    CHECK_FALSE(token == lcm::secret("abc12"));
    CHECK_FALSE(token == lcm::secret());
    CHECK(lcm::secret().empty());
    CHECK_FALSE(token.empty());
}
