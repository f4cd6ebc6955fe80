#include "llama-kv-freeze.h"

#include "asrkf.h"
#include "llama-kv-freeze-rows.h"

#include <system_error>

#include "llama-kv-cache.h"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <limits>
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

using kvf_clock = std::chrono::steady_clock;

static double kvf_ms(kvf_clock::time_point a, kvf_clock::time_point b) {
    return std::chrono::duration<double, std::milli>(b - a).count();
}

void llama_kv_freeze::offload(llama_seq_id seq_id, const std::vector<llama_pos> & pos) {
    const auto t_start = kvf_clock::now();
    if (!lctx) {
        KVF_FAIL(ASRKF_EFREED, "the llama_context of this handle was freed");
    }
    finish_pending(); // the records' checksums, and the copies made ahead, are final once it is done

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

    // the positions copied ahead (offload_ahead) only free their cells; the others are copied now
    std::vector<uint32_t>  cell, cell_all(order.size());
    std::vector<llama_pos> cpos, cpos_ahead;
    cell.reserve(order.size());
    cpos.reserve(order.size());
    for (uint32_t i = 0; i < order.size(); ++i) {
        cell_all[i] = idx[order[i]];
        if (ahead.count({seq_id, pos[order[i]]})) {
            cpos_ahead.push_back(pos[order[i]]);
        } else {
            cell.push_back(idx[order[i]]);
            cpos.push_back(pos[order[i]]);
        }
    }

    // only rows copied now need the device to be done: releasing copies made ahead changes host state only (the
    // next decode, queued behind any graph still running, is what writes the freed cells). A controller frees one
    // cell per token that way, and a synchronize per token is what a GPU step cannot afford
    const auto t_prepared = kvf_clock::now();
    if (!cell.empty()) {
        sync();
    }
    const auto   t_synced     = kvf_clock::now();
    const auto   t_alloc0     = t_synced;
    const double hash_before  = store.hash_seconds;
    const double g_plan0 = gather_plan_s, g_queue0 = gather_queue_s, g_wait0 = gather_wait_s;
    const double g_stage0 = staging_s, g_call0 = gather_call_s;
    auto t_returned = kvf_clock::now(); // copy_to_host returned: then the records and the background thread
    const uint64_t g_passes0 = gather_passes;
    const auto   allocs_before = store.n_chunk_allocs;

    std::vector<llama_kv_host_slot> slot;
    auto t_alloc1 = t_alloc0;
    if (!cell.empty()) {
        slot = copy_records(records, seq_id, cell, cpos, "offload", t_alloc1, t_returned);
    }

    const auto t_copied = kvf_clock::now();

    // the copies made ahead become records (sync() above finished any copy of theirs still running)
    for (const llama_pos p : cpos_ahead) {
        auto it = ahead.find({seq_id, p});
        records.emplace(it->first, it->second); // its cell: where it was, as offload records it
        ahead.erase(it);
    }

    for (const uint32_t i : cell_all) {
        c.rm(i);
    }

    epoch++;

    // a release of copies made ahead moves nothing: no line (one per decoded token would cost more than it)
    if (trace_moves && !cell.empty()) {
        const auto t_end = kvf_clock::now();
        fprintf(stderr, "asrkf-trace offload n=%zu ahead=%zu cell_runs=%zu slot_runs=%zu chunk_allocs=%llu MB=%.1f sync_ms=%.3f "
                "prep_ms=%.3f alloc_ms=%.3f copy_ms=%.3f hash_ms=%.3f free_ms=%.3f total_ms=%.3f "
                "gather_plan_ms=%.3f gather_queue_ms=%.3f gather_wait_ms=%.3f gather_passes=%llu staging_ms=%.3f "
                "gather_call_ms=%.3f copy_fn_ms=%.3f records_thread_ms=%.3f\n",
                cell.size(), cpos_ahead.size(), kvf_runs(cell, slot).size(), kvf_slot_runs(slot).size(),
                (unsigned long long) (store.n_chunk_allocs - allocs_before), cell.size()*store.token_bytes()/1e6,
                kvf_ms(t_prepared, t_synced), kvf_ms(t_start, t_prepared), kvf_ms(t_alloc0, t_alloc1), kvf_ms(t_alloc1, t_copied),
                1e3*(store.hash_seconds - hash_before), kvf_ms(t_copied, t_end), kvf_ms(t_start, t_end),
                1e3*(gather_plan_s - g_plan0), 1e3*(gather_queue_s - g_queue0), 1e3*(gather_wait_s - g_wait0),
                (unsigned long long) (gather_passes - g_passes0), 1e3*(staging_s - g_stage0), 1e3*(gather_call_s - g_call0),
                kvf_ms(t_alloc1, t_returned), kvf_ms(t_returned, t_copied));
    }
}

