#ifndef ASRKF_H
#define ASRKF_H

// asrkf-gguf: reversible soft-freeze of the llama.cpp KV cache.
//
// A handle attaches to one llama_context and works on its (full-attention) KV cache:
//   - freeze / unfreeze: a cell stays resident but is masked out of attention (stage 1)
//   - offload: the K/V rows of every layer move to host memory owned by the handle, the cells are freed (stage 2)
//   - thaw: offloaded rows go back into free cells with their original position and sequence
//   - importance: per-cell attention mass from the last n_q queries of the latest decode, computed in the graph
//   - entropy: of the next-token distribution of the latest decode, computed in the graph
//
// Every position of a sequence is, at any time, exactly one of: active (resident), frozen (resident, masked),
// offloaded (host). Nothing is dropped unless the caller removes positions (llama_memory_seq_rm / clear).
//
// Invariants (asrkf_kv_check verifies them), kept by refusing the llama.cpp calls that would break them:
//   - every offloaded position of a sequence is below its newest resident position: llama.cpp decodes the next
//     token right after the newest resident position, which therefore is never an offloaded one. So positions
//     0..newest are each resident or offloaded (|resident| + |offloaded| = newest + 1) unless the caller removed
//     some below the newest. asrkf_kv_offload refuses the newest position; llama_memory_seq_rm returns false and
//     changes nothing when the removal would leave an offloaded position above the new newest one (include those
//     positions in the removal, or thaw them first).
//   - a frozen cell belongs to one sequence (the flag is per cell): asrkf_kv_freeze refuses shared cells and
//     llama_memory_seq_cp refuses (does nothing for) a range holding a frozen cell of the source.
//   - a snapshot holds neither host rows nor frozen flags: llama_state_get_size / get_data / save_file and their
//     seq_ variants give 0 (refused) while the saved sequence (any sequence, for the whole state) has offloaded
//     positions or frozen cells; a load is refused while the sequence has offloaded positions, and the cells it
//     restores are active. So after a load, the cells are frozen exactly as they were when the snapshot was taken.
//     asrkf_kv_session_save / asrkf_kv_session_load save and restore a sequence with its frozen flags and host copies.
//   - llama_memory_seq_add / seq_div / seq_cp over offloaded positions are refused (nothing changes).
// A llama.cpp call refused this way logs why and leaves the reason in asrkf_last_error() (code -2) on its thread.
//
// Return convention of every int32_t function:
//    0  ok
//   -1  invalid argument (unknown / duplicate / non-resident position, bad layer, null pointer, ...)
//   -2  refused: the operation would break the cache (offloading the newest position, no free cells, pending shift)
//   -3  integrity: an offloaded row failed its checksum; nothing was changed
//   -4  the llama_context behind the handle was freed
//   -5  unsupported model / cache type
//   -6  backend or allocation failure
// On any error the cache and the handle are left exactly as they were, and asrkf_last_error() says why.
// Every call synchronizes the context's pending device work first.
//
// Threads: the calls on one handle take a mutex of the handle, so threads may share a handle and its calls run one
// at a time. The cells they act on belong to the llama_context, which llama.cpp does not make thread-safe: no
// asrkf_kv_* call may overlap another thread's use of the same context (llama_decode, llama_memory_*,
// llama_state_*); serialize those as for llama.cpp itself. The one exception is llama_free(ctx): it may run while
// a call on the handle runs on another thread; it waits for that call to finish, and every later call returns
// ASRKF_EFREED. asrkf_kv_free deletes the handle: it must not overlap other calls on it. asrkf_last_error() is per
// thread. Different handles (different contexts) are independent.

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

#ifdef ASRKF_SHARED
#    if defined(_WIN32) && !defined(__MINGW32__)
#        ifdef ASRKF_BUILD
#            define ASRKF_API __declspec(dllexport)
#        else
#            define ASRKF_API __declspec(dllimport)
#        endif
#    else
#        define ASRKF_API __attribute__ ((visibility ("default")))
#    endif
#else
#    define ASRKF_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

