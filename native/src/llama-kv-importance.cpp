// outputs of the freeze controller computed inside the graph: the attention mass each cell receives from the last
// n_q queries on the selected layers (also with flash attention, which exposes no probabilities), and the entropy
// of the last logits row (on the device that computed them: one float crosses instead of the vocabulary)

#include "llama-kv-freeze.h"

#include "asrkf.h"

#include "llama-context.h"
#include "llama-graph.h"
#include "llama-hparams.h"
#include "llama-kv-cache.h"
#include "llama-kv-cache-iswa.h"

#include "ggml.h"

#include <algorithm>
#include <cstring>

// the shadow mask: the regular KQ mask without the frozen overlay, so frozen cells keep being scored
class llm_graph_input_kv_freeze : public llm_graph_input_i {
public:
    llm_graph_input_kv_freeze(llama_kv_freeze * kvf, bool causal_attn, const llama_kv_cache_context * mctx)
        : kvf(kvf), causal_attn(causal_attn), mctx(mctx) {}

    ~llm_graph_input_kv_freeze() override {
        if (kvf) {
            kvf->inputs.erase(this);
            if (kvf->input_active == this) {
                kvf->input_active = nullptr;
            }
            if (kvf->input_building == this) {
                kvf->input_building = nullptr;
            }
        }
    }

    void set_input(const llama_ubatch * ubatch) override {
        if (shadow_mask && !shadow_shared) {
            // only the last n_q queries are scored: their rows, not the whole ubatch's (a 512-token prompt chunk
            // filled and uploaded a second [n_kv, 512] mask of which 32 rows were read)
            mctx->set_input_kq_mask(shadow_mask, ubatch, causal_attn, /*apply_freeze =*/ false, ubatch->n_tokens - n_q);
        }
        outputs_copied = false; // until on_computed() queues this graph's copies

        if (kvf) {
            kvf->input_active = this;
            kvf->input_epoch  = kvf->epoch;

            // the sequence whose queries are scored; -1 when the last n_q tokens mix sequences
            kvf->input_seq = ubatch->seq_id[ubatch->n_tokens - 1][0];
            for (uint32_t i = ubatch->n_tokens - n_q; i < ubatch->n_tokens; ++i) {
                if (ubatch->n_seq_id[i] != 1 || ubatch->seq_id[i][0] != kvf->input_seq) {
                    kvf->input_seq = -1;
                }
            }
        }
    }

    bool can_reuse(const llm_graph_params & params) override {
        if (const auto * iswa = dynamic_cast<const llama_kv_cache_iswa_context *>(params.mctx)) {
            mctx = iswa->get_base();
        } else {
            mctx = static_cast<const llama_kv_cache_context *>(params.mctx);
        }

        // a graph that shares the attention's mask scores frozen cells as masked: it is rebuilt when a cell freezes
        // (and when the last one thaws, to share again)
        return !shadow_mask || (shadow_mask->ne[0] == mctx->get_n_kv() &&
                                shadow_mask->ne[1] == std::min<int64_t>(kvf_n_q, params.ubatch.n_tokens) &&
                                (!kvf || !shadow_can_share || shadow_shared == !kvf->any_frozen()));
    }

    llama_kv_freeze * kvf; // nullptr once the controller is gone

    const bool causal_attn;

    const llama_kv_cache_context * mctx;

    ggml_tensor * shadow_mask = nullptr; // [n_kv, n_q]: the rows of the last n_q tokens; nullptr with the importance output off
    // no cell frozen when the graph was built: shadow_mask is a view of the attention's own mask, not filled here
    bool          shadow_shared = false;
    // the attention's mask could serve (its layout fits, ASRKF_SHADOW_OWN unset): sharing then follows the freeze
    bool          shadow_can_share = false;
    ggml_tensor * importance  = nullptr; // [1, n_kv], summed over the selected layers
    int32_t       n_q         = 0;
    int32_t       kvf_n_q     = 0;       // the controller's n_q when this input was built (n_q: capped by the ubatch)
    ggml_tensor * neg_entropy = nullptr; // [1]: sum of p log p over the last logits row

    // on_computed() queued the copies of importance and neg_entropy to the controller's host outputs for the
    // latest compute of this graph
    bool outputs_copied = false;

