#include "llama-kv-freeze.h"

#include "asrkf.h"

#include "llama-arch.h"
#include "llama-context.h"
#include "llama-impl.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"
#include "llama-model.h"

#include "ggml-cpp.h"

#include <algorithm>
#include <cinttypes>
#include <cstdarg>
#include <cstdio>
#include <limits>
#include <cstring>
#include <mutex>
#include <unordered_map>

// contexts with an attached controller, so that a context's destructor can detach it
static std::mutex                                            g_kvf_mutex;
static std::unordered_map<llama_context *, llama_kv_freeze *> g_kvf_by_ctx;

static std::string fmt_error(const char * fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    char buf[512];
    vsnprintf(buf, sizeof(buf), fmt, ap);
    va_end(ap);
    return buf;
}

#define KVF_FAIL(code, ...) throw llama_kv_freeze_error(code, fmt_error(__VA_ARGS__))

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
            if (pinned_host && !pinned_buft && t->buffer && !ggml_backend_buffer_is_host(t->buffer)) {
                ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
                if (dev) {
                    pinned_buft = ggml_backend_dev_host_buffer_type(dev);
                }
            }
        }
    }

    store.init(std::move(k_row_bytes), std::move(v_row_bytes), pinned_buft, host_chunk_cells);

    g_kvf_by_ctx[lctx] = this;

    kv->freeze = this;
    lctx->cparams.kv_freeze = this;
    bump_graph();
}

llama_kv_freeze::~llama_kv_freeze() {
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

    for (auto & [dev, backend] : backends) {
        ggml_backend_free(backend);
    }
}

void llama_kv_freeze::on_context_free() {
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
// device copies
//

ggml_backend_t llama_kv_freeze::backend_for(const ggml_tensor * t) {
    ggml_backend_dev_t dev = ggml_backend_buft_get_device(ggml_backend_buffer_get_type(t->buffer));
    if (!dev && ggml_backend_buffer_is_host(t->buffer)) {
        // ggml's plain CPU buffer type names no device
        dev = ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU);
    }
    if (!dev) {
        return nullptr;
    }
    auto it = backends.find(dev);
    if (it != backends.end()) {
        return it->second;
    }
    ggml_backend_t backend = ggml_backend_dev_init(dev, nullptr);
    backends[dev] = backend; // nullptr is remembered too: then copies are synchronous
    return backend;
}

void llama_kv_freeze::read(const ggml_tensor * t, size_t offset, size_t size, void * dst) {
    n_copies++;
    if (ggml_backend_buffer_is_host(t->buffer)) {
        memcpy(dst, (const uint8_t *) t->data + offset, size);
    } else if (ggml_backend_t backend = backend_for(t)) {
        ggml_backend_tensor_get_async(backend, t, dst, offset, size);
    } else {
        ggml_backend_tensor_get(t, dst, offset, size);
    }
}

void llama_kv_freeze::write(ggml_tensor * t, size_t offset, size_t size, const void * src) {
    n_copies++;
    if (ggml_backend_buffer_is_host(t->buffer)) {
        memcpy((uint8_t *) t->data + offset, src, size);
    } else if (ggml_backend_t backend = backend_for(t)) {
        ggml_backend_tensor_set_async(backend, t, src, offset, size);
    } else {
        ggml_backend_tensor_set(t, src, offset, size);
    }
}

void llama_kv_freeze::finish_copies() {
    for (auto & [dev, backend] : backends) {
        if (backend) {
            ggml_backend_synchronize(backend);
        }
    }
    scatter_rows.reset();
}

bool llama_kv_freeze::can_gather(const ggml_tensor * t) const {
    // the I32 alias needs whole 4-byte words per row (true when n_embd_gqa % 64 == 0 for q4_0)
    if (t->nb[1] % 4 != 0 || !t->buffer) {
        return false;
    }
    return force_gather || !ggml_backend_buffer_is_host(t->buffer);
}

// the one backend that runs the gather/scatter graph of these tensors, and how many rows go in one pass (the
// device scratch is bounded to scratch_bytes); nullptr: copy per run of cells instead
ggml_backend_t llama_kv_freeze::rows_backend(const std::vector<ggml_tensor *> & tensors, size_t n_rows, size_t & n_pass) {
    ggml_backend_t backend = backend_for(tensors[0]);
    if (!backend) {
        LLAMA_LOG_WARN("%s: no backend for the device of %s: copying per run of cells\n", __func__, tensors[0]->name);
        return nullptr;
    }
    size_t bytes_per_row = 0;
    for (const auto * t : tensors) {
        if (backend_for(t) != backend) {
            LLAMA_LOG_WARN("%s: the cache spans several devices: copying per run of cells\n", __func__);
            return nullptr;
        }
        bytes_per_row += t->nb[1];
    }
    // few large passes: every pass costs device calls (the first is the only one nothing else overlaps)
    n_pass = std::min(n_rows, std::max<size_t>(1, scratch_bytes / bytes_per_row));
    return backend;
}

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
    ggml_backend_buffer_ptr       idx_buf;
    ggml_backend_buffer_ptr       scratch;
    ggml_tensor                 * idx = nullptr;
    std::vector<int32_t>          ids;      // idx's host copy: an async upload reads it after the caller returned
    std::vector<group>            groups;
    size_t                        max_count = 1;
    std::vector<ggml_context_ptr> pass_ctx; // kept until the passes ran
};

