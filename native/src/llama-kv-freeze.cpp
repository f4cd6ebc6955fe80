#include "llama-kv-freeze.h"

#include "asrkf.h"
#include "llama-kv-freeze-rows.h"

#include "llama-arch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>

// the controller's lifetime (attach, detach, the context going away), lookups into the cell table and the
// invariant check; the operations are in llama-kv-freeze-cells.cpp, the device copies in llama-kv-freeze-rows.cpp
// and the hooks the patched llama.cpp calls in llama-kv-freeze-hooks.cpp

// contexts with an attached controller, so that a context's destructor can detach it
static std::mutex                                            g_kvf_mutex;
static std::unordered_map<llama_context *, llama_kv_freeze *> g_kvf_by_ctx;

std::string llama_kv_freeze_fmt(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[512];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

void llama_kv_freeze_check_unique(const std::vector<llama_pos> & pos, const char * op) {
    std::vector<llama_pos> sorted = pos;
    std::sort(sorted.begin(), sorted.end());
    for (size_t i = 1; i < sorted.size(); ++i) {
        if (sorted[i] == sorted[i - 1]) {
            KVF_FAIL(ASRKF_EINVAL, "%s: position %d is given twice", op, sorted[i]);
        }
    }
}

//
// construction
//

// a switch of the benchmarks and tests: set, non-empty and not "0"
static bool kvf_env_flag(const char * name) {
    const char * v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

llama_kv_freeze::llama_kv_freeze(llama_context * lctx, bool pinned_host, uint32_t host_chunk_cells, bool force_gather, size_t scratch_bytes)
    : lctx(lctx), force_gather(force_gather), scratch_bytes(scratch_bytes) {
    // one check-and-register: two threads attaching to one context cannot both succeed
    std::lock_guard<std::mutex> lock(g_kvf_mutex);

    const llama_model & model = lctx->model;

    llama_memory_i * mem = lctx->memory.get();
    if (!mem) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "the context has no KV cache (architecture %s)", llm_arch_name(model.arch));
    }

    if (auto * plain = dynamic_cast<llama_kv_cache *>(mem)) {
        kv = plain;
    } else if (auto * swa = dynamic_cast<llama_kv_cache_iswa *>(mem)) {
        kv   = swa->get_base();
        iswa = true;
    } else {
        KVF_FAIL(ASRKF_EUNSUPPORTED,
                "architecture %s uses a recurrent, hybrid or sparse-attention memory; only standard and iSWA KV caches can be frozen",
                llm_arch_name(model.arch));
    }

    if (kv->other) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "architecture %s shares KV cells between caches", llm_arch_name(model.arch));
    }
    if (kv->layers.empty()) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "architecture %s has no full-attention layers to manage", llm_arch_name(model.arch));
    }

    // the importance node and the host recall score a cell by softmax(kq_scale * q.k) over the mask: attention that
    // changes the logits or the normalisation beyond that would get scores that are silently wrong
    const llama_hparams & hp = model.hparams;
    if (hp.attn_soft_cap || model.arch == LLM_ARCH_GROK) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "architecture %s uses attention logit soft-capping (cap %.1f), which the importance "
                "scores and the host recall do not compute", llm_arch_name(model.arch), hp.f_attn_logit_softcapping);
    }
    if (hp.use_alibi || hp.f_max_alibi_bias > 0.0f) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "architecture %s uses ALiBi position biases (max bias %.1f), which the importance "
                "scores and the host recall do not compute", llm_arch_name(model.arch), hp.f_max_alibi_bias);
    }
    for (size_t il = 0; il < model.layers.size(); ++il) {
        if (model.layers[il].attn_sinks) {
            KVF_FAIL(ASRKF_EUNSUPPORTED, "architecture %s uses attention sinks (layer %zu), which the importance scores and "
                    "the host recall do not compute", llm_arch_name(model.arch), il);
        }
    }

    if (kv->n_stream != 1) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "the KV cache has %u streams: create the context with kv_unified = true or n_seq_max = 1", kv->n_stream);
    }
    if (lctx->cparams.kv_freeze || g_kvf_by_ctx.count(lctx)) {
        KVF_FAIL(ASRKF_EREFUSED, "a freeze controller is already attached to this context");
    }

    std::vector<size_t> k_row_bytes;
    std::vector<size_t> v_row_bytes;

    ggml_backend_buffer_type_t pinned_buft = nullptr;

    for (const auto & layer : kv->layers) {
        if (!layer.k || !layer.v) {
            KVF_FAIL(ASRKF_EUNSUPPORTED, "architecture %s stores K without V (MLA); not supported", llm_arch_name(model.arch));
        }

        layer_k.push_back(layer.k);
        layer_v.push_back(layer.v);
        layer_il.push_back((int32_t) layer.il);

        k_row_bytes.push_back(ggml_row_size(layer.k->type, layer.k->ne[0]));
        v_row_bytes.push_back(ggml_row_size(layer.v->type, layer.v->ne[0]));

        for (ggml_tensor * t : { layer.k, layer.v }) {
            if (!pinned_buft && t->buffer && !ggml_backend_buffer_is_host(t->buffer)) {
                ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
                if (dev) {
                    pinned_buft = ggml_backend_dev_host_buffer_type(dev);
                }
            }
        }
    }

    // pinned_host: the offloaded rows live in pinned memory and move straight between it and the device; else in
    // pageable memory, and every device move is staged through a pinned buffer of the handle (pinning costs about as
    // much as the copies, and CUDA serializes it with the launches: pageable chunks are cheap to get)
    staging_buft = pinned_buft;
    // (force_gather, a testing switch, takes the staged path on a CPU cache too, with pageable staging)
    staged = !pinned_host && (pinned_buft != nullptr || force_gather);
    store.init(std::move(k_row_bytes), std::move(v_row_bytes), pinned_host ? pinned_buft : nullptr, host_chunk_cells);

    trace_moves         = kvf_env_flag("ASRKF_TRACE_MOVES");
    outputs_sync        = kvf_env_flag("ASRKF_OUTPUTS_SYNC");
    score_layerwise     = kvf_env_flag("ASRKF_SCORE_LAYERWISE");
    score_together_host = kvf_env_flag("ASRKF_SCORE_TOGETHER");
    shadow_own          = kvf_env_flag("ASRKF_SHADOW_OWN");
    deferred_scratch_bytes = 4*scratch_bytes;
    if (const char * mb = getenv("ASRKF_DEFERRED_SCRATCH_MB")) {
        deferred_scratch_bytes = (size_t) strtoull(mb, nullptr, 10) << 20;
    }

    g_kvf_by_ctx[lctx] = this;

    kv->freeze = this;
    lctx->cparams.kv_freeze = this;
    bump_graph();
}

