#include "llama-kv-freeze.h"

#include "asrkf.h"

#include "llama-impl.h"
#include "llama-kv-cache.h"

#include <cstring>
#include <limits>

// what the patched llama.cpp calls (llama-kv-freeze-hooks.h): removals drop their offloaded copies, and edits or
// snapshots that would break the freeze state are refused

//
// hooks
//

using kvf_record_map = std::map<std::pair<llama_seq_id, llama_pos>, llama_kv_freeze_record>;

// erase the entries of m whose key (seq_id, pos) `hit` names, their host slots released
template <typename F>
static void kvf_release_if(llama_kv_host_store & store, kvf_record_map & m, F hit) {
    for (auto it = m.begin(); it != m.end();) {
        if (hit(it->first.first, it->first.second)) {
            store.release(it->second.slot);
            it = m.erase(it);
        } else {
            ++it;
        }
    }
}

void llama_kv_freeze::on_clear() {
    finish_pending(); // its thread writes into slots about to be released
    if (parked.empty()) {
        store.clear();
        records.clear();
        ahead.clear();
    } else { // the parked sequences' slots are not the cache's to clear
        const auto all = [](llama_seq_id, llama_pos) { return true; };
        kvf_release_if(store, records, all);
        kvf_release_if(store, ahead, all);
    }
    epoch++;
}

void llama_kv_freeze::on_seq_rm(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    finish_pending();
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    kvf_release_if(store, records, [&](llama_seq_id s, llama_pos p) { return (seq_id < 0 || s == seq_id) && p >= p0 && p < p1; });
    drop_ahead(seq_id, p0, p1);
    epoch++;
}

void llama_kv_freeze::on_seq_keep(llama_seq_id seq_id) {
    finish_pending();
    const auto other = [&](llama_seq_id s, llama_pos) { return s != seq_id; };
    kvf_release_if(store, records, other);
    kvf_release_if(store, ahead, other);
    epoch++;
}

void llama_kv_freeze::drop_ahead(llama_seq_id seq_id, llama_pos p0, llama_pos p1) {
    finish_pending(); // its thread may still be writing into these slots
    if (p0 < 0) {
        p0 = 0;
    }
    if (p1 < 0) {
        p1 = std::numeric_limits<llama_pos>::max();
    }
    kvf_release_if(store, ahead, [&](llama_seq_id s, llama_pos p) { return (seq_id < 0 || s == seq_id) && p >= p0 && p < p1; });
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
    return kvf_refuse(llama_kv_freeze_fmt("%s: refused: sequence %d has positions offloaded to host memory in [%d, %d) that this would "
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
            return kvf_refuse(llama_kv_freeze_fmt("seq_rm: refused: removing [%d, %d) of sequence %d would leave its offloaded position %d "
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
        return kvf_refuse(llama_kv_freeze_fmt("seq_cp: refused: position %d of sequence %d is frozen, and a copy to sequence %d would "
                "share its cell and its mask; unfreeze the range first", pf, seq_id_src, seq_id_dst));
    }
    return true;
}

bool llama_kv_freeze_allow_seq_add(const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1, llama_pos shift) {
    // the moved range and where it lands
    const llama_pos lo = std::min(std::max(p0, 0), std::max(p0, 0) + shift);
    const llama_pos hi = p1 < 0 ? -1 : std::max(p1, p1 + shift);
    if (kvf->has_offloaded(seq_id, lo, hi)) {
        return kvf_refuse("seq_add", seq_id, lo, hi);
    }
    // the shift rewrites the keys of the moved cells: copies made ahead of them would thaw the old rows
    const_cast<llama_kv_freeze *>(kvf)->drop_ahead(seq_id);
    return true;
}

bool llama_kv_freeze_allow_seq_div(const llama_kv_freeze * kvf, llama_seq_id seq_id, llama_pos p0, llama_pos p1, int d) {
    const llama_pos lo = d > 0 ? std::max(p0, 0) / d : 0;
    if (kvf->has_offloaded(seq_id, lo, p1)) {
        return kvf_refuse("seq_div", seq_id, lo, p1);
    }
    const_cast<llama_kv_freeze *>(kvf)->drop_ahead(seq_id); // as seq_add
    return true;
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
            return kvf_refuse(llama_kv_freeze_fmt("state_write: refused: position %d%s is frozen and a snapshot does not hold the "
                    "frozen flags; unfreeze first", pf, seq_id < 0 ? "" : llama_kv_freeze_fmt(" of sequence %d", seq_id).c_str()));
        }
    }
    return true;
}