// rows of resident cells (ascending) into new host slots, recorded in `into` under (seq_id, cpos[i]) with their
// checksums: offload's records, or the copies made ahead. Nothing is recorded on failure. Staged, the last round's
// copy into the slots is left to a background thread (pending) that every later operation waits for. t_alloced /
// t_returned: when the slots were allocated and when copy_to_host returned (the offload trace)
std::vector<llama_kv_host_slot> llama_kv_freeze::copy_records(std::map<std::pair<llama_seq_id, llama_pos>, llama_kv_freeze_record> & into,
        llama_seq_id seq_id, const std::vector<uint32_t> & cell, const std::vector<llama_pos> & cpos, const char * op,
        std::chrono::steady_clock::time_point & t_alloced, std::chrono::steady_clock::time_point & t_returned) {
    const auto & c = cells(seq_id);

    std::vector<llama_kv_host_slot> slot;
    try {
        slot = store.alloc((uint32_t) cell.size());
    } catch (const std::bad_alloc &) {
        KVF_FAIL(ASRKF_EBACKEND, "%s: out of host memory for %zu tokens (%zu bytes each)", op, cell.size(), store.token_bytes());
    }
    t_alloced = kvf_clock::now();

    std::function<void()> deferred;
    std::vector<uint64_t> sums(cell.size(), 0);
    try {
        copy_to_host(stream(seq_id), cell, slot, sums.data(), staged ? &deferred : nullptr);
        t_returned = kvf_clock::now();

        for (size_t i = 0; i < cell.size(); ++i) {
            llama_kv_freeze_record rec;
            rec.slot     = slot[i];
            rec.ext      = c.ext_get(cell[i]);
            rec.checksum = sums[i];
            rec.cell     = cell[i];

            into.emplace(std::make_pair(seq_id, cpos[i]), rec);
        }
    } catch (...) {
        finish_copies();
        for (size_t i = 0; i < cell.size(); ++i) {
            into.erase({seq_id, cpos[i]}); // new keys only: these positions were resident, without a copy
            store.release(slot[i]);
        }
        throw;
    }

    if (deferred) {
        auto job = std::make_unique<pending_offload>();
        job->keys.reserve(cpos.size());
        for (const llama_pos p : cpos) {
            job->keys.emplace_back(seq_id, p);
        }
        job->sums = std::move(sums); // the same buffer: the deferred work writes into it
        try {
            job->worker = std::thread(deferred); // a copy: a thread that fails to start leaves `deferred` whole
            pending = std::move(job);
        } catch (const std::system_error &) {
            deferred(); // no thread: finish here
            pending = std::move(job);
            finish_pending();
        }
    }
    return slot;
}

//
// offload ahead
//

