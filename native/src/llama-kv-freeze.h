#pragma once

#include "llama-kv-freeze-hooks.h"
#include "llama-kv-host-store.h"

#include "llama-kv-cells.h"
#include "ggml-backend.h"

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

struct llama_context;
class  llama_kv_cache;
class  llm_graph_input_kv_freeze;

// printf-style message of a llama_kv_freeze_error
std::string llama_kv_freeze_fmt(const char * fmt, ...);

#define KVF_FAIL(code, ...) throw llama_kv_freeze_error(code, llama_kv_freeze_fmt(__VA_ARGS__))

// an error with the code of the C API (asrkf.h); thrown inside libllama, turned into a return code at the boundary
struct llama_kv_freeze_error : std::runtime_error {
    int32_t code;

    llama_kv_freeze_error(int32_t code, const std::string & msg) : std::runtime_error(msg), code(code) {}
};

struct llama_kv_freeze_importance_params {
    bool                 enabled  = false;
    int32_t              n_q      = 1;
    std::vector<int32_t> layers;   // model layer ids, ascending
    bool                 export_q = false;
};

// one offloaded position
struct llama_kv_freeze_record {
    llama_kv_host_slot slot;
    llama_kv_cell_ext  ext;
    uint64_t           checksum;
    uint32_t           cell; // where it was: thawing back there keeps the attention sums bit-identical
};

// one position of a parked sequence: its state when parked (ASRKF_CELL_ACTIVE / FROZEN / OFFLOADED) and where its
// rows are in the host store
struct llama_kv_parked_entry {
    llama_pos              pos;
    uint8_t                state;
    llama_kv_freeze_record rec;
};

// a sequence parked in host memory (llama-kv-freeze-session.cpp): every position, by position, and the cache's
// search head when it was parked
struct llama_kv_parked {
    std::vector<llama_kv_parked_entry> entries;
    uint32_t                           head = 0;
};

// device scratch and graphs of one gather or scatter (llama-kv-freeze-rows.h)
struct llama_kv_freeze_rows;
struct kvf_run;

// the controller state of one llama_context: cell-state operations, the host store and the importance output
struct llama_kv_freeze {
    llama_kv_freeze(llama_context * lctx, bool pinned_host, uint32_t host_chunk_cells, bool force_gather, size_t scratch_bytes);
    ~llama_kv_freeze();

    llama_kv_freeze(const llama_kv_freeze &) = delete;
    llama_kv_freeze & operator=(const llama_kv_freeze &) = delete;

    // held by every C API call on this handle and by the context destructor's hook: calls from several threads run
    // one at a time, and the context cannot be detached in the middle of one (lock order: the registry of
    // attached contexts first, then this)
    std::mutex mtx;

    // nullptr once the context is gone
    llama_context  * lctx = nullptr;
    llama_kv_cache * kv   = nullptr;

    bool iswa = false;

    // gather rows with get_rows also when the cache is in host memory (there a memcpy per run is as fast)
    bool force_gather = false;

    // device scratch of one gather/scatter pass
    size_t scratch_bytes = 64u << 20;
    // a gather that leaves its copies running (a staged offload: gather's leave_copies) takes one pass up to this
    // size, 4 x scratch_bytes: only the last pass's copy runs while the next tokens decode, the earlier ones are
    // waited for, and a prompt chunk of an 8B model offloads ~80 MB, two passes of 64 MiB
    // (ASRKF_DEFERRED_SCRATCH_MB overrides it; at most scratch_bytes: passes as in every other move)
    size_t deferred_scratch_bytes = 256u << 20;

    //
    // operations (validate everything first, then change; throw llama_kv_freeze_error)
    //