llama_kv_freeze::~llama_kv_freeze() {
    finish_pending();
    for (auto * inp : inputs) {
        llama_kv_freeze_input_detach(inp);
    }
    inputs.clear();

    // llama_kv_freeze_release took us out of the registry already
    if (lctx) {
        // unfreeze so that the context behaves as if we had never been there; offloaded rows are the caller's loss
        for (uint32_t i = 0; i < kv->v_cells[0].size(); ++i) {
            if (!kv->v_cells[0].is_empty(i)) {
                kv->v_cells[0].set_frozen(i, false);
            }
        }

        kv->freeze = nullptr;
        lctx->cparams.kv_freeze = nullptr;
        bump_graph();
    }

    for (auto & [backend, bufs] : dev_buffers) {
        for (auto * buf : bufs) {
            if (buf) {
                ggml_backend_buffer_free(buf);
            }
        }
    }
    if (staging_pinned) {
        ggml_backend_buffer_free(staging_pinned);
    }
    if (outputs_pinned) {
        ggml_backend_buffer_free(outputs_pinned); // the release (or the context's end) synchronized its copies
    }
    for (auto & [dev, backend] : backends) {
        ggml_backend_free(backend);
    }
}

uint8_t * llama_kv_freeze::host_staging(size_t size) {
    if (staging_pinned && ggml_backend_buffer_get_size(staging_pinned) >= size) {
        return (uint8_t *) ggml_backend_buffer_get_base(staging_pinned);
    }
    if (!staging_pinned && staging_plain.size() >= size) {
        return staging_plain.data();
    }
    // grown by half at least: a prompt's offloads differ by a few tokens, and pinning memory is slow
    size = std::max(size, (staging_pinned ? ggml_backend_buffer_get_size(staging_pinned) : staging_plain.size())*3/2);
    if (staging_pinned) {
        ggml_backend_buffer_free(staging_pinned);
        staging_pinned = nullptr;
    }
    if (ggml_backend_buffer_type_t buft = staging_buft) {
        staging_pinned = ggml_backend_buft_alloc_buffer(buft, size);
        if (staging_pinned) {
            staging_plain = {};
            return (uint8_t *) ggml_backend_buffer_get_base(staging_pinned);
        }
    }
    staging_plain.resize(size);
    return staging_plain.data();
}