struct llama_context;

typedef struct asrkf_kv * asrkf_kv_t;

enum asrkf_status {
    ASRKF_OK            =  0,
    ASRKF_EINVAL        = -1,
    ASRKF_EREFUSED      = -2,
    ASRKF_ECHECKSUM     = -3,
    ASRKF_EFREED        = -4,
    ASRKF_EUNSUPPORTED  = -5,
    ASRKF_EBACKEND      = -6,
};

enum asrkf_cell_state {
    ASRKF_CELL_ACTIVE    = 1,
    ASRKF_CELL_FROZEN    = 2,
    ASRKF_CELL_OFFLOADED = 3,
};

struct asrkf_kv_params {
    bool     pinned_host;      // offloaded rows in the device's pinned host memory (moved straight); false: in
                               // pageable memory, every device move staged through one pinned buffer of the handle
    uint32_t host_chunk_cells; // offloaded rows are stored in chunks of at least this many tokens (0: automatic)
    bool     force_gather;     // testing: gather rows with get_rows also for caches in host memory (always on for
                               // devices), and stage them as a device would when pinned_host is false
    uint64_t scratch_bytes;    // device scratch of one gather/scatter pass (0: 64 MiB); a move of more rows takes several passes
};

struct asrkf_kv_info {
    uint32_t n_layer;            // model layers
    uint32_t n_layer_kv;         // layers with their own K/V storage in the managed cache
    uint32_t n_head;             // query heads (layer 0)
    uint32_t n_head_kv;          // key/value heads (layer 0)
    uint32_t n_embd_head_k;      // head size of K (layer 0)
    uint32_t n_cells;            // cells of the managed cache (the device budget)
    uint32_t n_cells_used;       // non-empty cells
    uint32_t n_frozen;           // frozen (resident, masked) cells
    uint32_t n_offloaded;        // positions held in host memory, all sequences
    int32_t  type_k;             // ggml_type of K
    int32_t  type_v;             // ggml_type of V
    bool     v_trans;            // V stored transposed (flash attention off)
    bool     iswa;               // the managed cache is the full-attention half of an iSWA cache
    uint64_t device_kv_bytes;    // bytes of the managed K/V tensors (all cells)
    uint64_t kv_bytes_per_token; // K+V bytes of one token over all managed layers
    uint64_t host_bytes;         // host bytes allocated for offloaded rows
    uint64_t host_bytes_used;    // host bytes holding offloaded rows
    uint64_t n_copies;           // device<->host copy calls issued by offload/thaw since attach
    uint64_t n_gathers;          // get_rows gather graphs run by offload since attach
    uint64_t hashed_bytes;       // host bytes checksummed by offload and thaw since attach
    uint64_t hash_us;            // microseconds the calling thread spent in those checksums (with its helper threads)
};

ASRKF_API struct asrkf_kv_params asrkf_kv_default_params(void);

// the message and code of the last failed call on this thread ("" and 0 if none); the code is how a failed
// asrkf_kv_attach (which returns NULL) says why
ASRKF_API const char * asrkf_last_error(void);
ASRKF_API int32_t      asrkf_last_error_code(void);

// attach to ctx; returns NULL on failure (unsupported cache, already attached, ...)
// refused (-5) for models whose attention the importance scores and the host recall (softmax of kq_scale * q.k under
// the mask) would get silently wrong: attention logit soft-capping (Gemma-2, Grok), ALiBi (BLOOM, MPT, ...),
// attention sinks (gpt-oss); the message names the feature
// the handle must be freed before or after the context; once the context is freed every call returns ASRKF_EFREED
ASRKF_API asrkf_kv_t asrkf_kv_attach(struct llama_context * ctx, struct asrkf_kv_params params);

