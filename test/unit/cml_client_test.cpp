#include <lcm/controller/cml_client.hpp>

#include <boost/asio/error.hpp>
#include <catch2/catch.hpp>

#include <sstream>

namespace {

boost::system::error_code error_of(lcm::cml_call call, int status)
{
    const auto mapped = lcm::map_cml_status(call, status);
    return mapped ? boost::system::error_code{} : mapped.error();
}

} // namespace

TEST_CASE("status mapping of successes", "[cml]")
{
    using lcm::cml_call;
    using lcm::cml_success;

    CHECK(lcm::map_cml_status(cml_call::authenticate, 200).value() == cml_success::ok);
    CHECK(lcm::map_cml_status(cml_call::get_licensing_status, 200).value() == cml_success::ok);
    CHECK(lcm::map_cml_status(cml_call::register_license, 204).value() == cml_success::ok);
    CHECK(lcm::map_cml_status(cml_call::register_license, 202).value() == cml_success::ok);
    CHECK(lcm::map_cml_status(cml_call::deregister_license, 204).value() == cml_success::deregistered);
    CHECK(lcm::map_cml_status(cml_call::deregister_license, 200).value() == cml_success::deregistered);
    CHECK(lcm::map_cml_status(cml_call::deregister_license, 202).value() == cml_success::deregistered_locally);
    CHECK(lcm::map_cml_status(cml_call::deregister_license, 400).value() == cml_success::already_deregistered);
}

TEST_CASE("status mapping of failures", "[cml]")
{
    using lcm::cml_call;
    using lcm::errc;

    CHECK(error_of(cml_call::register_license, 400) == errc::invalid_token);
    CHECK(error_of(cml_call::authenticate, 400) == errc::invalid_argument);
    CHECK(error_of(cml_call::get_licensing_status, 401) == errc::unauthorized);
    CHECK(error_of(cml_call::authenticate, 403) == errc::unauthorized);
    CHECK(error_of(cml_call::get_licensing_status, 403) == errc::forbidden);
    CHECK(error_of(cml_call::register_license, 403) == errc::forbidden);
    CHECK(error_of(cml_call::deregister_license, 403) == errc::forbidden);
    CHECK(error_of(cml_call::get_licensing_status, 404) == errc::not_found);
    CHECK(error_of(cml_call::register_license, 409) == errc::operation_in_progress);
    CHECK(error_of(cml_call::deregister_license, 409) == errc::operation_in_progress);
    CHECK(error_of(cml_call::get_licensing_status, 429) == errc::unavailable);
    CHECK(error_of(cml_call::get_licensing_status, 500) == errc::unavailable);
    CHECK(error_of(cml_call::get_licensing_status, 502) == errc::unavailable);
    CHECK(error_of(cml_call::register_license, 503) == errc::unavailable);
    CHECK(error_of(cml_call::get_licensing_status, 302) == errc::protocol_error);
    CHECK(error_of(cml_call::get_licensing_status, 418) == errc::protocol_error);
}

TEST_CASE("error classification transient or permanent", "[cml]")
{
    CHECK(lcm::is_transient_cml_error(error_of(lcm::cml_call::register_license, 409)));
    CHECK(lcm::is_transient_cml_error(error_of(lcm::cml_call::get_licensing_status, 502)));
    CHECK(lcm::is_transient_cml_error(lcm::errc::timeout));
    CHECK(lcm::is_transient_cml_error(boost::asio::error::connection_refused));

    CHECK_FALSE(lcm::is_transient_cml_error({}));
    CHECK_FALSE(lcm::is_transient_cml_error(error_of(lcm::cml_call::register_license, 400)));
    CHECK_FALSE(lcm::is_transient_cml_error(error_of(lcm::cml_call::register_license, 403)));
    CHECK_FALSE(lcm::is_transient_cml_error(error_of(lcm::cml_call::get_licensing_status, 401)));
    CHECK_FALSE(lcm::is_transient_cml_error(lcm::errc::cancelled));
}

TEST_CASE("redaction replaces every occurrence", "[cml]")
{
    const lcm::secret token("Tok3n+/=");

    CHECK(lcm::redact_secret("token Tok3n+/= is invalid: Tok3n+/=", token) ==
          "token <redacted> is invalid: <redacted>");
    CHECK(lcm::redact_secret("Tok3n+/=", token) == "<redacted>");
    CHECK(lcm::redact_secret("nothing to hide", token) == "nothing to hide");
    CHECK(lcm::redact_secret("Tok3n+/", token) == "Tok3n+/");
    CHECK(lcm::redact_secret("text", lcm::secret{}) == "text");
}

TEST_CASE("failure reason prints redacted", "[cml]")
{
    const lcm::secret token("SECRETTOKEN");
    const lcm::cml_failure_reason reason("Failed to register with ID token SECRETTOKEN");

    std::ostringstream printed;
    printed << reason;

    CHECK(printed.str() == "<redacted>");
    CHECK(reason.redacted(token) == "Failed to register with ID token <redacted>");
    CHECK(reason.reveal() == "Failed to register with ID token SECRETTOKEN");
}

TEST_CASE("status text parses and prints", "[cml]")
{
    for (auto status : {lcm::cml_registration_status::not_registered, lcm::cml_registration_status::in_progress,
                        lcm::cml_registration_status::retry_in_progress, lcm::cml_registration_status::completed,
                        lcm::cml_registration_status::failed,
                        lcm::cml_registration_status::reservation_in_progress}) {
        CHECK(lcm::parse_registration_status(lcm::to_string(status)) == status);
    }
    for (auto status : {lcm::cml_authorization_status::init, lcm::cml_authorization_status::eval,
                        lcm::cml_authorization_status::in_compliance, lcm::cml_authorization_status::not_authorized,
                        lcm::cml_authorization_status::eval_expired,
                        lcm::cml_authorization_status::out_of_compliance}) {
        CHECK(lcm::parse_authorization_status(lcm::to_string(status)) == status);
    }
    CHECK(lcm::parse_registration_status("completed") == lcm::cml_registration_status::unknown);
    CHECK(lcm::parse_registration_status("") == lcm::cml_registration_status::unknown);
    CHECK(lcm::parse_authorization_status("EVAL ") == lcm::cml_authorization_status::unknown);
}

TEST_CASE("license token format check", "[cml]")
{
    CHECK(lcm::is_valid_license_token("NjM0ZTc3YjEtMGQ2OS00ZTFj+/%=-"));
    CHECK(lcm::is_valid_license_token(std::string(256, 'a')));
    CHECK_FALSE(lcm::is_valid_license_token(""));
    CHECK_FALSE(lcm::is_valid_license_token(std::string(257, 'a')));
    CHECK_FALSE(lcm::is_valid_license_token("abc def"));
    CHECK_FALSE(lcm::is_valid_license_token("abc\"def"));
    CHECK_FALSE(lcm::is_valid_license_token("abc_def"));
}