static bool kvf_plan_rows(llama_kv_freeze_rows & plan, ggml_backend_t backend, const std::vector<ggml_tensor *> & tensors,
        const std::vector<int32_t> & rows, size_t n_pass, ggml_type word_type) {
    const size_t n_t = tensors.size();

    ggml_init_params ip = { ggml_tensor_overhead()*(3*n_t + 2), nullptr, /*.no_alloc =*/ true };
    plan.ctx.reset(ggml_init(ip));

    const ggml_tensor * t0 = tensors[0];
    const size_t stride = n_t > 1 ? (size_t) ((const uint8_t *) tensors[1]->data - (const uint8_t *) t0->data) : 0;
    bool uniform = n_t > 1 && tensors[1]->data > t0->data && stride >= ggml_nbytes(t0) && stride % 4 == 0;
    for (size_t i = 0; uniform && i < n_t; ++i) {
        const ggml_tensor * t = tensors[i];
        uniform = t->buffer == t0->buffer && t->nb[1] == t0->nb[1] && ggml_nbytes(t) == ggml_nbytes(t0) &&
                  (const uint8_t *) t->data == (const uint8_t *) t0->data + i*stride;
    }

    auto make_alias = [&](const ggml_tensor * t, size_t count) -> ggml_tensor * {
        const int64_t words = (int64_t) (t->nb[1]/4);
        const int64_t n_row = (int64_t) (ggml_nbytes(t)/t->nb[1]);
        const size_t  span  = (count - 1)*stride + ggml_nbytes(t);
        ggml_tensor * flat = ggml_new_tensor_1d(plan.ctx.get(), word_type, (int64_t) (span/4));
        if (ggml_backend_tensor_alloc(t->buffer, flat, t->data) != GGML_STATUS_SUCCESS) {
            LLAMA_LOG_WARN("%s: cannot alias %s: copying per run of cells\n", __func__, t->name);
            return nullptr;
        }
        ggml_tensor * alias = ggml_view_3d(plan.ctx.get(), flat, words, n_row, (int64_t) count, t->nb[1],
                count > 1 ? stride : ggml_nbytes(t), 0);
        ggml_backend_view_init(alias);
        return alias;
    };

    const size_t align = ggml_backend_get_alignment(backend);
    size_t size = 0;
    for (size_t i = 0; i < n_t; i += uniform ? n_t : 1) {
        const size_t count = uniform ? n_t : 1;
        ggml_tensor * alias = make_alias(tensors[i], count);
        if (!alias) {
            return false;
        }
        plan.groups.push_back({ alias, i, count, size });
        size += GGML_PAD(n_pass*count*tensors[i]->nb[1], align);
    }
    plan.max_count = uniform ? n_t : 1;

    // per pass, its rows repeated for every tensor of a group: get_rows takes one column of ids per tensor
    const size_t n_rows = rows.size();
    plan.ids.resize(n_rows*plan.max_count);
    for (size_t r0 = 0; r0 < n_rows; r0 += n_pass) {
        const size_t n = std::min(n_pass, n_rows - r0);
        for (size_t c = 0; c < plan.max_count; ++c) {
            std::copy(rows.begin() + r0, rows.begin() + r0 + n, plan.ids.begin() + r0*plan.max_count + c*n);
        }
    }
    plan.idx = ggml_new_tensor_1d(plan.ctx.get(), GGML_TYPE_I32, (int64_t) plan.ids.size());

    plan.idx_buf.reset(ggml_backend_alloc_buffer(backend, ggml_nbytes(plan.idx)));
    plan.scratch.reset(ggml_backend_alloc_buffer(backend, size));
    if (!plan.idx_buf || !plan.scratch ||
            ggml_backend_tensor_alloc(plan.idx_buf.get(), plan.idx, ggml_backend_buffer_get_base(plan.idx_buf.get())) != GGML_STATUS_SUCCESS) {
        LLAMA_LOG_WARN("%s: no device memory for %zu rows: copying per run of cells\n", __func__, n_pass);
        return false;
    }
    ggml_backend_tensor_set_async(backend, plan.idx, plan.ids.data(), 0, plan.ids.size()*sizeof(int32_t));
    return true;
}

// a pass's context and the ids of its rows for a group: [n, count]
// per group: the ids view, the rows (gather: get_rows; scatter: the uploaded rows and the set_rows view), and
// the alias view the graph also visits
static size_t kvf_pass_graph_size(size_t n_groups) {
    return 4*n_groups + 4;
}

static ggml_context * kvf_pass_ctx(llama_kv_freeze_rows & plan) {
    const size_t n_g = plan.groups.size();
    ggml_init_params ip = {
        /*.mem_size   =*/ ggml_tensor_overhead()*(4*n_g + 1) + ggml_graph_overhead_custom(kvf_pass_graph_size(n_g), false),
        /*.mem_buffer =*/ nullptr,
        /*.no_alloc   =*/ true,
    };
    plan.pass_ctx.emplace_back(ggml_init(ip));
    return plan.pass_ctx.back().get();
}

static ggml_tensor * kvf_pass_ids(llama_kv_freeze_rows & plan, ggml_context * ctx, size_t r0, size_t n, size_t count) {
    ggml_tensor * idx = ggml_view_2d(ctx, plan.idx, (int64_t) n, (int64_t) count, n*sizeof(int32_t),
            r0*plan.max_count*sizeof(int32_t));
    ggml_backend_view_init(idx);
    return idx;
}

// events recorded after queued copies, so that the host can work on what landed while the rest still copies;
// on the way out the backend is synchronized first (nothing may still write into memory the caller frees)
struct kvf_events {
    ggml_backend_t                    backend = nullptr;
    std::vector<ggml_backend_event_t> ev; // nullptr where the device has no events: wait for everything there

    explicit kvf_events(ggml_backend_t backend) : backend(backend) {}

    void record() {
        ggml_backend_event_t e = ggml_backend_event_new(ggml_backend_get_device(backend));
        if (e) {
            ggml_backend_event_record(e, backend);
        }
        ev.push_back(e);
    }

    void wait(size_t i) const {
        if (ev[i]) {
            ggml_backend_event_synchronize(ev[i]);
        } else {
            ggml_backend_synchronize(backend);
        }
    }

    ~kvf_events() {
        ggml_backend_synchronize(backend);
        for (auto * e : ev) {
            if (e) {
                ggml_backend_event_free(e);
            }
        }
    }
};

