// HTTP message types of lcm's transport, and the JSON responses every route builds.
#pragma once

#include <lcm/error.hpp>

#include <boost/beast/http/field.hpp>
#include <boost/beast/http/message.hpp>
#include <boost/beast/http/string_body.hpp>
#include <boost/beast/http/verb.hpp>
#include <boost/json/serialize.hpp>
#include <boost/json/value.hpp>

#include <string>
#include <string_view>

namespace lcm::transport {

namespace http = boost::beast::http;

/// A request with its whole body in memory; the server's limits bound its size.
using http_request = http::request<http::string_body>;

/// A response with its whole body in memory.
using http_response = http::response<http::string_body>;

/// The content type of every JSON body lcm sends.
inline constexpr std::string_view json_content_type = "application/json";

/// Builds a response with `body` serialized as JSON.
inline http_response make_json_response(http::status status, const boost::json::value& body, unsigned version = 11)
{
    http_response response{status, version};
    response.set(http::field::content_type, json_content_type);
    response.body() = boost::json::serialize(body);
    response.prepare_payload();
    return response;
}

/// Builds the error response `{"code": ..., "message": ...}` with the status that
/// `lcm::http_status` maps `error` to and the code that `lcm::error_name` gives.
/// `message` replaces the error's own description; it must never quote a secret. Errors
/// outside `lcm::errc` become 500 with a generic message, so no internal detail leaks.
inline http_response make_error_response(const boost::system::error_code& error, std::string_view message = {},
                                         unsigned version = 11)
{
    std::string text(message);
    if (error.category() != error_category()) {
        text = "internal server error";
    }
    else if (text.empty()) {
        text = error.message();
    }
    boost::json::object body{{"code", error_name(error)}, {"message", std::move(text)}};
    return make_json_response(static_cast<http::status>(http_status(error)), body, version);
}

} // namespace lcm::transport
