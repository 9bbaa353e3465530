// Test fixtures for the control-plane command handlers: a captured logger, repositories that
// fail on purpose, and synchronous wrappers around each command.
#pragma once

#include <lcm/application/control_plane.hpp>
#include <lcm/log.hpp>
#include <lcm/storage/memory_repository.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/io_context.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace lcm::test {

/// Keeps every log line a logger writes, formatted as `format_log_line` does. Thread-safe.
class log_capture {
public:
    /// Returns a logger at debug level that writes into this capture.
    logger make_logger()
    {
        return logger(log_level::debug, [this](const log_record& record) {
            std::lock_guard lock(mutex_);
            lines_.push_back(format_log_line(record));
        });
    }

    std::vector<std::string> lines() const
    {
        std::lock_guard lock(mutex_);
        return lines_;
    }

    /// Returns the number of lines that contain `text`.
    std::size_t count(std::string_view text) const
    {
        std::lock_guard lock(mutex_);
        std::size_t found = 0;
        for (const auto& line : lines_) {
            found += line.find(text) != std::string::npos ? 1 : 0;
        }
        return found;
    }

private:
    mutable std::mutex mutex_;
    std::vector<std::string> lines_;
};

/// A repository that forwards to a `memory_repository` but fails the first
/// `failing_updates` calls of `update` with `error`, without touching the stored worker.
/// With `yield_before_update`, each update first yields to the executor, as a database round
/// trip would, so that other coroutines can change the worker between a read and a write.
class faulty_repository {
public:
    faulty_repository(storage::memory_repository& inner, int failing_updates, errc error,
                      bool yield_before_update = false)
        : inner_(inner), failing_updates_(failing_updates), error_(error), yield_before_update_(yield_before_update)
    {
    }

    boost::asio::awaitable<result<domain::cml_worker>> get(std::string_view id) { return inner_.get(id); }

    boost::asio::awaitable<result<std::uint64_t>> add(const domain::cml_worker& worker) { return inner_.add(worker); }

    boost::asio::awaitable<result<std::uint64_t>> update(const domain::cml_worker& worker)
    {
        if (++update_calls_ <= failing_updates_) {
            co_return error_;
        }
        if (yield_before_update_) {
            auto executor = co_await boost::asio::this_coro::executor;
            co_await boost::asio::post(executor, boost::asio::use_awaitable);
        }
        co_return co_await inner_.update(worker);
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list(std::string_view after_id, std::size_t limit)
    {
        return inner_.list(after_id, limit);
    }

    boost::asio::awaitable<result<std::vector<domain::cml_worker>>> list_pending(std::size_t limit)
    {
        return inner_.list_pending(limit);
    }

    std::uint64_t change_sequence() const { return inner_.change_sequence(); }

    boost::asio::awaitable<result<std::uint64_t>> wait_for_change(std::uint64_t after)
    {
        return inner_.wait_for_change(after);
    }

    /// Returns how often `update` was called, failed calls included.
    int update_calls() const { return update_calls_.load(); }

private:
    storage::memory_repository& inner_;
    std::atomic<int> update_calls_{0};
    int failing_updates_;
    errc error_;
    bool yield_before_update_;
};

static_assert(application::worker_repository<faulty_repository>);

/// Runs each command of a control plane to completion under the test timeout.
///
/// Every command is created in one statement and awaited in another, so no temporary with a
/// non-trivial destructor lives across a suspension, because g++ 12 miscompiles those.
template <class Plane>
class command_runner {
public:
    command_runner(boost::asio::io_context& context, Plane& plane) : context_(context), plane_(plane) {}

    result<domain::cml_worker> add(std::string id, domain::worker_status status = domain::worker_status::running)
    {
        application::add_worker_request request{std::move(id), "lab", "https://cml.example.test", status, "admin"};
        return run(plane_.add_worker(std::move(request)));
    }

    result<domain::cml_worker> get(std::string id)
    {
        // get_worker takes a string_view, so the id must outlive the run.
        return run(plane_.get_worker(id));
    }

    result<domain::cml_worker> change_status(std::string id, domain::worker_status status)
    {
        return run(plane_.change_worker_status(std::move(id), status, "infrastructure"));
    }

    result<application::operation_accepted> request_registration(std::string id, std::string token,
                                                                  bool reregister = false)
    {
        return run(plane_.request_registration(std::move(id), secret(std::move(token)), reregister, "admin"));
    }

    result<application::operation_accepted> request_deregistration(std::string id)
    {
        return run(plane_.request_deregistration(std::move(id), "admin"));
    }

    result<application::operation_claim> claim(std::string id, std::string holder, std::chrono::milliseconds lease)
    {
        return run(plane_.claim_operation(std::move(id), std::move(holder), lease));
    }

    result<domain::cml_worker> start(std::string id, domain::operation_key key)
    {
        return run(plane_.start_operation(std::move(id), key));
    }

    result<domain::cml_worker> complete_registration(std::string id, domain::operation_key key,
                                                     domain::registration_details details = {})
    {
        return run(plane_.complete_registration(std::move(id), key, std::move(details)));
    }

    result<domain::cml_worker> complete_deregistration(std::string id, domain::operation_key key,
                                                       std::optional<std::string> warning = std::nullopt)
    {
        return run(plane_.complete_deregistration(std::move(id), key, std::move(warning)));
    }

    result<domain::cml_worker> fail(std::string id, domain::operation_key key, std::string code = "cml_error",
                                    std::string message = "CML answered 500")
    {
        return run(plane_.fail_operation(std::move(id), key, std::move(code), std::move(message)));
    }

    /// Registers `token` on a worker through request, start and completion, and returns the
    /// operation id.
    std::uint64_t register_license(const std::string& id, const std::string& token, bool reregister = false)
    {
        const auto operation_id = request_registration(id, token, reregister).value().operation_id;
        start(id, operation_id).value();
        complete_registration(id, operation_id).value();
        return operation_id;
    }

private:
    template <class T>
    T run(boost::asio::awaitable<T> task)
    {
        return testing::run_with_timeout(context_, std::move(task));
    }

    boost::asio::io_context& context_;
    Plane& plane_;
};

/// A control plane on a `memory_repository` with a memory event sink and a captured log.
struct control_plane_fixture {
    explicit control_plane_fixture(application::control_plane_options options = {})
        : plane(repository, sink, logs.make_logger(), options)
    {
    }

    boost::asio::io_context context;
    storage::memory_repository repository;
    application::memory_event_sink sink;
    log_capture logs;
    application::control_plane<storage::memory_repository, application::memory_event_sink> plane;
    command_runner<decltype(plane)> commands{context, plane};

    std::size_t pending_count() const { return repository.pending_count(); }
};

/// A control plane on a `faulty_repository`, configured as its constructor describes.
struct faulty_control_plane_fixture {
    faulty_control_plane_fixture(int failing_updates, errc error, application::control_plane_options options,
                                 bool yield_before_update = false)
        : repository(storage, failing_updates, error, yield_before_update),
          plane(repository, sink, logs.make_logger(), options)
    {
    }

    boost::asio::io_context context;
    storage::memory_repository storage;
    faulty_repository repository;
    application::memory_event_sink sink;
    log_capture logs;
    application::control_plane<faulty_repository, application::memory_event_sink> plane;
    command_runner<decltype(plane)> commands{context, plane};

    std::size_t pending_count() const { return storage.pending_count(); }
};

} // namespace lcm::test
