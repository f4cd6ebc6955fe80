"""cffi (ABI mode) binding of native/include/asrkf.h; no logic here.

CDEF is a copy of the header's declarations; tests/test_binding.py checks that it stays complete.
"""

from __future__ import annotations

import cffi

from ._lib import libggml_path, libllama_path

CDEF = """
struct llama_context;
typedef struct asrkf_kv * asrkf_kv_t;

struct asrkf_kv_params {
    bool     pinned_host;
    uint32_t host_chunk_cells;
    bool     force_gather;
    uint64_t scratch_bytes;
};

struct asrkf_kv_info {
    uint32_t n_layer;
    uint32_t n_layer_kv;
    uint32_t n_head;
    uint32_t n_head_kv;
    uint32_t n_embd_head_k;
    uint32_t n_cells;
    uint32_t n_cells_used;
    uint32_t n_frozen;
    uint32_t n_offloaded;
    int32_t  type_k;
    int32_t  type_v;
    bool     v_trans;
    bool     iswa;
    uint64_t device_kv_bytes;
    uint64_t kv_bytes_per_token;
    uint64_t host_bytes;
    uint64_t host_bytes_used;
    uint64_t n_copies;
    uint64_t n_gathers;
    uint64_t hashed_bytes;
    uint64_t hash_us;
};

struct asrkf_kv_params asrkf_kv_default_params(void);
const char * asrkf_last_error(void);
int32_t asrkf_last_error_code(void);
asrkf_kv_t asrkf_kv_attach(struct llama_context * ctx, struct asrkf_kv_params params);
int32_t asrkf_kv_free(asrkf_kv_t kv, bool force);
int32_t asrkf_kv_get_info(asrkf_kv_t kv, struct asrkf_kv_info * info);
int32_t asrkf_kv_cells(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, uint8_t * state, int32_t * cell, int32_t cap, int32_t * n_out);
int32_t asrkf_kv_offloaded(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, int32_t cap, int32_t * n_out);
int32_t asrkf_kv_freeze(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);
int32_t asrkf_kv_unfreeze(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);
int32_t asrkf_kv_offload(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);
int32_t asrkf_kv_offload_ahead(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n);
int32_t asrkf_kv_reserve_staging(asrkf_kv_t kv, uint64_t bytes);
int32_t asrkf_kv_ahead(asrkf_kv_t kv, int32_t seq_id, int32_t * n_out);
int32_t asrkf_kv_release_ahead(asrkf_kv_t kv, int32_t seq_id, int32_t n, int32_t pos_lo, int32_t pos_hi, int32_t * out, int32_t * n_out);
int32_t asrkf_kv_ahead_queued(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, int32_t cap, int32_t * n_out);
int32_t asrkf_kv_thaw(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n, bool frozen);
int32_t asrkf_kv_set_importance(asrkf_kv_t kv, bool enabled, int32_t n_q, const int32_t * layers, int32_t n_layers, bool export_q);
int32_t asrkf_kv_importance(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, float * score, int32_t cap, int32_t * n_out);
int32_t asrkf_kv_importance_fold(asrkf_kv_t kv, int32_t seq_id, float ema, int32_t n_queries, float * score, float * mass, int32_t n_pos);
int32_t asrkf_kv_set_entropy(asrkf_kv_t kv, bool enabled);
int32_t asrkf_kv_entropy(asrkf_kv_t kv, float * out);
int32_t asrkf_kv_query(asrkf_kv_t kv, int32_t layer, float * out, int64_t cap, int32_t * n_q, int32_t * n_head, int32_t * n_embd_head, float * kq_scale);
int32_t asrkf_kv_layers(asrkf_kv_t kv, int32_t * layers, int32_t cap, int32_t * n_out);
int32_t asrkf_kv_row_bytes(asrkf_kv_t kv, int32_t layer, size_t * k_bytes, size_t * v_bytes);
int32_t asrkf_kv_reserve_host(asrkf_kv_t kv, uint64_t bytes);
int32_t asrkf_kv_k_rows(asrkf_kv_t kv, int32_t seq_id, int32_t layer, const int32_t * pos, int32_t n, void * out, size_t size);
int32_t asrkf_kv_recall_mass(asrkf_kv_t kv, int32_t seq_id, const int32_t * layers, int32_t n_layers, const int32_t * pos, int32_t n_pos, int32_t n_out, float * out);
int32_t asrkf_kv_session_save(asrkf_kv_t kv, int32_t seq_id, void * out, size_t size, size_t * n_out);
int32_t asrkf_kv_session_load(asrkf_kv_t kv, int32_t seq_id, const void * data, size_t size, bool check_only);
int32_t asrkf_kv_park(asrkf_kv_t kv, int32_t seq_id, int64_t park_id);
int32_t asrkf_kv_unpark(asrkf_kv_t kv, int64_t park_id, int32_t seq_id);
int32_t asrkf_kv_drop_parked(asrkf_kv_t kv, int64_t park_id);
int32_t asrkf_kv_parked_save(asrkf_kv_t kv, int64_t park_id, void * out, size_t size, size_t * n_out);
int32_t asrkf_kv_parked_tokens(asrkf_kv_t kv, int64_t park_id, int32_t * n_out);
int32_t asrkf_kv_check(asrkf_kv_t kv);
int32_t asrkf_kv_debug_corrupt(asrkf_kv_t kv, int32_t seq_id, int32_t pos, uint64_t byte);
int32_t asrkf_kv_debug_corrupt_parked(asrkf_kv_t kv, int64_t park_id, int32_t pos, uint64_t byte);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)
lib = ffi.dlopen(str(libllama_path()))

# ggml's device registry (ggml/include/ggml-backend.h at llama.cpp 0c1e570): the devices a model is placed on, and
# the RPC backend's servers (asrkf_gguf.rpc). libggml is the one libllama loaded (same folder, same handle)
GGML_CDEF = """
typedef struct ggml_backend_device * ggml_backend_dev_t;
typedef struct ggml_backend_reg * ggml_backend_reg_t;

size_t             ggml_backend_dev_count(void);
ggml_backend_dev_t ggml_backend_dev_get(size_t index);
const char *       ggml_backend_dev_name(ggml_backend_dev_t device);
const char *       ggml_backend_dev_description(ggml_backend_dev_t device);
void               ggml_backend_dev_memory(ggml_backend_dev_t device, size_t * free, size_t * total);
int                ggml_backend_dev_type(ggml_backend_dev_t device);
ggml_backend_reg_t ggml_backend_dev_backend_reg(ggml_backend_dev_t device);

const char *       ggml_backend_reg_name(ggml_backend_reg_t reg);
size_t             ggml_backend_reg_dev_count(ggml_backend_reg_t reg);
ggml_backend_dev_t ggml_backend_reg_dev_get(ggml_backend_reg_t reg, size_t index);
void *             ggml_backend_reg_get_proc_address(ggml_backend_reg_t reg, const char * name);
ggml_backend_reg_t ggml_backend_reg_by_name(const char * name);
"""

ggml_ffi = cffi.FFI()
ggml_ffi.cdef(GGML_CDEF)
ggml = ggml_ffi.dlopen(str(libggml_path()))
