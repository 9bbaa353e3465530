// A pool of objects in fixed-size chunks, addressed by 32-bit handles.
#pragma once

#include <algorithm>
#include <bitset>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <stdexcept>
#include <utility>
#include <vector>

namespace lcm::reconcile::detail {

/// Objects of type `T` in chunks of `ChunkSize` slots, each object addressed by a 32-bit handle.
///
/// - Objects never move, so pointers to them stay valid until `destroy`.
/// - A chunk is filled in address order before its freed slots are reused, so objects created one
///   after another sit next to each other, and a walk in creation order reads memory sequentially.
/// - A chunk whose last object is destroyed is freed at once, except the chunk that new objects
///   currently go to. Memory is therefore at most one chunk more than the chunks that hold objects,
///   and at most one chunk when the pool is empty.
///
/// Thread safety: none.
template <class T, std::size_t ChunkSize = 256>
class slab_pool {
    static_assert(ChunkSize > 0 && (ChunkSize & (ChunkSize - 1)) == 0, "ChunkSize must be a power of two");
    static_assert(ChunkSize <= std::numeric_limits<std::uint32_t>::max());
    static_assert(sizeof(T) >= sizeof(std::uint32_t), "a free slot stores the next free slot's index");

public:
    using handle = std::uint32_t;

    /// Maximum number of chunks: every handle fits in 32 bits.
    static constexpr std::size_t max_chunks = (std::size_t{1} << 32) / ChunkSize;

    slab_pool() = default;
    slab_pool(const slab_pool&) = delete;
    slab_pool& operator=(const slab_pool&) = delete;

    ~slab_pool()
    {
        for (auto& owned : chunks_) {
            if (owned) {
                owned->destroy_all();
            }
        }
    }

    /// Constructs a `T` from `arguments` and returns its handle. Throws `std::length_error` when
    /// all 2^32 handles are taken, and whatever `T`'s constructor or the allocation throws.
    template <class... Arguments>
    handle create(Arguments&&... arguments)
    {
        const std::uint32_t number = chunk_with_free_slot();
        chunk& target = *chunks_[number];
        const std::uint32_t slot = target.peek_free_slot();
        // The object overwrites the link to the next free slot, so read it first.
        const std::uint32_t next_free = target.next_free(slot);
        ::new (target.address(slot)) T(std::forward<Arguments>(arguments)...);
        target.take_free_slot(slot, next_free);
        ++size_;
        return static_cast<handle>(number * ChunkSize + slot);
    }

    /// Destroys the object of `id`, which must be live, and frees its chunk when that was its last
    /// object and the chunk is not the one that new objects go to.
    void destroy(handle id) noexcept
    {
        const std::uint32_t number = id / ChunkSize;
        chunk& target = *chunks_[number];
        const bool was_full = target.full();
        target.object(id % ChunkSize).~T();
        target.release_slot(id % ChunkSize);
        --size_;

        if (number == current_) {
            if (target.live == 0) {
                // Refill the chunk from its first slot, so that the next objects are contiguous again.
                target.reset();
            }
            return;
        }
        if (target.live == 0) {
            release_chunk(number);
            return;
        }
        if (was_full) {
            available_.push_back(number);
        }
    }

    /// Frees every chunk and the lists of chunk numbers, if the pool is empty; otherwise does nothing.
    void release_if_empty() noexcept
    {
        if (size_ != 0) {
            return;
        }
        std::vector<std::unique_ptr<chunk>>().swap(chunks_);
        std::vector<std::uint32_t>().swap(released_);
        std::vector<std::uint32_t>().swap(available_);
        current_ = no_chunk;
    }

    T& operator[](handle id) noexcept { return chunks_[id / ChunkSize]->object(id % ChunkSize); }
    const T& operator[](handle id) const noexcept { return chunks_[id / ChunkSize]->object(id % ChunkSize); }

    /// Number of live objects.
    std::size_t size() const noexcept { return size_; }
    bool empty() const noexcept { return size_ == 0; }

    /// Number of chunks allocated; their memory is `chunk_bytes` each.
    std::size_t chunk_count() const noexcept { return chunks_.size() - released_.size(); }

    static constexpr std::size_t chunk_bytes = sizeof(T) * ChunkSize;

private:
    static constexpr std::uint32_t no_slot = std::numeric_limits<std::uint32_t>::max();
    static constexpr std::uint32_t no_chunk = std::numeric_limits<std::uint32_t>::max();