void llama_kv_freeze::offload_ahead(llama_seq_id seq_id, const std::vector<llama_pos> & pos) {
    sync();

    auto & c = cells(seq_id);

    if (c.get_has_shift()) {
        KVF_FAIL(ASRKF_EREFUSED, "offload_ahead: a K-shift is pending; decode once (or call llama_memory_update) first");
    }

    // the checks of offload but the newest position's: a copy made ahead is refused nothing that offload allows
    const std::vector<uint32_t> idx = cells_of(seq_id, pos, "offload_ahead");
    for (size_t i = 0; i < idx.size(); ++i) {
        if (c.seq_count(idx[i]) != 1) {
            KVF_FAIL(ASRKF_EREFUSED, "offload_ahead: the cell of position %d is shared with another sequence", pos[i]);
        }
    }

    // the leaving order, as given (copies refused below leave it empty: nothing is queued without its copy)
    ahead_order.erase(seq_id);

    // copies of pos already made stay; those of other positions of seq_id are released
    std::vector<std::pair<uint32_t, llama_pos>> todo; // (cell, pos) to copy, by cell
    {
        std::set<llama_pos> want(pos.begin(), pos.end());
        for (auto it = ahead.lower_bound({seq_id, std::numeric_limits<llama_pos>::min()});
             it != ahead.end() && it->first.first == seq_id;) {
            if (want.count(it->first.second)) {
                ++it;
            } else {
                store.release(it->second.slot);
                it = ahead.erase(it);
            }
        }
        for (size_t i = 0; i < idx.size(); ++i) {
            if (!ahead.count({seq_id, pos[i]})) {
                todo.emplace_back(idx[i], pos[i]);
            }
        }
    }
    if (!todo.empty()) {
        std::sort(todo.begin(), todo.end()); // ascending cells: consecutive cells into consecutive slots

        std::vector<uint32_t>  cell(todo.size());
        std::vector<llama_pos> cpos(todo.size());
        for (size_t i = 0; i < todo.size(); ++i) {
            cell[i] = todo[i].first;
            cpos[i] = todo[i].second;
        }
        auto t_alloced = kvf_clock::now(), t_returned = t_alloced;
        copy_records(ahead, seq_id, cell, cpos, "offload_ahead", t_alloced, t_returned);
    }
    if (!pos.empty()) {
        ahead_order[seq_id] = ahead_queue{pos, 0};
    }
    // the cells are unchanged: no epoch bump, the importance of the latest decode still holds
}

std::vector<llama_pos> llama_kv_freeze::release_ahead(llama_seq_id seq_id, int32_t n, llama_pos pos_lo, llama_pos pos_hi) {
    if (n < 0) {
        KVF_FAIL(ASRKF_EINVAL, "release_ahead: n = %d; n >= 0 is required", n);
    }
    stream(seq_id); // range check
    std::vector<llama_pos> out;
    auto q = ahead_order.find(seq_id);
    if (n == 0 || q == ahead_order.end()) {
        return out;
    }
    auto & qu = q->second;
    size_t i = qu.next;
    out.reserve(n);
    for (; i < qu.pos.size() && (int32_t) out.size() < n; ++i) {
        const llama_pos p = qu.pos[i];
        if (p >= pos_lo && p < pos_hi && ahead.count({seq_id, p})) {
            out.push_back(p);
        }
    }
    if ((int32_t) out.size() < n) {
        ahead_order.erase(q);
        out.clear();
        return out;
    }
    offload(seq_id, out); // only frees cells: every one of them has its copy (offload finishes a pending copy first)
    qu.next = i;
    return out;
}

std::vector<llama_pos> llama_kv_freeze::ahead_queued(llama_seq_id seq_id) const {
    std::vector<llama_pos> out;
    const auto q = ahead_order.find(seq_id);
    if (q == ahead_order.end()) {
        return out;
    }
    for (size_t i = q->second.next; i < q->second.pos.size(); ++i) {
        if (ahead.count({seq_id, q->second.pos[i]})) {
            out.push_back(q->second.pos[i]);
        }
    }
    return out;
}

//
// thaw
//

