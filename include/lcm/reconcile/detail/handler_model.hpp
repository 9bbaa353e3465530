// Type erasure of a reconcile handler, so that a reconciler's type names only Spec, Status and Key.
#pragma once

#include <lcm/reconcile/handler.hpp>

#include <optional>
#include <stdexcept>
#include <utility>

namespace lcm::reconcile::detail {

template <class Key, class Spec, class Status>
class handler_base {
public:
    virtual ~handler_base() = default;
    virtual boost::asio::awaitable<result<std::vector<Key>>> list_keys() = 0;
    virtual boost::asio::awaitable<result<std::optional<Spec>>> read_spec(const Key& key) = 0;
    /// Whether the reconciler should call the second `read_status`, which writes into its status.
    virtual bool reads_status_in_place() const noexcept = 0;
    virtual boost::asio::awaitable<result<Status>> read_status(const Key& key, Spec& spec) = 0;
    /// Emplaces the status and writes the observed state into it.
    virtual boost::asio::awaitable<result<void>> read_status(const Key& key, Spec& spec,
                                                             std::optional<Status>& status) = 0;
    virtual boost::asio::awaitable<action> reconcile(const Key& key, Spec& spec, Status& status) = 0;
    virtual boost::asio::awaitable<void> on_terminal_failure(const Key& key, const terminal_failure& failure) = 0;
};

// The overrides return the user's awaitables as they are, so that type erasure adds a virtual call
// per step but no coroutine frame.
template <class H, class Key, class Spec, class Status>
class handler_model final : public handler_base<Key, Spec, Status> {
public:
    explicit handler_model(H handler) : handler_(std::move(handler)) {}

    boost::asio::awaitable<result<std::vector<Key>>> list_keys() override { return handler_.list_keys(); }

    boost::asio::awaitable<result<std::optional<Spec>>> read_spec(const Key& key) override
    {
        return handler_.read_spec(key);
    }

    bool reads_status_in_place() const noexcept override { return in_place; }

    // The reconciler calls only the form of `read_status` that the handler has, so the other
    // override throws.

    boost::asio::awaitable<result<Status>> read_status(const Key& key, Spec& spec) override
    {
        if constexpr (in_place) {
            throw std::logic_error("read_status returning a status called on a handler that reads in place");
        } else {
            return handler_.read_status(key, spec);
        }
    }

    boost::asio::awaitable<result<void>> read_status(const Key& key, Spec& spec, std::optional<Status>& status) override
    {
        if constexpr (in_place) {
            return handler_.read_status(key, spec, status.emplace());
        } else {
            throw std::logic_error("read_status into a status called on a handler that returns it");
        }
    }

    boost::asio::awaitable<action> reconcile(const Key& key, Spec& spec, Status& status) override
    {
        return handler_.reconcile(key, spec, status);
    }

    boost::asio::awaitable<void> on_terminal_failure(const Key& key, const terminal_failure& failure) override
    {
        if constexpr (has_terminal_failure_hook<H, Key>) {
            return handler_.on_terminal_failure(key, failure);
        } else {
            return no_hook();
        }
    }

private:
    static constexpr bool in_place = lcm::reconcile::reads_status_in_place<H, Key, Spec, Status>;

    static boost::asio::awaitable<void> no_hook() { co_return; }

    H handler_;
};

} // namespace lcm::reconcile::detail