bool llama_kv_freeze::gather(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows,
        const std::vector<uint8_t *> & dst, const std::function<void(size_t, size_t)> & landed) {
    if (tensors.empty() || rows.empty()) {
        return true;
    }

    const size_t n_rows = rows.size();
    size_t n_pass = 0;
    ggml_backend_t backend = rows_backend(tensors, n_rows, n_pass);
    if (!backend) {
        return false;
    }

    llama_kv_freeze_rows plan;
    if (!kvf_plan_rows(plan, backend, tensors, rows, n_pass, GGML_TYPE_I32)) {
        return false;
    }
    uint8_t * scratch_base = (uint8_t *) ggml_backend_buffer_get_base(plan.scratch.get());

    // every pass is queued before any is hashed (the passes reuse one scratch in stream order), with an event
    // after each: the caller hashes pass after pass while the device copies the rest
    kvf_events landed_ev(backend);

    const size_t n_passes = (n_rows + n_pass - 1)/n_pass;
    for (size_t p = 0; p < n_passes; ++p) {
        const size_t r0 = p*n_pass;
        const size_t n  = std::min(n_pass, n_rows - r0);

        ggml_context * ctx = kvf_pass_ctx(plan);
        ggml_cgraph  * gf  = ggml_new_graph_custom(ctx, kvf_pass_graph_size(plan.groups.size()), false);
        std::vector<ggml_tensor *> outs;
        for (const auto & g : plan.groups) {
            ggml_tensor * out = ggml_get_rows(ctx, g.alias, kvf_pass_ids(plan, ctx, r0, n, g.count)); // [words, n, count]
            ggml_backend_tensor_alloc(plan.scratch.get(), out, scratch_base + g.offset);
            ggml_build_forward_expand(gf, out);
            outs.push_back(out);
        }
        if (ggml_backend_graph_compute_async(backend, gf) != GGML_STATUS_SUCCESS) {
            throw llama_kv_freeze_error(ASRKF_EBACKEND, "offload: the gather graph failed on the device");
        }
        n_gathers++;
        for (size_t ig = 0; ig < plan.groups.size(); ++ig) {
            const auto & g = plan.groups[ig];
            for (size_t i = g.first; i < g.first + g.count; ++i) {
                const size_t rb = tensors[i]->nb[1];
                ggml_backend_tensor_get_async(backend, outs[ig], dst[i] + r0*rb, (i - g.first)*n*rb, n*rb);
                n_copies++;
            }
        }
        if (landed) {
            landed_ev.record();
        }
    }
    for (size_t p = 0; landed && p < n_passes; ++p) {
        landed_ev.wait(p);
        landed(p*n_pass, std::min(n_pass, n_rows - p*n_pass));
    }
    ggml_backend_synchronize(backend);

    return true;
}

// thaw's counterpart of gather(): rows[i] of every tensor := row i of src[t], with one set_rows per group of
// tensors on the device instead of a copy per run of cells. The cache is viewed as rows of 4-byte words typed
// F32, and set_rows from F32 to F32 moves them bit for bit, whatever the KV type. Every pass is queued at once
// and this returns without waiting for them (finish_copies() does): the caller verifies the host rows meanwhile.
// false: the caller writes per run.
bool llama_kv_freeze::scatter(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows,
        const std::vector<const uint8_t *> & src) {
    if (tensors.empty() || rows.empty()) {
        return true;
    }

    const size_t n_rows = rows.size();
    size_t n_pass = 0;
    ggml_backend_t backend = rows_backend(tensors, n_rows, n_pass);
    if (!backend) {
        return false;
    }

    scatter_rows = std::make_unique<llama_kv_freeze_rows>();
    auto & plan = *scatter_rows;
    if (!kvf_plan_rows(plan, backend, tensors, rows, n_pass, GGML_TYPE_F32)) {
        scatter_rows.reset();
        return false;
    }
    uint8_t * scratch_base = (uint8_t *) ggml_backend_buffer_get_base(plan.scratch.get());

    for (size_t r0 = 0; r0 < n_rows; r0 += n_pass) {
        const size_t n = std::min(n_pass, n_rows - r0);

        ggml_context * ctx = kvf_pass_ctx(plan);
        ggml_cgraph  * gf  = ggml_new_graph_custom(ctx, kvf_pass_graph_size(plan.groups.size()), false);
        for (const auto & g : plan.groups) {
            const size_t rb = tensors[g.first]->nb[1];
            ggml_tensor * in = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, (int64_t) (rb/4), (int64_t) n, (int64_t) g.count);
            ggml_backend_tensor_alloc(plan.scratch.get(), in, scratch_base + g.offset);
            for (size_t i = g.first; i < g.first + g.count; ++i) {
                ggml_backend_tensor_set_async(backend, in, src[i] + r0*rb, (i - g.first)*n*rb, n*rb);
                n_copies++;
            }
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, g.alias, in, kvf_pass_ids(plan, ctx, r0, n, g.count)));
        }
        if (ggml_backend_graph_compute_async(backend, gf) != GGML_STATUS_SUCCESS) {
            // nothing was recorded as thawed yet: the caller reports the failure and the host copies stay
            finish_copies();
            throw llama_kv_freeze_error(ASRKF_EBACKEND, "thaw: the scatter graph failed on the device");
        }
        n_gathers++;
    }
    return true;
}

// below this many runs of cells, offload copies per run instead of gathering on the device
static constexpr size_t kvf_gather_min_runs = 8;

// runs of i where cells and slots both advance by one: each run is one copy per layer and tensor
struct kvf_run {
    uint32_t first; // index into the cell/slot arrays
    uint32_t n;
};

static std::vector<kvf_run> kvf_runs(const std::vector<uint32_t> & cell, const std::vector<llama_kv_host_slot> & slot) {
    std::vector<kvf_run> runs;
    for (uint32_t i = 0; i < cell.size(); ++i) {
        if (!runs.empty()) {
            auto & r = runs.back();
            const uint32_t j = r.first + r.n - 1;
            if (cell[i] == cell[j] + 1 && slot[i].chunk == slot[j].chunk && slot[i].index == slot[j].index + 1) {
                r.n++;
                continue;
            }
        }
        runs.push_back({i, 1});
    }
    return runs;
}

