#include <lcm/transport/cml_json.hpp>

#include <boost/json.hpp>
#include <catch2/catch.hpp>

#include <sstream>

namespace {

// Shaped like a CML 2.9 response, with an extra top-level key and an extra registration key
// that lcm does not know, both timestamp forms, and nulls where CML sends them.
constexpr std::string_view registered_sample = R"({
  "udi": {"hostname": "cml-worker-7", "product_uuid": "4c4c4544-0042-3510-8054-b4c04f4e4d32"},
  "registration": {
    "status": "COMPLETED",
    "smart_account": "Example Corp",
    "virtual_account": "Lab Fleet",
    "expires": "2027-08-20 17:25:30",
    "register_time": {"succeeded": "2026-08-20 17:25:30", "attempted": "2026-08-20 17:25:01",
                      "scheduled": null, "status": "SUCCEEDED", "failure": null, "success": "SUCCEEDED"},
    "renew_time": {"succeeded": null, "attempted": null, "scheduled": "2027-02-16T17:25:30Z",
                   "status": null, "failure": null, "success": null},
    "registered_by": "admin"
  },
  "authorization": {
    "status": "IN_COMPLIANCE",
    "expires": "2026-11-18T17:25:30.250000+00:00",
    "renew_time": {"succeeded": null, "attempted": null, "scheduled": null,
                   "status": null, "failure": null, "success": null}
  },
  "reservation_mode": false,
  "features": [
    {"id": "regid.2019-10.com.cisco.CML_NODE_COUNT,1.0_ee2a7fcb", "name": "CML - Nodes",
     "description": "Cisco Modeling Labs node licenses", "version": "1.0", "in_use": 12,
     "status": "IN_COMPLIANCE", "min": 0, "max": 40, "minEndDate": null, "maxEndDate": "2027-08-20 00:00:00",
     "extra": [1, 2, 3]}
  ],
  "product_license": {"active": "CML_Enterprise", "is_enterprise": true},
  "transport": {"ssms": null, "proxy": {"server": null, "port": null}, "default_ssms": "https://smartreceiver.cisco.com"},
  "cluster_mode": "standalone"
})";

lcm::timestamp utc(int year, unsigned month, unsigned day, int hour, int minute, int second)
{
    using namespace std::chrono;
    return lcm::timestamp{sys_days{std::chrono::year{year} / month / day}.time_since_epoch() + hours{hour} +
                          minutes{minute} + seconds{second}};
}

} // namespace

TEST_CASE("licensing status decodes CML sample", "[cml][json]")
{
    const auto decoded = lcm::transport::decode_licensing_status(registered_sample);

    REQUIRE(decoded);
    const auto& status = decoded.value();
    CHECK(status.registration_status == lcm::cml_registration_status::completed);
    CHECK(status.registration_status_text.empty());
    CHECK(status.smart_account == "Example Corp");
    CHECK(status.virtual_account == "Lab Fleet");
    CHECK(status.registration_expires == utc(2027, 8, 20, 17, 25, 30));
    CHECK(status.registration_failure.empty());
    CHECK(status.authorization_status == lcm::cml_authorization_status::in_compliance);
    CHECK(status.authorization_expires == utc(2026, 11, 18, 17, 25, 30) + std::chrono::milliseconds{250});
    CHECK(status.product_license == "CML_Enterprise");
    CHECK(status.is_enterprise);

    REQUIRE(status.features.size() == 1);
    const auto& feature = status.features.front();
    CHECK(feature.id == "regid.2019-10.com.cisco.CML_NODE_COUNT,1.0_ee2a7fcb");
    CHECK(feature.name == "CML - Nodes");
    CHECK(feature.version == "1.0");
    CHECK(feature.status == "IN_COMPLIANCE");
    CHECK(feature.in_use == 12);
    CHECK(feature.max == 40);
    CHECK_FALSE(feature.min_end_date);
    CHECK(feature.max_end_date == utc(2027, 8, 20, 0, 0, 0));
}