    void freeze (llama_seq_id seq_id, const std::vector<llama_pos> & pos, bool frozen);
    // positions with a copy made ahead (offload_ahead) free their cells without copying again
    void offload(llama_seq_id seq_id, const std::vector<llama_pos> & pos);
    // copy the rows of resident positions to the host now and leave them resident and attended: the copies made
    // ahead for seq_id become those of pos (others are released), and a later offload of one of them only frees
    // its cell. A controller that offloads in batches (one device round trip per batch) copies a batch ahead and
    // frees one cell per new token, so the cache stays full instead of a batch short (issue 16: asrkf attended
    // 1,008 of 1,024 cells against h2o's 1,024)
    void offload_ahead(llama_seq_id seq_id, const std::vector<llama_pos> & pos);
    // free the cells of the next n positions copied ahead for seq_id, in the order offload_ahead was given them,
    // skipping those whose copy was released since and those outside [pos_lo, pos_hi): offload without a copy or
    // a device synchronize. Fewer than n such positions: nothing changes, the queue is emptied and the result is
    // empty (the caller copies a new batch). One call a decoded token: the controller's per-step release
    std::vector<llama_pos> release_ahead(llama_seq_id seq_id, int32_t n, llama_pos pos_lo, llama_pos pos_hi);
    // the positions still queued by offload_ahead for seq_id that keep their copy, in their order
    std::vector<llama_pos> ahead_queued(llama_seq_id seq_id) const;
    // release the copies made ahead for positions [p0, p1) of seq_id (p1 < 0: no end; seq_id < 0: every
    // sequence): their cells may be written again (a removal, a shift, a state load)
    void drop_ahead(llama_seq_id seq_id, llama_pos p0 = -1, llama_pos p1 = -1);
    // have the pinned staging of device moves hold `bytes` now (no-op without pinned host memory for the device):
    // allocated inside the first prompt's offloads, pinning cost 115 ms of a 30k-token prompt's 4.3 s on the H200
    void reserve_staging(size_t bytes);
    // verify = false: the caller has just checked these host copies (a session load), skip hashing them again
    void thaw   (llama_seq_id seq_id, const std::vector<llama_pos> & pos, bool frozen, bool verify = true);

    void set_importance(const llama_kv_freeze_importance_params & params);

    // (pos, score) of the resident cells of seq_id after the latest decode
    void importance(llama_seq_id seq_id, std::vector<llama_pos> & pos, std::vector<float> & score) const;

    // the same scores folded into per-position arrays of length n_pos, in one pass over the cells:
    // score[p] = (1 - ema)*score[p] + ema*s/n_queries, mass[p] += s
    void importance_fold(llama_seq_id seq_id, float ema, int32_t n_queries, float * score, float * mass, int32_t n_pos) const;

    void  set_entropy(bool enabled);
    float entropy() const; // of the last logits row of the latest decode, nats
    void query(int32_t il, std::vector<float> & out, int32_t & n_q, int32_t & n_head, int32_t & n_embd_head, float & kq_scale) const;
    void k_rows(llama_seq_id seq_id, int32_t il, const std::vector<llama_pos> & pos, uint8_t * out, size_t size);
    // recall's scoring on the backend of the K cache (llama-kv-recall.cpp): out[i], i < n_out, is the attention mass
    // the latest decode's exported queries give keys[i] in a causal softmax over all of keys, summed over the
    // layers, their heads and queries; keys[n_out..] are keys of the softmax whose mass is not returned
    void recall_mass(llama_seq_id seq_id, const std::vector<int32_t> & layers, const std::vector<llama_pos> & keys,
                     size_t n_out, float * out);

    // resident cells of seq_id ordered by position: (pos, cell)
    std::vector<std::pair<llama_pos, uint32_t>> resident(llama_seq_id seq_id) const;
    std::vector<llama_pos>                      offloaded(llama_seq_id seq_id) const;

    void check() const;

    // session export / import of one sequence (llama-kv-freeze-session.cpp): out == nullptr gives the size in n_out
    size_t session_bytes(size_t n_entries) const;
    void session_save(llama_seq_id seq_id, uint8_t * out, size_t size, size_t & n_out);
    void session_load(llama_seq_id seq_id, const uint8_t * data, size_t size, bool check_only);

    void debug_corrupt(llama_seq_id seq_id, llama_pos pos, uint64_t byte);
    void debug_corrupt_parked(int64_t park_id, llama_pos pos, uint64_t byte);
    void debug_corrupt_slot(const llama_kv_host_slot & slot, uint64_t byte);

    // parking (llama-kv-freeze-session.cpp): park moves every position of seq_id into the host store under park_id
    // (the resident rows are copied there, the offloaded ones only change owner) and empties the sequence; unpark
    // puts them back into an empty sequence, the resident ones into their cells. A switch between conversations then
    // moves only the resident rows, each way
    void park(llama_seq_id seq_id, int64_t park_id);
    void unpark(int64_t park_id, llama_seq_id seq_id);
    void drop_parked(int64_t park_id);
    // a parked sequence as session_save would have written it before it was parked
    void parked_save(int64_t park_id, uint8_t * out, size_t size, size_t & n_out);
    size_t parked_tokens() const; // positions of all parked sequences

    std::map<int64_t, llama_kv_parked> parked;

    //
    // hooks (llama-kv-freeze-hooks.h)
    //