    ggml_tensor * probs    = nullptr; // [n_kv, rows] attention probabilities not yet in importance
    ggml_tensor * mask_rep = nullptr; // the shadow mask's query rows, repeated for grouped query heads

    // a decode step's layers scored together (llama_kv_freeze_build_layer): the scored layers' K as one tensor
    // [n_embd_head, n_kv, n_head_kv, n_layers], their queries gathered along dim 3, one product after the last
    int           together = -1;      // -1 undecided, 0 layer by layer, 1 together
    ggml_tensor * k_all    = nullptr;
    ggml_tensor * q_all    = nullptr; // [n_embd_head, n_gqa, n_head_kv, layers so far]
    float         q_scale  = 0.0f;    // the kq_scale the product is scaled by (the first layer's)

    // fold probs into importance: sum over rows, [n_kv, rows] -> [rows, n_kv] -> [1, n_kv]
    void reduce_probs(ggml_context * ctx) {
        if (!probs) {
            return;
        }
        ggml_tensor * per_cell = ggml_sum_rows(ctx, ggml_cont(ctx, ggml_transpose(ctx, probs)));
        importance = importance ? ggml_add(ctx, importance, per_cell) : per_cell;
        probs = nullptr;
    }

    struct query_out {
        int32_t       il;
        ggml_tensor * q;        // [n_embd_head, n_head, n_q]
        float         kq_scale;
    };
    std::vector<query_out> queries;
};

void llama_kv_freeze_input_detach(llm_graph_input_kv_freeze * inp) {
    inp->kvf = nullptr;
}

void llama_kv_freeze_build_input(llama_kv_freeze * kvf, ggml_context * ctx0, llm_graph_result * res, const llama_ubatch & ubatch,
        const llama_cparams & cparams, const llama_kv_cache_context * mctx, ggml_tensor * kq_mask) {
    kvf->input_building = nullptr;

    // off: no input, no node, the graph is the stock one
    if (!(kvf->imp.enabled || kvf->entropy_enabled) || cparams.training) {
        return;
    }

    auto inp = std::make_unique<llm_graph_input_kv_freeze>(kvf, cparams.causal_attn, mctx);

    if (kvf->imp.enabled) {
        // same type as the regular mask: flash attention wants f16
        const ggml_type type = cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32;

        inp->kvf_n_q = kvf->imp.n_q;
        inp->n_q     = std::min<int32_t>(kvf->imp.n_q, (int32_t) ubatch.n_tokens);

        // with no cell frozen the shadow mask equals the attention's (under a binding budget nothing freezes): its
        // last n_q rows serve, instead of a second mask filled over every cell and uploaded each step
        const int64_t n_kv = mctx->get_n_kv();
        inp->shadow_can_share = kq_mask && !kvf->shadow_own && kq_mask->type == type && kq_mask->ne[0] == n_kv &&
                kq_mask->ne[1] == (int64_t) ubatch.n_tokens && kq_mask->ne[2] == 1 && kq_mask->ne[3] == 1;
        if (inp->shadow_can_share && !kvf->any_frozen()) {
            inp->shadow_mask   = ggml_view_2d(ctx0, kq_mask, n_kv, inp->n_q, kq_mask->nb[1],
                    (ubatch.n_tokens - inp->n_q)*kq_mask->nb[1]);
            inp->shadow_shared = true;
        } else {
            inp->shadow_mask = ggml_new_tensor_4d(ctx0, type, n_kv, inp->n_q, 1, 1);
            ggml_set_input(inp->shadow_mask);
            ggml_set_name(inp->shadow_mask, "kv_freeze_shadow_mask");
        }
    }

    kvf->inputs.insert(inp.get());
    kvf->input_building = inp.get();

    res->add_input(std::move(inp));
}

