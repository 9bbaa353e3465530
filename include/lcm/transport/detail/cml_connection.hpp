// Internals of `cml_http_client`: the parsed base URL of a CML host, one connection over
// TCP or TLS, and the bounded pool of idle keep-alive connections per host.
#pragma once

#include <lcm/error.hpp>

#include <boost/asio/any_io_executor.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/beast/core/tcp_stream.hpp>
#include <boost/beast/ssl/ssl_stream.hpp>
#include <boost/url/parse.hpp>
#include <boost/url/scheme.hpp>
#include <boost/url/url_view.hpp>

#include <chrono>
#include <cstddef>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <utility>
#include <vector>

namespace lcm::transport::detail {

/// The parts of a CML base URL such as `https://cml-1.lab:443/prefix` that a request needs.
struct cml_base_url {
    bool tls = false;
    /// The host name or address without brackets, for the resolver, SNI and certificate checks.
    std::string host;
    bool host_is_address = false;
    std::uint16_t port = 0;
    /// The value of the `Host` header field, with the port when the URL names one.
    std::string host_field;
    /// `scheme://host:port`: the key of the connection pool and the `host` field of log records.
    std::string origin;
    /// The path before `/api/v0`, without a trailing slash; empty for a URL without a path.
    std::string path;
};

/// Parses a base URL. Fails with `invalid_argument` unless it is an absolute `http` or
/// `https` URL with a host and without user information, query or fragment.
inline result<cml_base_url> parse_cml_base_url(std::string_view text)
{
    auto parsed = boost::urls::parse_absolute_uri(text);
    if (!parsed) {
        return make_error_code(errc::invalid_argument);
    }
    const boost::urls::url_view& url = *parsed;
    const auto scheme = url.scheme_id();
    if ((scheme != boost::urls::scheme::http && scheme != boost::urls::scheme::https) || url.has_userinfo() ||
        url.has_query() || url.has_fragment() || url.encoded_host().empty()) {
        return make_error_code(errc::invalid_argument);
    }

    cml_base_url base;
    base.tls = scheme == boost::urls::scheme::https;
    base.host = url.host_address();
    base.host_is_address = url.host_type() == boost::urls::host_type::ipv4 ||
                           url.host_type() == boost::urls::host_type::ipv6;
    if (url.has_port()) {
        if (url.port_number() == 0) {
            return make_error_code(errc::invalid_argument);
        }
        base.port = url.port_number();
    }
    else {
        base.port = base.tls ? 443 : 80;
    }
    base.host_field = url.encoded_authority();
    base.origin = std::string(url.scheme()) + "://" + std::string(url.encoded_host()) + ":" + std::to_string(base.port);
    base.path = url.encoded_path();
    while (!base.path.empty() && base.path.back() == '/') {
        base.path.pop_back();
    }
    return base;
}

/// One connection to a CML host. A TLS connection moves its TCP stream into `tls`.
struct cml_connection {
    explicit cml_connection(const boost::asio::any_io_executor& executor) : plain(executor) {}

    /// Returns the TCP layer, which carries the timeouts of both kinds of stream.
    boost::beast::tcp_stream& tcp() noexcept { return tls ? tls->next_layer() : plain; }

    boost::beast::tcp_stream plain;
    std::optional<boost::beast::ssl_stream<boost::beast::tcp_stream>> tls;
    /// When the connection was returned to the pool.
    std::chrono::steady_clock::time_point idle_since{};
};

/// Idle keep-alive connections, at most `max_per_host` for each origin. A connection idle
/// for longer than `max_idle_time` is closed instead of reused, because the server has
/// probably closed it already.
///
/// Thread safety: every member may be called concurrently.
class cml_connection_pool {
public:
    cml_connection_pool(std::size_t max_per_host, std::chrono::milliseconds max_idle_time)
        : max_per_host_(max_per_host), max_idle_time_(max_idle_time)
    {
    }

    /// Returns the most recently used idle connection to `origin`, or null.
    std::unique_ptr<cml_connection> take(const std::string& origin)
    {
        const auto oldest_usable = std::chrono::steady_clock::now() - max_idle_time_;
        std::lock_guard lock(mutex_);
        auto found = idle_.find(origin);
        if (found == idle_.end()) {
            return nullptr;
        }
        auto& connections = found->second;
        while (!connections.empty()) {
            auto connection = std::move(connections.back());
            connections.pop_back();
            if (connection->idle_since >= oldest_usable) {
                return connection;
            }
        }
        idle_.erase(found);
        return nullptr;
    }

    /// Keeps a connection for reuse, or closes it when `origin` has `max_per_host` already.
    void put(const std::string& origin, std::unique_ptr<cml_connection> connection)
    {
        connection->idle_since = std::chrono::steady_clock::now();
        std::lock_guard lock(mutex_);
        auto& connections = idle_[origin];
        if (connections.size() < max_per_host_) {
            connections.push_back(std::move(connection));
        }
    }

    /// Closes every idle connection.
    void clear()
    {
        std::lock_guard lock(mutex_);
        idle_.clear();
    }

private:
    const std::size_t max_per_host_;
    const std::chrono::milliseconds max_idle_time_;
    std::mutex mutex_;
    std::unordered_map<std::string, std::vector<std::unique_ptr<cml_connection>>> idle_;
};

} // namespace lcm::transport::detail