//
// freeze
//

void llama_kv_freeze::freeze(llama_seq_id seq_id, const std::vector<llama_pos> & pos, bool frozen) {
    sync();

    const char * op = frozen ? "freeze" : "unfreeze";

    const auto idx = cells_of(seq_id, pos, op);

    // the flag is per cell: on a cell shared with another sequence it would freeze that sequence too
    auto & c = cells(seq_id);
    for (size_t i = 0; i < idx.size(); ++i) {
        if (c.seq_count(idx[i]) != 1) {
            KVF_FAIL(ASRKF_EREFUSED, "%s: the cell of position %d is shared with another sequence", op, pos[i]);
        }
    }
    for (const uint32_t i : idx) {
        c.set_frozen(i, frozen);
    }
}

//
// offload
//

void llama_kv_freeze::offload(llama_seq_id seq_id, const std::vector<llama_pos> & pos) {
    sync();

    if (pos.empty()) {
        return;
    }

    auto & c = cells(seq_id);

    if (c.get_has_shift()) {
        KVF_FAIL(ASRKF_EREFUSED, "offload: a K-shift is pending; decode once (or call llama_memory_update) first");
    }

    std::vector<uint32_t> idx = cells_of(seq_id, pos, "offload");

    const llama_pos pos_max = c.seq_pos_max(seq_id);
    for (size_t i = 0; i < idx.size(); ++i) {
        if (pos[i] == pos_max) {
            KVF_FAIL(ASRKF_EREFUSED, "offload: position %d is the newest of sequence %d; the next token must attend it", pos[i], seq_id);
        }
        if (c.seq_count(idx[i]) != 1) {
            KVF_FAIL(ASRKF_EREFUSED, "offload: the cell of position %d is shared with another sequence", pos[i]);
        }
    }

    // ascending cell order makes consecutive cells consecutive slots
    std::vector<uint32_t> order(idx.size());
    for (uint32_t i = 0; i < order.size(); ++i) {
        order[i] = i;
    }
    std::sort(order.begin(), order.end(), [&](uint32_t a, uint32_t b) { return idx[a] < idx[b]; });

    std::vector<uint32_t>  cell(order.size());
    std::vector<llama_pos> cpos(order.size());
    for (uint32_t i = 0; i < order.size(); ++i) {
        cell[i] = idx[order[i]];
        cpos[i] = pos[order[i]];
    }

    std::vector<llama_kv_host_slot> slot;
    try {
        slot = store.alloc((uint32_t) cell.size());
    } catch (const std::bad_alloc &) {
        KVF_FAIL(ASRKF_EBACKEND, "offload: out of host memory for %zu tokens (%zu bytes each)", cell.size(), store.token_bytes());
    }

    // nothing in the cache changes until every row is on the host and recorded
    try {
        std::vector<uint64_t> sums(cell.size(), 0);
        copy_to_host(stream(seq_id), cell, slot, sums.data());

        for (uint32_t i = 0; i < cell.size(); ++i) {
            llama_kv_freeze_record rec;
            rec.slot     = slot[i];
            rec.ext      = c.ext_get(cell[i]);
            rec.checksum = sums[i];
            rec.cell     = cell[i];

            records.emplace(std::make_pair(seq_id, cpos[i]), rec);
        }
    } catch (...) {
        finish_copies();
        for (uint32_t i = 0; i < cell.size(); ++i) {
            records.erase({seq_id, cpos[i]}); // new keys only: these positions were resident
            store.release(slot[i]);
        }
        throw;
    }

    for (const uint32_t i : cell) {
        c.rm(i);
    }

    epoch++;
}

