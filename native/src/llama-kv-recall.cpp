#include "llama-kv-freeze.h"

#include "asrkf.h"
#include "llama-kv-freeze-rows.h"

#include "llama-context.h"
#include "llama-kv-cache.h"

#include "ggml-alloc.h"
#include "ggml-cpp.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cmath>
#include <cstring>
#include <limits>

// recall's scoring where K lives: the attention mass the latest decode's queries give every key of a sequence,
// resident or offloaded, computed by the backend of the layer's K (a GPU when the cache is there).
//
// Why here and not on the host: recall scores every token of the context with the question's queries, per
// scored layer [n_keys x n_head x n_q] logits and their softmax (30k keys: 8 GFLOP and 123 MB of logits per layer
// of an 8B model). numpy on the host took ~1 s of a 30k-token prompt's 5.7 s on the H200 (docs/gpu.md); the device
// does the products in milliseconds, and what remains is moving one layer's K rows (resident ones from their
// cells, offloaded ones from the host store) into one device tensor per layer.
//
// The same graph runs on the CPU backend when the cache is in host memory, with the context's thread count.

using kvf_clock = std::chrono::steady_clock;

static double kvf_recall_ms(kvf_clock::time_point a, kvf_clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

static void kvf_set_n_threads(ggml_backend_t backend, int n_threads) {
    ggml_backend_dev_t dev = ggml_backend_get_device(backend);
    ggml_backend_reg_t reg = dev ? ggml_backend_dev_backend_reg(dev) : nullptr;
    auto * set_n_threads = reg ? (ggml_backend_set_n_threads_t) ggml_backend_reg_get_proc_address(reg, "ggml_backend_set_n_threads") : nullptr;
    if (set_n_threads) {
        set_n_threads(backend, n_threads);
    }
}

// logits of one chain are at most this large: heads are scored a few at a time so that the device memory recall
// needs stays bounded (the cache budget is what the user gave the device, recall must not need much beyond it)
static constexpr size_t kvf_recall_chain_bytes = 32u << 20;

void llama_kv_freeze::recall_mass(llama_seq_id seq_id, const std::vector<int32_t> & layers, const std::vector<llama_pos> & keys,
        size_t n_out, float * out) {
    sync();

    if (n_out > keys.size()) {
        KVF_FAIL(ASRKF_EINVAL, "recall_mass: %zu outputs for %zu keys", n_out, keys.size());
    }
    if (n_out > 0 && !out) {
        KVF_FAIL(ASRKF_EINVAL, "recall_mass: out is NULL");
    }
    llama_kv_freeze_check_unique(keys, "recall_mass");
    for (int32_t il : layers) {
        if (layer_index(il) < 0) {
            KVF_FAIL(ASRKF_EINVAL, "recall_mass: layer %d has no K/V in the managed cache", il);
        }
    }
    std::fill(out, out + n_out, 0.0f);
    if (keys.empty() || layers.empty()) {
        return;
    }

    // each key is resident (its cell) or offloaded (its host slot); the rows are laid out resident first, so that
    // the resident ones are one gather into one run of the host buffer
    const uint32_t strm = stream(seq_id);
    const auto & sp = cells(seq_id).seq_pos_get(seq_id);
    std::vector<size_t>             order;     // row j holds keys[order[j]]
    std::vector<int32_t>            res_rows;  // global K row of each resident key
    std::vector<llama_kv_host_slot> off_slots;
    order.reserve(keys.size());
    for (size_t i = 0; i < keys.size(); ++i) {
        auto it = sp.lower_bound({keys[i], 0u});
        if (it != sp.end() && it->first == keys[i]) {
            order.push_back(i);
            res_rows.push_back((int32_t) (strm*kv->get_size() + it->second));
        }
    }
    const size_t n_res = order.size();
    for (size_t i = 0; i < keys.size(); ++i) {
        auto rec = records.find({seq_id, keys[i]});
        if (rec != records.end()) {
            order.push_back(i);
            off_slots.push_back(rec->second.slot);
        } else {
            auto it = sp.lower_bound({keys[i], 0u});
            if (it == sp.end() || it->first != keys[i]) {
                KVF_FAIL(ASRKF_EINVAL, "recall_mass: position %d is not in sequence %d", keys[i], seq_id);
            }
        }
    }
    const int64_t n_keys = (int64_t) keys.size();

    llama_pos newest = -1;
    if (!sp.empty()) {
        newest = sp.rbegin()->first;
    }

    std::vector<float>  q;
    std::vector<float>  qg;
    std::vector<float>  mask;
    std::vector<float>  mass((size_t) n_keys);
    std::vector<double> acc(n_out, 0.0);

    // one graph allocator per call: its buffer (the logits of a chain, the layer's K) is freed when recall is done
    ggml_gallocr_t galloc = nullptr;
    ggml_backend_t galloc_backend = nullptr;
    struct galloc_guard {
        ggml_gallocr_t & g;
        ~galloc_guard() { if (g) { ggml_gallocr_free(g); } }
    } guard { galloc };

    double ms_rows = 0.0, ms_compute = 0.0;

    for (int32_t il : layers) {
        int32_t n_q = 0, n_head = 0, d = 0;
        float scale = 0.0f;
        query(il, q, n_q, n_head, d, scale);

        const int32_t ikv = layer_index(il);
        ggml_tensor * k   = layer_k[ikv];
        const size_t  kb  = store.k_row_bytes(ikv);
        const int64_t n_embd_k = k->ne[0];
        if (d <= 0 || n_embd_k % d != 0 || n_head % (n_embd_k/d) != 0) {
            KVF_FAIL(ASRKF_EINVAL, "recall_mass: layer %d: K rows of %" PRId64 " values do not split into heads of %d for %d query heads",
                    il, n_embd_k, d, n_head);
        }
        const int64_t n_head_kv = n_embd_k/d;
        const int64_t n_gqa     = n_head/n_head_kv;
        const int64_t n_rows_q  = (int64_t) n_q*n_gqa; // rows of one KV head's product: (query, head in group)

        ggml_backend_t backend = backend_for(k);
        if (!backend) {
            KVF_FAIL(ASRKF_EBACKEND, "recall_mass: no backend for the device of %s", k->name);
        }
        kvf_set_n_threads(backend, lctx->cparams.n_threads); // the CPU backend's; others have no such setting

        // the layer's K rows of every key, in `order`, into host memory (pinned when the device has it)
        const auto t0 = kvf_clock::now();
        uint8_t * rows = host_staging((size_t) n_keys*kb);
        if (n_res > 0) {
            // one get_rows on the device into the host buffer; a cache in host memory is read row by row
            const std::vector<kvf_run> one_run = { { 0, (uint32_t) n_res } };
            if (!(can_gather(k) && gather({ k }, res_rows, one_run, [&](size_t, size_t a) { return rows + a*kb; }, nullptr))) {
                for (size_t j = 0; j < n_res; ++j) {
                    read(k, (size_t) res_rows[j]*k->nb[1], kb, rows + j*kb);
                }
                finish_copies();
            }
        }
        if (!off_slots.empty()) {
            const size_t n_off = off_slots.size();
            const size_t block = 256;
            store.parallel_for((n_off + block - 1)/block, [&](size_t b) {
                for (size_t j = b*block; j < std::min(n_off, (b + 1)*block); ++j) {
                    memcpy(rows + (n_res + j)*kb, store.k_row(off_slots[j], ikv), kb);
                }
            });
        }
        const auto t1 = kvf_clock::now();

        // queries as [d, (t, g), h_kv]: the n_gqa query heads of a KV head are rows of one product, query fastest
        qg.resize((size_t) d*n_rows_q*n_head_kv);
        for (int64_t h = 0; h < n_head_kv; ++h) {
            for (int64_t g = 0; g < n_gqa; ++g) {
                for (int64_t t = 0; t < n_q; ++t) {
                    const float * src = q.data() + ((size_t) t*n_head + (size_t) (h*n_gqa + g))*d;
                    std::copy(src, src + d, qg.data() + ((size_t) h*n_rows_q + (size_t) (g*n_q + t))*d);
                }
            }
        }
        // causal: query t (position newest - n_q + 1 + t) does not see later keys; the same for every layer
        if (mask.size() != (size_t) n_keys*n_q) {
            mask.resize((size_t) n_keys*n_q);
            for (int64_t t = 0; t < n_q; ++t) {
                const llama_pos q_pos = newest - n_q + 1 + (llama_pos) t;
                for (int64_t j = 0; j < n_keys; ++j) {
                    mask[(size_t) t*n_keys + j] = keys[order[j]] > q_pos ? -std::numeric_limits<float>::infinity() : 0.0f;
                }
            }
        }

        const int64_t per_head = n_keys*n_rows_q*(int64_t) sizeof(float);
        const int64_t n_chain  = std::max<int64_t>(1, std::min<int64_t>(n_head_kv, (int64_t) kvf_recall_chain_bytes/std::max<int64_t>(1, per_head)));
        const int64_t n_chains = (n_head_kv + n_chain - 1)/n_chain;
        const size_t  n_nodes  = 16*(size_t) n_chains + 16;

        ggml_init_params ip = {
            /*.mem_size   =*/ ggml_tensor_overhead()*(n_nodes + 8) + ggml_graph_overhead_custom(n_nodes, false),
            /*.mem_buffer =*/ nullptr,
            /*.no_alloc   =*/ true,
        };
        ggml_context_ptr ctx { ggml_init(ip) };
        ggml_context * c = ctx.get();
        ggml_cgraph * gf = ggml_new_graph_custom(c, n_nodes, false);

        ggml_tensor * kd = ggml_new_tensor_3d(c, k->type, d, n_head_kv, n_keys);
        ggml_tensor * qd = ggml_new_tensor_3d(c, GGML_TYPE_F32, d, n_rows_q, n_head_kv);
        ggml_tensor * md = ggml_new_tensor_2d(c, GGML_TYPE_F32, n_keys, n_q);
        ggml_set_input(kd);
        ggml_set_input(qd);
        ggml_set_input(md);
        if (kd->nb[2] != kb) {
            KVF_FAIL(ASRKF_EINVAL, "recall_mass: layer %d: a K row is %zu bytes in the cache and %zu in the graph", il, kb, kd->nb[2]);
        }

        ggml_tensor * sum = nullptr;
        for (int64_t h0 = 0; h0 < n_head_kv; h0 += n_chain) {
            const int64_t nh = std::min(n_chain, n_head_kv - h0);
            ggml_tensor * kp = ggml_view_3d(c, kd, d, n_keys, nh, kd->nb[2], kd->nb[1], h0*kd->nb[1]); // [d, n_keys, nh]
            ggml_tensor * qp = ggml_view_3d(c, qd, d, n_rows_q, nh, qd->nb[1], qd->nb[2], h0*qd->nb[2]); // [d, rows, nh]
            ggml_tensor * kq = ggml_mul_mat(c, kp, qp);                                               // [n_keys, rows, nh]
            ggml_prec_set_acc(kq, GGML_PREC_F32);
            kq = ggml_reshape_4d(c, kq, n_keys, n_q, n_gqa*nh, 1);                                   // the mask per query
            kq = ggml_soft_max_ext(c, kq, md, scale, 0.0f);
            kq = ggml_reshape_2d(c, kq, n_keys, n_rows_q*nh);
            ggml_tensor * s = ggml_sum_rows(c, ggml_cont(c, ggml_transpose(c, kq)));                  // [1, n_keys]
            sum = sum ? ggml_add(c, sum, s) : s;
            ggml_build_forward_expand(gf, sum); // chain by chain: a chain's logits are freed before the next
        }
        ggml_set_output(sum);

        if (galloc_backend != backend) {
            if (galloc) {
                ggml_gallocr_free(galloc);
            }
            galloc = ggml_gallocr_new(ggml_backend_get_default_buffer_type(backend));
            galloc_backend = backend;
        }
        if (!galloc || !ggml_gallocr_alloc_graph(galloc, gf)) {
            KVF_FAIL(ASRKF_EBACKEND, "recall_mass: no memory on the device of %s for scoring %" PRId64 " keys", k->name, n_keys);
        }
        ggml_backend_tensor_set(kd, rows, 0, (size_t) n_keys*kb);
        ggml_backend_tensor_set(qd, qg.data(), 0, qg.size()*sizeof(float));
        ggml_backend_tensor_set(md, mask.data(), 0, mask.size()*sizeof(float));
        if (ggml_backend_graph_compute(backend, gf) != GGML_STATUS_SUCCESS) {
            KVF_FAIL(ASRKF_EBACKEND, "recall_mass: the scoring graph failed on the device of %s", k->name);
        }
        ggml_backend_tensor_get(sum, mass.data(), 0, mass.size()*sizeof(float));
        for (size_t j = 0; j < (size_t) n_keys; ++j) {
            if (order[j] < n_out) {
                acc[order[j]] += mass[j];
            }
        }
        const auto t2 = kvf_clock::now();
        ms_rows    += kvf_recall_ms(t0, t1);
        ms_compute += kvf_recall_ms(t1, t2);
    }

    for (size_t i = 0; i < n_out; ++i) {
        out[i] = (float) acc[i];
    }
    if (trace_moves) {
        fprintf(stderr, "asrkf-trace recall keys=%" PRId64 " resident=%zu layers=%zu rows_ms=%.3f compute_ms=%.3f\n",
                n_keys, n_res, layers.size(), ms_rows, ms_compute);
    }
}
