#pragma once

#include "ggml-backend.h"

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

// where one offloaded token lives in host memory
struct llama_kv_host_slot {
    uint32_t chunk;
    uint32_t index;
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

    // n free slots, ascending; consecutive when a run of n free slots exists; throws std::bad_alloc
    std::vector<llama_kv_host_slot> alloc(uint32_t n);

    void release(const llama_kv_host_slot & slot);
    void clear();

    uint8_t * k_row(const llama_kv_host_slot & slot, uint32_t il_kv) const;
    uint8_t * v_row(const llama_kv_host_slot & slot, uint32_t il_kv) const;

    // over every K and V byte of the slot, all layers
    uint64_t checksum(const llama_kv_host_slot & slot) const;

    // checksum() of n slots into out; large batches are split over threads
    void checksums(const llama_kv_host_slot * slot, size_t n, uint64_t * out) const;

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

    uint32_t add_chunk(uint32_t n_slots);
};