void llama_kv_freeze::copy_to_host(uint32_t strm, const std::vector<uint32_t> & cell, const std::vector<llama_kv_host_slot> & slot, uint64_t * sums) {
    const auto runs = kvf_runs(cell, slot);

    const uint64_t kv_size = kv->get_size();
    const uint32_t n_layer = (uint32_t) layer_k.size();

    // hashing the host rows costs as much as copying them: it runs on the rows that landed while the device
    // copies the next ones (by pass of a gather, or by layer of the per-run copies); hashed_to says how far
    uint32_t hashed_to = 0; // layers [0, hashed_to) hashed for every slot
    auto hash_layers = [&](uint32_t il1) {
        if (sums && il1 > hashed_to) {
            store.checksum_add(slot.data(), slot.size(), hashed_to, il1, sums);
            hashed_to = il1;
        }
    };

    std::vector<uint8_t> staging;

    // K (and V unless transposed) of every layer: one gather per tensor where the device can, else a copy per run
    std::vector<ggml_tensor *> gather_t;
    std::vector<uint8_t *>     gather_dst;
    std::vector<std::pair<uint32_t, bool>> gather_what; // (layer, is_v)

    // gathered rows land back to back: straight into the slots when they are one run in one chunk
    const bool slots_contiguous = runs.size() == 1 || std::all_of(slot.begin(), slot.end(), [&](const llama_kv_host_slot & sl) {
        return sl.chunk == slot[0].chunk && sl.index == slot[0].index + (&sl - slot.data());
    });
    std::vector<std::vector<uint8_t>> gather_staging;

    // a gather is a graph and a scratch buffer on the device: for a few runs, plain copies cost less
    const bool few_runs = runs.size() < kvf_gather_min_runs && !force_gather;

    for (uint32_t il = 0; il < n_layer; ++il) {
        for (const bool is_v : { false, true }) {
            ggml_tensor * t = is_v ? layer_v[il] : layer_k[il];
            if ((is_v && kv->v_trans) || few_runs || !can_gather(t)) {
                continue;
            }
            gather_t.push_back(t);
            gather_what.emplace_back(il, is_v);
            if (slots_contiguous) {
                gather_dst.push_back(is_v ? store.v_row(slot[0], il) : store.k_row(slot[0], il));
            } else {
                gather_staging.emplace_back(cell.size()*t->nb[1]);
                gather_dst.push_back(gather_staging.back().data());
            }
        }
    }

    // every row of a pass in its slot as the pass lands: hash that pass's slots, all layers
    const bool gather_all = gather_t.size() == 2*(size_t) n_layer && slots_contiguous;
    std::function<void(size_t, size_t)> landed;
    if (sums && gather_all) {
        landed = [&](size_t r0, size_t n) {
            store.checksum_add(slot.data() + r0, n, 0, n_layer, sums + r0);
        };
    }

    std::vector<int32_t> rows(cell.size());
    for (size_t i = 0; i < cell.size(); ++i) {
        rows[i] = (int32_t) (strm*kv_size + cell[i]);
    }
    if (!gather(gather_t, rows, gather_dst, landed)) {
        gather_t.clear();
        gather_what.clear();
        gather_staging.clear();
    } else if (landed) {
        hashed_to = n_layer;
    }
    for (size_t g = 0; g < gather_staging.size(); ++g) {
        const auto [il, is_v] = gather_what[g];
        const size_t rb = gather_t[g]->nb[1];
        for (size_t i = 0; i < cell.size(); ++i) {
            memcpy(is_v ? store.v_row(slot[i], il) : store.k_row(slot[i], il), gather_staging[g].data() + i*rb, rb);
        }
    }
    auto gathered = [&](uint32_t il, bool is_v) {
        return std::find(gather_what.begin(), gather_what.end(), std::make_pair(il, is_v)) != gather_what.end();
    };

    // per-run copies of every layer are queued first, with an event after each group of layers of at least
    // 16 MiB of rows (smaller units cost more in waking the hashing threads); then the host hashes group after
    // group while the device copies the rest
    ggml_backend_t ev_backend = gather_t.empty() && sums && !kv->v_trans ? backend_for(layer_k[0]) : nullptr;
    for (uint32_t il = 0; ev_backend && il < n_layer; ++il) {
        for (const ggml_tensor * t : { layer_k[il], layer_v[il] }) {
            if (!t->buffer || ggml_backend_buffer_is_host(t->buffer) || backend_for(t) != ev_backend) {
                ev_backend = nullptr; // copies of several devices or plain memcpys: hash after all of them
            }
        }
    }
    std::unique_ptr<kvf_events> layer_ev;
    std::vector<uint32_t>       layer_ev_end; // layers [0, end) have landed once event i fired
    if (ev_backend) {
        layer_ev = std::make_unique<kvf_events>(ev_backend);
    }
    uint32_t group_start = 0;

    for (uint32_t il = 0; il < n_layer; ++il) {
        ggml_tensor * k = layer_k[il];
        ggml_tensor * v = layer_v[il];

        const size_t kb = store.k_row_bytes(il);
        const size_t vb = store.v_row_bytes(il);

        // decided once per layer, not per run: the lookup scans every gathered tensor
        const bool copy_k = !gathered(il, false);
        const bool copy_v = !kv->v_trans && !gathered(il, true);
        for (size_t ir = 0; (copy_k || copy_v) && ir < runs.size(); ++ir) {
            const auto & r = runs[ir];
            const size_t row0 = strm*kv_size + cell[r.first];
            if (copy_k) {
                read(k, row0*k->nb[1], r.n*kb, store.k_row(slot[r.first], il));
            }
            if (copy_v) {
                read(v, row0*v->nb[1], r.n*vb, store.v_row(slot[r.first], il));
            }
        }

        if (kv->v_trans) {
            // cell i, channel j lives at (j*kv_size + i): gather channel-major, then transpose into the slots
            const size_t  es   = ggml_type_size(v->type);
            const int64_t n_ch = v->ne[0];

            staging.resize(cell.size()*n_ch*es);
            for (const auto & r : runs) {
                for (int64_t j = 0; j < n_ch; ++j) {
                    const size_t off = strm*v->nb[2] + (j*kv_size + cell[r.first])*es;
                    read(v, off, r.n*es, staging.data() + (j*cell.size() + r.first)*es);
                }
            }
            finish_copies();
            for (uint32_t i = 0; i < cell.size(); ++i) {
                uint8_t * dst = store.v_row(slot[i], il);
                for (int64_t j = 0; j < n_ch; ++j) {
                    memcpy(dst + j*es, staging.data() + (j*cell.size() + i)*es, es);
                }
            }
        }

        if (layer_ev && (il + 1 == n_layer || (il + 1 - group_start)*(store.token_bytes()/n_layer)*cell.size() >= (16u << 20))) {
            layer_ev->record();
            layer_ev_end.push_back(il + 1);
            group_start = il + 1;
        }
    }
    for (size_t g = 0; g < layer_ev_end.size(); ++g) {
        layer_ev->wait(g);
        hash_layers(layer_ev_end[g]);
    }

    finish_copies();
    hash_layers(n_layer);
}

//
// thaw
//