void llama_kv_freeze::reserve_staging(size_t bytes) {
    if (!staging_buft || bytes == 0) {
        return;
    }
    sync(); // a larger staging replaces the old one, which a copy still running may be reading
    host_staging(bytes);
}

void llama_kv_freeze::on_context_free() {
    finish_pending();
    // outputs copied behind the last graph (on_computed) land in our buffer: wait for them while the context can
    lctx->synchronize();
    // the context frees the cache and the graph inputs right after this; forget them all
    for (auto * inp : inputs) {
        llama_kv_freeze_input_detach(inp);
    }
    inputs.clear();
    input_active   = nullptr;
    input_building = nullptr;

    records.clear();
    store.clear();

    kv->freeze = nullptr;
    lctx->cparams.kv_freeze = nullptr;

    lctx = nullptr;
    kv   = nullptr;
}

void llama_kv_freeze::bump_graph() const {
    if (lctx) {
        lctx->cparams.kv_freeze_gen++;
    }
}

void llama_kv_freeze::sync() const {
    if (!lctx) {
        KVF_FAIL(ASRKF_EFREED, "the llama_context of this handle was freed");
    }
    lctx->synchronize();
    // const readers wait for a pending offload too: its records' checksums are only final once it is done
    const_cast<llama_kv_freeze *>(this)->finish_pending();
}

void llama_kv_freeze::finish_pending() {
    if (!pending) {
        return;
    }
    if (pending->worker.joinable()) {
        pending->worker.join();
    }
    for (size_t i = 0; i < pending->keys.size(); ++i) {
        auto it = records.find(pending->keys[i]);
        if (it != records.end()) {
            it->second.checksum = pending->sums[i];
        } else if ((it = ahead.find(pending->keys[i])) != ahead.end()) {
            it->second.checksum = pending->sums[i];
        }
    }
    pending.reset();
}

//
// lookups
//

uint32_t llama_kv_freeze::stream(llama_seq_id seq_id) const {
    if (seq_id < 0 || (size_t) seq_id >= kv->seq_to_stream.size()) {
        KVF_FAIL(ASRKF_EINVAL, "sequence id %d is out of range [0, %zu)", seq_id, kv->seq_to_stream.size());
    }
    return kv->seq_to_stream[seq_id];
}

llama_kv_cells & llama_kv_freeze::cells(llama_seq_id seq_id) const {
    return kv->v_cells[stream(seq_id)];
}

int32_t llama_kv_freeze::layer_index(int32_t il) const {
    const auto it = kv->map_layer_ids.find(il);
    if (it == kv->map_layer_ids.end()) {
        return -1;
    }
    // a layer that reuses another layer's K/V has no rows of its own
    const int32_t ikv = it->second;
    return kv->layers[ikv].il == (uint32_t) il ? ikv : -1;
}

std::vector<std::pair<llama_pos, uint32_t>> llama_kv_freeze::resident(llama_seq_id seq_id) const {
    const auto & sp = cells(seq_id).seq_pos_get(seq_id);
    return { sp.begin(), sp.end() };
}

std::vector<llama_pos> llama_kv_freeze::offloaded(llama_seq_id seq_id) const {
    stream(seq_id);
    std::vector<llama_pos> res;
    for (auto it = records.lower_bound({seq_id, INT32_MIN}); it != records.end() && it->first.first == seq_id; ++it) {
        res.push_back(it->first.second);
    }
    return res;
}