// detach and release host memory: offloaded positions are lost, so this refuses (-2) while any exist unless force
ASRKF_API int32_t asrkf_kv_free(asrkf_kv_t kv, bool force);

ASRKF_API int32_t asrkf_kv_get_info(asrkf_kv_t kv, struct asrkf_kv_info * info);

// resident cells of seq_id, ordered by position
// pos / state / cell may be NULL; at most cap entries are written, *n_out is the total count
ASRKF_API int32_t asrkf_kv_cells(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, uint8_t * state, int32_t * cell, int32_t cap, int32_t * n_out);

// offloaded positions of seq_id, ascending; at most cap written, *n_out is the total count
ASRKF_API int32_t asrkf_kv_offloaded(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, int32_t cap, int32_t * n_out);

// positions must be resident for seq_id, unique; freezing a frozen cell (or unfreezing an active one) is allowed
ASRKF_API int32_t asrkf_kv_freeze  (asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);
ASRKF_API int32_t asrkf_kv_unfreeze(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);

// move positions to host memory and free their cells
// refused for the newest position of the sequence and for cells shared with another sequence
ASRKF_API int32_t asrkf_kv_offload(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);

// copy the rows of resident positions to host memory now, leaving them resident (and attended): a later
// asrkf_kv_offload of one of them only frees its cell. The copies made ahead for seq_id become those of pos (the
// others are released; n = 0 releases all). Removing, shifting or loading the sequence's positions releases theirs.
// A controller that offloads in batches copies a batch ahead and frees one cell per new token
ASRKF_API int32_t asrkf_kv_offload_ahead(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);
// how many positions of seq_id (-1: of every sequence) have a copy made ahead
ASRKF_API int32_t asrkf_kv_ahead(asrkf_kv_t kv, int32_t seq_id, int32_t * n_out);
// free the cells of the next n positions copied ahead for seq_id, in the order asrkf_kv_offload_ahead was given
// them, skipping those whose copy a removal released and those outside [pos_lo, pos_hi): an offload that copies
// nothing and does not synchronize the device; the positions freed go to out (n entries), *n_out = n. When fewer
// than n are left, nothing is freed, the queue is emptied and *n_out = 0 (copy a new batch ahead). A controller
// calls it once per decoded token
ASRKF_API int32_t asrkf_kv_release_ahead(asrkf_kv_t kv, int32_t seq_id, int32_t n, int32_t pos_lo, int32_t pos_hi,
                                         int32_t * out, int32_t * n_out);
// the positions still queued to leave for seq_id (with their copies), in their order; at most cap written,
// *n_out is the total count
ASRKF_API int32_t asrkf_kv_ahead_queued(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, int32_t cap, int32_t * n_out);

// bring offloaded positions back into free cells (a contiguous run when one exists), active or frozen
ASRKF_API int32_t asrkf_kv_thaw(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n, bool frozen);

// have host memory for `bytes` more offloaded rows ready before the offloads that need it: it is allocated (pages
// faulted in) on a background thread, so reserving what a prompt will offload before decoding it takes the
// allocations off the moves. For pageable host memory (pinned_host false): pinned memory reserved this way slowed
// the prompt's launches on CUDA by as much as it saved. Returns at once; a smaller request does not cancel a larger
// one still pending; 0 stops reserving more. Reserved memory counts in asrkf_kv_info.host_bytes and is kept until
// the handle is freed
ASRKF_API int32_t asrkf_kv_reserve_host(asrkf_kv_t kv, uint64_t bytes);

// have the pinned staging that device moves go through (a pageable host store on a GPU) hold at least `bytes`
// now, instead of pinning it inside the first offloads of a prompt; does nothing where the device has no pinned
// host memory (a CPU cache). Kept until the handle is freed
ASRKF_API int32_t asrkf_kv_reserve_staging(asrkf_kv_t kv, uint64_t bytes);