    struct chunk {
        // Slots from `unused_from` on have never held an object. A freed slot is on the list that
        // starts at `free_head`, and stores the index of the next free slot in its first bytes.
        alignas(T) unsigned char storage[ChunkSize][sizeof(T)];
        std::bitset<ChunkSize> occupied;
        std::uint32_t live = 0;
        std::uint32_t unused_from = 0;
        std::uint32_t free_head = no_slot;

        void* address(std::uint32_t slot) noexcept { return storage[slot]; }
        T& object(std::uint32_t slot) noexcept { return *std::launder(reinterpret_cast<T*>(storage[slot])); }
        const T& object(std::uint32_t slot) const noexcept
        {
            return *std::launder(reinterpret_cast<const T*>(storage[slot]));
        }

        bool full() const noexcept { return live == ChunkSize; }

        std::uint32_t peek_free_slot() const noexcept { return free_head != no_slot ? free_head : unused_from; }

        // The free slot after `slot` when `slot` is the head of the free list.
        std::uint32_t next_free(std::uint32_t slot) const noexcept
        {
            std::uint32_t next = no_slot;
            if (slot == free_head) {
                std::memcpy(&next, storage[slot], sizeof next);
            }
            return next;
        }

        void take_free_slot(std::uint32_t slot, std::uint32_t next_free) noexcept
        {
            if (slot == free_head) {
                free_head = next_free;
            } else {
                ++unused_from;
            }
            occupied.set(slot);
            ++live;
        }

        void release_slot(std::uint32_t slot) noexcept
        {
            std::memcpy(storage[slot], &free_head, sizeof free_head);
            free_head = slot;
            occupied.reset(slot);
            --live;
        }

        void reset() noexcept
        {
            unused_from = 0;
            free_head = no_slot;
        }

        void destroy_all() noexcept
        {
            for (std::uint32_t slot = 0; slot < unused_from; ++slot) {
                if (occupied.test(slot)) {
                    object(slot).~T();
                }
            }
        }
    };

    // Returns the number of a chunk with a free slot and makes it current.
    std::uint32_t chunk_with_free_slot()
    {
        if (current_ != no_chunk && !chunks_[current_]->full()) {
            return current_;
        }
        if (!available_.empty()) {
            current_ = available_.back();
            available_.pop_back();
            return current_;
        }
        current_ = allocate_chunk();
        return current_;
    }

    std::uint32_t allocate_chunk()
    {
        if (!released_.empty()) {
            const std::uint32_t number = released_.back();
            chunks_[number] = make_chunk();
            released_.pop_back();
            return number;
        }
        if (chunks_.size() == max_chunks) {
            throw std::length_error("slab_pool: all 2^32 handles are in use");
        }
        // Reserve room for every chunk number in both lists first, so that destroy(), which is
        // noexcept, never reallocates them.
        reserve_for(released_, chunks_.size() + 1);
        reserve_for(available_, chunks_.size() + 1);
        chunks_.push_back(make_chunk());
        return static_cast<std::uint32_t>(chunks_.size() - 1);
    }

    // Grows `numbers` geometrically, because reserving one more each time would copy it every time.
    static void reserve_for(std::vector<std::uint32_t>& numbers, std::size_t count)
    {
        if (numbers.capacity() < count) {
            numbers.reserve(std::max(count, 2 * numbers.capacity()));
        }
    }

    // Default-initializes, because std::make_unique would value-initialize and so zero the storage.
    static std::unique_ptr<chunk> make_chunk() { return std::unique_ptr<chunk>(new chunk); }

    void release_chunk(std::uint32_t number) noexcept
    {
        // A chunk that is not current and has free slots is listed in available_, exactly once.
        for (auto& listed : available_) {
            if (listed == number) {
                listed = available_.back();
                available_.pop_back();
                break;
            }
        }
        chunks_[number].reset();
        released_.push_back(number);
    }

    // A null pointer marks a released chunk whose number is in released_.
    std::vector<std::unique_ptr<chunk>> chunks_;
    std::vector<std::uint32_t> released_;
    // Chunks with free slots, other than current_.
    std::vector<std::uint32_t> available_;
    std::uint32_t current_ = no_chunk;
    std::size_t size_ = 0;
};

} // namespace lcm::reconcile::detail
