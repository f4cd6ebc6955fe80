// the C boundary of asrkf-gguf: argument checks, error codes, no exception crosses it

#include "asrkf.h"

#include "llama-kv-freeze.h"

#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-model.h"

#include <algorithm>
#include <cstring>
#include <mutex>
#include <new>
#include <string>

struct asrkf_kv {
    llama_kv_freeze * kvf = nullptr;
};

static thread_local std::string g_last_error;
static thread_local int32_t     g_last_error_code = 0;

static void clear_error() {
    g_last_error.clear();
    g_last_error_code = 0;
}

void asrkf_set_last_error(int32_t code, const std::string & msg) {
    g_last_error      = msg;
    g_last_error_code = code;
}

static int32_t fail(int32_t code, const char * func, const std::string & msg) {
    g_last_error      = msg;
    g_last_error_code = code;
    LLAMA_LOG_ERROR("%s: %s\n", func, msg.c_str());
    return code;
}

// runs fn, turning exceptions into return codes and g_last_error
template <typename F>
static int32_t guarded(const char * func, asrkf_kv_t kv, F && fn) {
    if (!kv || !kv->kvf) {
        return fail(ASRKF_EINVAL, func, "the handle is NULL or was freed");
    }
    // calls on one handle run one at a time; the context's destructor waits for a running one
    std::lock_guard<std::mutex> lock(kv->kvf->mtx);
    if (!kv->kvf->lctx) {
        return fail(ASRKF_EFREED, func, "the llama_context of this handle was freed");
    }
    try {
        fn(*kv->kvf);
    } catch (const llama_kv_freeze_error & err) {
        return fail(err.code, func, err.what());
    } catch (const std::bad_alloc &) {
        return fail(ASRKF_EBACKEND, func, "out of memory");
    } catch (const std::exception & err) {
        return fail(ASRKF_EBACKEND, func, err.what());
    }
    clear_error();
    return ASRKF_OK;
}

static std::vector<llama_pos> positions(const int32_t * pos, int32_t n) {
    if (n < 0) {
        throw llama_kv_freeze_error(ASRKF_EINVAL, "the number of positions is negative (" + std::to_string(n) + ")");
    }
    if (n > 0 && !pos) {
        throw llama_kv_freeze_error(ASRKF_EINVAL, "positions is NULL");
    }
    return std::vector<llama_pos>(pos, pos + n);
}

template <typename T>
static void copy_out(const std::vector<T> & src, T * dst, int32_t cap) {
    if (dst) {
        std::copy_n(src.begin(), std::min<size_t>(src.size(), (size_t) std::max(cap, 0)), dst);
    }
}