void llama_kv_freeze_build_layer(llama_kv_freeze * kvf, ggml_context * ctx0, ggml_cgraph * gf, const llama_hparams & hparams,
        ggml_tensor * q, ggml_tensor * k, float kq_scale, int il) {
    auto * inp = kvf->input_building;
    if (!inp || !inp->shadow_mask || !std::binary_search(kvf->imp.layers.begin(), kvf->imp.layers.end(), il)) {
        return;
    }

    // q: [n_embd_head, n_head, n_tokens] in the space of the stored K; k: [n_embd_head, n_head_kv, n_kv, 1]
    const int64_t n_embd_head = q->ne[0];
    const int64_t n_head      = q->ne[1];
    const int64_t n_tokens    = q->ne[2];
    const int64_t n_head_kv   = k->ne[1];
    const int64_t n_q         = inp->n_q;
    const int64_t n_kv        = k->ne[2];
    const size_t  q_offset    = (n_tokens - n_q)*q->nb[2];

    ggml_tensor * q_last = ggml_view_3d(ctx0, q, n_embd_head, n_head, n_q, q->nb[1], q->nb[2], q_offset);

    ggml_tensor * mask = inp->shadow_mask; // [n_kv, n_q]: the last n_q queries' rows

    // ALiBi slopes follow the head index in dim 2, so those models keep one row of queries per head
    const bool grouped = hparams.f_max_alibi_bias == 0.0f && n_head % n_head_kv == 0;

    if (inp->together < 0) {
        inp->together = 0;
        if (n_q == 1 && grouped && !hparams.attn_soft_cap && !kvf->score_layerwise) {
            inp->k_all = kvf->scored_k_together(ctx0, k);
            inp->together = inp->k_all != nullptr;
        }
    }
    if (inp->together) {
        // a decode step: this layer's one query joins the others (its n_gqa heads per KV head are rows); the product,
        // softmax and reduction run once for all scored layers, after the last. Layer by layer, a product, a softmax
        // of 32 rows and an add per layer took ~170 us of kernels a step on the H200 under ncu, together ~70; a real
        // step gains less (25-40 us): each layer's own product read K its attention had just brought into L2
        // (docs/gpu.md, session 12)
        const int64_t n_gqa = n_head/n_head_kv;
        ggml_tensor * qg = ggml_view_4d(ctx0, q, n_embd_head, n_gqa, n_head_kv, 1,
                q->nb[1], n_gqa*q->nb[1], q->nb[2], q_offset); // [d, n_gqa, n_head_kv, 1]
        if (!inp->q_all) {
            inp->q_scale = kq_scale;
        } else if (kq_scale != inp->q_scale) {
            qg = ggml_scale(ctx0, qg, kq_scale/inp->q_scale); // a layer of its own scale: the product takes the first's
        }
        inp->q_all = inp->q_all ? ggml_concat(ctx0, inp->q_all, qg, 3) : qg;
        ggml_build_forward_expand(gf, inp->q_all); // gathered right after this layer

        if (il == kvf->imp.layers.back()) {
            GGML_ASSERT(inp->q_all->ne[3] == inp->k_all->ne[3]);
            ggml_tensor * kq = ggml_mul_mat(ctx0, inp->k_all, inp->q_all); // [n_kv, n_gqa, n_head_kv, n_layers]
            ggml_prec_set_acc(kq, GGML_PREC_F32);
            if (!inp->mask_rep) {
                inp->mask_rep = ggml_repeat_4d(ctx0, mask, n_kv, n_gqa, 1, 1);
            }
            kq = ggml_soft_max_ext(ctx0, kq, inp->mask_rep, inp->q_scale, 0.0f);
            inp->probs = ggml_reshape_2d(ctx0, kq, n_kv, kq->ne[1]*kq->ne[2]*kq->ne[3]);
            inp->reduce_probs(ctx0);
            ggml_set_name  (inp->importance, "kv_freeze_importance");
            ggml_set_output(inp->importance);
            ggml_build_forward_expand(gf, inp->importance);
        }
    } else {
        ggml_tensor * kp = ggml_permute(ctx0, k, 0, 2, 1, 3); // [n_embd_head, n_kv, n_head_kv]
        ggml_tensor * kq = nullptr;

        if (grouped) {
            // the n_gqa query heads that share a KV head become rows of one product, so every K row is read once per
            // layer (broadcasting K over the query heads reads it n_gqa times): rows are (query, head in group)
            const int64_t n_gqa = n_head/n_head_kv;
            ggml_tensor * qg = ggml_view_4d(ctx0, q, n_embd_head, n_gqa, n_head_kv, n_q,
                    q->nb[1], n_gqa*q->nb[1], q->nb[2], q_offset);              // [d, n_gqa, n_head_kv, n_q]
            qg = ggml_cont(ctx0, ggml_permute(ctx0, qg, 0, 2, 3, 1));          // [d, n_q, n_gqa, n_head_kv]
            qg = ggml_reshape_3d(ctx0, qg, n_embd_head, n_q*n_gqa, n_head_kv);

            kq = ggml_mul_mat(ctx0, kp, qg); // [n_kv, n_q*n_gqa, n_head_kv]

            // row r attends like query r % n_q: the mask repeated once per graph and group size
            if (!inp->mask_rep || inp->mask_rep->ne[1] != n_q*n_gqa) {
                inp->mask_rep = ggml_repeat_4d(ctx0, mask, n_kv, n_q*n_gqa, 1, 1);
            }
            mask = inp->mask_rep;
        } else {
            ggml_tensor * qp = ggml_permute(ctx0, q_last, 0, 2, 1, 3); // [n_embd_head, n_q, n_head]
            kq = ggml_mul_mat(ctx0, kp, qp); // [n_kv, n_q, n_head], GQA by broadcast
        }
        ggml_prec_set_acc(kq, GGML_PREC_F32);

        if (hparams.attn_soft_cap) {
            kq = ggml_scale(ctx0, kq, 1.0f / hparams.f_attn_logit_softcapping);
            kq = ggml_tanh (ctx0, kq);
            kq = ggml_scale(ctx0, kq, hparams.f_attn_logit_softcapping);
        }

        kq = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, hparams.f_max_alibi_bias);

        // probabilities of layers of one shape add up elementwise; the sum over queries and heads, a transposed copy
        // and a row sum, runs once per graph and shape instead of once per layer
        kq = ggml_reshape_2d(ctx0, kq, n_kv, kq->ne[1]*kq->ne[2]);
        if (inp->probs && ggml_are_same_shape(inp->probs, kq)) {
            inp->probs = ggml_add(ctx0, inp->probs, kq);
        } else {
            inp->reduce_probs(ctx0);
            inp->probs = kq;
        }
        // scheduled here, right after this layer's attention, and not where the output is expanded: each layer's
        // q and probabilities are then freed before the next layer instead of all living to the end of the graph
        ggml_build_forward_expand(gf, inp->probs);
        if (inp->importance) {
            ggml_build_forward_expand(gf, inp->importance);
        }
        if (il == kvf->imp.layers.back()) {
            inp->reduce_probs(ctx0);
            ggml_set_name  (inp->importance, "kv_freeze_importance");
            ggml_set_output(inp->importance);
            ggml_build_forward_expand(gf, inp->importance);
        }
    }

    if (kvf->imp.export_q) {
        ggml_tensor * qe = ggml_cont(ctx0, q_last); // [n_embd_head, n_head, n_q]
        ggml_format_name(qe, "kv_freeze_query_l%d", il);
        ggml_set_output(qe);
        ggml_build_forward_expand(gf, qe);
        inp->queries.push_back({il, qe, kq_scale});
    }
}

