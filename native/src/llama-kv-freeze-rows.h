#pragma once

// internal to llama-kv-freeze*.cpp: the device plan of a gather or scatter, and runs of cells

#include "llama-kv-freeze.h"

#include "ggml-cpp.h"

#include <algorithm>
#include <cstdint>
#include <vector>

// the cache tensors viewed as rows of 4-byte words (get_rows / set_rows move them bit for bit, whatever the KV
// type), the row ids, and one device scratch buffer that every pass of a gather or scatter reuses: the passes
// queue back to back on the backend's stream, which orders a pass's reuse of the scratch after the last one's copy.
// Tensors of one shape laid out at a fixed stride in one buffer (a cache's layers, as llama.cpp allocates them)
// form one group: one get_rows / set_rows for all of them per pass, where every operation counts (launches)
struct llama_kv_freeze_rows {
    struct group {
        ggml_tensor * alias;  // [words, rows, count]
        size_t        first;  // index of its first tensor
        size_t        count;
        size_t        offset; // of its rows in the scratch
    };

    ggml_context_ptr              ctx;
    ggml_backend_buffer_t         idx_buf = nullptr; // the handle's, kept across moves (llama_kv_freeze::device_buffer)
    ggml_backend_buffer_t         scratch = nullptr;
    ggml_tensor                 * idx = nullptr;
    std::vector<int32_t>          ids;      // idx's host copy: an async upload reads it after the caller returned
    std::vector<group>            groups;
    size_t                        max_count = 1;
    std::vector<ggml_context_ptr> pass_ctx; // kept until the passes ran
};

// below this many runs of cells, offload copies per run instead of gathering on the device
static constexpr size_t kvf_gather_min_runs = 8;

// runs of i where cells and slots both advance by one: each run is one copy per layer and tensor
struct kvf_run {
    uint32_t first; // index into the cell/slot arrays
    uint32_t n;
};

std::vector<kvf_run> kvf_runs(const std::vector<uint32_t> & cell, const std::vector<llama_kv_host_slot> & slot);

// runs of i where the slots advance by one in one chunk: the rows of a run are back to back in host memory, so a
// gather or scatter moves each run of each tensor with one device copy, without staging
std::vector<kvf_run> kvf_slot_runs(const std::vector<llama_kv_host_slot> & slot);

// few enough slot runs that a device copy per run and tensor costs less than staging the rows (a copy call costs
// microseconds; a run of 16 tokens of an 8B model is 2 MiB)
static inline bool kvf_slot_runs_direct(size_t n_runs, size_t n_rows) {
    return n_runs*16 <= std::max<size_t>(16, n_rows);
}
