#include "llama-kv-host-store.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <new>
#include <thread>

llama_kv_host_store::chunk::~chunk() {
    if (pinned) {
        ggml_backend_buffer_free(pinned);
    }
}

void llama_kv_host_store::init(std::vector<size_t> k_row_bytes, std::vector<size_t> v_row_bytes,
                               ggml_backend_buffer_type_t pinned_buft, uint32_t chunk_slots) {
    k_bytes = std::move(k_row_bytes);
    v_bytes = std::move(v_row_bytes);

    layer_prefix.assign(k_bytes.size(), 0);
    bytes_per_token = 0;
    for (size_t il = 0; il < k_bytes.size(); ++il) {
        layer_prefix[il] = bytes_per_token;
        bytes_per_token += k_bytes[il] + v_bytes[il];
    }

    this->pinned_buft = pinned_buft;

    // default: 64 MiB chunks, between 64 and 4096 tokens. Pinned host memory costs a driver call and page locking
    // per allocation: an 8B model's f16 rows are 128 KiB a token, and 16 MiB chunks (128 tokens) meant one
    // allocation every 128 tokens offloaded, a large part of a prompt's offload time on a GPU
    if (chunk_slots == 0) {
        chunk_slots = (uint32_t) std::clamp<size_t>((64u << 20) / std::max<size_t>(1, bytes_per_token), 64, 4096);
    }
    this->chunk_slots = chunk_slots;

    chunks.clear();
}

std::unique_ptr<llama_kv_host_store::chunk> llama_kv_host_store::new_chunk(uint32_t n_slots, bool touch) const {
    auto c = std::make_unique<chunk>();

    const size_t size = (size_t) n_slots*bytes_per_token;

    if (pinned_buft) {
        c->pinned = ggml_backend_buft_alloc_buffer(pinned_buft, size);
        if (c->pinned) {
            c->base = (uint8_t *) ggml_backend_buffer_get_base(c->pinned);
        }
    }
    if (!c->base) {
        // pageable memory (asked for, or pinned memory ran out)
        c->plain.reset(new uint8_t[size]);
        c->base = c->plain.get();
        if (touch) {
            memset(c->base, 0, size); // fault the pages in here, on the reserver's thread, not in the moves
        }
    }

    c->n_slots = n_slots;
    c->used.assign(n_slots, 0);
    return c;
}

uint32_t llama_kv_host_store::add_chunk(uint32_t n_slots) {
    auto c = new_chunk(n_slots, /*touch =*/ false);
    n_chunk_allocs++;
    return place_chunk(std::move(c));
}

uint32_t llama_kv_host_store::take_spare() {
    std::unique_ptr<chunk> c;
    {
        std::lock_guard<std::mutex> lock(spare_mtx);
        if (spare.empty()) {
            return UINT32_MAX;
        }
        c = std::move(spare.back());
        spare.pop_back();
        spare_wanted = spare_wanted > 0 ? spare_wanted - 1 : 0;
    }
    return place_chunk(std::move(c));
}

void llama_kv_host_store::reserve(size_t bytes) {
    size_t n_free = 0;
    for (const auto & c : chunks) {
        n_free += c ? c->n_slots - c->n_used : 0;
    }
    const size_t chunk_bytes = (size_t) chunk_slots*bytes_per_token;
    const size_t need = bytes > n_free*bytes_per_token ? bytes - n_free*bytes_per_token : 0;
    {
        std::lock_guard<std::mutex> lock(spare_mtx);
        // at least what an earlier call still wants (a prompt's reservation outlives the decode's small ones)
        const size_t n_chunks = (need + chunk_bytes - 1)/std::max<size_t>(1, chunk_bytes);
        spare_wanted = bytes == 0 ? 0 : std::max(spare_wanted, n_chunks);
        if (spare_wanted <= spare.size() || reserver.joinable()) {
            spare_cv.notify_one();
            return;
        }
    }
    reserver = std::thread([this]() {
        std::unique_lock<std::mutex> lock(spare_mtx);
        for (;;) {
            spare_cv.wait(lock, [&]() { return spare_stop || spare.size() < spare_wanted; });
            if (spare_stop) {
                return;
            }
            lock.unlock();
            std::unique_ptr<chunk> c;
            try {
                c = new_chunk(chunk_slots, /*touch =*/ true);
            } catch (...) {
                c.reset(); // out of memory: the moves allocate (and report) it themselves
            }
            lock.lock();
            if (!c) {
                spare_wanted = spare.size();
                continue;
            }
            spare.push_back(std::move(c));
        }
    });
}