// importance output: layers are model layer indices with K/V in the managed cache (n_layers = 0: all of them)
// changing it rebuilds the graph once; enabled = false removes the extra nodes entirely
ASRKF_API int32_t asrkf_kv_set_importance(asrkf_kv_t kv, bool enabled, int32_t n_q, const int32_t * layers, int32_t n_layers, bool export_q);

// scores of the latest decode, for the resident cells of seq_id (frozen ones included: shadow mask)
// score = attention probability summed over heads, the last n_q queries and the selected layers; the queries are
// the last n_q tokens of the decode's last ubatch (fewer if that ubatch is shorter)
// refused (-2) when no decode ran with importance on, the cells changed since (offload, thaw, seq_rm), or those
// queries were not all of seq_id
ASRKF_API int32_t asrkf_kv_importance(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, float * score, int32_t cap, int32_t * n_out);

// the same scores folded into the caller's per-position arrays (index = position, n_pos entries) in one pass, for
// a controller that keeps a running score: score[p] = (1 - ema)*score[p] + ema*s/n_queries and mass[p] += s for
// every resident position p of seq_id; refused like asrkf_kv_importance, and -1 with nothing written when a
// resident position is >= n_pos
ASRKF_API int32_t asrkf_kv_importance_fold(asrkf_kv_t kv, int32_t seq_id, float ema, int32_t n_queries, float * score, float * mass, int32_t n_pos);

// entropy output: the Shannon entropy (nats) of softmax of the last logits row of each decode, computed in the
// graph on the device that computed the logits; changing it rebuilds the graph once
ASRKF_API int32_t asrkf_kv_set_entropy(asrkf_kv_t kv, bool enabled);

// the entropy of the latest decode; refused (-2) when the output is off or that decode produced no logits
ASRKF_API int32_t asrkf_kv_entropy(asrkf_kv_t kv, float * out);

// query vectors of the latest decode for one selected layer, in the space of the stored K (after RoPE and the
// rotation applied for quantized K): out[t][h][d], t < n_q, h < n_head, d < n_embd_head_k; kq_scale is the scale
// the model applies to q.k before the softmax in that layer
ASRKF_API int32_t asrkf_kv_query(asrkf_kv_t kv, int32_t layer, float * out, int64_t cap, int32_t * n_q, int32_t * n_head, int32_t * n_embd_head, float * kq_scale);

// model layer ids with K/V in the managed cache, ascending (iSWA: the full-attention layers); *n_out is the count
ASRKF_API int32_t asrkf_kv_layers(asrkf_kv_t kv, int32_t * layers, int32_t cap, int32_t * n_out);

// bytes of one token's K row and V row in one layer (cache type; layers can differ)
ASRKF_API int32_t asrkf_kv_row_bytes(asrkf_kv_t kv, int32_t layer, size_t * k_bytes, size_t * v_bytes);

// raw K bytes (asrkf_kv_row_bytes per position, cache type, stored space) of positions for one layer: offloaded
// ones from the host copy, resident ones read from their cell; with asrkf_kv_query, the host can score any token
ASRKF_API int32_t asrkf_kv_k_rows(asrkf_kv_t kv, int32_t seq_id, int32_t layer, const int32_t * pos, int32_t n, void * out, size_t size);

// recall's scoring where K lives: out[i] (i < n_out) := the attention mass the latest decode's queries (exported
// with asrkf_kv_set_importance(export_q)) give pos[i], in a causal softmax over all n_pos positions of seq_id
// (resident or offloaded), summed over the given layers (each a selected importance layer), heads and queries. The
// products and softmax run on the backend holding the layer's K (the GPU when the cache is there), one layer at a
// time, with a few heads per pass so that the scratch stays small; nothing in the cache changes. What the host
// computes from asrkf_kv_query and asrkf_kv_k_rows, without moving every K row into the caller's memory.
ASRKF_API int32_t asrkf_kv_recall_mass(asrkf_kv_t kv, int32_t seq_id, const int32_t * layers, int32_t n_layers, const int32_t * pos,
                                       int32_t n_pos, int32_t n_out, float * out);

