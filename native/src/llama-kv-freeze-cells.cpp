#include "llama-kv-freeze.h"

#include "asrkf.h"
#include "llama-kv-freeze-rows.h"

#include "llama-kv-cache.h"

#include <algorithm>
#include <cinttypes>
#include <cstring>
#include <set>

// the cell-state operations: freeze / unfreeze (a flag), offload (rows to the host store, cells freed), thaw (rows
// back into free cells), and the host reads of K rows

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

//
// thaw
//

void llama_kv_freeze::thaw(llama_seq_id seq_id, const std::vector<llama_pos> & pos, bool frozen, bool verify) {
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
    if (verify) {
        store.checksums(slot.data(), n, sums.data());
    }

    finish_copies();

    for (uint32_t i = 0; verify && i < n; ++i) {
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