ggml_tensor * llama_kv_freeze::scored_k_together(ggml_context * ctx0, const ggml_tensor * k) const {
    const size_t n = imp.layers.size();
    if (n < 2 || k->ne[3] != 1) {
        return nullptr;
    }
    std::vector<const ggml_tensor *> ts;
    for (const int32_t il : imp.layers) {
        ts.push_back(layer_k[layer_index(il)]);
    }
    // the same layout at one stride in one buffer (a model on one device: the cache allocates each layer's K and V in
    // turn), and k the graph's view of the first from its first cell
    const ggml_tensor * t0 = ts[0];
    if (k->data != t0->data || !t0->buffer || ts[1]->data <= t0->data) {
        return nullptr;
    }
    // not for quantized K: a backend may clear a quantized tensor's row padding when it is allocated, here past the
    // span, in the cache's next tensor. Not over RPC either: an alias's sizes travel as 32-bit numbers there. And
    // not for K in host memory: on the CPU the combined product made a decode step slower, not faster (tiny model,
    // 2,048 cells: 261-268 against 231-240 ms for 256 steps), where a GPU gains from fewer, larger kernels
    if (ggml_is_quantized(t0->type) || (ggml_backend_buffer_is_host(t0->buffer) && !score_together_host) ||
            strncmp(ggml_backend_buft_name(ggml_backend_buffer_get_type(t0->buffer)), "RPC", 3) == 0) {
        return nullptr;
    }
    const size_t stride = (size_t) ((const uint8_t *) ts[1]->data - (const uint8_t *) t0->data);
    const size_t ts0    = ggml_type_size(t0->type);
    if (stride < ggml_nbytes(t0) || stride % ts0 != 0) {
        return nullptr;
    }
    for (size_t i = 0; i < n; ++i) {
        const ggml_tensor * t = ts[i];
        if (t->buffer != t0->buffer || t->type != t0->type || !ggml_are_same_shape(t, t0) || !ggml_are_same_stride(t, t0) ||
                (const uint8_t *) t->data != (const uint8_t *) t0->data + i*stride) {
            return nullptr;
        }
    }
    const size_t span = (n - 1)*stride + ggml_nbytes(t0);
    if (span % ts0 != 0) {
        return nullptr;
    }
    // one tensor over the selected layers' K (and the V and unscored layers between them, never read)
    ggml_tensor * flat = ggml_new_tensor_1d(ctx0, t0->type, (int64_t) (span/ts0*ggml_blck_size(t0->type)));
    if (ggml_backend_tensor_alloc(t0->buffer, flat, t0->data) != GGML_STATUS_SUCCESS) {
        return nullptr;
    }
    // [n_embd_head, n_kv, n_head_kv, n_layers]: k permuted as the layer-by-layer product reads it, layers in dim 3
    ggml_tensor * k_all = ggml_view_4d(ctx0, flat, k->ne[0], k->ne[2], k->ne[1], (int64_t) n, k->nb[2], k->nb[1], stride, 0);
    ggml_format_name(k_all, "kv_freeze_k_scored");
    return k_all;
}