void llama_kv_host_store::stop_reserver() {
    {
        std::lock_guard<std::mutex> lock(spare_mtx);
        spare_stop = true;
    }
    spare_cv.notify_all();
    if (reserver.joinable()) {
        reserver.join();
    }
    std::lock_guard<std::mutex> lock(spare_mtx);
    spare.clear();
    spare_wanted = 0;
    spare_stop   = false;
}

llama_kv_host_store::~llama_kv_host_store() {
    stop_reserver();
}

uint32_t llama_kv_host_store::place_chunk(std::unique_ptr<chunk> c) {
    for (uint32_t i = 0; i < chunks.size(); ++i) {
        if (!chunks[i]) {
            chunks[i] = std::move(c);
            return i;
        }
    }

    chunks.push_back(std::move(c));

    return (uint32_t) chunks.size() - 1;
}

std::vector<llama_kv_host_slot> llama_kv_host_store::alloc(uint32_t n) {
    std::vector<llama_kv_host_slot> res;
    res.reserve(n);

    // a run of n free slots in one chunk keeps the copies per layer at one per run of cells
    for (uint32_t ic = 0; ic < chunks.size() && n > 0; ++ic) {
        const auto & c = chunks[ic];
        if (!c || c->n_slots - c->n_used < n) {
            continue;
        }
        uint32_t run = 0;
        for (uint32_t i = 0; i < c->n_slots; ++i) {
            run = c->used[i] ? 0 : run + 1;
            if (run == n) {
                for (uint32_t j = i + 1 - n; j <= i; ++j) {
                    c->used[j] = 1;
                    res.push_back({ic, j});
                }
                c->n_used += n;
                return res;
            }
        }
    }

    // otherwise, when the free slots cannot hold all n, fresh chunks for all of them (reserved ones first, then one
    // allocation for the rest): each is one run of slots, one device copy per tensor, where slots spread over the
    // holes of other chunks would need staging (the free slots left behind serve later, smaller moves)
    size_t n_free = 0;
    for (const auto & c : chunks) {
        n_free += c ? c->n_slots - c->n_used : 0;
    }
    if (n_free < n) {
        try {
            for (uint32_t left = n; left > 0;) {
                uint32_t ic = take_spare();
                if (ic == UINT32_MAX) {
                    ic = add_chunk(std::max(chunk_slots, left));
                }
                auto & c = chunks[ic];
                const uint32_t m = std::min(left, c->n_slots);
                for (uint32_t i = 0; i < m; ++i) {
                    c->used[i] = 1;
                    res.push_back({ic, i});
                }
                c->n_used = m;
                left -= m;
            }
        } catch (...) {
            for (const auto & s : res) { // out of memory half way: the slots taken so far are free again
                release(s);
            }
            throw;
        }
        return res;
    }

    // otherwise any free slots
    for (uint32_t ic = 0; ic < chunks.size() && res.size() < n; ++ic) {
        const auto & c = chunks[ic];
        if (!c) {
            continue;
        }
        for (uint32_t i = 0; i < c->n_slots && res.size() < n; ++i) {
            if (!c->used[i]) {
                res.push_back({ic, i});
            }
        }
    }

    for (const auto & s : res) {
        chunks[s.chunk]->used[s.index] = 1;
        chunks[s.chunk]->n_used++;
    }

    return res;
}