    void on_clear();
    void on_seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1);
    void on_seq_keep(llama_seq_id seq_id);
    bool has_offloaded(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const;
    // a frozen cell of seq_id in [p0, p1) (p1 < 0: no end; seq_id < 0: any sequence), -1 if none: its position
    llama_pos frozen_in(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const;
    // the newest offloaded position of seq_id that a removal of [p0, p1) keeps, and the newest resident one it
    // keeps (-1: none)
    llama_pos offloaded_max_after_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const;
    llama_pos resident_max_after_rm (llama_seq_id seq_id, llama_pos p0, llama_pos p1) const;
    void on_context_free();
    // after a ubatch's graph was queued (llama_context::decode, behind its logits copy): queue the copies of the
    // importance and entropy outputs to host memory, so that the synchronize that reads the logits covers them
    void on_computed(ggml_backend_sched * sched);

    //
    // state read by the C API and the graph builder
    //

    llama_kv_cells & cells(llama_seq_id seq_id) const;
    uint32_t         stream(llama_seq_id seq_id) const;

    // model layer id -> index into the cache's layers, -1 if the layer has no K/V there
    int32_t layer_index(int32_t il) const;

    // the K of the scored layers as one tensor of the graph, [n_embd_head, n_kv, n_head_kv, n_layers], given k, the
    // graph's view of the first scored layer; nullptr unless they are alike at one stride in one buffer
    ggml_tensor * scored_k_together(ggml_context * ctx0, const ggml_tensor * k) const;

    llama_kv_freeze_importance_params imp;
    bool entropy_enabled = false;
    // ASRKF_SCORE_LAYERWISE=1 (a benchmark switch): decode steps score layer by layer, not together
    bool score_layerwise = false;
    // ASRKF_SCORE_TOGETHER=1 (for the tests on a CPU): together also where K is in host memory
    bool score_together_host = false;
    // ASRKF_SHADOW_OWN=1 (a benchmark switch): the shadow mask is always filled here, never the attention's shared
    bool shadow_own = false;
    // any resident cell frozen (masked): then the importance needs a mask of its own
    bool any_frozen() const;

    // graph inputs created for this controller and still alive (they outlive graphs, not us)
    std::set<llm_graph_input_kv_freeze *> inputs;

    // the input of the graph that ran last, and the cell epoch when it ran
    llm_graph_input_kv_freeze * input_active = nullptr;
    uint64_t                    input_epoch  = 0;
    llama_seq_id                input_seq    = -1;

    // the input being built (between build_input and the end of the graph)
    llm_graph_input_kv_freeze * input_building = nullptr;

    // changes whenever cells move (offload, thaw, removal): importance read later than that would be misattributed
    uint64_t epoch = 0;

    std::map<std::pair<llama_seq_id, llama_pos>, llama_kv_freeze_record> records;
    // copies made ahead (offload_ahead): positions still resident whose rows are also in host slots
    std::map<std::pair<llama_seq_id, llama_pos>, llama_kv_freeze_record> ahead;
    // per sequence, the order offload_ahead was given (the controller's leaving order) and the next to leave; an
    // entry whose copy a removal released is skipped (ahead no longer holds it)
    struct ahead_queue {
        std::vector<llama_pos> pos;
        size_t                 next = 0;
    };
    std::map<llama_seq_id, ahead_queue> ahead_order;

    llama_kv_host_store store;

    std::vector<ggml_tensor *> layer_k; // per cache layer
    std::vector<ggml_tensor *> layer_v;
    std::vector<int32_t>       layer_il;

    // copy calls and gather graphs issued so far: what the batching saves is visible from outside
    uint64_t n_copies  = 0;
    uint64_t n_gathers = 0;

    uint32_t n_frozen_cells() const;
    bool     v_trans() const;

    // waits for the llama context and for an offload's copies still running on the host (finish_pending)
    void sync() const;
    void bump_graph() const;

    // the host side of the last offload when it was staged: its rows are copied out of the pinned staging into
    // their slots and hashed on a background thread while the caller decodes the next prompt chunk (the copies
    // took 0.49 s of a 30k prompt's 4.7 s on the H200, docs/gpu.md). Every operation of this handle, the hooks and
    // the destructor wait for it first; then its checksums go into the records
    void finish_pending();

private:
    // the importance output of the latest decode for seq_id, n floats, one per cell of the graph's view (refuses
    // stale data): read in place from the host outputs when they were copied behind the logits, else copied into
    // importance_buf; valid until the next decode or call
    const float * importance_cells(llama_seq_id seq_id, uint32_t & n) const;
    mutable std::vector<float> importance_buf;

    // ASRKF_OUTPUTS_SYNC=1 (a benchmark switch): no copies behind the logits, the readers copy synchronously
    bool outputs_sync = false;
    // where on_computed() copies the outputs: [0] the negative entropy, [1..] the importance per cell. Pinned when
    // a device holds the cache (a copy into pageable memory would wait for the graph), else plain memory
    ggml_backend_buffer_t outputs_pinned = nullptr;
    std::vector<float>    outputs_plain;
    float *       outputs_host(size_t n_floats); // for the copies: grown (or made pinned) to hold n_floats
    const float * outputs_data() const;           // for the readers: what the copies wrote

    // one backend per device holding K/V: async copies and one synchronize per operation
    std::map<ggml_backend_dev_t, ggml_backend_t> backends;

    ggml_backend_t backend_for(const ggml_tensor * t);

    // rows (global row ids) of each tensor into dst[i] (n rows back to back): one get_rows per tensor on the
    // device holding it, one copy back per tensor; false when the tensors' rows cannot be gathered that way
    // (scratch: the bytes one pass may take; 0: scratch_bytes)
    ggml_backend_t rows_backend(const std::vector<ggml_tensor *> & tensors, size_t n_rows, size_t & n_pass, size_t scratch = 0);
    // landed(r0, n): rows r0..r0+n-1 of every tensor are on the host (called in order, while later rows copy)
    // runs: the rows in runs (ascending, covering every row) whose host rows are back to back: dst(i, a) / src(i, a)
    // is where row a of tensor i and the rest of its run live on the host (one device copy per run and tensor)
    // tensors on several devices (layers split over GPUs, or over a GPU and the CPU with force_gather): one gather /
    // scatter per device, each over its own tensors (gather_on / scatter_on: the tensors of one device)
    // leave_copies: return once the device has read the rows (the cells may be written again), with the copies to
    // the host still running: the backends are in copies_in_flight, and whoever reads dst synchronizes them first
    // while_queued: host work run once the device copies are queued, before they are waited for (an offload copies
    // the host-resident layers of a partly offloaded model then: they and the device's copies overlap)
    bool gather(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows, const std::vector<kvf_run> & runs,
                const std::function<uint8_t *(size_t, size_t)> & dst, const std::function<void(size_t, size_t)> & landed,
                bool leave_copies = false, const std::function<void()> & while_queued = nullptr);
    bool scatter(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows, const std::vector<kvf_run> & runs,
                 const std::function<const uint8_t *(size_t, size_t)> & src);
    bool gather_on(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows, const std::vector<kvf_run> & runs,
                   const std::function<uint8_t *(size_t, size_t)> & dst, const std::function<void(size_t, size_t)> & landed,
                   bool leave_copies = false, const std::function<void()> & while_queued = nullptr);
    std::vector<ggml_backend_t> copies_in_flight; // gathers left with their device-to-host copies running
    bool scatter_on(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows, const std::vector<kvf_run> & runs,
                    const std::function<const uint8_t *(size_t, size_t)> & src);
    // indices of tensors grouped by the backend that holds them, in order of first appearance; empty when one has
    // no backend
    std::vector<std::vector<size_t>> by_backend(const std::vector<ggml_tensor *> & tensors);

    // device buffers of the gathers and scatters (0: row ids, 1: scratch), per backend, kept across moves
    std::map<ggml_backend_t, std::array<ggml_backend_buffer_t, 2>> dev_buffers;
    ggml_backend_buffer_t device_buffer(ggml_backend_t backend, int which, size_t size);

    // host memory that stages rows of a thaw whose slots are spread out (pinned when the device has pinned memory),
    // kept across moves and grown on demand
    ggml_backend_buffer_type_t staging_buft = nullptr; // the device's pinned host memory, if it has one
    bool staged = false; // the host store is pageable: device moves go through the pinned staging
    ggml_backend_buffer_t staging_pinned = nullptr;
    std::vector<uint8_t>  staging_plain;
    uint8_t * host_staging(size_t size);

    // ASRKF_TRACE_MOVES=1: one line per offload and thaw on stderr (sizes, runs, path, time of each part)
    bool trace_moves = false;
    // gather_on's parts in seconds, summed (the offload trace prints the difference over one offload): planning
    // (graph context, row ids, scratch), queueing the passes and their copies, and waiting for the device
    double gather_plan_s = 0.0, gather_queue_s = 0.0, gather_wait_s = 0.0;
    uint64_t gather_passes = 0;
    // and around it in a staged offload: getting the pinned staging, and gather() as a whole (grouping by device,
    // the plan's teardown)
    double staging_s = 0.0, gather_call_s = 0.0;
    bool can_gather(const ggml_tensor * t) const;
    // the K and V tensors a gather / scatter moves (V stored transposed is not), appended with their (layer, is_v);
    // returns their bytes per token
    size_t gatherable(std::vector<ggml_tensor *> & tensors, std::vector<std::pair<uint32_t, bool>> & what) const;

    // K/V rows of the cells into the slots (cells ascending; slots from store.alloc); with sums, the slots'
    // checksums, hashed as the rows land while later rows still copy
    // defer != nullptr: the last round of a staged copy may be left to *defer (run it later, on any thread, before
    // the staging or the slots are touched again), which then fills its part of sums
    void copy_to_host(uint32_t strm, const std::vector<uint32_t> & cell, const std::vector<llama_kv_host_slot> & slot, uint64_t * sums,
                      std::function<void()> * defer = nullptr);

    // rows of resident cells (ascending) into new host slots recorded in `into` (offload's records or the copies
    // made ahead), with their checksums and a staged copy's background part (llama-kv-freeze-cells.cpp)
    std::vector<llama_kv_host_slot> copy_records(std::map<std::pair<llama_seq_id, llama_pos>, llama_kv_freeze_record> & into,
            llama_seq_id seq_id, const std::vector<uint32_t> & cell, const std::vector<llama_pos> & cpos, const char * op,
            std::chrono::steady_clock::time_point & t_alloced, std::chrono::steady_clock::time_point & t_returned);

    struct pending_offload {
        std::thread                                    worker;
        std::vector<uint64_t>                          sums; // by index of keys; the deferred part filled by worker
        std::vector<std::pair<llama_seq_id, llama_pos>> keys;
    };
    std::unique_ptr<pending_offload> pending;

    // per-run copies between host slots and the K/V tensors that live in host memory (the layers llama.cpp keeps on
    // the CPU with part of the model on a GPU, or a CPU cache), one tensor per item on the store's threads; the
    // tensors `skip` names are left out. Returns the (layer, is_v) copied: empty when there is too little work to
    // spread (then the caller's per-run loop copies them)
    std::vector<std::pair<uint32_t, bool>> copy_host_runs(uint32_t strm, const std::vector<uint32_t> & cell,
            const std::vector<llama_kv_host_slot> & slot, const std::vector<kvf_run> & runs, bool to_host,
            const std::function<bool(uint32_t, bool)> & skip);

    // the rows of resident cells res (pos, cell) copied into new host slots, slot[i] and sums[i] for res[i] (the
    // slots are the caller's; none on failure)
    void resident_to_host(llama_seq_id seq_id, const std::vector<std::pair<llama_pos, uint32_t>> & res,
                          std::vector<llama_kv_host_slot> & slot, std::vector<uint64_t> & sums, const char * op);
    // ECHECKSUM naming pos[i] for the first host copy rec[i] whose rows no longer match its checksum
    void verify_slots(const std::vector<const llama_kv_freeze_record *> & rec, const std::vector<llama_pos> & pos, const char * op);

    void read (const ggml_tensor * t, size_t offset, size_t size, void * dst);
    void write(ggml_tensor * t, size_t offset, size_t size, const void * src);
    void finish_copies();

    // the device buffers of a scatter still running (released by finish_copies)
    std::vector<std::unique_ptr<llama_kv_freeze_rows>> scatter_rows; // one per device of the scatter

    // cell index of each position (must be resident and unique), in the order given
    std::vector<uint32_t> cells_of(llama_seq_id seq_id, const std::vector<llama_pos> & pos, const char * op) const;
};

void llama_kv_freeze_check_unique(const std::vector<llama_pos> & pos, const char * op);

// asrkf_kv_free: detach from the context (refused with offloaded positions unless force) and delete kvf, atomically
// with respect to the context's destructor; throws llama_kv_freeze_error and then leaves kvf as it was
void llama_kv_freeze_release(llama_kv_freeze * kvf, bool force);

// asrkf.cpp: what asrkf_last_error() / asrkf_last_error_code() report on this thread; a hook that refuses a
// llama.cpp call (which has no way to say why) leaves its reason there
void asrkf_set_last_error(int32_t code, const std::string & msg);

// the controller is going away before the graph input it created: the input must not call back
void llama_kv_freeze_input_detach(llm_graph_input_kv_freeze * inp);
