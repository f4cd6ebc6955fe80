#include "llama-kv-freeze.h"

#include "asrkf.h"
#include "llama-kv-freeze-rows.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"

#include "ggml-cpp.h"

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstring>

using kvf_clock = std::chrono::steady_clock;

// row copies between the device cache and host memory: per run of cells, or gathered / scattered on the device in
// passes through a bounded scratch buffer

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
    scatter_rows.clear();
    copies_in_flight.clear();
}

std::vector<std::pair<uint32_t, bool>> llama_kv_freeze::copy_host_runs(uint32_t strm, const std::vector<uint32_t> & cell,
        const std::vector<llama_kv_host_slot> & slot, const std::vector<kvf_run> & runs, bool to_host,
        const std::function<bool(uint32_t, bool)> & skip) {
    std::vector<std::pair<uint32_t, bool>> what;
    for (uint32_t il = 0; il < layer_k.size(); ++il) {
        for (const bool is_v : { false, true }) {
            const ggml_tensor * t = is_v ? layer_v[il] : layer_k[il];
            if ((is_v && kv->v_trans) || !t->buffer || !ggml_backend_buffer_is_host(t->buffer) || skip(il, is_v)) {
                continue;
            }
            what.emplace_back(il, is_v);
        }
    }
    // one memcpy per run is microseconds: spread when there are many of them, or when the runs are long (a
    // contiguous move of 1,024 tokens is one run per tensor, 2 MiB each for Llama-3-8B's f16 rows: on one thread the
    // H200's host copied 8.2 GB/s, spread over the store's threads scattered moves ran at 18.8, docs/gpu.md)
    size_t bytes = 0;
    for (const auto & [il, is_v] : what) {
        bytes += cell.size()*(is_v ? store.v_row_bytes(il) : store.k_row_bytes(il));
    }
    if (what.size() < 2 || (what.size()*runs.size() < 256 && bytes < (8u << 20))) {
        return {};
    }
    const uint64_t kv_size = kv->get_size();
    store.parallel_for(what.size(), [&](size_t i) {
        const auto [il, is_v] = what[i];
        ggml_tensor * t = is_v ? layer_v[il] : layer_k[il];
        const size_t rb = is_v ? store.v_row_bytes(il) : store.k_row_bytes(il);
        for (const auto & r : runs) {
            uint8_t * dev  = (uint8_t *) t->data + (strm*kv_size + cell[r.first])*t->nb[1];
            uint8_t * host = is_v ? store.v_row(slot[r.first], il) : store.k_row(slot[r.first], il);
            if (to_host) {
                memcpy(host, dev, r.n*rb);
            } else {
                memcpy(dev, host, r.n*rb);
            }
        }
    });
    n_copies += what.size()*runs.size();
    return what;
}

ggml_backend_buffer_t llama_kv_freeze::device_buffer(ggml_backend_t backend, int which, size_t size) {
    // kept across moves and grown when a move needs more: a device allocation and free per move cost about as
    // much as moving a few hundred tokens. Every move waits for its copies before it returns, so the next one
    // may reuse the buffer
    auto & buf = dev_buffers[backend][which];
    if (buf && ggml_backend_buffer_get_size(buf) >= size) {
        return buf;
    }
    if (buf) {
        // grown by half at least, up to the largest pass: a prompt's offloads differ by a few tokens, and each
        // regrowth is a device free (which waits for the device) and an allocation
        const size_t grown = ggml_backend_buffer_get_size(buf) + ggml_backend_buffer_get_size(buf)/2;
        size = std::max(size, which == 1 ? std::min(grown, std::max(scratch_bytes, deferred_scratch_bytes)) : grown);
        ggml_backend_buffer_free(buf);
    }
    buf = ggml_backend_alloc_buffer(backend, size);
    return buf;
}

