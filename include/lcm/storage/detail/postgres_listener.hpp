// The LISTEN side of `postgres_repository`: one dedicated connection whose notifications
// advance the repository's change sequence.
#pragma once

#include <lcm/error.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/change_notifier.hpp>
#include <lcm/storage/detail/postgres_connection.hpp>

#include <libpq-fe.h>

#include <chrono>
#include <string>
#include <system_error>
#include <thread>

#include <fcntl.h>
#include <poll.h>
#include <unistd.h>

namespace lcm::storage::detail {

/// Listens on `channel` from its own thread and calls `notifier.notify()` for every
/// notification whose payload is not `instance`, that is, for every commit of another
/// repository object. A lost connection is reopened every `retry_interval`; after a
/// reconnect the sequence advances once, because notifications sent in between are lost
/// and waiters must resync.
///
/// Thread safety: `start` and `stop` are called by the owning repository only. The thread
/// blocks in `poll` on the libpq socket and on a pipe that `stop` writes to.
class postgres_listener {
public:
    postgres_listener(postgres_settings settings, std::string channel, std::string instance, change_notifier& notifier,
                      logger log, std::chrono::milliseconds retry_interval)
        : settings_(std::move(settings)), channel_(std::move(channel)), instance_(std::move(instance)),
          notifier_(notifier), log_(std::move(log)), retry_interval_(retry_interval)
    {
    }

    postgres_listener(const postgres_listener&) = delete;
    postgres_listener& operator=(const postgres_listener&) = delete;
    ~postgres_listener() { stop(); }

    /// Connects, runs LISTEN and starts the thread. Blocks; called on a repository pool
    /// thread. On failure no thread runs.
    result<void> start()
    {
        if (::pipe2(wake_, O_CLOEXEC) != 0) {
            throw std::system_error(errno, std::generic_category(), "creating the listener's wake-up pipe failed");
        }
        if (auto listening = listen(); !listening) {
            return listening.error();
        }
        thread_ = std::thread([this] { run(); });
        return success();
    }

    /// Ends the thread and closes the connection. Blocks until the thread has ended.
    void stop()
    {
        if (thread_.joinable()) {
            const char byte = 0;
            [[maybe_unused]] const auto written = ::write(wake_[1], &byte, 1);
            thread_.join();
        }
        for (int& descriptor : wake_) {
            if (descriptor >= 0) {
                ::close(descriptor);
                descriptor = -1;
            }
        }
    }

private:
    result<void> listen()
    {
        if (auto connected = connection_.connect(settings_, log_); !connected) {
            return connected.error();
        }
        // LISTEN takes an identifier, which cannot be a bound parameter.
        const auto statement = "LISTEN " + connection_.quote_identifier(channel_);
        connection_.begin_operation();
        if (auto listening = connection_.execute(statement.c_str(), {}, log_); !listening) {
            return listening.error();
        }
        return success();
    }

    // Waits up to `timeout` for readable data on `socket` (if any) or on the wake-up pipe.
    // Returns false when the pipe was written, that is, when the thread must end.
    bool wait(int socket, int timeout_ms)
    {
        pollfd descriptors[2] = {{wake_[0], POLLIN, 0}, {socket, POLLIN, 0}};
        const nfds_t count = socket >= 0 ? 2 : 1;
        while (::poll(descriptors, count, timeout_ms) < 0) {
            if (errno != EINTR) {
                throw std::system_error(errno, std::generic_category(), "waiting for PostgreSQL notifications failed");
            }
        }
        return (descriptors[0].revents & POLLIN) == 0;
    }

    void run()
    {
        for (;;) {
            if (!connection_.healthy()) {
                if (!wait(-1, static_cast<int>(retry_interval_.count()))) {
                    return;
                }
                if (!listen()) {
                    continue;
                }
                log_.info("PostgreSQL notification connection restored",
                          {{"host", settings_.endpoint.host}, {"port", settings_.endpoint.port},
                           {"dbname", settings_.endpoint.dbname}});
                notifier_.notify();
            }

            if (!wait(PQsocket(connection_.handle()), -1)) {
                return;
            }
            if (PQconsumeInput(connection_.handle()) == 0 || !connection_.healthy()) {
                log_.warning("PostgreSQL notification connection lost; reconnecting",
                             {{"host", settings_.endpoint.host}, {"port", settings_.endpoint.port},
                              {"dbname", settings_.endpoint.dbname},
                              {"retry_ms", std::to_string(retry_interval_.count())}});
                connection_.close();
                continue;
            }
            deliver();
        }
    }

    void deliver()
    {
        while (PGnotify* notification = PQnotifies(connection_.handle())) {
            const bool own = instance_ == notification->extra;
            PQfreemem(notification);
            if (!own) {
                notifier_.notify();
            }
        }
    }

    postgres_settings settings_;
    std::string channel_;
    std::string instance_;
    change_notifier& notifier_;
    logger log_;
    std::chrono::milliseconds retry_interval_;
    postgres_connection connection_;
    int wake_[2] = {-1, -1};
    std::thread thread_;
};

} // namespace lcm::storage::detail