// session export: every position of seq_id, resident (its cell, frozen flag and K/V rows) or offloaded (its host
// copy and checksum), into one buffer that asrkf_kv_session_load restores bit-identically: the same cells, flags,
// host copies and the cache's search head, so that later decodes compute exactly what they would have without the
// round trip. Nothing in the cache changes. out == NULL: *n_out is the size needed (else the bytes written; -1 when
// size is too small). Refused (-2) with a pending K-shift or cells shared with another sequence, -3 when a host copy
// fails its checksum, -5 for iSWA models (the window layers' K/V live outside the managed cache).
ASRKF_API int32_t asrkf_kv_session_save(asrkf_kv_t kv, int32_t seq_id, void * out, size_t size, size_t * n_out);

// session import: replaces the content of seq_id (its resident cells and host copies) with a buffer of
// asrkf_kv_session_save from a cache of the same geometry (layers, row sizes, K/V types, cell count, flash
// attention). Everything is validated (format, geometry: -1; the rows' checksums: -3; cells held by another
// sequence or a pending K-shift: -2) before anything changes, and then nothing has. check_only: validate the format,
// geometry and cells only (not the rows' checksums) and change nothing.
ASRKF_API int32_t asrkf_kv_session_load(asrkf_kv_t kv, int32_t seq_id, const void * data, size_t size, bool check_only);

// parking, for several conversations over one context: asrkf_kv_park moves every position of seq_id into the host
// store under park_id (the resident rows are copied there and hashed, the offloaded ones only change owner) and
// empties the sequence; asrkf_kv_unpark restores them into an empty sequence, the resident ones into their original
// cells when free (then later decodes compute exactly what they would have without the round trip), their rows
// checked first. A switch then copies only the resident rows each way, not the whole conversation.
// park: -1 when park_id is taken, -2 with a pending K-shift or shared cells, -6 out of host memory, -5 for iSWA
// models. unpark: -1 when nothing is parked under park_id, -2 when seq_id is not empty or the cache has too few free
// cells, -3 when a row fails its checksum (then nothing changed). asrkf_kv_parked_save writes a parked sequence as
// asrkf_kv_session_save wrote it before it was parked (out == NULL: *n_out is the size); asrkf_kv_drop_parked
// releases its host memory. Parked rows count in host_bytes_used; asrkf_kv_free refuses them unless forced.
ASRKF_API int32_t asrkf_kv_park(asrkf_kv_t kv, int32_t seq_id, int64_t park_id);
ASRKF_API int32_t asrkf_kv_unpark(asrkf_kv_t kv, int64_t park_id, int32_t seq_id);
ASRKF_API int32_t asrkf_kv_drop_parked(asrkf_kv_t kv, int64_t park_id);
ASRKF_API int32_t asrkf_kv_parked_save(asrkf_kv_t kv, int64_t park_id, void * out, size_t size, size_t * n_out);
ASRKF_API int32_t asrkf_kv_parked_tokens(asrkf_kv_t kv, int64_t park_id, int32_t * n_out);

// check the invariants of the cell table and the host store; -1 with a message on the first violation
ASRKF_API int32_t asrkf_kv_check(asrkf_kv_t kv);

// testing only: flip one byte of the host copy of an offloaded position (to exercise the checksum path)
ASRKF_API int32_t asrkf_kv_debug_corrupt(asrkf_kv_t kv, int32_t seq_id, int32_t pos, uint64_t byte);
// testing only: the same for a position parked under park_id (resident or offloaded when it was parked)
ASRKF_API int32_t asrkf_kv_debug_corrupt_parked(asrkf_kv_t kv, int64_t park_id, int32_t pos, uint64_t byte);

#ifdef __cplusplus
}
#endif

#endif // ASRKF_H