TEST_CASE("licensing status keeps unknown status text", "[cml][json]")
{
    const auto decoded = lcm::transport::decode_licensing_status(
        R"({"registration": {"status": "DEREGISTRATION_PENDING", "smart_account": null, "expires": null},
            "authorization": {"status": "AUTHORIZATION_EXPIRED", "expires": "not a date"}})");

    REQUIRE(decoded);
    CHECK(decoded.value().registration_status == lcm::cml_registration_status::unknown);
    CHECK(decoded.value().registration_status_text == "DEREGISTRATION_PENDING");
    CHECK_FALSE(decoded.value().smart_account);
    CHECK_FALSE(decoded.value().registration_expires);
    CHECK(decoded.value().authorization_status == lcm::cml_authorization_status::unknown);
    CHECK(decoded.value().authorization_status_text == "AUTHORIZATION_EXPIRED");
    CHECK_FALSE(decoded.value().authorization_expires);
}

TEST_CASE("licensing status tolerates missing objects", "[cml][json]")
{
    const auto decoded = lcm::transport::decode_licensing_status(
        R"({"registration": {"status": "NOT_REGISTERED"}, "authorization": {"status": "EVAL"},
            "features": null, "product_license": null})");

    REQUIRE(decoded);
    CHECK(decoded.value().registration_status == lcm::cml_registration_status::not_registered);
    CHECK(decoded.value().authorization_status == lcm::cml_authorization_status::eval);
    CHECK(decoded.value().features.empty());
    CHECK(decoded.value().product_license.empty());

    const auto empty = lcm::transport::decode_licensing_status("{}");
    REQUIRE(empty);
    CHECK(empty.value().registration_status == lcm::cml_registration_status::unknown);
    CHECK(empty.value().authorization_status == lcm::cml_authorization_status::unknown);
}

TEST_CASE("licensing status rejects non-objects", "[cml][json]")
{
    CHECK(lcm::transport::decode_licensing_status("").error() == lcm::errc::protocol_error);
    CHECK(lcm::transport::decode_licensing_status("[1, 2]").error() == lcm::errc::protocol_error);
    CHECK(lcm::transport::decode_licensing_status("{\"registration\": ").error() == lcm::errc::protocol_error);
}

TEST_CASE("licensing status failure stays redacted", "[cml][json]")
{
    const lcm::secret token("NjM0ZTc3YjEtMGQ2OS00ZTFjLTg5ZTMtZGQ1MGQ");
    const std::string body = R"({"registration": {"status": "FAILED", "register_time": {"succeeded": null,
        "attempted": "2026-08-20 17:25:01", "scheduled": null, "status": "FAILED",
        "failure": "Failed to register with ID token NjM0ZTc3YjEtMGQ2OS00ZTFjLTg5ZTMtZGQ1MGQ: invalid",
        "success": null}}, "authorization": {"status": "EVAL"}})";

    const auto decoded = lcm::transport::decode_licensing_status(body);

    REQUIRE(decoded);
    const auto& failure = decoded.value().registration_failure;
    CHECK(decoded.value().registration_status == lcm::cml_registration_status::failed);
    CHECK(failure.redacted(token) == "Failed to register with ID token <redacted>: invalid");
    std::ostringstream printed;
    printed << failure;
    CHECK(printed.str() == "<redacted>");
    CHECK(boost::json::serialize(boost::json::value_from(failure)) == "\"<redacted>\"");
    CHECK(failure.reveal().find(token.reveal()) != std::string::npos);
}

TEST_CASE("licensing status survives encode and decode", "[cml][json]")
{
    lcm::cml_licensing_status status;
    status.registration_status = lcm::cml_registration_status::failed;
    status.registration_failure = lcm::cml_failure_reason("token ABC rejected");
    status.smart_account = "Example Corp";
    status.registration_expires = utc(2027, 1, 2, 3, 4, 5);
    status.authorization_status = lcm::cml_authorization_status::unknown;
    status.authorization_status_text = "SOMETHING_NEW";
    status.features.push_back({"CML_NODE_COUNT", "CML Nodes", "", "1.0", "INIT", 2, 0, 20, utc(2026, 1, 1, 0, 0, 0), {}});
    status.product_license = "CML_Enterprise";
    status.is_enterprise = true;

    const auto encoded = lcm::transport::licensing_status_to_json(status, "worker-1");
    const auto decoded = lcm::transport::decode_licensing_status(lcm::transport::encode_licensing_status(status));

    REQUIRE(decoded);
    CHECK(decoded.value() == status);
    const auto& register_time = encoded.as_object().at("registration").as_object().at("register_time").as_object();
    CHECK(register_time.size() == 6);
    CHECK(register_time.at("failure") == "token ABC rejected");
    CHECK(lcm::transport::licensing_status_from_json(encoded).value() == status);
    CHECK(encoded.as_object().at("udi").as_object().at("hostname") == "worker-1");
}

