#pragma once

#include "ggml-backend.h"

#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

// where one offloaded token lives in host memory
struct llama_kv_host_slot {
    uint32_t chunk;
    uint32_t index;
};

// worker threads started once: a move hashes its rows in many small units as they land, and starting threads per
// unit would cost more than the hashing
class llama_kv_thread_pool {
public:
    explicit llama_kv_thread_pool(size_t n_workers);
    ~llama_kv_thread_pool();

    // fn(i) for every i in [0, n), on the workers and the calling thread; returns when all are done
    void run(size_t n, const std::function<void(size_t)> & fn);

    size_t n_threads() const { return workers.size() + 1; }

private:
    void start(size_t n_workers);
    void shutdown();
    void drain();

    std::vector<std::thread> workers;

    std::mutex              mtx;
    std::condition_variable cv_start;
    std::condition_variable cv_done;

    const std::function<void(size_t)> * job = nullptr;
    size_t   n_items    = 0;
    size_t   next_item  = 0; // guarded by mtx
    size_t   n_finished = 0; // workers done with the current generation
    uint64_t generation = 0;
    bool     stop       = false;

    std::exception_ptr error; // the first exception of the current job
};

// host memory for offloaded K/V rows
//
// chunks of n_slots tokens, laid out layer-major: [layer 0 K rows][layer 0 V rows][layer 1 K rows]...
// so that a run of consecutive cells offloaded into consecutive slots is one copy per layer and tensor.
// chunks come from the device's pinned host buffer type when it has one (fast async copies), else from malloc.
class llama_kv_host_store {
public:
    void init(std::vector<size_t> k_row_bytes, std::vector<size_t> v_row_bytes,
              ggml_backend_buffer_type_t pinned_buft, uint32_t chunk_slots);

    // n free slots, ascending within each chunk; consecutive when a run of n free slots exists; when the free slots
    // are fewer than n, all n come from fresh chunks (reserved ones first), one run each; throws std::bad_alloc
    std::vector<llama_kv_host_slot> alloc(uint32_t n);

    void release(const llama_kv_host_slot & slot);
    void clear();

    // have free slots for `bytes` more rows ready: chunks are allocated (and their pages faulted in) on a background
    // thread into a spare list that alloc() takes from, while the device computes a prompt. Meant for pageable
    // memory: pinning on that thread slowed the prompt's launches by as much as it saved (CUDA serializes it).
    // Returns at once; a smaller request does not cancel a larger pending one; 0 stops reserving more
    void reserve(size_t bytes);

    ~llama_kv_host_store();

    uint8_t * k_row(const llama_kv_host_slot & slot, uint32_t il_kv) const;
    uint8_t * v_row(const llama_kv_host_slot & slot, uint32_t il_kv) const;

    // over every K and V byte of the slot: the sum (mod 2^64) of one hash per layer and tensor, each seeded by
    // its layer and tensor, so that the layers of a move can be hashed in any order as their rows land
    uint64_t checksum(const llama_kv_host_slot & slot) const;

    // acc[i] += the part of checksum(slot[i]) from layers [il0, il1); large batches are split over threads
    void checksum_add(const llama_kv_host_slot * slot, size_t n, uint32_t il0, uint32_t il1, uint64_t * acc);

    // fn(i) for i in [0, n) on the store's worker threads (started at the first use)
    void parallel_for(size_t n, const std::function<void(size_t)> & fn);

    // checksum() of n slots into out
    void checksums(const llama_kv_host_slot * slot, size_t n, uint64_t * out);

    // bytes hashed and seconds spent hashing by checksum_add since init (the cost of verifying host copies)
    uint64_t hashed_bytes = 0;
    double   hash_seconds = 0.0;

    // chunks allocated on the moves' path (the trace of ASRKF_TRACE_MOVES reports them per move)
    uint64_t n_chunk_allocs = 0;

    size_t token_bytes()     const { return bytes_per_token; }
    size_t bytes_allocated() const;
    size_t bytes_used()      const;

    uint32_t n_layer() const { return (uint32_t) k_bytes.size(); }
    size_t   k_row_bytes(uint32_t il_kv) const { return k_bytes[il_kv]; }
    size_t   v_row_bytes(uint32_t il_kv) const { return v_bytes[il_kv]; }

private:
    struct chunk {
        ggml_backend_buffer_t        pinned = nullptr;
        std::unique_ptr<uint8_t[]>   plain;
        uint8_t                    * base    = nullptr;
        uint32_t                     n_slots = 0;
        uint32_t                     n_used  = 0;
        std::vector<uint8_t>         used;

        ~chunk();
    };

    std::vector<size_t> k_bytes;
    std::vector<size_t> v_bytes;
    std::vector<size_t> layer_prefix; // sum of K+V row bytes of the layers before il_kv

    size_t bytes_per_token = 0;

    ggml_backend_buffer_type_t pinned_buft = nullptr;
    uint32_t                   chunk_slots = 0;

    // a freed chunk leaves a hole so that slot handles of other chunks stay valid
    std::vector<std::unique_ptr<chunk>> chunks;

    std::unique_ptr<llama_kv_thread_pool> pool; // started at the first large batch

    uint32_t add_chunk(uint32_t n_slots);
    std::unique_ptr<chunk> new_chunk(uint32_t n_slots, bool touch) const;
    uint32_t place_chunk(std::unique_ptr<chunk> c);
    // a reserved chunk moved into chunks, or UINT32_MAX when none is ready
    uint32_t take_spare();

    // the reserver: chunks of chunk_slots allocated on its thread until spare_wanted are ready
    std::thread                         reserver;
    mutable std::mutex                  spare_mtx;
    std::condition_variable             spare_cv;
    std::vector<std::unique_ptr<chunk>> spare;
    size_t                              spare_wanted = 0; // chunks the reserver should have ready (guarded)
    bool                                spare_stop   = false;
    void stop_reserver();
};
