// The contract of `application::worker_repository`, checked against every store kind that
// this build has: memory, SQLite on a temporary file, and PostgreSQL when
// LCM_TEST_POSTGRES_URL names a server. Catch2 names each case by the store's index in
// `store_types`: 0 is memory, 1 SQLite and 2 PostgreSQL when both adapters were built.
#include "concurrent_tasks.hpp"
#include "repository_stores.hpp"

#include <lcm/application/worker_repository.hpp>
#include <lcm/testing/run.hpp>

#include <boost/asio/experimental/awaitable_operators.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>

#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <optional>
#include <string>
#include <vector>

namespace {

using lcm::errc;
using lcm::result;
using lcm::domain::cml_worker;
using lcm::test::store_types;
using boost::asio::awaitable;
using boost::asio::use_awaitable;

// Coroutines below never put a temporary with a non-trivial destructor into a co_await
// expression, because g++ 12 miscompiles such temporaries. Arguments are named locals.

cml_worker make_worker(std::string id)
{
    return cml_worker::create(std::move(id), "lab", "https://cml.example.test", lcm::domain::worker_status::running,
                              "admin")
        .value();
}

lcm::timestamp at_second(int second)
{
    return lcm::timestamp{std::chrono::seconds{1'700'000'000 + second}};
}

std::vector<std::string> ids_of(const std::vector<cml_worker>& workers)
{
    std::vector<std::string> ids;
    for (const auto& worker : workers) {
        ids.push_back(worker.id());
    }
    return ids;
}

/// Adds a worker with the given id and returns the stored copy.
template <lcm::application::worker_repository Repository>
awaitable<cml_worker> add_stored(Repository& repository, std::string id)
{
    auto worker = make_worker(std::move(id));
    auto added = co_await repository.add(worker);
    if (!added) {
        throw std::runtime_error("adding worker failed: " + added.error().message());
    }
    auto stored = co_await repository.get(worker.id());
    co_return stored.value();
}

/// Loads a stored worker, applies `change` and saves it with the version it read.
template <lcm::application::worker_repository Repository, class Change>
awaitable<result<std::uint64_t>> load_change_save(Repository& repository, std::string id, Change change)
{
    auto loaded = co_await repository.get(id);
    if (!loaded) {
        co_return loaded.error();
    }
    auto worker = std::move(loaded).value();
    change(worker);
    auto saved = co_await repository.update(worker);
    co_return saved;
}

/// Returns the number of stored workers, read through `list`.
template <lcm::application::worker_repository Repository>
std::size_t count_workers(boost::asio::io_context& context, Repository& repository)
{
    auto listed = lcm::testing::run_with_timeout(context, repository.list("", 1000));
    if (!listed) {
        throw std::runtime_error("listing workers failed: " + listed.error().message());
    }
    return listed.value().size();
}

} // namespace

TEMPLATE_LIST_TEST_CASE("repository gets an added worker", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    const auto worker = make_worker("w-1");

    struct observed {
        result<std::uint64_t> version;
        result<cml_worker> stored;
        result<cml_worker> unknown;
    };
    auto seen = lcm::testing::run_with_timeout(context, [&]() -> awaitable<observed> {
        auto version = co_await repository.add(worker);
        auto stored = co_await repository.get("w-1");
        auto unknown = co_await repository.get("w-2");
        co_return observed{version, stored, unknown};
    }());

    REQUIRE(seen.version);
    CHECK(seen.version.value() == 1);
    REQUIRE(seen.stored);
    CHECK(seen.stored.value().version() == 1);
    CHECK(seen.stored.value().id() == "w-1");
    CHECK(seen.stored.value().name() == worker.name());
    CHECK(seen.stored.value().cml_url() == worker.cml_url());
    CHECK(seen.stored.value().created_at() == worker.created_at());
    CHECK(seen.unknown.error() == errc::not_found);
    CHECK(count_workers(context, repository) == 1);
}

TEMPLATE_LIST_TEST_CASE("repository keeps every field", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();

    // A pending registration carries a token, which the record form keeps in clear text.
    auto worker = make_worker("w-1");
    REQUIRE(worker.request_license_registration(lcm::secret("TOKEN-1"), false, "admin", at_second(5)));
    REQUIRE(lcm::testing::run_with_timeout(context, repository.add(worker)));
    auto stored = lcm::testing::run_with_timeout(context, repository.get("w-1"));

    REQUIRE(stored);
    auto expected = worker.state();
    expected.version = 1;
    CHECK(stored.value().state() == expected);
    REQUIRE(stored.value().license().pending_token().has_value());
    CHECK(stored.value().license().pending_token()->reveal() == "TOKEN-1");
}

TEMPLATE_LIST_TEST_CASE("repository rejects a duplicate id", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    const auto first = make_worker("w-1");
    const auto second = cml_worker::create("w-1", "other lab", "https://other.example.test",
                                           lcm::domain::worker_status::stopped, "admin")
                            .value();

    auto added = lcm::testing::run_with_timeout(context, repository.add(first));
    auto duplicate = lcm::testing::run_with_timeout(context, repository.add(second));
    auto stored = lcm::testing::run_with_timeout(context, repository.get("w-1"));

    REQUIRE(added);
    CHECK(duplicate.error() == errc::already_exists);
    CHECK(count_workers(context, repository) == 1);
    REQUIRE(stored);
    CHECK(stored.value().name() == "lab");
    CHECK(stored.value().version() == 1);
}

TEMPLATE_LIST_TEST_CASE("repository update checks the version", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    auto stored = lcm::testing::run_with_timeout(context, add_stored(repository, "w-1"));

    auto fresh = stored;
    fresh.change_status(lcm::domain::worker_status::draining, "admin");
    auto saved = lcm::testing::run_with_timeout(context, repository.update(fresh));
    REQUIRE(saved);
    CHECK(saved.value() == 2);

    // `stored` still carries version 1, which is no longer the stored version.
    auto stale = stored;
    stale.change_status(lcm::domain::worker_status::stopped, "admin");
    auto conflict = lcm::testing::run_with_timeout(context, repository.update(stale));
    CHECK(conflict.error() == errc::version_conflict);

    auto unknown = make_worker("w-2");
    auto missing = lcm::testing::run_with_timeout(context, repository.update(unknown));
    CHECK(missing.error() == errc::not_found);

    auto reloaded = lcm::testing::run_with_timeout(context, repository.get("w-1"));
    REQUIRE(reloaded);
    CHECK(reloaded.value().version() == 2);
    CHECK(reloaded.value().status() == lcm::domain::worker_status::draining);
    CHECK(count_workers(context, repository) == 1);

    auto next = reloaded.value();
    next.change_status(lcm::domain::worker_status::stopped, "admin");
    auto saved_again = lcm::testing::run_with_timeout(context, repository.update(next));
    REQUIRE(saved_again);
    CHECK(saved_again.value() == 3);
}

TEMPLATE_LIST_TEST_CASE("repository stores no pending events", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    const auto created = make_worker("w-1");
    REQUIRE(created.events().size() == 1);

    REQUIRE(lcm::testing::run_with_timeout(context, repository.add(created)));
    auto after_add = lcm::testing::run_with_timeout(context, repository.get("w-1"));
    REQUIRE(after_add);
    CHECK(after_add.value().events().empty());

    auto changed = after_add.value();
    changed.change_status(lcm::domain::worker_status::stopped, "admin");
    REQUIRE(changed.events().size() == 1);
    REQUIRE(lcm::testing::run_with_timeout(context, repository.update(changed)));
    auto after_update = lcm::testing::run_with_timeout(context, repository.get("w-1"));
    REQUIRE(after_update);
    CHECK(after_update.value().events().empty());
    CHECK(after_update.value().status() == lcm::domain::worker_status::stopped);

    // The repository copies what it saves, so the caller keeps its events.
    CHECK(created.events().size() == 1);
    CHECK(changed.events().size() == 1);
}

TEMPLATE_LIST_TEST_CASE("repository lists pages by id", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    for (const char* id : {"d", "b", "e", "a", "c"}) {
        lcm::testing::run_with_timeout(context, add_stored(repository, id));
    }

    auto page = [&](std::string after, std::size_t limit) {
        auto listed = lcm::testing::run_with_timeout(context, repository.list(after, limit));
        REQUIRE(listed);
        return ids_of(listed.value());
    };

    using ids = std::vector<std::string>;
    CHECK(page("", 2) == ids{"a", "b"});
    CHECK(page("b", 2) == ids{"c", "d"});
    CHECK(page("d", 2) == ids{"e"});
    CHECK(page("e", 2).empty());
    CHECK(page("", 10) == ids{"a", "b", "c", "d", "e"});
    CHECK(page("", 0).empty());
    // An id that is not stored still marks where the page starts.
    CHECK(page("bb", 2) == ids{"c", "d"});
}

TEMPLATE_LIST_TEST_CASE("pending list orders oldest request first", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    for (const char* id : {"a", "b", "c", "idle"}) {
        lcm::testing::run_with_timeout(context, add_stored(repository, id));
    }

    // Requests at explicit times, in an order that differs from the id order.
    const std::vector<std::pair<std::string, int>> requests{{"b", 20}, {"a", 30}, {"c", 10}};
    for (const auto& [id, second] : requests) {
        const auto requested_at = at_second(second);
        auto saved = lcm::testing::run_with_timeout(
            context, load_change_save(repository, id, [&](cml_worker& worker) {
                REQUIRE(worker.request_license_registration(lcm::secret("TOKEN"), false, "admin", requested_at));
            }));
        REQUIRE(saved);
    }

    auto pending = [&](std::size_t limit) {
        auto listed = lcm::testing::run_with_timeout(context, repository.list_pending(limit));
        REQUIRE(listed);
        return ids_of(listed.value());
    };

    using ids = std::vector<std::string>;
    CHECK(pending(10) == ids{"c", "b", "a"});
    CHECK(pending(2) == ids{"c", "b"});
    CHECK(pending(0).empty());
    CHECK(pending(100).size() == 3);

    SECTION("a completed operation leaves the list")
    {
        auto saved = lcm::testing::run_with_timeout(context, load_change_save(repository, "c", [](cml_worker& worker) {
            const auto operation = worker.license().operation_id();
            REQUIRE(worker.start_license_operation(operation));
            REQUIRE(worker.complete_license_registration(operation, {}));
        }));
        REQUIRE(saved);
        CHECK(pending(10) == ids{"b", "a"});
        CHECK(pending(100).size() == 2);
    }

    SECTION("a failed operation leaves the list")
    {
        auto saved = lcm::testing::run_with_timeout(context, load_change_save(repository, "b", [](cml_worker& worker) {
            REQUIRE(worker.fail_license_registration(worker.license().operation_id(), "unreachable", "no route"));
        }));
        REQUIRE(saved);
        CHECK(pending(10) == ids{"c", "a"});
        CHECK(pending(100).size() == 2);
    }

    SECTION("a started operation stays in its place")
    {
        auto saved = lcm::testing::run_with_timeout(context, load_change_save(repository, "c", [](cml_worker& worker) {
            REQUIRE(worker.start_license_operation(worker.license().operation_id(), at_second(40)));
        }));
        REQUIRE(saved);
        CHECK(pending(10) == ids{"c", "b", "a"});
        CHECK(pending(100).size() == 3);
    }

    SECTION("a new request goes to the end")
    {
        auto saved = lcm::testing::run_with_timeout(context, load_change_save(repository, "c", [](cml_worker& worker) {
            const auto operation = worker.license().operation_id();
            REQUIRE(worker.fail_license_registration(operation, "unreachable", "no route", at_second(40)));
            REQUIRE(worker.request_license_registration(lcm::secret("TOKEN"), false, "admin", at_second(50)));
        }));
        REQUIRE(saved);
        CHECK(pending(10) == ids{"b", "a", "c"});
        CHECK(pending(100).size() == 3);
    }
}

TEMPLATE_LIST_TEST_CASE("change sequence counts committed changes", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    CHECK(repository.change_sequence() == 0);

    auto stored = lcm::testing::run_with_timeout(context, add_stored(repository, "w-1"));
    CHECK(repository.change_sequence() == 1);

    auto duplicate = make_worker("w-1");
    REQUIRE(lcm::testing::run_with_timeout(context, repository.add(duplicate)).error() == errc::already_exists);
    CHECK(repository.change_sequence() == 1);

    auto changed = stored;
    changed.change_status(lcm::domain::worker_status::stopped, "admin");
    REQUIRE(lcm::testing::run_with_timeout(context, repository.update(changed)));
    CHECK(repository.change_sequence() == 2);

    // The same version again is a conflict, which commits nothing.
    auto conflict = lcm::testing::run_with_timeout(context, repository.update(changed));
    CHECK(conflict.error() == errc::version_conflict);
    CHECK(repository.change_sequence() == 2);

    auto unknown = make_worker("w-2");
    REQUIRE(lcm::testing::run_with_timeout(context, repository.update(unknown)).error() == errc::not_found);
    CHECK(repository.change_sequence() == 2);
}

TEMPLATE_LIST_TEST_CASE("change wait returns when already past", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    lcm::testing::run_with_timeout(context, add_stored(repository, "w-1"));
    lcm::testing::run_with_timeout(context, add_stored(repository, "w-2"));

    auto from_zero = lcm::testing::run_with_timeout(context, repository.wait_for_change(0));
    auto from_one = lcm::testing::run_with_timeout(context, repository.wait_for_change(1));

    REQUIRE(from_zero);
    CHECK(from_zero.value() == 2);
    REQUIRE(from_one);
    CHECK(from_one.value() == 2);
}

TEMPLATE_LIST_TEST_CASE("change wait wakes on a later change", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    auto stored = lcm::testing::run_with_timeout(context, add_stored(repository, "w-1"));
    const auto before = repository.change_sequence();

    std::optional<result<std::uint64_t>> woken;
    std::optional<std::uint64_t> sequence_seen_by_writer;
    std::optional<result<std::uint64_t>> written;
    auto wait = [&]() -> awaitable<void> { woken = co_await repository.wait_for_change(before); };
    auto write = [&]() -> awaitable<void> {
        // The waiter was spawned first and runs until it suspends, so nothing woke it yet.
        sequence_seen_by_writer = repository.change_sequence();
        auto changed = stored;
        changed.change_status(lcm::domain::worker_status::stopped, "admin");
        written = co_await repository.update(changed);
    };

    std::vector<awaitable<void>> tasks;
    tasks.push_back(wait());
    tasks.push_back(write());
    lcm::testing::run_with_timeout(context, lcm::test::run_concurrently(std::move(tasks)));

    REQUIRE(written.has_value());
    CHECK(written->has_value());
    CHECK(sequence_seen_by_writer == before);
    REQUIRE(woken.has_value());
    REQUIRE(*woken);
    CHECK(woken->value() == before + 1);
}

TEMPLATE_LIST_TEST_CASE("change wait ends on cancellation", "[storage]", store_types)
{
    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    auto stored = lcm::testing::run_with_timeout(context, add_stored(repository, "w-1"));
    const auto before = repository.change_sequence();

    std::optional<result<std::uint64_t>> cancelled;
    auto wait = [&]() -> awaitable<void> { cancelled = co_await repository.wait_for_change(before); };

    auto winner = lcm::testing::run_with_timeout(context, [&]() -> awaitable<std::size_t> {
        boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, std::chrono::milliseconds(20));
        using namespace boost::asio::experimental::awaitable_operators;
        auto first = co_await (wait() || timer.async_wait(use_awaitable));
        co_return first.index();
    }());

    CHECK(winner == 1);
    REQUIRE(cancelled.has_value());
    CHECK(cancelled->error() == errc::cancelled);
    CHECK(repository.change_sequence() == before);

    // A cancelled wait leaves the repository usable: the next change wakes a new wait.
    auto changed = stored;
    changed.change_status(lcm::domain::worker_status::stopped, "admin");
    REQUIRE(lcm::testing::run_with_timeout(context, repository.update(changed)));
    auto next = lcm::testing::run_with_timeout(context, repository.wait_for_change(before));
    REQUIRE(next);
    CHECK(next.value() == before + 1);
}

TEMPLATE_LIST_TEST_CASE("concurrent updates lose no update", "[storage][threads]", store_types)
{
    constexpr int thread_count = 4;
    constexpr int writer_count = 8;
    constexpr int updates_per_writer = TestType::updates_per_writer;

    boost::asio::io_context context;
    auto store = TestType::open(context);
    if (!store) {
        return;
    }
    auto& repository = store->repository();
    const auto counter = cml_worker::create("w-1", "0", "https://cml.example.test",
                                            lcm::domain::worker_status::running, "admin")
                             .value();
    REQUIRE(lcm::testing::run_with_timeout(context, repository.add(counter)));

    std::atomic<int> saved{0};
    std::atomic<int> conflicts{0};
    std::atomic<int> other_errors{0};

    // Each writer increments a counter kept in the worker's name with a read-modify-write
    // loop and yields between read and write, so that other writers interleave.
    auto writer = [&]() -> awaitable<void> {
        auto executor = co_await boost::asio::this_coro::executor;
        for (int done = 0; done < updates_per_writer;) {
            auto loaded = co_await repository.get("w-1");
            if (!loaded) {
                ++other_errors;
                co_return;
            }
            auto fields = loaded.value().state();
            fields.name = std::to_string(std::stoi(fields.name) + 1);
            auto next = cml_worker::restore(std::move(fields)).value();
            co_await boost::asio::post(executor, use_awaitable);

            auto result = co_await repository.update(next);
            if (result) {
                ++saved;
                ++done;
            }
            else if (result.error() == errc::version_conflict) {
                ++conflicts;
            }
            else {
                ++other_errors;
                co_return;
            }
        }
    };

    std::vector<awaitable<void>> writers;
    for (int i = 0; i < writer_count; ++i) {
        writers.push_back(writer());
    }
    lcm::testing::run_with_timeout(context, lcm::test::run_concurrently(std::move(writers)),
                                   std::chrono::seconds(60), thread_count);

    auto stored = lcm::testing::run_with_timeout(context, repository.get("w-1"));
    REQUIRE(stored);
    CHECK(other_errors == 0);
    CHECK(saved == writer_count * updates_per_writer);
    CHECK(stored.value().name() == std::to_string(saved.load()));
    CHECK(stored.value().version() == static_cast<std::uint64_t>(saved.load()) + 1);
    CHECK(repository.change_sequence() == static_cast<std::uint64_t>(saved.load()) + 1);
    // Yielding between read and write makes conflicts all but certain on several threads.
    CHECK(conflicts > 0);
}

TEST_CASE("required stores are built", "[storage]")
{
    // Without SQLite or libpq at configure time, CMake leaves that store out of the suite.
    // A run that requires PostgreSQL, as scripts/test does, must then fail here instead of
    // passing without those stores.
    if (!lcm::test::postgres_tests_required()) {
        SUCCEED("PostgreSQL tests are not required (LCM_TEST_REQUIRE_POSTGRES is not 1)");
        return;
    }
#ifndef LCM_TEST_SQLITE
    FAIL("lcm-tests was built without SQLite; install libsqlite3-dev and configure again");
#endif
#ifndef LCM_TEST_POSTGRES
    FAIL("lcm-tests was built without libpq; install libpq-dev and configure again");
#endif
    SUCCEED("lcm-tests was built with SQLite and PostgreSQL");
}