extern "C" {

struct asrkf_kv_params asrkf_kv_default_params(void) {
    asrkf_kv_params params;
    params.pinned_host      = true;
    params.host_chunk_cells = 0;
    params.force_gather     = false;
    params.scratch_bytes    = 0;
    return params;
}

const char * asrkf_last_error(void) {
    return g_last_error.c_str();
}

int32_t asrkf_last_error_code(void) {
    return g_last_error_code;
}

asrkf_kv_t asrkf_kv_attach(struct llama_context * ctx, struct asrkf_kv_params params) {
    if (!ctx) {
        fail(ASRKF_EINVAL, __func__, "ctx is NULL");
        return nullptr;
    }
    try {
        ctx->synchronize();
        auto * kv = new asrkf_kv;
        try {
            kv->kvf = new llama_kv_freeze(ctx, params.pinned_host, params.host_chunk_cells, params.force_gather,
                    params.scratch_bytes ? params.scratch_bytes : (64u << 20));
        } catch (...) {
            delete kv;
            throw;
        }
        clear_error();
        return kv;
    } catch (const llama_kv_freeze_error & err) {
        fail(err.code, __func__, err.what());
    } catch (const std::exception & err) {
        fail(ASRKF_EBACKEND, __func__, err.what());
    }
    return nullptr;
}

int32_t asrkf_kv_free(asrkf_kv_t kv, bool force) {
    if (!kv) {
        return ASRKF_OK;
    }
    if (kv->kvf) {
        try {
            llama_kv_freeze_release(kv->kvf, force);
        } catch (const llama_kv_freeze_error & err) {
            return fail(err.code, __func__, err.what());
        } catch (const std::exception & err) {
            return fail(ASRKF_EBACKEND, __func__, err.what());
        }
    }
    delete kv;
    clear_error();
    return ASRKF_OK;
}

int32_t asrkf_kv_get_info(asrkf_kv_t kv, struct asrkf_kv_info * info) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        if (!info) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "info is NULL");
        }
        kvf.sync();

        const llama_kv_cache & cache   = *kvf.kv;
        const llama_hparams  & hparams = llama_get_model(kvf.lctx)->hparams;

        memset(info, 0, sizeof(*info));
        info->n_layer       = hparams.n_layer();
        info->n_layer_kv    = (uint32_t) kvf.layer_k.size();
        info->n_head        = hparams.n_head(kvf.layer_il[0]);
        info->n_head_kv     = hparams.n_head_kv(kvf.layer_il[0]);
        info->n_embd_head_k = hparams.n_embd_head_k(kvf.layer_il[0]);
        info->n_cells       = cache.get_size();
        info->n_cells_used  = cache.get_cells(0).get_used();
        info->n_frozen      = kvf.n_frozen_cells();
        info->n_offloaded   = (uint32_t) kvf.records.size();
        info->type_k        = cache.type_k();
        info->type_v        = cache.type_v();
        info->v_trans       = kvf.v_trans();
        info->iswa          = kvf.iswa;

        uint64_t device = 0;
        for (size_t il = 0; il < kvf.layer_k.size(); ++il) {
            device += ggml_nbytes(kvf.layer_k[il]) + ggml_nbytes(kvf.layer_v[il]);
        }
        info->device_kv_bytes    = device;
        info->kv_bytes_per_token = kvf.store.token_bytes();
        info->host_bytes         = kvf.store.bytes_allocated();
        info->host_bytes_used    = kvf.store.bytes_used();
        info->n_copies           = kvf.n_copies;
        info->n_gathers          = kvf.n_gathers;
        kvf.finish_pending(); // a staged offload may still be hashing on its thread
        info->hashed_bytes       = kvf.store.hashed_bytes;
        info->hash_us            = (uint64_t) (kvf.store.hash_seconds*1e6);
    });
}

int32_t asrkf_kv_cells(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, uint8_t * state, int32_t * cell, int32_t cap, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        kvf.sync();
        const auto res = kvf.resident(seq_id);
        const auto & c = kvf.cells(seq_id);
        const size_t n = std::min<size_t>(res.size(), (size_t) std::max(cap, 0));
        for (size_t i = 0; i < n; ++i) {
            if (pos)   { pos[i]   = res[i].first; }
            if (cell)  { cell[i]  = (int32_t) res[i].second; }
            if (state) { state[i] = c.is_frozen(res[i].second) ? ASRKF_CELL_FROZEN : ASRKF_CELL_ACTIVE; }
        }
        if (n_out) {
            *n_out = (int32_t) res.size();
        }
    });
}

int32_t asrkf_kv_offloaded(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, int32_t cap, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        kvf.sync();
        const auto res = kvf.offloaded(seq_id);
        copy_out(res, pos, cap);
        if (n_out) {
            *n_out = (int32_t) res.size();
        }
    });
}

int32_t asrkf_kv_freeze(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.freeze(seq_id, positions(pos, n), true); });
}

int32_t asrkf_kv_unfreeze(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.freeze(seq_id, positions(pos, n), false); });
}

int32_t asrkf_kv_offload(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.offload(seq_id, positions(pos, n)); });
}

int32_t asrkf_kv_offload_ahead(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.offload_ahead(seq_id, positions(pos, n)); });
}

int32_t asrkf_kv_ahead(asrkf_kv_t kv, int32_t seq_id, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        kvf.sync();
        if (seq_id >= 0) {
            kvf.stream(seq_id); // range check
        }
        int32_t n = 0;
        for (const auto & [key, rec] : kvf.ahead) {
            n += seq_id < 0 || key.first == seq_id;
        }
        if (n_out) {
            *n_out = n;
        }
    });
}