void llama_kv_freeze_build_output(llama_kv_freeze * kvf, ggml_context * ctx0, ggml_cgraph * gf, ggml_tensor * logits) {
    auto * inp = kvf->input_building;
    kvf->input_building = nullptr; // the graph is complete

    if (!inp || !kvf->entropy_enabled || !logits || logits->ne[1] < 1) {
        return;
    }

    // H = -sum p log p; the 1e-30 keeps log finite where p underflows, and changes no term above ~1e-24
    ggml_tensor * row  = ggml_view_1d(ctx0, logits, logits->ne[0], (logits->ne[1] - 1)*logits->nb[1]);
    ggml_tensor * p    = ggml_soft_max(ctx0, row);
    ggml_tensor * logp = ggml_log(ctx0, ggml_scale_bias(ctx0, p, 1.0f, 1e-30f));

    inp->neg_entropy = ggml_sum(ctx0, ggml_mul(ctx0, p, logp));
    ggml_set_name  (inp->neg_entropy, "kv_freeze_neg_entropy");
    ggml_set_output(inp->neg_entropy);
    ggml_build_forward_expand(gf, inp->neg_entropy);
}

//
// llama_kv_freeze: importance API
//

void llama_kv_freeze::set_importance(const llama_kv_freeze_importance_params & params) {
    sync();

    llama_kv_freeze_importance_params p = params;

    if (p.enabled) {
        if (p.n_q < 1 || (uint32_t) p.n_q > lctx->cparams.n_ubatch) {
            throw llama_kv_freeze_error(ASRKF_EINVAL, "set_importance: n_q = " + std::to_string(p.n_q) +
                    " must be in [1, n_ubatch = " + std::to_string(lctx->cparams.n_ubatch) + "]");
        }
        if (p.layers.empty()) {
            p.layers = layer_il;
        }
        std::sort(p.layers.begin(), p.layers.end());
        for (size_t i = 0; i < p.layers.size(); ++i) {
            if (layer_index(p.layers[i]) < 0) {
                throw llama_kv_freeze_error(ASRKF_EINVAL, "set_importance: layer " + std::to_string(p.layers[i]) +
                        " has no K/V in the managed cache (window layers of iSWA models and shared layers cannot be scored)");
            }
            if (i > 0 && p.layers[i] == p.layers[i - 1]) {
                throw llama_kv_freeze_error(ASRKF_EINVAL, "set_importance: layer " + std::to_string(p.layers[i]) + " is given twice");
            }
        }
    } else {
        p = llama_kv_freeze_importance_params{};
    }

    imp = p;
    input_active = nullptr;
    bump_graph();
}

