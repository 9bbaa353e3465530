// A throwaway certificate authority and server certificates for TLS tests, generated with
// the `openssl` command line into a temporary directory on first use and deleted at exit.
#pragma once

#include <boost/asio/ssl/context.hpp>

#include <catch2/catch.hpp>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <memory>
#include <string>

namespace lcm::test {

/// PEM files of a test CA, a server certificate for 127.0.0.1, ::1 and localhost, and one
/// for a host name that no test connects to.
struct test_certificates {
    std::filesystem::path directory;
    std::string ca_file;
    std::string server_certificate;
    std::string server_key;
    std::string wrong_name_certificate;
    std::string wrong_name_key;
};

namespace detail {

inline void run_openssl(const std::filesystem::path& directory, const std::string& arguments)
{
    // Output goes to a log file in the directory, which REQUIRE names when the command fails.
    const auto command = "cd '" + directory.string() + "' && openssl " + arguments + " >>openssl.log 2>&1";
    const int status = std::system(command.c_str());
    INFO("command: openssl " << arguments << "; see " << (directory / "openssl.log").string());
    REQUIRE(status == 0);
}

inline void issue_server_certificate(const std::filesystem::path& directory, const std::string& name,
                                     const std::string& subject_alt_names)
{
    {
        std::ofstream extensions(directory / (name + ".ext"));
        extensions << "subjectAltName=" << subject_alt_names << "\n"
                   << "basicConstraints=CA:FALSE\n"
                   << "keyUsage=critical,digitalSignature\n"
                   << "extendedKeyUsage=serverAuth\n";
    }
    run_openssl(directory, "req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout " + name +
                               ".key -out " + name + ".csr -subj /CN=" + name);
    run_openssl(directory, "x509 -req -in " + name + ".csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -out " +
                               name + ".pem -extfile " + name + ".ext");
}

/// Deletes the directory when the test program ends.
struct certificate_directory {
    std::filesystem::path path;

    ~certificate_directory()
    {
        std::error_code ignored;
        std::filesystem::remove_all(path, ignored);
    }
};

} // namespace detail

/// Returns the test certificates, generating them on the first call. Not thread-safe.
inline const test_certificates& get_test_certificates()
{
    static detail::certificate_directory directory;
    static test_certificates certificates;
    if (!directory.path.empty()) {
        return certificates;
    }

    std::string pattern = (std::filesystem::temp_directory_path() / "lcm-tls-XXXXXX").string();
    REQUIRE(::mkdtemp(pattern.data()) != nullptr);
    const std::filesystem::path path = pattern;
    detail::run_openssl(path, "req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key "
                              "-out ca.pem -days 2 -subj /CN=lcm-test-ca "
                              "-addext basicConstraints=critical,CA:TRUE "
                              "-addext keyUsage=critical,keyCertSign,cRLSign");
    detail::issue_server_certificate(path, "server", "IP:127.0.0.1,IP:::1,DNS:localhost");
    detail::issue_server_certificate(path, "wrong-name", "DNS:wrong-name.invalid");

    certificates.directory = path;
    certificates.ca_file = (path / "ca.pem").string();
    certificates.server_certificate = (path / "server.pem").string();
    certificates.server_key = (path / "server.key").string();
    certificates.wrong_name_certificate = (path / "wrong-name.pem").string();
    certificates.wrong_name_key = (path / "wrong-name.key").string();
    directory.path = path;
    return certificates;
}

/// Returns a server TLS context with the given PEM certificate chain and key.
inline std::shared_ptr<boost::asio::ssl::context> make_server_tls_context(const std::string& certificate,
                                                                          const std::string& key)
{
    auto context = std::make_shared<boost::asio::ssl::context>(boost::asio::ssl::context::tls_server);
    context->use_certificate_chain_file(certificate);
    context->use_private_key_file(key, boost::asio::ssl::context::pem);
    return context;
}

} // namespace lcm::test
