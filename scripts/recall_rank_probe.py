"""Where recall would rank a needle: one asrkf prefill per case, then, at recall time, several rankings of the
movable tokens, and the worst rank of the answer's tokens under each (kept if below the device cells to give).

  python scripts/recall_rank_probe.py needle-docs,needle-code,needle-prose 0.3,0.7

A: the first version (softmax over the movable tokens alone, pooling +-3); B: the sinks and recent window in the
softmax (pooling +-3, +-8); C: each head normalised, max over heads; D: votes of per-head top-k; E: the question
queries only; F: blocks of 16. Qwen2.5-Coder-0.5B, 4,096 tokens, 1,024 cells (docs/controller.md).
"""
import sys, json, time
import numpy as np
import asrkf_gguf
from asrkf_gguf.engine import Engine
from asrkf_gguf.evaluation.grid import Tokenizer
from asrkf_gguf.evaluation.tasks import make_case
from asrkf_gguf.models import fetch_qwen_coder_model, fetch_haystack_essays
from asrkf_gguf.kv import CellState
from asrkf_gguf.recall import dequantize_rows
from asrkf_gguf.controller import pooled_max

path = str(fetch_qwen_coder_model(progress=False))
essays = [p.read_text(encoding="utf-8", errors="replace") for p in fetch_haystack_essays(progress=False)]
tasks = sys.argv[1].split(","); depths = [float(x) for x in sys.argv[2].split(",")]
ctx = 4096; budget = 1024

def head_probs(kv, layers, keys_pos, q_take=None):
    """per layer: p [n_q, n_head, n_keys] causal softmax over keys_pos (all given keys)."""
    info = kv.info(); d = info.n_embd_head_k
    newest = int(kv.cells(0)[0].max())
    out = []
    for il in layers:
        q, scale = kv.query(il)
        if q_take is not None: q = q[-q_take:]
        q_pos = np.arange(newest - q.shape[0] + 1, newest + 1)
        k = dequantize_rows(kv.k_rows(il, keys_pos, 0), info.type_k, info.n_head_kv * d).reshape(len(keys_pos), info.n_head_kv, d)
        n_q, n_head, _ = q.shape; g = n_head // info.n_head_kv
        lg = np.einsum("tkgd,jkd->tkgj", q.reshape(n_q, info.n_head_kv, g, d), k, optimize=True) * scale
        later = keys_pos[None, :] > q_pos[:, None]
        lg = np.where(later[:, None, None, :], -np.inf, lg)
        lg -= lg.max(-1, keepdims=True); p = np.exp(lg); p /= p.sum(-1, keepdims=True)
        out.append(p.reshape(n_q, n_head, len(keys_pos)))
    return out

results = []
with Tokenizer(path) as tok:
    for task in tasks:
        for d in depths:
            case = make_case(task, ctx, d, 0, tok.count, essays)
            ans = case.answers[0]
            eng = Engine(path, ctx=ctx, kv_budget=budget, flash_attn="on", n_threads=2)
            ctl = eng.controller
            full = eng.session.chat_prompt([{"role": "user", "content": case.turns[-1]}])
            off = full.find(ans)
            a0 = len(eng.session.tokenize(full[:off], add_special=True))
            a1 = len(eng.session.tokenize(full[:off + len(ans)], add_special=True))
            span = np.arange(a0 - 1, a1 + 1)  # answer tokens (+-1 for tokenization boundary)
            orig = ctl.recall
            def probe():
                t = ctl.table
                movable = np.concatenate([ctl.policy.candidates(t, s) for s in (CellState.ACTIVE, CellState.FROZEN, CellState.OFFLOADED)])
                movable.sort()
                n_res = int(np.count_nonzero(t.state[movable] != CellState.OFFLOADED))
                fixed = np.setdiff1d(np.concatenate([t.positions(CellState.ACTIVE), t.positions(CellState.FROZEN)]), movable)
                keys = np.concatenate([movable, fixed])
                t0 = time.time()
                P = head_probs(ctl.kv, ctl.layers, keys)          # list of [n_q, n_head, n_keys]
                dt = time.time() - t0
                nm = movable.size
                variants = {}
                # A: current (movable-only denominator)
                from asrkf_gguf.recall import recall_mass
                mA = recall_mass(ctl.kv, movable, ctl.layers, 0)
                variants["A_cur_pool3"] = pooled_max(movable, mA, 3, t.n)
                S = np.stack([p.sum(0) for p in P])  # [L, H, n_keys]
                mB = S.sum((0, 1))[:nm]
                variants["B_truedenom_pool3"] = pooled_max(movable, mB, 3, t.n)
                variants["B_truedenom_pool8"] = pooled_max(movable, mB, 8, t.n)
                # C: per-head normalised by its doc mass then max over heads
                doc = S[:, :, :nm]
                variants["C_maxhead_pool3"] = pooled_max(movable, (doc / doc.sum(-1, keepdims=True)).max((0, 1)), 3, t.n)
                # D: per-head rank votes: fraction of heads that put the token in their top-k
                kk = max(1, n_res // 4)
                flat = doc.reshape(-1, nm)
                top = np.argpartition(-flat, kk, axis=1)[:, :kk]
                votes = np.zeros(nm); np.add.at(votes, top.ravel(), 1)
                variants["D_votes_pool3"] = pooled_max(movable, votes, 3, t.n)
                # E: only question queries (last 24 minus template): take q_take
                Pq = [p[-24:-5] for p in P]
                mE = np.stack([p.sum(0) for p in Pq]).sum((0, 1))[:nm]
                variants["E_q_only_pool3"] = pooled_max(movable, mE, 3, t.n)
                # F: true denom, sum over heads of sqrt mass (less dominated)
                blk = (movable // 16)
                bm = np.zeros(blk.max() + 1); np.maximum.at(bm, blk, mB)
                variants["F_block16"] = bm[blk]
                row = dict(task=task, depth=d, ans=ans, span=[int(span[0]), int(span[-1])], n_res=n_res, n_mov=nm, score_s=round(dt, 2))
                for name, sc in variants.items():
                    order = np.argsort(-sc, kind="stable")
                    rank = np.empty(nm, int); rank[order] = np.arange(nm)
                    idx = np.searchsorted(movable, span[1:-1])
                    ok = (idx < nm) & (movable[np.minimum(idx, nm - 1)] == span[1:-1])
                    r = rank[idx[ok]]
                    row[name] = int(r.max()) if r.size else -1
                # where was the needle after prefill
                row["state_after_prefill"] = [int(x) for x in t.state[span]]
                print(json.dumps(row), flush=True)
                return orig()
            ctl.recall = probe
            t0 = time.time()
            reply = "".join(eng.chat(case.turns[-1], max_tokens=24))
            print(json.dumps(dict(reply=reply[:50], passed=ans in reply, sec=round(time.time() - t0, 1))), flush=True)
            eng.close()
