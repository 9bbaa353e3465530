#include <lcm/reconcile/detail/slab_pool.hpp>

#include <catch2/catch.hpp>

#include <cstdint>
#include <set>
#include <string>
#include <vector>

using lcm::reconcile::detail::slab_pool;

namespace {

// Counts live instances, so that tests can check that the pool destroys what it constructed.
struct counted {
    explicit counted(int number, int& live_count) : value(number), live(&live_count) { ++*live; }
    counted(const counted&) = delete;
    counted& operator=(const counted&) = delete;
    ~counted() { --*live; }

    int value;
    int* live;
};

using small_pool = slab_pool<counted, 4>;

// Creates objects with the values 0 to count - 1 and returns their handles in that order.
std::vector<small_pool::handle> create_numbered(small_pool& pool, int count, int& live)
{
    std::vector<small_pool::handle> handles;
    for (int i = 0; i < count; ++i) {
        handles.push_back(pool.create(i, live));
    }
    return handles;
}

} // namespace

TEST_CASE("slab pool stores and destroys objects", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    const auto first = pool.create(1, live);
    const auto second = pool.create(2, live);
    CHECK(pool.size() == 2);
    CHECK(live == 2);
    CHECK(pool[first].value == 1);
    CHECK(pool[second].value == 2);

    pool.destroy(first);
    CHECK(pool.size() == 1);
    CHECK(live == 1);
    CHECK(pool[second].value == 2);
}

TEST_CASE("slab pool places objects in creation order", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    const std::vector<small_pool::handle> handles = create_numbered(pool, 4, live);
    for (std::size_t i = 1; i < handles.size(); ++i) {
        CHECK(&pool[handles[i]] == &pool[handles[i - 1]] + 1);
    }
}

TEST_CASE("slab pool keeps addresses stable", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    std::vector<small_pool::handle> handles;
    std::vector<const counted*> addresses;
    for (int i = 0; i < 100; ++i) {
        handles.push_back(pool.create(i, live));
        addresses.push_back(&pool[handles.back()]);
    }
    for (std::size_t i = 0; i < handles.size(); ++i) {
        CHECK(&pool[handles[i]] == addresses[i]);
        CHECK(pool[handles[i]].value == static_cast<int>(i));
    }
}

TEST_CASE("slab pool reuses freed slots", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    const std::vector<small_pool::handle> handles = create_numbered(pool, 4, live);
    pool.destroy(handles[1]);
    const auto reused = pool.create(10, live);
    CHECK(reused == handles[1]);
    CHECK(pool.chunk_count() == 1);
    CHECK(pool[reused].value == 10);

    // Several freed slots in a row: each new object must not break the list of the free slots.
    pool.destroy(handles[0]);
    pool.destroy(handles[2]);
    pool.destroy(handles[3]);
    std::set<small_pool::handle> created;
    for (int i = 0; i < 3; ++i) {
        created.insert(pool.create(20 + i, live));
    }
    CHECK(created == std::set<small_pool::handle>{handles[0], handles[2], handles[3]});
    CHECK(pool.chunk_count() == 1);
    CHECK(live == 4);
}

TEST_CASE("slab pool frees empty chunks", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    const std::vector<small_pool::handle> handles = create_numbered(pool, 40, live);
    CHECK(pool.chunk_count() == 10);

    // Destroying in creation order empties the old chunks first; each one is freed when it empties.
    for (int i = 0; i < 20; ++i) {
        pool.destroy(handles[static_cast<std::size_t>(i)]);
    }
    CHECK(pool.chunk_count() == 5);
    for (std::size_t i = 20; i < handles.size(); ++i) {
        CHECK(pool[handles[i]].value == static_cast<int>(i));
    }

    for (std::size_t i = 20; i < handles.size(); ++i) {
        pool.destroy(handles[i]);
    }
    CHECK(pool.empty());
    CHECK(live == 0);
    // The chunk that new objects go to stays.
    CHECK(pool.chunk_count() == 1);
}

TEST_CASE("slab pool releases all when empty", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    const std::vector<small_pool::handle> handles = create_numbered(pool, 10, live);

    pool.release_if_empty();
    CHECK(pool.chunk_count() == 3);
    CHECK(live == 10);

    for (const auto handle : handles) {
        pool.destroy(handle);
    }
    CHECK(pool.chunk_count() == 1);
    pool.release_if_empty();
    CHECK(pool.chunk_count() == 0);

    // The pool works again afterwards, from the first handle.
    const auto created = pool.create(7, live);
    CHECK(created == 0);
    CHECK(pool[created].value == 7);
    CHECK(pool.chunk_count() == 1);
}

TEST_CASE("slab pool refills emptied chunks", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    const std::vector<small_pool::handle> handles = create_numbered(pool, 12, live);
    // Free one slot in each of the first two chunks, and all of the current one.
    pool.destroy(handles[0]);
    pool.destroy(handles[5]);
    for (std::size_t i = 8; i < 12; ++i) {
        pool.destroy(handles[i]);
    }
    CHECK(pool.chunk_count() == 3);

    // The current chunk starts again at its first slot, then the other free slots are used.
    std::set<small_pool::handle> created;
    for (int i = 0; i < 6; ++i) {
        created.insert(pool.create(100 + i, live));
    }
    CHECK(created == std::set<small_pool::handle>{handles[0], handles[5], handles[8], handles[9], handles[10],
                                                  handles[11]});
    CHECK(pool.chunk_count() == 3);
    CHECK(live == 12);
}

TEST_CASE("slab pool reuses released chunk numbers", "[reconcile]")
{
    int live = 0;
    small_pool pool;
    const std::vector<small_pool::handle> handles = create_numbered(pool, 12, live);
    for (std::size_t i = 0; i < 4; ++i) {
        pool.destroy(handles[i]);
    }
    CHECK(pool.chunk_count() == 2);

    // The pool is full again, so the next object needs a chunk, and gets the released number.
    const auto next = pool.create(99, live);
    CHECK(next / 4 == handles[0] / 4);
    CHECK(pool.chunk_count() == 3);
    CHECK(pool[next].value == 99);
    for (std::size_t i = 4; i < handles.size(); ++i) {
        CHECK(pool[handles[i]].value == static_cast<int>(i));
    }
}

TEST_CASE("slab pool destructor destroys live objects", "[reconcile]")
{
    int live = 0;
    {
        slab_pool<std::string, 4> strings;
        const auto kept = strings.create(std::string(100, 'x'));
        const auto dropped = strings.create("short");
        strings.destroy(dropped);
        CHECK(strings[kept].size() == 100);

        small_pool pool;
        for (int i = 0; i < 10; ++i) {
            pool.create(i, live);
        }
        pool.destroy(3);
        CHECK(live == 9);
    }
    CHECK(live == 0);
}
