// Starts a program as a child process with its stdout and stderr on pipes, for tests of
// the example programs. POSIX only: fork, execve, poll and waitpid.
#pragma once

#include <catch2/catch.hpp>

#include <cerrno>
#include <chrono>
#include <csignal>
#include <cstring>
#include <initializer_list>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace lcm::test {

/// A running child process. Its output is collected while a test reads lines or waits for
/// the exit. The destructor kills a child that is still running.
class child_process {
public:
    /// Starts `program` with `arguments`, the test's environment and `environment` on top
    /// (`NAME=value` entries).
    child_process(const std::string& program, const std::vector<std::string>& arguments,
                  const std::vector<std::string>& environment = {})
    {
        int out_pipe[2];
        int err_pipe[2];
        REQUIRE(::pipe2(out_pipe, O_CLOEXEC) == 0);
        REQUIRE(::pipe2(err_pipe, O_CLOEXEC) == 0);

        // Everything execve needs is built before fork, because the child may only call
        // async-signal-safe functions.
        std::vector<std::string> argument_storage{program};
        argument_storage.insert(argument_storage.end(), arguments.begin(), arguments.end());
        std::vector<char*> argv;
        for (auto& argument : argument_storage) {
            argv.push_back(argument.data());
        }
        argv.push_back(nullptr);
        std::vector<std::string> environment_storage;
        for (char** entry = environ; *entry != nullptr; ++entry) {
            environment_storage.emplace_back(*entry);
        }
        environment_storage.insert(environment_storage.end(), environment.begin(), environment.end());
        std::vector<char*> envp;
        for (auto& entry : environment_storage) {
            envp.push_back(entry.data());
        }
        envp.push_back(nullptr);

        pid_ = ::fork();
        REQUIRE(pid_ >= 0);
        if (pid_ == 0) {
            ::dup2(out_pipe[1], STDOUT_FILENO);
            ::dup2(err_pipe[1], STDERR_FILENO);
            ::execve(program.c_str(), argv.data(), envp.data());
            ::_exit(127);
        }
        ::close(out_pipe[1]);
        ::close(err_pipe[1]);
        out_fd_ = out_pipe[0];
        err_fd_ = err_pipe[0];
    }

    child_process(const child_process&) = delete;
    child_process& operator=(const child_process&) = delete;

    ~child_process()
    {
        if (!exit_status_) {
            ::kill(pid_, SIGKILL);
            int status = 0;
            ::waitpid(pid_, &status, 0);
        }
        close_pipes();
    }

    /// Returns the first line of stdout without its newline, or nothing when the child
    /// closed stdout or `timeout` passed first.
    std::optional<std::string> read_first_line(std::chrono::milliseconds timeout)
    {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        for (;;) {
            if (const auto end = stdout_.find('\n'); end != std::string::npos) {
                return stdout_.substr(0, end);
            }
            if (out_fd_ < 0 || !pump(deadline)) {
                return std::nullopt;
            }
        }
    }

    void send_signal(int signal_number) { ::kill(pid_, signal_number); }

    /// Waits until the child exits and its pipes are closed, and returns its exit code, or
    /// 128 plus the signal number when a signal ended it. Returns nothing after `timeout`.
    std::optional<int> wait_for_exit(std::chrono::milliseconds timeout)
    {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        while (out_fd_ >= 0 || err_fd_ >= 0) {
            if (!pump(deadline)) {
                return std::nullopt;
            }
        }
        while (!exit_status_) {
            int status = 0;
            const auto waited = ::waitpid(pid_, &status, WNOHANG);
            if (waited == pid_) {
                exit_status_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                break;
            }
            if (std::chrono::steady_clock::now() >= deadline) {
                return std::nullopt;
            }
            // The pipes are closed, so the exit is imminent; poll with a short pause.
            ::poll(nullptr, 0, 10);
        }
        return exit_status_;
    }

    /// Everything the child wrote to stdout so far.
    const std::string& standard_output() const noexcept { return stdout_; }

    /// Everything the child wrote to stderr so far.
    const std::string& standard_error() const noexcept { return stderr_; }

private:
    /// Reads what is available from the open pipes, waiting until `deadline`. Returns false
    /// when the deadline passed with nothing to read.
    bool pump(std::chrono::steady_clock::time_point deadline)
    {
        std::vector<pollfd> fds;
        if (out_fd_ >= 0) {
            fds.push_back({out_fd_, POLLIN, 0});
        }
        if (err_fd_ >= 0) {
            fds.push_back({err_fd_, POLLIN, 0});
        }
        const auto remaining =
            std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
        if (remaining.count() <= 0) {
            return false;
        }
        const int ready = ::poll(fds.data(), fds.size(), static_cast<int>(remaining.count()));
        if (ready <= 0) {
            return ready < 0 && errno == EINTR;
        }
        for (const auto& entry : fds) {
            if (entry.revents == 0) {
                continue;
            }
            const bool is_out = entry.fd == out_fd_;
            char buffer[4096];
            const auto received = ::read(entry.fd, buffer, sizeof buffer);
            if (received <= 0) {
                ::close(entry.fd);
                (is_out ? out_fd_ : err_fd_) = -1;
                continue;
            }
            (is_out ? stdout_ : stderr_).append(buffer, static_cast<std::size_t>(received));
        }
        return true;
    }

    void close_pipes()
    {
        for (int* fd : {&out_fd_, &err_fd_}) {
            if (*fd >= 0) {
                ::close(*fd);
                *fd = -1;
            }
        }
    }

    pid_t pid_ = -1;
    int out_fd_ = -1;
    int err_fd_ = -1;
    std::string stdout_;
    std::string stderr_;
    std::optional<int> exit_status_;
};

} // namespace lcm::test