void llama_kv_host_store::release(const llama_kv_host_slot & slot) {
    auto & c = chunks.at(slot.chunk);
    if (!c || !c->used.at(slot.index)) {
        return;
    }

    c->used[slot.index] = 0;
    c->n_used--;

    // keep one empty chunk: offload/thaw cycles would otherwise pay fresh page faults every time
    if (c->n_used == 0) {
        uint32_t n_empty = 0;
        for (const auto & other : chunks) {
            n_empty += other && other->n_used == 0;
        }
        if (n_empty > 1) {
            c.reset();
            while (!chunks.empty() && !chunks.back()) {
                chunks.pop_back();
            }
        }
    }
}

void llama_kv_host_store::clear() {
    stop_reserver();
    chunks.clear();
}

uint8_t * llama_kv_host_store::k_row(const llama_kv_host_slot & slot, uint32_t il_kv) const {
    const auto & c = chunks[slot.chunk];
    return c->base + c->n_slots*layer_prefix[il_kv] + (size_t) slot.index*k_bytes[il_kv];
}

uint8_t * llama_kv_host_store::v_row(const llama_kv_host_slot & slot, uint32_t il_kv) const {
    const auto & c = chunks[slot.chunk];
    return c->base + c->n_slots*(layer_prefix[il_kv] + k_bytes[il_kv]) + (size_t) slot.index*v_bytes[il_kv];
}

// 64-bit multiply-xorshift over 8-byte words in four independent lanes (the multiply latency, not memory, would
// bound a single chain): detects corruption at memory speed, not meant to be cryptographic
static uint64_t checksum_update(uint64_t h, const uint8_t * data, size_t size) {
    const uint64_t prime = 0x100000001b3ull;

    uint64_t lane[4] = { h, h ^ 0x9e3779b97f4a7c15ull, h ^ 0xc2b2ae3d27d4eb4full, h ^ 0x165667b19e3779f9ull };

    size_t i = 0;
    for (; i + 32 <= size; i += 32) {
        for (int l = 0; l < 4; ++l) {
            uint64_t w;
            memcpy(&w, data + i + 8*l, 8);
            lane[l] = (lane[l] ^ w)*prime;
            lane[l] ^= lane[l] >> 29;
        }
    }

    h = lane[0];
    for (int l = 1; l < 4; ++l) {
        h = (h ^ lane[l])*prime;
        h ^= h >> 29;
    }
    for (; i < size; ++i) {
        h = (h ^ data[i])*prime;
    }

    return h;
}

// the seed of layer il_kv's K (is_v = 0) or V hash (splitmix64 of the index)
static uint64_t checksum_seed(uint32_t il_kv, bool is_v) {
    uint64_t z = 0xcbf29ce484222325ull + (2ull*il_kv + is_v)*0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30))*0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27))*0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

uint64_t llama_kv_host_store::checksum(const llama_kv_host_slot & slot) const {
    uint64_t h = 0;
    for (uint32_t il = 0; il < k_bytes.size(); ++il) {
        h += checksum_update(checksum_seed(il, false), k_row(slot, il), k_bytes[il]);
        h += checksum_update(checksum_seed(il, true),  v_row(slot, il), v_bytes[il]);
    }
    return h;
}