bool llama_kv_freeze::v_trans() const {
    return kv->v_trans;
}

bool llama_kv_freeze::any_frozen() const {
    for (const auto & c : kv->v_cells) {
        if (c.any_frozen()) {
            return true;
        }
    }
    return false;
}

uint32_t llama_kv_freeze::n_frozen_cells() const {
    uint32_t n = 0;
    const auto & c = kv->v_cells[0];
    for (uint32_t i = 0; i < c.size(); ++i) {
        n += !c.is_empty(i) && c.is_frozen(i);
    }
    return n;
}

std::vector<uint32_t> llama_kv_freeze::cells_of(llama_seq_id seq_id, const std::vector<llama_pos> & pos, const char * op) const {
    const auto & c  = cells(seq_id);
    const auto & sp = c.seq_pos_get(seq_id);

    std::vector<uint32_t> res;
    res.reserve(pos.size());

    if (pos.empty()) {
        return res;
    }

    // many positions within a few cache sizes of each other (a controller's freeze or unfreeze batch): a dense
    // index over their range and one scan of the cells, instead of a tree lookup per position
    const auto [pmin, pmax] = std::minmax_element(pos.begin(), pos.end());
    const int64_t range = (int64_t) *pmax - (int64_t) *pmin + 1;
    if (pos.size()*16 >= c.size() && range <= 4*((int64_t) c.size() + (int64_t) pos.size())) {
        std::vector<int32_t> index(range, -1); // position - *pmin -> index into pos
        for (size_t k = 0; k < pos.size(); ++k) {
            int32_t & ix = index[pos[k] - *pmin];
            if (ix >= 0) {
                KVF_FAIL(ASRKF_EINVAL, "%s: position %d is given twice", op, pos[k]);
            }
            ix = (int32_t) k;
        }
        std::vector<int64_t> found(pos.size(), -1);
        for (uint32_t i = 0; i < c.size(); ++i) {
            if (c.is_empty(i) || !c.seq_has(i, seq_id)) {
                continue;
            }
            const llama_pos p = c.pos_get(i);
            if (p < *pmin || p > *pmax || index[p - *pmin] < 0) {
                continue;
            }
            auto & f = found[index[p - *pmin]];
            if (f >= 0) {
                KVF_FAIL(ASRKF_EINVAL, "%s: position %d of sequence %d occupies several cells", op, p, seq_id);
            }
            f = i;
        }
        for (size_t k = 0; k < pos.size(); ++k) {
            if (found[k] < 0) {
                if (records.count({seq_id, pos[k]})) {
                    KVF_FAIL(ASRKF_EINVAL, "%s: position %d of sequence %d is offloaded, not resident", op, pos[k], seq_id);
                }
                KVF_FAIL(ASRKF_EINVAL, "%s: position %d is not in sequence %d", op, pos[k], seq_id);
            }
            res.push_back((uint32_t) found[k]);
        }
        return res;
    }

    llama_kv_freeze_check_unique(pos, op);

    for (const llama_pos p : pos) {
        auto it = sp.lower_bound({p, 0u});
        if (it == sp.end() || it->first != p) {
            if (records.count({seq_id, p})) {
                KVF_FAIL(ASRKF_EINVAL, "%s: position %d of sequence %d is offloaded, not resident", op, p, seq_id);
            }
            KVF_FAIL(ASRKF_EINVAL, "%s: position %d is not in sequence %d", op, p, seq_id);
        }
        auto next = std::next(it);
        if (next != sp.end() && next->first == p) {
            KVF_FAIL(ASRKF_EINVAL, "%s: position %d of sequence %d occupies several cells", op, p, seq_id);
        }
        res.push_back(it->second);
    }

    return res;
}

//
// invariants
//