int32_t asrkf_kv_release_ahead(asrkf_kv_t kv, int32_t seq_id, int32_t n, int32_t pos_lo, int32_t pos_hi,
                               int32_t * out, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        if (n > 0 && !out) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "release_ahead: out must hold n positions");
        }
        const auto res = kvf.release_ahead(seq_id, n, pos_lo, pos_hi);
        copy_out(res, out, n);
        if (n_out) {
            *n_out = (int32_t) res.size();
        }
    });
}

int32_t asrkf_kv_ahead_queued(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, int32_t cap, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        kvf.sync();
        kvf.stream(seq_id); // range check
        const auto res = kvf.ahead_queued(seq_id);
        copy_out(res, pos, cap);
        if (n_out) {
            *n_out = (int32_t) res.size();
        }
    });
}

int32_t asrkf_kv_thaw(asrkf_kv_t kv, int32_t seq_id, const int32_t * pos, int32_t n, bool frozen) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.thaw(seq_id, positions(pos, n), frozen); });
}

int32_t asrkf_kv_set_importance(asrkf_kv_t kv, bool enabled, int32_t n_q, const int32_t * layers, int32_t n_layers, bool export_q) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        llama_kv_freeze_importance_params params;
        params.enabled  = enabled;
        params.n_q      = n_q;
        params.layers   = positions(layers, n_layers);
        params.export_q = export_q;
        kvf.set_importance(params);
    });
}

int32_t asrkf_kv_importance(asrkf_kv_t kv, int32_t seq_id, int32_t * pos, float * score, int32_t cap, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        std::vector<llama_pos> p;
        std::vector<float>     s;
        kvf.importance(seq_id, p, s);
        copy_out(p, pos, cap);
        copy_out(s, score, cap);
        if (n_out) {
            *n_out = (int32_t) p.size();
        }
    });
}

int32_t asrkf_kv_importance_fold(asrkf_kv_t kv, int32_t seq_id, float ema, int32_t n_queries, float * score, float * mass, int32_t n_pos) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.importance_fold(seq_id, ema, n_queries, score, mass, n_pos); });
}

int32_t asrkf_kv_set_entropy(asrkf_kv_t kv, bool enabled) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.set_entropy(enabled); });
}

int32_t asrkf_kv_entropy(asrkf_kv_t kv, float * out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        if (!out) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "entropy: out is NULL");
        }
        *out = kvf.entropy();
    });
}

int32_t asrkf_kv_query(asrkf_kv_t kv, int32_t layer, float * out, int64_t cap, int32_t * n_q, int32_t * n_head, int32_t * n_embd_head, float * kq_scale) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        std::vector<float> q;
        int32_t nq = 0, nh = 0, ne = 0;
        float scale = 0.0f;
        kvf.query(layer, q, nq, nh, ne, scale);
        if (out && cap < (int64_t) q.size()) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "query: the output holds " + std::to_string(cap) + " floats, " +
                    std::to_string(q.size()) + " are needed");
        }
        if (out) {
            std::copy(q.begin(), q.end(), out);
        }
        if (n_q)         { *n_q = nq; }
        if (n_head)      { *n_head = nh; }
        if (n_embd_head) { *n_embd_head = ne; }
        if (kq_scale)    { *kq_scale = scale; }
    });
}

int32_t asrkf_kv_layers(asrkf_kv_t kv, int32_t * layers, int32_t cap, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        std::vector<int32_t> sorted = kvf.layer_il;
        std::sort(sorted.begin(), sorted.end());
        copy_out(sorted, layers, cap);
        if (n_out) {
            *n_out = (int32_t) sorted.size();
        }
    });
}