TEST_CASE("error body decodes every form", "[cml][json]")
{
    using lcm::transport::cml_error_body;
    using lcm::transport::decode_error_body;

    CHECK(decode_error_body("") == cml_error_body{});
    CHECK(decode_error_body("  \r\n") == cml_error_body{});
    CHECK(decode_error_body(R"({"code": 409, "description": "(re)registration cannot be requested at this time"})") ==
          cml_error_body{409, "(re)registration cannot be requested at this time"});
    CHECK(decode_error_body(R"({"code": 400, "description": "\"token: string does not match pattern\""})") ==
          cml_error_body{400, "token: string does not match pattern"});
    CHECK(decode_error_body(R"({"code": 400, "description": [{"loc": ["token"]}]})") ==
          cml_error_body{400, R"([{"loc":["token"]}])"});
    CHECK(decode_error_body(R"({"code": 403})") == cml_error_body{403, ""});
    CHECK(decode_error_body("<html>Bad Gateway</html>") == cml_error_body{0, "<html>Bad Gateway</html>"});
}

TEST_CASE("error body encodes code and description", "[cml][json]")
{
    const lcm::transport::cml_error_body error{401, "No valid authorization token provided"};

    CHECK(lcm::transport::decode_error_body(lcm::transport::encode_error_body(error)) == error);
}

TEST_CASE("registration request has two keys", "[cml][json]")
{
    const lcm::secret token("ABCdef123+/%=-");

    const auto body = lcm::transport::encode_registration_request(token, true);

    const auto parsed = boost::json::parse(body).as_object();
    CHECK(parsed.size() == 2);
    CHECK(parsed.at("token") == "ABCdef123+/%=-");
    CHECK(parsed.at("reregister") == true);

    const auto decoded = lcm::transport::decode_registration_request(body);
    REQUIRE(decoded);
    CHECK(decoded.value().token == token);
    CHECK(decoded.value().reregister);
}

TEST_CASE("registration request rejects bad bodies", "[cml][json]")
{
    using lcm::transport::decode_registration_request;

    const auto defaulted = decode_registration_request(R"({"token": "abc"})");
    REQUIRE(defaulted);
    CHECK_FALSE(defaulted.value().reregister);

    CHECK(decode_registration_request(R"({"token": "abc", "force": true})").error() == lcm::errc::invalid_argument);
    CHECK(decode_registration_request(R"({"reregister": true})").error() == lcm::errc::invalid_argument);
    CHECK(decode_registration_request(R"({"token": 5})").error() == lcm::errc::invalid_argument);
    CHECK(decode_registration_request(R"({"token": "abc", "reregister": "yes"})").error() ==
          lcm::errc::invalid_argument);
    CHECK(decode_registration_request("\"abc\"").error() == lcm::errc::invalid_argument);
}

TEST_CASE("authenticate bodies round-trip", "[cml][json]")
{
    const lcm::cml_credentials credentials{"admin", lcm::secret("p@ss word")};

    const auto request = lcm::transport::decode_authenticate_request(
        lcm::transport::encode_authenticate_request(credentials));
    REQUIRE(request);
    CHECK(request.value().username == "admin");
    CHECK(request.value().password == credentials.password);

    const lcm::secret jwt("eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl");
    const auto response = lcm::transport::encode_authenticate_response(jwt);
    CHECK(response == "\"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJhZG1pbiJ9.c2lnbmF0dXJl\"");
    const auto decoded = lcm::transport::decode_authenticate_response(response);
    REQUIRE(decoded);
    CHECK(decoded.value() == jwt);
}

TEST_CASE("authenticate bodies reject bad input", "[cml][json]")
{
    using namespace lcm::transport;

    CHECK(decode_authenticate_request(R"({"username": "", "password": "x"})").error() == lcm::errc::invalid_argument);
    CHECK(decode_authenticate_request(R"({"username": "abcdefghijabcdefghijabcdefghijabc", "password": "x"})")
              .error() == lcm::errc::invalid_argument);
    CHECK(decode_authenticate_request(R"({"username": "admin"})").error() == lcm::errc::invalid_argument);
    CHECK(decode_authenticate_response(R"({"token": "abc"})").error() == lcm::errc::protocol_error);
    CHECK(decode_authenticate_response("\"\"").error() == lcm::errc::protocol_error);
    CHECK(decode_authenticate_response("").error() == lcm::errc::protocol_error);
}