void llama_kv_host_store::checksum_add(const llama_kv_host_slot * slot, size_t n, uint32_t il0, uint32_t il1, uint64_t * acc) {
    const auto t0 = std::chrono::steady_clock::now();

    size_t bytes_per_slot = 0;
    for (uint32_t il = il0; il < il1; ++il) {
        bytes_per_slot += k_bytes[il] + v_bytes[il];
    }

    auto work = [&](size_t i0, size_t i1) {
        for (size_t i = i0; i < i1; ++i) {
            uint64_t h = 0;
            for (uint32_t il = il0; il < il1; ++il) {
                h += checksum_update(checksum_seed(il, false), k_row(slot[i], il), k_bytes[il]);
                h += checksum_update(checksum_seed(il, true),  v_row(slot[i], il), v_bytes[il]);
            }
            acc[i] += h;
        }
    };

    // one core hashes a few GB/s while a PCIe/NVLink host link moves tens: large batches go over a pool of
    // threads; below ~1 MiB, waking it costs more than it saves
    const size_t bytes = n*bytes_per_slot;
    if (bytes < (1u << 20)) {
        work(0, n);
    } else {
        // items of ~1 MiB: even shares for the threads, and no thread waits long on the last one
        const size_t per_item = std::max<size_t>(1, (1u << 20)/std::max<size_t>(1, bytes_per_slot));
        parallel_for((n + per_item - 1)/per_item, [&](size_t item) {
            work(item*per_item, std::min(n, (item + 1)*per_item));
        });
    }

    hashed_bytes += bytes;
    hash_seconds += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

void llama_kv_host_store::parallel_for(size_t n, const std::function<void(size_t)> & fn) {
    if (!pool) {
        const size_t n_cores = std::max(1u, std::thread::hardware_concurrency());
        pool = std::make_unique<llama_kv_thread_pool>(std::min<size_t>(n_cores, 16) - 1);
    }
    pool->run(n, fn);
}

void llama_kv_host_store::checksums(const llama_kv_host_slot * slot, size_t n, uint64_t * out) {
    std::fill(out, out + n, 0);
    checksum_add(slot, n, 0, n_layer(), out);
}

//
// llama_kv_thread_pool
//

llama_kv_thread_pool::llama_kv_thread_pool(size_t n_workers) {
    try {
        start(n_workers);
    } catch (...) {
        shutdown();
        throw;
    }
}

void llama_kv_thread_pool::start(size_t n_workers) {
    for (size_t w = 0; w < n_workers; ++w) {
        workers.emplace_back([this]() {
            uint64_t seen = 0;
            for (;;) {
                {
                    std::unique_lock<std::mutex> lock(mtx);
                    cv_start.wait(lock, [&]() { return stop || generation != seen; });
                    if (stop) {
                        return;
                    }
                    seen = generation;
                }
                drain();
                {
                    std::lock_guard<std::mutex> lock(mtx);
                    n_finished++;
                }
                cv_done.notify_one();
            }
        });
    }
}

llama_kv_thread_pool::~llama_kv_thread_pool() {
    shutdown();
}

void llama_kv_thread_pool::shutdown() {
    {
        std::lock_guard<std::mutex> lock(mtx);
        stop = true;
    }
    cv_start.notify_all();
    for (auto & w : workers) {
        if (w.joinable()) {
            w.join();
        }
    }
    workers.clear();
}

void llama_kv_thread_pool::drain() {
    for (;;) {
        size_t item;
        {
            std::lock_guard<std::mutex> lock(mtx);
            if (next_item >= n_items) {
                return;
            }
            item = next_item++;
        }
        try {
            (*job)(item);
        } catch (...) {
            // the first failure is rethrown by run() once every thread has left the job; the rest is skipped
            std::lock_guard<std::mutex> lock(mtx);
            if (!error) {
                error = std::current_exception();
            }
            next_item = n_items;
        }
    }
}

void llama_kv_thread_pool::run(size_t n, const std::function<void(size_t)> & fn) {
    if (workers.empty() || n <= 1) {
        for (size_t i = 0; i < n; ++i) {
            fn(i);
        }
        return;
    }
    {
        std::lock_guard<std::mutex> lock(mtx);
        job        = &fn;
        n_items    = n;
        next_item  = 0;
        n_finished = 0;
        error      = nullptr;
        generation++;
    }
    cv_start.notify_all();
    drain();

    // every worker finishes this generation before the next can start: none is left holding this job
    std::unique_lock<std::mutex> lock(mtx);
    cv_done.wait(lock, [&]() { return n_finished == workers.size(); });
    job = nullptr;
    if (error) {
        std::rethrow_exception(error);
    }
}

size_t llama_kv_host_store::bytes_allocated() const {
    size_t res = 0;
    for (const auto & c : chunks) {
        res += c ? (size_t) c->n_slots*bytes_per_token : 0;
    }
    std::lock_guard<std::mutex> lock(spare_mtx);
    for (const auto & c : spare) {
        res += (size_t) c->n_slots*bytes_per_token;
    }
    return res;
}

size_t llama_kv_host_store::bytes_used() const {
    size_t res = 0;
    for (const auto & c : chunks) {
        res += c ? (size_t) c->n_used*bytes_per_token : 0;
    }
    return res;
}