void llama_kv_freeze::thaw(llama_seq_id seq_id, const std::vector<llama_pos> & pos, bool frozen) {
    sync();

    if (pos.empty()) {
        return;
    }

    auto & c = cells(seq_id);

    llama_kv_freeze_check_unique(pos, "thaw");

    std::vector<llama_pos> sorted = pos;
    std::sort(sorted.begin(), sorted.end());

    std::vector<const llama_kv_freeze_record *> rec;
    const auto & sp = c.seq_pos_get(seq_id);
    for (const llama_pos p : sorted) {
        auto r = sp.lower_bound({p, 0u});
        if (r != sp.end() && r->first == p) {
            KVF_FAIL(ASRKF_EINVAL, "thaw: position %d of sequence %d is resident, not offloaded", p, seq_id);
        }
        auto it = records.find({seq_id, p});
        if (it == records.end()) {
            KVF_FAIL(ASRKF_EINVAL, "thaw: position %d of sequence %d is not offloaded", p, seq_id);
        }
        rec.push_back(&it->second);
    }

    const uint32_t n = (uint32_t) sorted.size();

    // destination cells: the original cells when all are still free (the computation is then bit-identical to
    // one that never offloaded), else the first run of n free cells, else the lowest free cells
    std::vector<uint32_t> cell;
    {
        std::set<uint32_t> seen;
        for (size_t i = 0; i < rec.size() && c.is_empty(rec[i]->cell) && seen.insert(rec[i]->cell).second; ++i) {
            cell.push_back(rec[i]->cell);
        }
    }
    if (cell.size() != rec.size()) {
        cell.clear();
        uint32_t run = 0;
        for (uint32_t i = 0; i < c.size(); ++i) {
            run = c.is_empty(i) ? run + 1 : 0;
            if (run == n) {
                for (uint32_t j = i + 1 - n; j <= i; ++j) {
                    cell.push_back(j);
                }
                break;
            }
        }
        if (cell.empty()) {
            for (uint32_t i = 0; i < c.size() && cell.size() < n; ++i) {
                if (c.is_empty(i)) {
                    cell.push_back(i);
                }
            }
        }
        if (cell.size() < n) {
            KVF_FAIL(ASRKF_EREFUSED, "thaw: %u positions need %u free cells, the cache has %u", n, n, (uint32_t) cell.size());
        }
    }

    std::vector<llama_kv_host_slot> slot(n);
    for (uint32_t i = 0; i < n; ++i) {
        slot[i] = rec[i]->slot;
    }

    const auto runs = kvf_runs(cell, slot);

    const uint32_t strm    = stream(seq_id);
    const uint64_t kv_size = kv->get_size();

    std::vector<uint8_t> staging;

    // many runs on a device: one set_rows per tensor (scatter) instead of a copy per run, layer and tensor
    std::vector<ggml_tensor *>   scatter_t;
    std::vector<const uint8_t *> scatter_src;
    std::vector<std::vector<uint8_t>> scatter_staging;
    if (runs.size() >= kvf_gather_min_runs || force_gather) {
        const bool slots_contiguous = std::all_of(slot.begin(), slot.end(), [&](const llama_kv_host_slot & sl) {
            return sl.chunk == slot[0].chunk && sl.index == slot[0].index + (&sl - slot.data());
        });
        for (uint32_t il = 0; il < layer_k.size(); ++il) {
            for (const bool is_v : { false, true }) {
                ggml_tensor * t = is_v ? layer_v[il] : layer_k[il];
                if ((is_v && kv->v_trans) || !can_gather(t)) {
                    continue;
                }
                scatter_t.push_back(t);
                if (slots_contiguous) {
                    scatter_src.push_back(is_v ? store.v_row(slot[0], il) : store.k_row(slot[0], il));
                } else {
                    const size_t rb = t->nb[1];
                    scatter_staging.emplace_back(n*rb);
                    for (uint32_t i = 0; i < n; ++i) {
                        memcpy(scatter_staging.back().data() + i*rb, is_v ? store.v_row(slot[i], il) : store.k_row(slot[i], il), rb);
                    }
                    scatter_src.push_back(scatter_staging.back().data());
                }
            }
        }
        std::vector<int32_t> rows(n);
        for (uint32_t i = 0; i < n; ++i) {
            rows[i] = (int32_t) (strm*kv_size + cell[i]);
        }
        if (!scatter(scatter_t, rows, scatter_src)) {
            scatter_t.clear();
        }
    }
    auto scattered = [&](const ggml_tensor * t) {
        return std::find(scatter_t.begin(), scatter_t.end(), t) != scatter_t.end();
    };

    for (uint32_t il = 0; il < layer_k.size(); ++il) {
        ggml_tensor * k = layer_k[il];
        ggml_tensor * v = layer_v[il];

        const size_t kb = store.k_row_bytes(il);
        const size_t vb = store.v_row_bytes(il);

        // decided once per layer, not per run: the lookup scans every scattered tensor
        const bool copy_k = !scattered(k);
        const bool copy_v = !kv->v_trans && !scattered(v);
        for (size_t ir = 0; (copy_k || copy_v) && ir < runs.size(); ++ir) {
            const auto & r = runs[ir];
            const size_t row0 = strm*kv_size + cell[r.first];
            if (copy_k) {
                write(k, row0*k->nb[1], r.n*kb, store.k_row(slot[r.first], il));
            }
            if (copy_v) {
                write(v, row0*v->nb[1], r.n*vb, store.v_row(slot[r.first], il));
            }
        }

        if (kv->v_trans) {
            const size_t  es   = ggml_type_size(v->type);
            const int64_t n_ch = v->ne[0];

            // the staging buffer must outlive the async copies: one per layer, synchronized before reuse
            finish_copies();
            staging.resize((size_t) n*n_ch*es);
            for (uint32_t i = 0; i < n; ++i) {
                const uint8_t * src = store.v_row(slot[i], il);
                for (int64_t j = 0; j < n_ch; ++j) {
                    memcpy(staging.data() + (j*n + i)*es, src + j*es, es);
                }
            }
            for (const auto & r : runs) {
                for (int64_t j = 0; j < n_ch; ++j) {
                    const size_t off = strm*v->nb[2] + (j*kv_size + cell[r.first])*es;
                    write(v, off, r.n*es, staging.data() + (j*n + r.first)*es);
                }
            }
        }
    }

    // verify while the copies run: the rows land in free cells, which no attention reads until the cells are
    // given their positions below, so a corrupted row is refused before it can reach attention
    std::vector<uint64_t> sums(n);
    store.checksums(slot.data(), n, sums.data());

    finish_copies();

    for (uint32_t i = 0; i < n; ++i) {
        if (sums[i] != rec[i]->checksum) {
            KVF_FAIL(ASRKF_ECHECKSUM, "thaw: the host copy of position %d of sequence %d failed its checksum; nothing was restored",
                    sorted[i], seq_id);
        }
    }

    for (uint32_t i = 0; i < n; ++i) {
        c.pos_set(cell[i], sorted[i]);
        c.ext_set(cell[i], rec[i]->ext);
        c.seq_add(cell[i], seq_id);
        if (frozen) {
            c.set_frozen(cell[i], true);
        }

        store.release(slot[i]);
        records.erase({seq_id, sorted[i]});
    }

    epoch++;
}