size_t llama_kv_freeze::gatherable(std::vector<ggml_tensor *> & tensors, std::vector<std::pair<uint32_t, bool>> & what) const {
    size_t row_bytes = 0;
    for (uint32_t il = 0; il < layer_k.size(); ++il) {
        for (const bool is_v : { false, true }) {
            ggml_tensor * t = is_v ? layer_v[il] : layer_k[il];
            if ((is_v && kv->v_trans) || !can_gather(t)) {
                continue;
            }
            tensors.push_back(t);
            what.emplace_back(il, is_v);
            row_bytes += t->nb[1];
        }
    }
    return row_bytes;
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
ggml_backend_t llama_kv_freeze::rows_backend(const std::vector<ggml_tensor *> & tensors, size_t n_rows, size_t & n_pass, size_t scratch) {
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
    if (scratch == 0) {
        scratch = scratch_bytes;
    }
    n_pass = std::min(n_rows, std::max<size_t>(1, scratch / bytes_per_row));
    return backend;
}

// ggml's RPC backend: its wire format (rpc_tensor) has 32-bit ne[] and nb[]
static bool kvf_is_rpc(ggml_backend_t backend) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    return reg && strncmp(ggml_backend_reg_name(reg), "RPC", 3) == 0;
}

static bool kvf_plan_rows(llama_kv_freeze_rows & plan, ggml_backend_t backend, const std::vector<ggml_tensor *> & tensors,
        const std::vector<int32_t> & rows, size_t n_pass, ggml_type word_type,
        const std::function<ggml_backend_buffer_t(int, size_t)> & device_buffer) {
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

    // the RPC backend sends a tensor's sizes and strides as 32-bit numbers: an alias spanning 4 GiB or more would
    // reach the server truncated, so those tensors are aliased one by one, and one that is itself that large is
    // left to the per-run copies (offsets there are 64-bit)
    const bool rpc = kvf_is_rpc(backend);
    const size_t rpc_max = UINT32_MAX;
    if (rpc && uniform && (n_t - 1)*stride + ggml_nbytes(t0) > rpc_max) {
        uniform = false;
    }

    auto make_alias = [&](const ggml_tensor * t, size_t count) -> ggml_tensor * {
        const int64_t words = (int64_t) (t->nb[1]/4);
        const int64_t n_row = (int64_t) (ggml_nbytes(t)/t->nb[1]);
        const size_t  span  = (count - 1)*stride + ggml_nbytes(t);
        if (rpc && span > rpc_max) {
            LLAMA_LOG_WARN("%s: %s is 4 GiB or more, more than the RPC backend can alias: copying per run of cells\n",
                    __func__, t->name);
            return nullptr;
        }
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

    plan.idx_buf = device_buffer(0, ggml_nbytes(plan.idx));
    plan.scratch = device_buffer(1, size);
    if (!plan.idx_buf || !plan.scratch ||
            ggml_backend_tensor_alloc(plan.idx_buf, plan.idx, ggml_backend_buffer_get_base(plan.idx_buf)) != GGML_STATUS_SUCCESS) {
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
    bool                              sync_at_end = true; // false: what was queued may still run after us

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
        if (sync_at_end) {
            ggml_backend_synchronize(backend);
        }
        for (auto * e : ev) {
            if (e) {
                ggml_backend_event_free(e);
            }
        }
    }
};

// fn(a, m) for each part [a, a + m) of a run that overlaps the rows [r0, r0 + n) of a pass (runs ascending, covering
// every row)
template <typename F>
static void kvf_for_runs_in(const std::vector<kvf_run> & runs, size_t r0, size_t n, F && fn) {
    auto it = std::upper_bound(runs.begin(), runs.end(), r0, [](size_t r, const kvf_run & run) { return r < run.first; });
    if (it != runs.begin()) {
        --it;
    }
    for (; it != runs.end() && it->first < r0 + n; ++it) {
        const size_t a = std::max<size_t>(r0, it->first);
        const size_t b = std::min<size_t>(r0 + n, (size_t) it->first + it->n);
        if (b > a) {
            fn(a, b - a);
        }
    }
}

std::vector<std::vector<size_t>> llama_kv_freeze::by_backend(const std::vector<ggml_tensor *> & tensors) {
    std::vector<ggml_backend_t>      backend_of;
    std::vector<std::vector<size_t>> groups;
    for (size_t i = 0; i < tensors.size(); ++i) {
        ggml_backend_t b = backend_for(tensors[i]);
        if (!b) {
            return {};
        }
        const size_t g = std::find(backend_of.begin(), backend_of.end(), b) - backend_of.begin();
        if (g == backend_of.size()) {
            backend_of.push_back(b);
            groups.emplace_back();
        }
        groups[g].push_back(i);
    }
    return groups;
}

bool llama_kv_freeze::gather(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows,
        const std::vector<kvf_run> & runs, const std::function<uint8_t *(size_t, size_t)> & dst,
        const std::function<void(size_t, size_t)> & landed, bool leave_copies, const std::function<void()> & while_queued) {
    const auto groups = by_backend(tensors);
    if (groups.size() <= 1) {
        return gather_on(tensors, rows, runs, dst, landed, leave_copies, while_queued);
    }
    // the devices one after the other (each waits for its copies); the rows have landed once all have. A device
    // that cannot gather leaves the whole move to the per-run copies, which rewrite what the others gathered
    for (size_t ig = 0; ig < groups.size(); ++ig) {
        const auto & g = groups[ig];
        std::vector<ggml_tensor *> sub;
        for (const size_t i : g) {
            sub.push_back(tensors[i]);
        }
        if (!gather_on(sub, rows, runs, [&](size_t j, size_t a) { return dst(g[j], a); }, nullptr, leave_copies && !landed,
                       ig == 0 ? while_queued : nullptr)) {
            return false;
        }
    }
    if (landed) {
        landed(0, rows.size());
    }
    return true;
}

bool llama_kv_freeze::scatter(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows,
        const std::vector<kvf_run> & runs, const std::function<const uint8_t *(size_t, size_t)> & src) {
    const auto groups = by_backend(tensors);
    if (groups.size() <= 1) {
        return scatter_on(tensors, rows, runs, src);
    }
    // every device's passes queued on its own stream (finish_copies() waits for all); false: the caller writes per
    // run, the same rows the queued scatters write
    for (const auto & g : groups) {
        std::vector<ggml_tensor *> sub;
        for (const size_t i : g) {
            sub.push_back(tensors[i]);
        }
        if (!scatter_on(sub, rows, runs, [&src, &g](size_t j, size_t a) { return src(g[j], a); })) {
            return false;
        }
    }
    return true;
}

bool llama_kv_freeze::gather_on(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows,
        const std::vector<kvf_run> & runs, const std::function<uint8_t *(size_t, size_t)> & dst,
        const std::function<void(size_t, size_t)> & landed, bool leave_copies, const std::function<void()> & while_queued) {
    if (tensors.empty() || rows.empty()) {
        return true;
    }

    const auto t_start = kvf_clock::now();
    const size_t n_rows = rows.size();
    leave_copies = leave_copies && !landed;
    size_t n_pass = 0;
    // left copies: one pass if the scratch may grow to it, so that the whole copy runs behind the next decode
    ggml_backend_t backend = rows_backend(tensors, n_rows, n_pass,
            leave_copies ? std::max(scratch_bytes, deferred_scratch_bytes) : 0);
    if (!backend) {
        return false;
    }

    llama_kv_freeze_rows plan;
    if (!kvf_plan_rows(plan, backend, tensors, rows, n_pass, GGML_TYPE_I32,
            [&](int which, size_t size) { return device_buffer(backend, which, size); })) {
        return false;
    }
    uint8_t * scratch_base = (uint8_t *) ggml_backend_buffer_get_base(plan.scratch);
    const auto t_planned = kvf_clock::now();

    // every pass is queued before any is hashed (the passes reuse one scratch in stream order), with an event
    // after each: the caller hashes pass after pass while the device copies the rest
    kvf_events landed_ev(backend);
    // leave_copies: an event after the last pass's rows are read (the passes before it, copies included, are done
    // then, in stream order); its copy to the host goes on while the caller decodes the next tokens
    ggml_backend_event_t rows_read = nullptr;

    const size_t n_passes = (n_rows + n_pass - 1)/n_pass;
    for (size_t p = 0; p < n_passes; ++p) {
        const size_t r0 = p*n_pass;
        const size_t n  = std::min(n_pass, n_rows - r0);

        ggml_context * ctx = kvf_pass_ctx(plan);
        ggml_cgraph  * gf  = ggml_new_graph_custom(ctx, kvf_pass_graph_size(plan.groups.size()), false);
        std::vector<ggml_tensor *> outs;
        for (const auto & g : plan.groups) {
            ggml_tensor * out = ggml_get_rows(ctx, g.alias, kvf_pass_ids(plan, ctx, r0, n, g.count)); // [words, n, count]
            ggml_backend_tensor_alloc(plan.scratch, out, scratch_base + g.offset);
            ggml_build_forward_expand(gf, out);
            outs.push_back(out);
        }
        if (ggml_backend_graph_compute_async(backend, gf) != GGML_STATUS_SUCCESS) {
            throw llama_kv_freeze_error(ASRKF_EBACKEND, "offload: the gather graph failed on the device");
        }
        n_gathers++;
        if (leave_copies && p + 1 == n_passes) {
            rows_read = ggml_backend_event_new(ggml_backend_get_device(backend));
            if (rows_read) {
                ggml_backend_event_record(rows_read, backend);
            }
        }
        for (size_t ig = 0; ig < plan.groups.size(); ++ig) {
            const auto & g = plan.groups[ig];
            for (size_t i = g.first; i < g.first + g.count; ++i) {
                const size_t rb = tensors[i]->nb[1];
                kvf_for_runs_in(runs, r0, n, [&](size_t a, size_t m) {
                    ggml_backend_tensor_get_async(backend, outs[ig], dst(i, a), (i - g.first)*n*rb + (a - r0)*rb, m*rb);
                    n_copies++;
                });
            }
        }
        if (landed) {
            landed_ev.record();
        }
    }
    const auto t_queued = kvf_clock::now();
    if (while_queued) {
        while_queued();
    }
    const auto t_host = kvf_clock::now();
    for (size_t p = 0; landed && p < n_passes; ++p) {
        landed_ev.wait(p);
        landed(p*n_pass, std::min(n_pass, n_rows - p*n_pass));
    }
    if (rows_read) {
        ggml_backend_event_synchronize(rows_read);
        ggml_backend_event_free(rows_read);
        copies_in_flight.push_back(backend);
        landed_ev.sync_at_end = false;
    } else {
        ggml_backend_synchronize(backend); // no events on this device: wait for the copies too
    }
    const auto t_end = kvf_clock::now();
    gather_plan_s  += std::chrono::duration<double>(t_planned - t_start).count();
    gather_queue_s += std::chrono::duration<double>(t_queued - t_planned).count();
    gather_wait_s  += std::chrono::duration<double>(t_end - t_host).count();
    gather_passes  += n_passes;

    return true;
}

// thaw's counterpart of gather(): rows[i] of every tensor := row i of src[t], with one set_rows per group of
// tensors on the device instead of a copy per run of cells. The cache is viewed as rows of 4-byte words typed
// F32, and set_rows from F32 to F32 moves them bit for bit, whatever the KV type. Every pass is queued at once
// and this returns without waiting for them (finish_copies() does): the caller verifies the host rows meanwhile.
// false: the caller writes per run.
bool llama_kv_freeze::scatter_on(const std::vector<ggml_tensor *> & tensors, const std::vector<int32_t> & rows,
        const std::vector<kvf_run> & runs, const std::function<const uint8_t *(size_t, size_t)> & src) {
    if (tensors.empty() || rows.empty()) {
        return true;
    }

    const size_t n_rows = rows.size();
    size_t n_pass = 0;
    ggml_backend_t backend = rows_backend(tensors, n_rows, n_pass);
    if (!backend) {
        return false;
    }

    scatter_rows.push_back(std::make_unique<llama_kv_freeze_rows>());
    auto & plan = *scatter_rows.back();
    if (!kvf_plan_rows(plan, backend, tensors, rows, n_pass, GGML_TYPE_F32,
            [&](int which, size_t size) { return device_buffer(backend, which, size); })) {
        scatter_rows.pop_back();
        return false;
    }
    uint8_t * scratch_base = (uint8_t *) ggml_backend_buffer_get_base(plan.scratch);

    for (size_t r0 = 0; r0 < n_rows; r0 += n_pass) {
        const size_t n = std::min(n_pass, n_rows - r0);

        ggml_context * ctx = kvf_pass_ctx(plan);
        ggml_cgraph  * gf  = ggml_new_graph_custom(ctx, kvf_pass_graph_size(plan.groups.size()), false);
        for (const auto & g : plan.groups) {
            const size_t rb = tensors[g.first]->nb[1];
            ggml_tensor * in = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, (int64_t) (rb/4), (int64_t) n, (int64_t) g.count);
            ggml_backend_tensor_alloc(plan.scratch, in, scratch_base + g.offset);
            for (size_t i = g.first; i < g.first + g.count; ++i) {
                kvf_for_runs_in(runs, r0, n, [&](size_t a, size_t m) {
                    ggml_backend_tensor_set_async(backend, in, src(i, a), (i - g.first)*n*rb + (a - r0)*rb, m*rb);
                    n_copies++;
                });
            }
            ggml_tensor * out = ggml_set_rows(ctx, g.alias, in, kvf_pass_ids(plan, ctx, r0, n, g.count));
            // the node is a view of the cache: give it the cache's buffer as a graph allocator does for views (the
            // RPC backend sends a node without a buffer as a null pointer, and the server's set_rows wrote there)
            ggml_backend_view_init(out);
            ggml_build_forward_expand(gf, out);
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

std::vector<kvf_run> kvf_runs(const std::vector<uint32_t> & cell, const std::vector<llama_kv_host_slot> & slot) {
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

std::vector<kvf_run> kvf_slot_runs(const std::vector<llama_kv_host_slot> & slot) {
    std::vector<kvf_run> runs;
    for (uint32_t i = 0; i < slot.size(); ++i) {
        if (i > 0 && slot[i].chunk == slot[i - 1].chunk && slot[i].index == slot[i - 1].index + 1) {
            runs.back().n++;
            continue;
        }
        runs.push_back({i, 1});
    }
    return runs;
}

//
// offload's copy to the host
//

void llama_kv_freeze::copy_to_host(uint32_t strm, const std::vector<uint32_t> & cell, const std::vector<llama_kv_host_slot> & slot, uint64_t * sums,
        std::function<void()> * defer) {
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
    std::vector<std::pair<uint32_t, bool>> gather_what; // (layer, is_v)

    // gathered rows land straight in their slots, one device copy per run of slots and tensor, unless the slots are
    // spread in so many runs that a staging copy costs less
    const auto slot_runs = kvf_slot_runs(slot);
    const bool direct    = kvf_slot_runs_direct(slot_runs.size(), slot.size());
    std::vector<std::vector<uint8_t>> gather_staging;

    // a gather is a graph and a scratch buffer on the device: for a few runs, plain copies cost less
    const bool few_runs = runs.size() < kvf_gather_min_runs && !force_gather;

    // the layers in host memory (a partly offloaded model: -ngl below the layer count) are memcpys: run them while
    // the device copies the gathered layers (gather's while_queued), not after: with 16 of 32 layers on the CPU,
    // offloads moved 18-20 GB/s one after the other
    auto gathered = [&](uint32_t il, bool is_v) {
        return std::find(gather_what.begin(), gather_what.end(), std::make_pair(il, is_v)) != gather_what.end();
    };
    std::vector<std::pair<uint32_t, bool>> host_copied;
    bool host_done = false;
    const std::function<void()> copy_host = [&]() {
        if (host_done) {
            return;
        }
        host_copied = copy_host_runs(strm, cell, slot, runs, /*to_host =*/ true, gathered);
        host_done = true;
        // their hashes too, while the device still copies, when they are the first layers (llama.cpp puts the
        // last -ngl layers on the GPU) and whole in their slots (V transposed is copied later, per channel)
        uint32_t k = 0;
        while (!kv->v_trans && k < n_layer &&
               std::find(host_copied.begin(), host_copied.end(), std::make_pair(k, false)) != host_copied.end() &&
               std::find(host_copied.begin(), host_copied.end(), std::make_pair(k, true)) != host_copied.end()) {
            ++k;
        }
        if (k > 0 && 2*(size_t) k == host_copied.size()) {
            hash_layers(k);
        }
    };

    if (staged) {
        // a pageable store: every gatherable tensor goes through the pinned staging, in rounds of at most 256 MiB;
        // each pass that lands there is copied into the slots (and hashed) by the store's threads while the device
        // copies the next
        const size_t row_bytes = gatherable(gather_t, gather_what);
        const bool hash_landed = sums && gather_t.size() == 2*(size_t) n_layer;
        const size_t n = cell.size();
        const size_t n_round = std::min(n, std::max<size_t>(1, (256u << 20)/std::max<size_t>(1, row_bytes)));
        const auto t_stage0 = kvf_clock::now();
        uint8_t * stage = gather_t.empty() ? nullptr : host_staging(n_round*row_bytes);
        staging_s += std::chrono::duration<double>(kvf_clock::now() - t_stage0).count();
        bool ok = !gather_t.empty();
        for (size_t q0 = 0; ok && q0 < n; q0 += n_round) {
            const size_t m = std::min(n_round, n - q0);
            std::vector<size_t> off(gather_t.size(), 0);
            for (size_t i = 1; i < gather_t.size(); ++i) {
                off[i] = off[i - 1] + m*gather_t[i - 1]->nb[1];
            }
            std::vector<int32_t> rows_round(m);
            for (size_t j = 0; j < m; ++j) {
                rows_round[j] = (int32_t) (strm*kv_size + cell[q0 + j]);
            }
            auto landed = [&](size_t r0, size_t cnt) {
                const size_t per_item = 32;
                store.parallel_for((cnt + per_item - 1)/per_item, [&](size_t item) {
                    const size_t j1 = std::min(r0 + cnt, r0 + (item + 1)*per_item);
                    for (size_t i = 0; i < gather_t.size(); ++i) {
                        const auto [il, is_v] = gather_what[i];
                        const size_t rb = gather_t[i]->nb[1];
                        for (size_t j = r0 + item*per_item; j < j1; ++j) {
                            uint8_t * dst = is_v ? store.v_row(slot[q0 + j], il) : store.k_row(slot[q0 + j], il);
                            memcpy(dst, stage + off[i] + j*rb, rb);
                        }
                    }
                });
                if (hash_landed) {
                    store.checksum_add(slot.data() + q0 + r0, cnt, 0, n_layer, sums + q0 + r0);
                }
            };
            const std::vector<kvf_run> one_run = { { 0, (uint32_t) m } };
            auto stage_dst = [&](size_t i, size_t a) { return stage + off[i] + a*gather_t[i]->nb[1]; };
            if (defer && hash_landed && q0 + m == n) {
                // the last round: once the device has read its rows, the cells may be written again; its copies
                // into the staging (still running when gather returns), then copying them into the slots and
                // hashing them, are left to the caller's background thread, which waits for the copies first
                copies_in_flight.clear();
                const auto t_g0 = kvf_clock::now();
                ok = gather(gather_t, rows_round, one_run, stage_dst, nullptr, /*leave_copies =*/ true, copy_host);
                gather_call_s += std::chrono::duration<double>(kvf_clock::now() - t_g0).count();
                if (!ok) {
                    finish_copies(); // a device that gathered before another failed: its copies land first
                }
                if (ok) {
                    std::vector<size_t> rb(gather_t.size());
                    for (size_t i = 0; i < gather_t.size(); ++i) {
                        rb[i] = gather_t[i]->nb[1];
                    }
                    std::vector<llama_kv_host_slot> slots(slot.begin() + q0, slot.begin() + q0 + m);
                    *defer = [this, stage, off, rb, what = gather_what, slots = std::move(slots), out = sums + q0, n_layer,
                              in_flight = std::move(copies_in_flight)]() {
                        for (ggml_backend_t b : in_flight) {
                            ggml_backend_synchronize(b);
                        }
                        const size_t cnt = slots.size(), per_item = 32;
                        store.parallel_for((cnt + per_item - 1)/per_item, [&](size_t item) {
                            const size_t j1 = std::min(cnt, (item + 1)*per_item);
                            for (size_t i = 0; i < rb.size(); ++i) {
                                const auto [il, is_v] = what[i];
                                for (size_t j = item*per_item; j < j1; ++j) {
                                    uint8_t * dst = is_v ? store.v_row(slots[j], il) : store.k_row(slots[j], il);
                                    memcpy(dst, stage + off[i] + j*rb[i], rb[i]);
                                }
                            }
                        });
                        store.checksum_add(slots.data(), cnt, 0, n_layer, out);
                    };
                }
            } else {
                ok = gather(gather_t, rows_round, one_run, stage_dst, landed, false, copy_host);
            }
        }
        if (!ok) {
            // no gather (several devices, no device memory): per-run copies into the pageable slots below, hashed
            // from scratch (host layers the gather already copied stay copied)
            if (sums) {
                std::fill(sums, sums + n, 0);
                hashed_to = 0; // the host layers copy_host hashed too
            }
            gather_t.clear();
            gather_what.clear();
        } else if (hash_landed) {
            hashed_to = n_layer;
        }
    }

    for (uint32_t il = 0; !staged && il < n_layer; ++il) {
        for (const bool is_v : { false, true }) {
            ggml_tensor * t = is_v ? layer_v[il] : layer_k[il];
            if ((is_v && kv->v_trans) || few_runs || !can_gather(t)) {
                continue;
            }
            gather_t.push_back(t);
            gather_what.emplace_back(il, is_v);
            if (!direct) {
                gather_staging.emplace_back(cell.size()*t->nb[1]);
            }
        }
    }

    // every row of a pass in its slot as the pass lands: hash that pass's slots, all layers
    const bool gather_all = gather_t.size() == 2*(size_t) n_layer && direct;
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
    const std::vector<kvf_run> all_rows = { { 0, (uint32_t) cell.size() } };
    auto gather_dst = [&](size_t i, size_t row) -> uint8_t * {
        if (!direct) {
            return gather_staging[i].data() + row*gather_t[i]->nb[1];
        }
        const auto [il, is_v] = gather_what[i];
        return is_v ? store.v_row(slot[row], il) : store.k_row(slot[row], il);
    };
    if (staged) {
        // gathered (or not) through the pinned staging above
    } else if (!gather(gather_t, rows, direct ? slot_runs : all_rows, gather_dst, landed, false, copy_host)) {
        gather_t.clear();
        gather_what.clear();
        gather_staging.clear();
    } else if (landed) {
        hashed_to = n_layer;
    }
    if (!gather_staging.empty()) store.parallel_for(gather_staging.size(), [&](size_t g) {
        const auto [il, is_v] = gather_what[g];
        const size_t rb = gather_t[g]->nb[1];
        for (size_t i = 0; i < cell.size(); ++i) {
            memcpy(is_v ? store.v_row(slot[i], il) : store.k_row(slot[i], il), gather_staging[g].data() + i*rb, rb);
        }
    });
    copy_host(); // no gather ran it (nothing to gather, or it failed before queueing)
    auto copied = [&](uint32_t il, bool is_v) {
        return gathered(il, is_v) || std::find(host_copied.begin(), host_copied.end(), std::make_pair(il, is_v)) != host_copied.end();
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
        const bool copy_k = !copied(il, false);
        const bool copy_v = !kv->v_trans && !copied(il, true);
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