const float * llama_kv_freeze::importance_cells(llama_seq_id seq_id, uint32_t & n) const {
    sync();

    stream(seq_id);

    if (!imp.enabled) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "importance: the importance output is off (asrkf_kv_set_importance)");
    }
    if (!input_active || !input_active->importance) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "importance: no decode has run with the importance output on");
    }
    if (input_epoch != epoch) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "importance: cells moved (offload, thaw or removal) since the last decode; decode again first");
    }
    if (input_seq != seq_id) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "importance: the last decode scored the queries of " +
                (input_seq < 0 ? std::string("several sequences") : "sequence " + std::to_string(input_seq)) +
                ", not of sequence " + std::to_string(seq_id));
    }

    ggml_tensor * t = input_active->importance;

    n = (uint32_t) t->ne[1];
    if (input_active->outputs_copied) {
        // copied behind the logits (on_computed), landed by the sync() above: read in place
        return outputs_data() + 1;
    }
    importance_buf.resize(n);
    ggml_backend_tensor_get(t, importance_buf.data(), 0, importance_buf.size()*sizeof(float));
    return importance_buf.data();
}

const float * llama_kv_freeze::outputs_data() const {
    return outputs_pinned ? (const float *) ggml_backend_buffer_get_base(outputs_pinned) : outputs_plain.data();
}

float * llama_kv_freeze::outputs_host(size_t n_floats) {
    if (outputs_pinned && ggml_backend_buffer_get_size(outputs_pinned) >= n_floats*sizeof(float)) {
        return (float *) ggml_backend_buffer_get_base(outputs_pinned);
    }
    if (!outputs_pinned && staging_buft) {
        // the whole cache's cells at once: the buffer is made once per handle (pinning is slow)
        outputs_pinned = ggml_backend_buft_alloc_buffer(staging_buft, std::max<size_t>(n_floats, kv->get_size() + 1)*sizeof(float));
        if (outputs_pinned && ggml_backend_buffer_get_size(outputs_pinned) >= n_floats*sizeof(float)) {
            return (float *) ggml_backend_buffer_get_base(outputs_pinned);
        }
    }
    if (outputs_pinned) {
        return nullptr; // a graph larger than the cache: the readers copy synchronously
    }
    outputs_plain.resize(std::max(outputs_plain.size(), n_floats));
    return outputs_plain.data();
}

void llama_kv_freeze::on_computed(ggml_backend_sched * sched) {
    auto * inp = input_active;
    if (!inp || !lctx || outputs_sync || (!inp->importance && !inp->neg_entropy)) {
        return;
    }
    ggml_backend_t b_imp = inp->importance  ? ggml_backend_sched_get_tensor_backend(sched, inp->importance)  : nullptr;
    ggml_backend_t b_ent = inp->neg_entropy ? ggml_backend_sched_get_tensor_backend(sched, inp->neg_entropy) : nullptr;
    if ((inp->importance && !b_imp) || (inp->neg_entropy && !b_ent)) {
        return; // not computed by this graph's scheduler: the readers copy synchronously
    }
    float * host = outputs_host(1 + (inp->importance ? (size_t) ggml_nelements(inp->importance) : 0));
    if (!host) {
        return;
    }
    if (inp->importance) {
        ggml_backend_tensor_get_async(b_imp, inp->importance, host + 1, 0, ggml_nbytes(inp->importance));
    }
    if (inp->neg_entropy) {
        ggml_backend_tensor_get_async(b_ent, inp->neg_entropy, host, 0, sizeof(float));
    }
    inp->outputs_copied = true;
}

void llama_kv_freeze_on_computed(llama_kv_freeze * kvf, ggml_backend_sched * sched) {
    kvf->on_computed(sched);
}