//
// host reads
//

void llama_kv_freeze::k_rows(llama_seq_id seq_id, int32_t il, const std::vector<llama_pos> & pos, uint8_t * out, size_t size) {
    sync();

    const int32_t ikv = layer_index(il);
    if (ikv < 0) {
        KVF_FAIL(ASRKF_EINVAL, "k_rows: layer %d has no K/V in the managed cache", il);
    }
    const uint32_t strm = stream(seq_id);

    const size_t kb = store.k_row_bytes(ikv);
    if (size < pos.size()*kb) {
        KVF_FAIL(ASRKF_EINVAL, "k_rows: the output holds %zu bytes, %zu positions need %zu", size, pos.size(), pos.size()*kb);
    }

    // each position is offloaded (host copy) or resident (read from its cell); validate all before copying
    const auto & sp = cells(seq_id).seq_pos_get(seq_id);
    std::vector<int64_t> cell(pos.size(), -1);
    for (size_t i = 0; i < pos.size(); ++i) {
        if (records.count({seq_id, pos[i]})) {
            continue;
        }
        auto it = sp.lower_bound({pos[i], 0u});
        if (it == sp.end() || it->first != pos[i]) {
            KVF_FAIL(ASRKF_EINVAL, "k_rows: position %d is not in sequence %d", pos[i], seq_id);
        }
        cell[i] = it->second;
    }

    // resident rows: one copy per run of consecutive cells that land in consecutive output rows
    ggml_tensor * k = layer_k[ikv];
    for (size_t i = 0; i < pos.size();) {
        if (cell[i] < 0) {
            memcpy(out + i*kb, store.k_row(records.at({seq_id, pos[i]}).slot, ikv), kb);
            ++i;
            continue;
        }
        size_t n = 1;
        while (i + n < pos.size() && cell[i + n] == cell[i] + (int64_t) n) {
            ++n;
        }
        read(k, (strm*kv->get_size() + (size_t) cell[i])*k->nb[1], n*kb, out + i*kb);
        i += n;
    }
    finish_copies();
}

void llama_kv_freeze::debug_corrupt(llama_seq_id seq_id, llama_pos pos, uint64_t byte) {
    sync();

    auto it = records.find({seq_id, pos});
    if (it == records.end()) {
        KVF_FAIL(ASRKF_EINVAL, "debug_corrupt: position %d of sequence %d is not offloaded", pos, seq_id);
    }
    if (byte >= store.token_bytes()) {
        KVF_FAIL(ASRKF_EINVAL, "debug_corrupt: byte %" PRIu64 " is past the %zu bytes of a token", byte, store.token_bytes());
    }

    // walk the per-layer rows to find the byte
    uint64_t rest = byte;
    for (uint32_t il = 0; il < store.n_layer(); ++il) {
        if (rest < store.k_row_bytes(il)) {
            store.k_row(it->second.slot, il)[rest] ^= 0x5a;
            return;
        }
        rest -= store.k_row_bytes(il);
        if (rest < store.v_row_bytes(il)) {
            store.v_row(it->second.slot, il)[rest] ^= 0x5a;
            return;
        }
        rest -= store.v_row_bytes(il);
    }
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

    if (store.bytes_used() != records.size()*store.token_bytes()) {
        KVF_FAIL(ASRKF_EINVAL, "check: the host store holds %zu bytes for %zu records", store.bytes_used(), records.size());
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
// hooks
//

void llama_kv_freeze::on_clear() {
    records.clear();
    store.clear();
    epoch++;
}

void llama_kv_freeze::on_seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    for (auto it = records.begin(); it != records.end();) {
        const auto & [s, p] = it->first;
        if ((seq_id < 0 || s == seq_id) && p >= p0 && p < p1) {
            store.release(it->second.slot);
            it = records.erase(it);
        } else {
            ++it;
        }
    }
    epoch++;
}

void llama_kv_freeze::on_seq_keep(llama_seq_id seq_id) {
    for (auto it = records.begin(); it != records.end();) {
        if (it->first.first != seq_id) {
            store.release(it->second.slot);
            it = records.erase(it);
        } else {
            ++it;
        }
    }
    epoch++;
}

bool llama_kv_freeze::has_offloaded(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    for (const auto & [key, rec] : records) {
        if ((seq_id < 0 || key.first == seq_id) && key.second >= p0 && key.second < p1) {
            return true;
        }
    }
    return false;
}

void llama_kv_freeze_on_clear(llama_kv_freeze * kvf) {
    kvf->on_clear();
}

void llama_kv_freeze_on_seq_rm(llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    kvf->on_seq_rm(seq_id, p0, p1);
}

void llama_kv_freeze_on_seq_keep(llama_kv_freeze * kvf, llama_seq_id seq_id) {
    kvf->on_seq_keep(seq_id);
}

// a refused llama.cpp call returns nothing that says why: the reason goes to the log and to asrkf_last_error()
static bool kvf_refuse(const std::string & msg) {
    LLAMA_LOG_ERROR("%s\n", msg.c_str());
    asrkf_set_last_error(ASRKF_EREFUSED, msg);
    return false;
}

static bool kvf_refuse(const char * op, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    return kvf_refuse(fmt_error("%s: refused: sequence %d has positions offloaded to host memory in [%d, %d) that this would "
            "skip or overwrite; thaw them first", op, seq_id, p0, p1 < 0 ? std::numeric_limits<llama_pos>::max() : p1));
}

llama_pos llama_kv_freeze::frozen_in(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    const auto & c = kv->v_cells[0];
    if ((size_t) seq_id >= kv->seq_to_stream.size() && seq_id >= 0) {
        return -1; // llama.cpp's own checks refuse it
    }
    if (seq_id < 0) {
        for (uint32_t i = 0; i < c.size(); ++i) {
            if (!c.is_empty(i) && c.is_frozen(i) && c.pos_get(i) >= p0 && c.pos_get(i) < p1) {
                return c.pos_get(i);
            }
        }
        return -1;
    }
    const auto & sp = c.seq_pos_get(seq_id);
    for (auto it = sp.lower_bound({p0, 0u}); it != sp.end() && it->first < p1; ++it) {
        if (c.is_frozen(it->second)) {
            return it->first;
        }
    }
    return -1;
}

llama_pos llama_kv_freeze::offloaded_max_after_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    const auto lo = records.lower_bound({seq_id, std::numeric_limits<llama_pos>::min()});
    for (auto it = records.lower_bound({seq_id + 1, std::numeric_limits<llama_pos>::min()}); it != lo;) {
        --it;
        const llama_pos p = it->first.second;
        if (p < p0 || p >= p1) {
            return p;
        }
    }
    return -1;
}