void llama_kv_freeze::check() const {
    sync();

    const auto & c = kv->v_cells[0];

    for (const auto & [key, rec] : records) {
        const auto & sp = c.seq_pos_get(key.first);
        auto it = sp.lower_bound({key.second, 0u});
        if (it != sp.end() && it->first == key.second) {
            KVF_FAIL(ASRKF_EINVAL, "check: position %d of sequence %d is both resident and offloaded", key.second, key.first);
        }
        if (store.checksum(rec.slot) != rec.checksum) {
            KVF_FAIL(ASRKF_ECHECKSUM, "check: the host copy of position %d of sequence %d failed its checksum", key.second, key.first);
        }
    }

    for (const auto & [key, rec] : ahead) {
        const auto & sp = c.seq_pos_get(key.first);
        auto it = sp.lower_bound({key.second, 0u});
        if (it == sp.end() || it->first != key.second) {
            KVF_FAIL(ASRKF_EINVAL, "check: position %d of sequence %d has a copy made ahead but is not resident", key.second, key.first);
        }
        if (store.checksum(rec.slot) != rec.checksum) {
            KVF_FAIL(ASRKF_ECHECKSUM, "check: the copy made ahead of position %d of sequence %d failed its checksum", key.second, key.first);
        }
    }

    if (store.bytes_used() != (records.size() + ahead.size() + parked_tokens())*store.token_bytes()) {
        KVF_FAIL(ASRKF_EINVAL, "check: the host store holds %zu bytes for %zu records, %zu copies made ahead and %zu parked positions",
                store.bytes_used(), records.size(), ahead.size(), parked_tokens());
    }
    for (const auto & [id, pk] : parked) {
        for (const auto & e : pk.entries) {
            if (store.checksum(e.rec.slot) != e.rec.checksum) {
                KVF_FAIL(ASRKF_ECHECKSUM, "check: the host copy of position %d parked under id %lld failed its checksum",
                        e.pos, (long long) id);
            }
        }
    }

    for (uint32_t i = 0; i < c.size(); ++i) {
        if (c.is_empty(i)) {
            continue;
        }
        if (c.seq_get_all(i).none()) {
            KVF_FAIL(ASRKF_EINVAL, "check: cell %u has a position but no sequence", i);
        }
        // the flag is per cell: a shared frozen cell would mask its position for every sequence holding it
        if (c.is_frozen(i) && c.seq_count(i) != 1) {
            KVF_FAIL(ASRKF_EINVAL, "check: frozen cell %u (position %d) is shared by %d sequences", i, c.pos_get(i), c.seq_count(i));
        }
    }

    // the next decode of a sequence goes right after its newest resident position: no offloaded position may be there
    for (auto it = records.begin(); it != records.end();) {
        const llama_seq_id s = it->first.first;
        it = records.lower_bound({s + 1, std::numeric_limits<llama_pos>::min()});
        const llama_pos off = std::prev(it)->first.second;
        const llama_pos res = c.seq_pos_max(s);
        if (off > res) {
            KVF_FAIL(ASRKF_EINVAL, "check: offloaded position %d of sequence %d is above its newest resident position (%d)", off, s, res);
        }
    }
}

//
// the context going away, and asrkf_kv_free (both under the registry lock)
//

void llama_kv_freeze_on_context_free(llama_context * lctx) {
    std::lock_guard<std::mutex> lock(g_kvf_mutex);
    auto it = g_kvf_by_ctx.find(lctx);
    if (it != g_kvf_by_ctx.end()) {
        // a call running on another thread finishes first (it holds the handle's mutex): it never sees the
        // context disappear under it, and every later call answers ASRKF_EFREED
        std::lock_guard<std::mutex> lock_kvf(it->second->mtx);
        it->second->on_context_free();
        g_kvf_by_ctx.erase(it);
    }
}

void llama_kv_freeze_release(llama_kv_freeze * kvf, bool force) {
    std::lock_guard<std::mutex> lock(g_kvf_mutex);
    {
        std::lock_guard<std::mutex> lock_kvf(kvf->mtx);
        if (kvf->lctx) {
            if ((!kvf->records.empty() || !kvf->parked.empty()) && !force) {
                KVF_FAIL(ASRKF_EREFUSED, "%zu positions are offloaded and %zu parked and would be lost; thaw them or free with force",
                        kvf->records.size(), kvf->parked_tokens());
            }
            kvf->lctx->synchronize();
            g_kvf_by_ctx.erase(kvf->lctx);
        }
    }
    // out of the registry, so the context's destructor cannot reach it any more; the registry lock is still held
    // until the destructor has detached from the context
    delete kvf;
}