void llama_kv_freeze::importance(llama_seq_id seq_id, std::vector<llama_pos> & pos, std::vector<float> & score) const {
    uint32_t n_kv = 0;
    const float * per_cell = importance_cells(seq_id, n_kv);

    const auto & c = cells(seq_id);

    pos.clear();
    score.clear();
    for (const auto & [p, i] : c.seq_pos_get(seq_id)) {
        pos.push_back(p);
        score.push_back(i < n_kv ? per_cell[i] : 0.0f);
    }
}

void llama_kv_freeze::importance_fold(llama_seq_id seq_id, float ema, int32_t n_queries, float * score, float * mass, int32_t n_pos) const {
    if (!(ema > 0.0f && ema <= 1.0f) || n_queries < 1 || n_pos < 0 || (n_pos > 0 && (!score || !mass))) {
        throw llama_kv_freeze_error(ASRKF_EINVAL, "importance_fold: 0 < ema <= 1, n_queries >= 1 and arrays of n_pos >= 0 floats are required");
    }

    uint32_t n_out = 0;
    const float * per_cell = importance_cells(seq_id, n_out);
    const auto & c = cells(seq_id);

    if (c.seq_pos_max(seq_id) >= n_pos) {
        throw llama_kv_freeze_error(ASRKF_EINVAL, "importance_fold: position " + std::to_string(c.seq_pos_max(seq_id)) +
                " is outside the arrays' " + std::to_string(n_pos) + " entries; nothing was changed");
    }

    // one scan of the cells, not of the position set: the fold runs every step
    const uint32_t n_cells = c.size();

    const float keep = 1.0f - ema;
    const float gain = ema/n_queries;
    const uint32_t n_kv = std::min<uint32_t>(n_cells, n_out);
    // every used cell holds seq_id when the sequence has as many cells as are used (the usual single chat): then
    // the per-cell sequence sets (32 bytes a cell) need not be read, a third of the fold's time
    const bool all_seq = c.seq_pos_get(seq_id).size() == c.get_used();
    for (uint32_t i = 0; i < n_cells; ++i) {
        if (c.is_empty(i) || (!all_seq && !c.seq_has(i, seq_id))) {
            continue;
        }
        const llama_pos p = c.pos_get(i);
        const float     s = i < n_kv ? per_cell[i] : 0.0f;
        score[p] = keep*score[p] + gain*s;
        mass[p] += s;
    }
}

void llama_kv_freeze::set_entropy(bool enabled) {
    sync();
    if (enabled != entropy_enabled) {
        entropy_enabled = enabled;
        input_active = nullptr;
        bump_graph();
    }
}

float llama_kv_freeze::entropy() const {
    sync();

    if (!entropy_enabled) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "entropy: the entropy output is off (asrkf_kv_set_entropy)");
    }
    if (!input_active || !input_active->neg_entropy) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "entropy: the latest decode ran without the entropy output or produced no logits");
    }

    float neg = 0.0f;
    if (input_active->outputs_copied) {
        neg = outputs_data()[0];
    } else {
        ggml_backend_tensor_get(input_active->neg_entropy, &neg, 0, sizeof(float));
    }

    return std::max(0.0f, -neg);
}

void llama_kv_freeze::query(int32_t il, std::vector<float> & out, int32_t & n_q, int32_t & n_head, int32_t & n_embd_head, float & kq_scale) const {
    sync();

    if (!imp.enabled || !imp.export_q) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "query: the query export is off (asrkf_kv_set_importance with export_q)");
    }
    if (!input_active) {
        throw llama_kv_freeze_error(ASRKF_EREFUSED, "query: no decode has run with the query export on");
    }

    for (const auto & qo : input_active->queries) {
        if (qo.il != il) {
            continue;
        }
        const ggml_tensor * t = qo.q;
        kq_scale = qo.kq_scale;
        n_embd_head = (int32_t) t->ne[0];
        n_head      = (int32_t) t->ne[1];
        n_q         = (int32_t) t->ne[2];
        out.resize(ggml_nelements(t));
        ggml_backend_tensor_get(t, out.data(), 0, ggml_nbytes(t));
        return;
    }

    throw llama_kv_freeze_error(ASRKF_EINVAL, "query: layer " + std::to_string(il) + " is not one of the selected importance layers");
}