llama_pos llama_kv_freeze::resident_max_after_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) const {
    const auto & sp = kv->v_cells[kv->seq_to_stream[seq_id]].seq_pos_get(seq_id);
    if (sp.empty()) {
        return -1;
    }
    const llama_pos p_max = sp.rbegin()->first;
    if (p_max < p0 || p_max >= p1) {
        return p_max;
    }
    // the newest position is removed, and with it everything up to it from p0: the newest one below p0 is left
    const auto it = sp.lower_bound({p0, 0u});
    return it == sp.begin() ? -1 : std::prev(it)->first;
}

bool llama_kv_freeze_allow_seq_rm(const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    // every offloaded position must stay below the newest resident one: the next decode of a sequence goes right
    // after its newest resident position, and would otherwise give an offloaded position a second, resident copy
    for (auto it = kvf->records.begin(); it != kvf->records.end();) {
        const llama_seq_id s = it->first.first;
        it = kvf->records.lower_bound({s + 1, std::numeric_limits<llama_pos>::min()});
        if (seq_id >= 0 && s != seq_id) {
            continue;
        }
        const llama_pos off = kvf->offloaded_max_after_rm(s, p0, p1);
        const llama_pos res = kvf->resident_max_after_rm(s, p0, p1);
        if (off >= 0 && off > res) {
            return kvf_refuse(fmt_error("seq_rm: refused: removing [%d, %d) of sequence %d would leave its offloaded position %d "
                    "above its newest resident position (%d), and the next decode would give that position a second copy; "
                    "thaw the offloaded positions above the new end first, or include them in the removal",
                    p0, p1, s, off, res));
        }
    }
    return true;
}

bool llama_kv_freeze_allow_seq_cp(const llama_kv_freeze * kvf, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1) {
    if (seq_id_src == seq_id_dst) {
        return true; // nothing to copy
    }
    // the source would lose them in the copy; the target would get a resident twin of its own offloaded positions
    for (const llama_seq_id s : { seq_id_src, seq_id_dst }) {
        if (kvf->has_offloaded(s, p0, p1)) {
            return kvf_refuse("seq_cp", s, p0, p1);
        }
    }
    // the frozen flag is per cell and the copy shares the cell: the target would start out with the mask
    const llama_pos pf = kvf->frozen_in(seq_id_src, p0, p1);
    if (pf >= 0) {
        return kvf_refuse(fmt_error("seq_cp: refused: position %d of sequence %d is frozen, and a copy to sequence %d would "
                "share its cell and its mask; unfreeze the range first", pf, seq_id_src, seq_id_dst));
    }
    return true;
}

bool llama_kv_freeze_allow_seq_add(const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    // the moved range and where it lands
    const llama_pos lo = std::min(std::max(p0, 0), std::max(p0, 0) + shift);
    const llama_pos hi = p1 < 0 ? -1 : std::max(p1, p1 + shift);
    return !kvf->has_offloaded(seq_id, lo, hi) || kvf_refuse("seq_add", seq_id, lo, hi);
}

bool llama_kv_freeze_allow_seq_div(const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    const llama_pos lo = d > 0 ? std::max(p0, 0) / d : 0;
    return !kvf->has_offloaded(seq_id, lo, p1) || kvf_refuse("seq_div", seq_id, lo, p1);
}

bool llama_kv_freeze_allow_state(const llama_kv_freeze * kvf, const char * op, llama_seq_id seq_id) {
    if (kvf->has_offloaded(seq_id, 0, -1)) {
        return kvf_refuse(op, seq_id, 0, -1);
    }
    // a snapshot holds no frozen flags: the cells it restores would come back active (op is the __func__ of
    // llama_kv_cache::state_write / state_read; a load replaces the sequence's cells, flags included)
    if (strcmp(op, "state_write") == 0) {
        const llama_pos pf = kvf->frozen_in(seq_id, 0, -1);
        if (pf >= 0) {
            return kvf_refuse(fmt_error("state_write: refused: position %d%s is frozen and a snapshot does not hold the "
                    "frozen flags; unfreeze first", pf, seq_id < 0 ? "" : fmt_error(" of sequence %d", seq_id).c_str()));
        }
    }
    return true;
}

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
            if (!kvf->records.empty() && !force) {
                KVF_FAIL(ASRKF_EREFUSED, "%zu positions are offloaded and would be lost; thaw them or free with force",
                        kvf->records.size());
            }
            kvf->lctx->synchronize();
            g_kvf_by_ctx.erase(kvf->lctx);
        }
    }
    // out of the registry, so the context's destructor cannot reach it any more; the registry lock is still held
    // until the destructor has detached from the context
    delete kvf;
}
