// Starts a program as a child process with its stdout and stderr on pipes, for tests of
// the example programs. Linux only: fork, execve, poll, waitpid and prctl.
#pragma once

#include <catch2/catch.hpp>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <csignal>
#include <cstring>
#include <initializer_list>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

#include <fcntl.h>
#include <poll.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

extern char** environ;

namespace lcm::test {

/// A running child process. A thread reads its stdout and stderr as they arrive, so a
/// child that logs a lot never blocks on a full pipe. The destructor kills a child that is
/// still running.
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

        const pid_t parent = ::getpid();
        pid_ = ::fork();
        REQUIRE(pid_ >= 0);
        if (pid_ == 0) {
            // The child gets SIGKILL when the forking thread ends, so a test that crashes
            // leaves no program running. The check covers a parent that ended before prctl.
            ::prctl(PR_SET_PDEATHSIG, SIGKILL);
            if (::getppid() != parent) {
                ::_exit(127);
            }
            ::dup2(out_pipe[1], STDOUT_FILENO);
            ::dup2(err_pipe[1], STDERR_FILENO);
            ::execve(program.c_str(), argv.data(), envp.data());
            ::_exit(127);
        }
        ::close(out_pipe[1]);
        ::close(err_pipe[1]);
        reader_ = std::thread([this, out = out_pipe[0], err = err_pipe[0]] { read_output(out, err); });
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
        // The pipes close when the child is gone, which ends the reader.
        reader_.join();
    }

    /// Returns the first line of stdout without its newline, or nothing when the child
    /// closed stdout or `timeout` passed first.
    std::optional<std::string> read_first_line(std::chrono::milliseconds timeout)
    {
        std::unique_lock lock(mutex_);
        output_changed_.wait_for(lock, timeout,
                                 [this] { return stdout_.find('\n') != std::string::npos || !stdout_open_; });
        if (const auto end = stdout_.find('\n'); end != std::string::npos) {
            return stdout_.substr(0, end);
        }
        return std::nullopt;
    }

    void send_signal(int signal_number) { ::kill(pid_, signal_number); }

    /// Waits until the child exits and its pipes are closed, and returns its exit code, or
    /// 128 plus the signal number when a signal ended it. Returns nothing after `timeout`.
    std::optional<int> wait_for_exit(std::chrono::milliseconds timeout)
    {
        const auto deadline = std::chrono::steady_clock::now() + timeout;
        {
            std::unique_lock lock(mutex_);
            if (!output_changed_.wait_until(lock, deadline, [this] { return !stdout_open_ && !stderr_open_; })) {
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

    /// Waits until the child's stderr contains `text`. Returns false when `timeout` passed or
    /// the child closed stderr first.
    bool wait_for_standard_error(std::string_view text, std::chrono::milliseconds timeout)
    {
        std::unique_lock lock(mutex_);
        const auto contains_text = [&] { return stderr_.find(text) != std::string::npos; };
        output_changed_.wait_for(lock, timeout, [&] { return contains_text() || !stderr_open_; });
        return contains_text();
    }

    /// Everything the child wrote to stdout so far.
    std::string standard_output() const
    {
        std::lock_guard lock(mutex_);
        return stdout_;
    }

    /// Everything the child wrote to stderr so far.
    std::string standard_error() const
    {
        std::lock_guard lock(mutex_);
        return stderr_;
    }

private:
    /// Appends what arrives on the pipes to the buffers until the child closed both, then
    /// closes them. Runs on the reader thread.
    void read_output(int out_fd, int err_fd)
    {
        while (out_fd >= 0 || err_fd >= 0) {
            pollfd fds[2] = {{out_fd, POLLIN, 0}, {err_fd, POLLIN, 0}};
            if (::poll(fds, 2, -1) < 0) {
                if (errno == EINTR) {
                    continue;
                }
                break;
            }
            for (auto& entry : fds) {
                if (entry.fd < 0 || entry.revents == 0) {
                    continue;
                }
                const bool is_out = entry.fd == out_fd;
                char buffer[4096];
                const auto received = ::read(entry.fd, buffer, sizeof buffer);
                if (received < 0 && errno == EINTR) {
                    continue;
                }
                std::lock_guard lock(mutex_);
                if (received <= 0) {
                    ::close(entry.fd);
                    (is_out ? out_fd : err_fd) = -1;
                    (is_out ? stdout_open_ : stderr_open_) = false;
                }
                else {
                    (is_out ? stdout_ : stderr_).append(buffer, static_cast<std::size_t>(received));
                }
                output_changed_.notify_all();
            }
        }
        std::lock_guard lock(mutex_);
        stdout_open_ = false;
        stderr_open_ = false;
        output_changed_.notify_all();
    }

    pid_t pid_ = -1;
    std::optional<int> exit_status_;
    mutable std::mutex mutex_;
    std::condition_variable output_changed_;
    std::string stdout_;
    std::string stderr_;
    bool stdout_open_ = true;
    bool stderr_open_ = true;
    std::thread reader_;
};

} // namespace lcm::test
