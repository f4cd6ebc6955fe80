#pragma once

// The only declarations the patched llama.cpp sources see (native/patches/): calls from the KV cache, the graph
// builder and the context into the freeze controller. Each one is a no-op unless a controller is attached.

#include "llama.h"

struct ggml_backend_sched;
struct ggml_context;
struct ggml_cgraph;
struct ggml_tensor;
struct llama_cparams;
struct llama_hparams;
struct llama_kv_freeze;
struct llama_ubatch;
class  llama_kv_cache_context;
class  llm_graph_result;

// llama_kv_cache: positions removed from the cache also leave the host store
void llama_kv_freeze_on_clear   (llama_kv_freeze * kvf);
void llama_kv_freeze_on_seq_rm  (llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
void llama_kv_freeze_on_seq_keep(llama_kv_freeze * kvf, llama_seq_id seq_id);

// llama_kv_cache(_iswa): false (and an error logged) when the edit would skip offloaded positions or land on them
// (a shift or copy over them, a snapshot without them, a removal that leaves one above the newest resident
// position), copy a frozen cell's flag to another sequence, or save a snapshot without the frozen flags
bool llama_kv_freeze_allow_seq_rm (const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1);
bool llama_kv_freeze_allow_seq_cp (const llama_kv_freeze * kvf, llama_seq_id seq_id_src, llama_seq_id seq_id_dst, llama_pos p0, llama_pos p1);
bool llama_kv_freeze_allow_seq_add(const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift);
bool llama_kv_freeze_allow_seq_div(const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d);
bool llama_kv_freeze_allow_state  (const llama_kv_freeze * kvf, const char * op, llama_seq_id seq_id);

// llama_context destructor
void llama_kv_freeze_on_context_free(llama_context * lctx);

// llama_context::decode, after each ubatch's graph and its logits copy were queued: the controller's outputs are
// copied behind them (one synchronize per step reads the logits, the importance and the entropy)
void llama_kv_freeze_on_computed(llama_kv_freeze * kvf, ggml_backend_sched * sched);

// graph builder: once per graph with a KV cache, then once per attention layer of that cache, then once with the
// logits (nullptr when the graph has none)
void llama_kv_freeze_build_input(llama_kv_freeze * kvf, ggml_context * ctx0, llm_graph_result * res, const llama_ubatch & ubatch,
        const llama_cparams & cparams, const llama_kv_cache_context * mctx, ggml_tensor * kq_mask);
void llama_kv_freeze_build_layer(llama_kv_freeze * kvf, ggml_context * ctx0, ggml_cgraph * gf, const llama_hparams & hparams,
        ggml_tensor * q, ggml_tensor * k, float kq_scale, int il);
void llama_kv_freeze_build_output(llama_kv_freeze * kvf, ggml_context * ctx0, ggml_cgraph * gf, ggml_tensor * logits);