int32_t asrkf_kv_row_bytes(asrkf_kv_t kv, int32_t layer, size_t * k_bytes, size_t * v_bytes) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        const int32_t ikv = kvf.layer_index(layer);
        if (ikv < 0) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "row_bytes: layer " + std::to_string(layer) + " has no K/V in the managed cache");
        }
        if (k_bytes) { *k_bytes = kvf.store.k_row_bytes(ikv); }
        if (v_bytes) { *v_bytes = kvf.store.v_row_bytes(ikv); }
    });
}

int32_t asrkf_kv_k_rows(asrkf_kv_t kv, int32_t seq_id, int32_t layer, const int32_t * pos, int32_t n, void * out, size_t size) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        if (!out && n > 0) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "k_rows: out is NULL");
        }
        kvf.k_rows(seq_id, layer, positions(pos, n), (uint8_t *) out, size);
    });
}

int32_t asrkf_kv_recall_mass(asrkf_kv_t kv, int32_t seq_id, const int32_t * layers, int32_t n_layers, const int32_t * pos,
        int32_t n_pos, int32_t n_out, float * out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        if (n_layers < 0 || (n_layers > 0 && !layers)) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "recall_mass: layers is NULL or its count negative");
        }
        if (n_out < 0 || n_out > n_pos) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "recall_mass: n_out = " + std::to_string(n_out) + " must be in [0, n_pos = " +
                    std::to_string(n_pos) + "]");
        }
        kvf.recall_mass(seq_id, std::vector<int32_t>(layers, layers + n_layers), positions(pos, n_pos), (size_t) n_out, out);
    });
}

int32_t asrkf_kv_session_save(asrkf_kv_t kv, int32_t seq_id, void * out, size_t size, size_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        size_t n = 0;
        kvf.session_save(seq_id, (uint8_t *) out, size, n);
        if (n_out) {
            *n_out = n;
        }
    });
}

int32_t asrkf_kv_session_load(asrkf_kv_t kv, int32_t seq_id, const void * data, size_t size, bool check_only) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.session_load(seq_id, (const uint8_t *) data, size, check_only); });
}

int32_t asrkf_kv_park(asrkf_kv_t kv, int32_t seq_id, int64_t park_id) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.park(seq_id, park_id); });
}

int32_t asrkf_kv_unpark(asrkf_kv_t kv, int64_t park_id, int32_t seq_id) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.unpark(park_id, seq_id); });
}

int32_t asrkf_kv_drop_parked(asrkf_kv_t kv, int64_t park_id) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.drop_parked(park_id); });
}

int32_t asrkf_kv_parked_save(asrkf_kv_t kv, int64_t park_id, void * out, size_t size, size_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        size_t n = 0;
        kvf.parked_save(park_id, (uint8_t *) out, size, n);
        if (n_out) {
            *n_out = n;
        }
    });
}

int32_t asrkf_kv_parked_tokens(asrkf_kv_t kv, int64_t park_id, int32_t * n_out) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        auto it = kvf.parked.find(park_id);
        if (it == kvf.parked.end()) {
            KVF_FAIL(ASRKF_EINVAL, "parked tokens: no sequence is parked under id %lld", (long long) park_id);
        }
        *n_out = (int32_t) it->second.entries.size();
    });
}

int32_t asrkf_kv_reserve_host(asrkf_kv_t kv, uint64_t bytes) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) {
        kvf.store.reserve((size_t) bytes); // no synchronize: it touches no cell, and the device may be busy
    });
}

int32_t asrkf_kv_reserve_staging(asrkf_kv_t kv, uint64_t bytes) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.reserve_staging((size_t) bytes); });
}

int32_t asrkf_kv_check(asrkf_kv_t kv) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.check(); });
}

int32_t asrkf_kv_debug_corrupt(asrkf_kv_t kv, int32_t seq_id, int32_t pos, uint64_t byte) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.debug_corrupt(seq_id, pos, byte); });
}

int32_t asrkf_kv_debug_corrupt_parked(asrkf_kv_t kv, int64_t park_id, int32_t pos, uint64_t byte) {
    return guarded(__func__, kv, [&](llama_kv_freeze & kvf) { kvf.debug_corrupt_parked(park_id, pos, byte); });
}

} // extern "C"