void llama_kv_freeze::thaw(llama_seq_id seq_id, const std::vector<llama_pos> & pos, bool frozen, bool verify) {
    const auto t_start = kvf_clock::now();
    sync();
    const auto t_synced = kvf_clock::now();

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
    const auto t_planned = kvf_clock::now();

    const uint32_t strm    = stream(seq_id);
    const uint64_t kv_size = kv->get_size();

    std::vector<uint8_t> staging;

    const char * path = "per-run";
    size_t n_slot_runs = 0;

    // many runs on a device: one set_rows per tensor (scatter) instead of a copy per run, layer and tensor
    std::vector<ggml_tensor *> scatter_t;
    if (runs.size() >= kvf_gather_min_runs || force_gather || staged) {
        std::vector<std::pair<uint32_t, bool>> what; // (layer, is_v) of scatter_t[i]
        const size_t row_bytes = gatherable(scatter_t, what); // of all scattered tensors, per token
        auto host_row = [&](size_t i, size_t row) -> const uint8_t * {
            return what[i].second ? store.v_row(slot[row], what[i].first) : store.k_row(slot[row], what[i].first);
        };
        std::vector<int32_t> rows(n);
        for (uint32_t i = 0; i < n; ++i) {
            rows[i] = (int32_t) (strm*kv_size + cell[i]);
        }

        const auto slot_runs = kvf_slot_runs(slot);
        n_slot_runs = slot_runs.size();
        if (scatter_t.empty()) {
            // nothing to scatter
        } else if (!staged && kvf_slot_runs_direct(slot_runs.size(), n)) {
            // straight from the slots: one device copy per run of slots and tensor
            path = "scatter";
            if (!scatter(scatter_t, rows, slot_runs, host_row)) {
                scatter_t.clear();
            }
        } else {
            // slots spread over many runs (tokens recalled from all over the host tier), or a pageable store: the
            // rows are staged in pinned memory by the store's threads, in rounds of at most 256 MiB, and each round
            // goes up with one device copy per tensor
            path = "staged";
            const size_t n_round = std::min<size_t>(n, std::max<size_t>(1, (256u << 20)/std::max<size_t>(1, row_bytes)));
            uint8_t * stage = host_staging(n_round*row_bytes);
            for (size_t q0 = 0; q0 < n && !scatter_t.empty(); q0 += n_round) {
                const size_t m = std::min(n_round, n - q0);
                if (q0 > 0) {
                    finish_copies(); // the previous round has left the staging memory
                }
                std::vector<size_t> off(scatter_t.size());
                for (size_t i = 1; i < scatter_t.size(); ++i) {
                    off[i] = off[i - 1] + m*scatter_t[i - 1]->nb[1];
                }
                const size_t per_item = 64;
                store.parallel_for((m + per_item - 1)/per_item, [&](size_t item) {
                    const size_t j1 = std::min(m, (item + 1)*per_item);
                    for (size_t i = 0; i < scatter_t.size(); ++i) {
                        const size_t rb = scatter_t[i]->nb[1];
                        for (size_t j = item*per_item; j < j1; ++j) {
                            memcpy(stage + off[i] + j*rb, host_row(i, q0 + j), rb);
                        }
                    }
                });
                const std::vector<int32_t> rows_round(rows.begin() + q0, rows.begin() + q0 + m);
                const std::vector<kvf_run> one_run = { { 0, (uint32_t) m } };
                if (!scatter(scatter_t, rows_round, one_run, [&](size_t i, size_t j) -> const uint8_t * {
                        return stage + off[i] + j*scatter_t[i]->nb[1];
                    })) {
                    scatter_t.clear(); // every row is written per run below (rows already scattered again: same bytes)
                }
            }
        }
    }
    auto scattered = [&](const ggml_tensor * t) {
        return std::find(scatter_t.begin(), scatter_t.end(), t) != scatter_t.end();
    };
    const auto host_written = copy_host_runs(strm, cell, slot, runs, /*to_host =*/ false,
            [&](uint32_t il, bool is_v) { return scattered(is_v ? layer_v[il] : layer_k[il]); });
    auto written = [&](const ggml_tensor * t) {
        if (scattered(t)) {
            return true;
        }
        for (const auto & [il, is_v] : host_written) {
            if ((is_v ? layer_v[il] : layer_k[il]) == t) {
                return true;
            }
        }
        return false;
    };

    for (uint32_t il = 0; il < layer_k.size(); ++il) {
        ggml_tensor * k = layer_k[il];
        ggml_tensor * v = layer_v[il];

        const size_t kb = store.k_row_bytes(il);
        const size_t vb = store.v_row_bytes(il);

        // decided once per layer, not per run: the lookup scans every scattered tensor
        const bool copy_k = !written(k);
        const bool copy_v = !kv->v_trans && !written(v);
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

    const auto t_queued = kvf_clock::now();

    // verify while the copies run: the rows land in free cells, which no attention reads until the cells are
    // given their positions below, so a corrupted row is refused before it can reach attention
    std::vector<uint64_t> sums(n);
    if (verify) {
        store.checksums(slot.data(), n, sums.data());
    }
    const auto t_hashed = kvf_clock::now();

    finish_copies();
    const auto t_copied = kvf_clock::now();

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

    if (trace_moves) {
        const auto t_end = kvf_clock::now();
        fprintf(stderr, "asrkf-trace thaw n=%u cell_runs=%zu slot_runs=%zu path=%s MB=%.1f sync_ms=%.3f plan_ms=%.3f "
                "queue_ms=%.3f hash_ms=%.3f wait_ms=%.3f commit_ms=%.3f total_ms=%.3f\n",
                n, runs.size(), n_slot_runs, path, n*store.token_bytes()/1e6, kvf_ms(t_start, t_synced),
                kvf_ms(t_synced, t_planned), kvf_ms(t_planned, t_queued), kvf_ms(t_queued, t_hashed),
                kvf_ms(t_hashed, t_copied), kvf_ms(t_copied, t_end), kvf_ms(t_start, t_end));
    }
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

    ggml_tensor * k = layer_k[ikv];

    // resident rows on a device, in many runs (recall asks for every movable token, and after a long prompt their
    // cells are in no order): one get_rows into pinned staging, then host copies, instead of a device copy per run
    // into pageable memory
    std::vector<int32_t> rows;
    std::vector<size_t>  rows_at; // output index of rows[j]
    size_t n_runs = 0;
    for (size_t i = 0; i < pos.size(); ++i) {
        if (cell[i] >= 0) {
            n_runs += i == 0 || cell[i - 1] < 0 || cell[i] != cell[i - 1] + 1;
            rows.push_back((int32_t) (strm*kv->get_size() + (size_t) cell[i]));
            rows_at.push_back(i);
        }
    }
    if (n_runs >= kvf_gather_min_runs && can_gather(k)) {
        uint8_t * stage = host_staging(rows.size()*kb);
        const std::vector<kvf_run> one_run = { { 0, (uint32_t) rows.size() } };
        if (gather({ k }, rows, one_run, [&](size_t, size_t a) { return stage + a*kb; }, nullptr)) {
            for (size_t j = 0; j < rows.size(); ++j) {
                memcpy(out + rows_at[j]*kb, stage + j*kb, kb);
            }
            for (size_t i = 0; i < pos.size(); ++i) {
                if (cell[i] < 0) {
                    memcpy(out + i*kb, store.k_row(records.at({seq_id, pos[i]}).slot, ikv), kb);
                }
            }
            return;
        }
    }

    // resident rows: one copy per run of consecutive cells that land in consecutive output rows
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
    debug_corrupt_slot(it->second.slot, byte);
}

void llama_kv_freeze::debug_corrupt_parked(int64_t park_id, llama_pos pos, uint64_t byte) {
    sync();

    auto it = parked.find(park_id);
    if (it != parked.end()) {
        for (const auto & e : it->second.entries) {
            if (e.pos == pos) {
                debug_corrupt_slot(e.rec.slot, byte);
                return;
            }
        }
    }
    KVF_FAIL(ASRKF_EINVAL, "debug_corrupt: position %d is not parked under id %lld", pos, (long long) park_id);
}

void llama_kv_freeze::debug_corrupt_slot(const llama_kv_host_slot & slot, uint64_t byte) {
    if (byte >= store.token_bytes()) {
        KVF_FAIL(ASRKF_EINVAL, "debug_corrupt: byte %" PRIu64 " is past the %zu bytes of a token", byte, store.token_bytes());
    }

    // walk the per-layer rows to find the byte
    uint64_t rest = byte;
    for (uint32_t il = 0; il < store.n_layer(); ++il) {
        if (rest < store.k_row_bytes(il)) {
            store.k_row(slot, il)[rest] ^= 0x5a;
            return;
        }
        rest -= store.k_row_bytes(il);
        if (rest < store.v_row_bytes(il)) {
            store.v_row(slot, il)[rest] ^= 0x5a;
            return;
        }
        rest -= store.v_row_bytes(il);
    }
}
