// Shared parts of the example servers: flags from the command line and the environment,
// secret files, the stderr logger, the listen address and a stop on SIGINT or SIGTERM.
#pragma once

#include <lcm/domain/secret.hpp>
#include <lcm/log.hpp>
#include <lcm/transport/http_server.hpp>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/signal_set.hpp>
#include <boost/program_options.hpp>

#include <algorithm>
#include <cctype>
#include <charconv>
#include <csignal>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iostream>
#include <iterator>
#include <mutex>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <utility>

namespace lcm::examples {

namespace po = boost::program_options;

/// A configuration error. The program prints it with a hint to `--help` and exits with 2.
class usage_error : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// Exit code of a configuration error, as for a bad flag.
inline constexpr int usage_exit_code = 2;

/// Parses the command line, then the environment variables `<prefix><FLAG>` (the flag in
/// upper case with `_` for `-`, so `--listen` reads `LCM_FAKE_CML_LISTEN`). A flag on the
/// command line wins over its variable. `--help` is not read from the environment.
inline po::variables_map parse_flags(int argc, char** argv, const po::options_description& flags,
                                     const std::string& environment_prefix)
{
    po::variables_map values;
    po::store(po::parse_command_line(argc, argv, flags), values);
    auto map_variable = [&](const std::string& variable) -> std::string {
        if (!variable.starts_with(environment_prefix)) {
            return {};
        }
        std::string name = variable.substr(environment_prefix.size());
        std::transform(name.begin(), name.end(), name.begin(), [](unsigned char c) {
            return c == '_' ? '-' : static_cast<char>(std::tolower(c));
        });
        if (name == "help" || flags.find_nothrow(name, false) == nullptr) {
            return {};
        }
        return name;
    };
    po::store(po::parse_environment(flags, map_variable), values);
    po::notify(values);
    return values;
}

/// Prints the usage line and the flags to stdout.
inline void print_help(std::string_view program, std::string_view summary, const po::options_description& flags)
{
    std::cout << "Usage: " << program << " [flags]\n" << summary << "\n\n" << flags << '\n';
}

/// Reads a secret from the first line of a file, without the line break. Throws
/// `usage_error` naming the flag when the file is missing, unreadable or empty.
inline secret read_secret_file(const std::string& path, std::string_view flag)
{
    if (path.empty()) {
        throw usage_error("missing --" + std::string(flag) + "; pass a file that contains the secret");
    }
    std::ifstream file(path);
    if (!file) {
        throw usage_error("cannot read --" + std::string(flag) + " file " + path + ": " +
                          std::generic_category().message(errno));
    }
    std::string line;
    std::getline(file, line);
    while (!line.empty() && std::isspace(static_cast<unsigned char>(line.back()))) {
        line.pop_back();
    }
    if (line.empty()) {
        throw usage_error("--" + std::string(flag) + " file " + path +
                          " is empty; put the secret on its first line");
    }
    return secret(std::move(line));
}

/// Parses `ADDRESS:PORT`, with an IPv6 address in brackets, into the server's options.
/// Throws `usage_error` for a malformed value.
inline void set_listen_address(const std::string& text, transport::http_server_options& options)
{
    const auto invalid = [&text] {
        return usage_error("invalid --listen value '" + text + "'; expected ADDRESS:PORT such as 127.0.0.1:8080");
    };
    const auto colon = text.rfind(':');
    if (colon == std::string::npos || colon == 0) {
        throw invalid();
    }
    std::string address = text.substr(0, colon);
    if (address.front() == '[' && address.back() == ']') {
        address = address.substr(1, address.size() - 2);
    }
    boost::system::error_code error;
    boost::asio::ip::make_address(address, error);
    const auto port_text = std::string_view(text).substr(colon + 1);
    std::uint16_t port = 0;
    const auto [end, parse_error] = std::from_chars(port_text.data(), port_text.data() + port_text.size(), port);
    if (error || parse_error != std::errc{} || end != port_text.data() + port_text.size() || port_text.empty()) {
        throw invalid();
    }
    options.address = std::move(address);
    options.port = port;
}

/// Parses `--log-level`. Throws `usage_error` for an unknown level.
inline log_level parse_log_level(const std::string& text)
{
    for (auto level : {log_level::trace, log_level::debug, log_level::info, log_level::warning, log_level::error,
                       log_level::off}) {
        if (text == to_string(level)) {
            return level;
        }
    }
    throw usage_error("invalid --log-level '" + text + "'; expected trace, debug, info, warning, error or off");
}

/// Returns a logger that writes one `key=value` line per record to stderr.
inline logger make_stderr_logger(log_level level)
{
    auto mutex = std::make_shared<std::mutex>();
    return logger(level, [mutex](const log_record& record) {
        const auto line = format_log_line(record);
        std::lock_guard lock(*mutex);
        std::cerr << line << '\n';
    });
}

/// Binds the server's socket. Throws `std::runtime_error` naming the address and the
/// socket error, such as `Address already in use`.
inline void listen_or_throw(transport::http_server& server, const std::string& listen)
{
    if (auto listening = server.listen(); !listening) {
        throw std::runtime_error("cannot listen on " + listen + ": " + listening.error().message());
    }
}

/// Runs `server` on `context` until SIGINT or SIGTERM, then stops it gracefully and returns
/// once every connection has closed. Prints `listening on <url>` as the first line of
/// stdout, so a caller that asked for port 0 can read the bound port.
template <class Server>
void serve_until_signal(boost::asio::io_context& context, Server& server, std::string_view scheme, const logger& log)
{
    const auto endpoint = server.local_endpoint();
    const auto address = endpoint.address();
    const auto host = address.is_v6() ? "[" + address.to_string() + "]" : address.to_string();
    std::cout << "listening on " << scheme << "://" << host << ":" << endpoint.port() << std::endl;

    boost::asio::signal_set signals(context, SIGINT, SIGTERM);
    signals.async_wait([&](const boost::system::error_code& error, int signal_number) {
        if (error) {
            return;
        }
        log.info("stop requested", {{"signal", signal_number == SIGINT ? "SIGINT" : "SIGTERM"}});
        server.stop();
    });
    std::exception_ptr failure;
    boost::asio::co_spawn(context, server.run(), [&](std::exception_ptr error) {
        failure = error;
        signals.cancel();
    });
    context.run();
    if (failure) {
        std::rethrow_exception(failure);
    }
}

/// Runs `body` and turns its exceptions into a message on stderr and an exit code: 2 for
/// usage errors and bad flags, 1 for anything else.
template <class Body>
int run_program(std::string_view program, Body body)
{
    try {
        return body();
    }
    catch (const po::error& error) {
        std::cerr << program << ": " << error.what() << "\nRun '" << program << " --help' for the flags.\n";
        return usage_exit_code;
    }
    catch (const usage_error& error) {
        std::cerr << program << ": " << error.what() << "\nRun '" << program << " --help' for the flags.\n";
        return usage_exit_code;
    }
    catch (const std::exception& error) {
        std::cerr << program << ": " << error.what() << '\n';
        return EXIT_FAILURE;
    }
}

} // namespace lcm::examples
