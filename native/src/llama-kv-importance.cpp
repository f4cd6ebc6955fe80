// importance output of the freeze controller: attention mass each cell receives from the last n_q queries,
// computed inside the graph on the selected layers (also with flash attention, which exposes no probabilities)

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
        mctx->set_input_kq_mask(shadow_mask, ubatch, causal_attn, /*apply_freeze =*/ false);

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

        return shadow_mask->ne[0] == mctx->get_n_kv() && shadow_mask->ne[1] == params.ubatch.n_tokens;
    }

    llama_kv_freeze * kvf; // nullptr once the controller is gone

    const bool causal_attn;

    const llama_kv_cache_context * mctx;

    ggml_tensor * shadow_mask = nullptr; // [n_kv, n_tokens]
    ggml_tensor * importance  = nullptr; // [1, n_kv], summed over the selected layers
    int32_t       n_q         = 0;

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
        const llama_cparams & cparams, const llama_kv_cache_context * mctx) {
    kvf->input_building = nullptr;

    // off: no input, no node, the graph is the stock one
    if (!kvf->imp.enabled || cparams.training) {
        return;
    }

    auto inp = std::make_unique<llm_graph_input_kv_freeze>(kvf, cparams.causal_attn, mctx);

    // same type as the regular mask: flash attention wants f16
    const ggml_type type = cparams.flash_attn ? GGML_TYPE_F16 : GGML_TYPE_F32;

    inp->shadow_mask = ggml_new_tensor_4d(ctx0, type, mctx->get_n_kv(), ubatch.n_tokens, 1, 1);
    ggml_set_input(inp->shadow_mask);
    ggml_set_name(inp->shadow_mask, "kv_freeze_shadow_mask");

    inp->n_q = std::min<int32_t>(kvf->imp.n_q, (int32_t) ubatch.n_tokens);

    kvf->inputs.insert(inp.get());
    kvf->input_building = inp.get();

    res->add_input(std::move(inp));
}

void llama_kv_freeze_build_layer(llama_kv_freeze * kvf, ggml_context * ctx0, ggml_cgraph * gf, const llama_hparams & hparams,
        ggml_tensor * q, ggml_tensor * k, float kq_scale, int il) {
    auto * inp = kvf->input_building;
    if (!inp || !std::binary_search(kvf->imp.layers.begin(), kvf->imp.layers.end(), il)) {
        return;
    }

    // q: [n_embd_head, n_head, n_tokens] in the space of the stored K; k: [n_embd_head, n_head_kv, n_kv, 1]
    const int64_t n_tokens = q->ne[2];
    const int64_t n_q      = inp->n_q;
    const int64_t n_kv     = k->ne[2];

    ggml_tensor * q_last = ggml_view_3d(ctx0, q, q->ne[0], q->ne[1], n_q, q->nb[1], q->nb[2], (n_tokens - n_q)*q->nb[2]);

    ggml_tensor * qp = ggml_permute(ctx0, q_last, 0, 2, 1, 3); // [n_embd_head, n_q,  n_head]
    ggml_tensor * kp = ggml_permute(ctx0, k,      0, 2, 1, 3); // [n_embd_head, n_kv, n_head_kv]

    ggml_tensor * kq = ggml_mul_mat(ctx0, kp, qp); // [n_kv, n_q, n_head], GQA by broadcast
    ggml_prec_set_acc(kq, GGML_PREC_F32);

    if (hparams.attn_soft_cap) {
        kq = ggml_scale(ctx0, kq, 1.0f / hparams.f_attn_logit_softcapping);
        kq = ggml_tanh (ctx0, kq);
        kq = ggml_scale(ctx0, kq, hparams.f_attn_logit_softcapping);
    }

    ggml_tensor * mask = ggml_view_2d(ctx0, inp->shadow_mask, n_kv, n_q, inp->shadow_mask->nb[1],
            (n_tokens - n_q)*inp->shadow_mask->nb[1]);

    kq = ggml_soft_max_ext(ctx0, kq, mask, kq_scale, hparams.f_max_alibi_bias);

    // sum over queries and heads: [n_kv, n_q*n_head] -> [n_q*n_head, n_kv] -> [1, n_kv]
    ggml_tensor * per_cell = ggml_reshape_2d(ctx0, kq, n_kv, kq->ne[1]*kq->ne[2]);
    per_cell = ggml_sum_rows(ctx0, ggml_cont(ctx0, ggml_transpose(ctx0, per_cell)));

    inp->importance = inp->importance ? ggml_add(ctx0, inp->importance, per_cell) : per_cell;
    ggml_set_name  (inp->importance, "kv_freeze_importance");
    ggml_set_output(inp->importance);
    ggml_build_forward_expand(gf, inp->importance);

    if (kvf->imp.export_q) {
        ggml_tensor * qe = ggml_cont(ctx0, q_last); // [n_embd_head, n_head, n_q]
        ggml_format_name(qe, "kv_freeze_query_l%d", il);
        ggml_set_output(qe);
        ggml_build_forward_expand(gf, qe);
        inp->queries.push_back({il, qe, kq_scale});
    }
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

void llama_kv_freeze::importance(llama_seq_id seq_id, std::vector<llama_pos> & pos, std::vector<float> & score) const {
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

    const int64_t n_kv = t->ne[1];

    std::vector<float> per_cell(n_kv);
    ggml_backend_tensor_get(t, per_cell.data(), 0, n_kv*sizeof(float));

    const auto & c = cells(seq_id);

    pos.clear();
    score.clear();
    for (const auto & [p, i] : c.seq_pos_get(seq_id)) {
        pos.push_back(p);
        score.push_back(i < (uint32_t) n_kv ? per_cell[i] : 0.0f);
    }
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
