#include "llama-kv-freeze.h"

#include "asrkf.h"

#include "llama-kv-cache.h"

#include <algorithm>
#include <cstring>
#include <limits>

// session export / import: one sequence's K/V in one buffer, resident cells (with their cell index and frozen flag)
// and offloaded positions (with their host copy and checksum) alike, so that a conversation can be written to disk
// or parked in memory and restored bit-identically into an empty sequence of a context with the same cache.
//
// Layout (native byte order; the header says which):
//   header   magic "ASRKFKV1", u32 version, u32 byte-order mark 0x01020304, u32 sizeof(llama_kv_cell_ext),
//            u32 n_layer_kv, u32 n_cells, i32 type_k, i32 type_v, u32 v_trans, u32 head, u32 n_entries,
//            u32 n_resident, u64 token_bytes
//   layers   n_layer_kv x (i32 model layer id, u64 K row bytes, u64 V row bytes)
//   entries  n_entries x (i32 pos, u32 cell, u8 state, 3 x u8 zero, ext, u64 checksum of the rows), by position
//   u64      FNV-1a of header + layers + entries
//   rows     n_entries x token_bytes: per entry, per layer, the K row then the V row (cache type, stored space)
// The rows of an entry are checked against its checksum (the host store's, so offloaded rows keep theirs), the
// rest against the FNV-1a.

static const char     kvs_magic[8] = { 'A', 'S', 'R', 'K', 'F', 'K', 'V', '1' };
static const uint32_t kvs_version  = 1;
static const uint32_t kvs_bom      = 0x01020304;

namespace {

struct kvs_entry {
    llama_pos         pos;
    uint32_t          cell;
    uint8_t           state;
    llama_kv_cell_ext ext;
    uint64_t          checksum;
};

constexpr size_t kvs_header_bytes = 8 + 4*11 + 8;
constexpr size_t kvs_layer_bytes  = 4 + 8 + 8;
constexpr size_t kvs_entry_bytes  = 4 + 4 + 4 + sizeof(llama_kv_cell_ext) + 8;

uint64_t fnv1a(const uint8_t * p, size_t n, uint64_t h = 1469598103934665603ull) {
    for (size_t i = 0; i < n; ++i) {
        h ^= p[i];
        h *= 1099511628211ull;
    }
    return h;
}

// copy(j, il, is_v, offset) for every row of n entries, offset: where that row starts within a token's rows in a
// session ([K 0][V 0][K 1][V 1]...); blocks of entries spread over the store's threads (the rows of a session are
// GBs: one thread's memcpy was most of a park or a switch)
template <typename F>
static void kvs_copy_rows(llama_kv_host_store & store, size_t n, F && copy) {
    const uint32_t n_layer = store.n_layer();
    std::vector<size_t> k_off(n_layer), v_off(n_layer);
    size_t off = 0;
    for (uint32_t il = 0; il < n_layer; ++il) {
        k_off[il] = off;
        v_off[il] = off + store.k_row_bytes(il);
        off += store.k_row_bytes(il) + store.v_row_bytes(il);
    }
    const size_t block = 64;
    auto work = [&](size_t b) {
        for (size_t j = b*block; j < std::min(n, (b + 1)*block); ++j) {
            for (uint32_t il = 0; il < n_layer; ++il) {
                copy(j, il, false, k_off[il]);
                copy(j, il, true,  v_off[il]);
            }
        }
    };
    const size_t n_blocks = (n + block - 1)/block;
    if (n_blocks > 1) {
        store.parallel_for(n_blocks, work);
    } else if (n_blocks == 1) {
        work(0);
    }
}

struct kvs_writer {
    uint8_t * p;

    template <typename T> void put(const T & v) { memcpy(p, &v, sizeof(T)); p += sizeof(T); }
    void bytes(const void * src, size_t n) { memcpy(p, src, n); p += n; }
};

struct kvs_reader {
    const uint8_t * p;
    const uint8_t * end;

    void need(size_t n) const {
        if ((size_t) (end - p) < n) {
            KVF_FAIL(ASRKF_EINVAL, "session load: the data ends early (truncated)");
        }
    }
    template <typename T> T get() { need(sizeof(T)); T v; memcpy(&v, p, sizeof(T)); p += sizeof(T); return v; }
    void bytes(void * dst, size_t n) { need(n); memcpy(dst, p, n); p += n; }
};

// releases slots of the host store unless kept
struct kvs_slots {
    llama_kv_host_store & store;
    std::vector<llama_kv_host_slot> slot;
    bool keep = false;

    ~kvs_slots() {
        if (!keep) {
            for (const auto & s : slot) {
                store.release(s);
            }
        }
    }
};

// one entry of a session being written: its rows are in a host slot
struct kvs_out {
    llama_pos                  pos;
    uint32_t                   cell;
    uint8_t                    state;
    llama_kv_cell_ext          ext;
    uint64_t                   checksum;
    const llama_kv_host_slot * slot;
};

} // namespace

static size_t kvs_write(llama_kv_freeze & kvf, uint32_t head, const std::vector<kvs_out> & order, uint32_t n_resident,
        uint8_t * out);

size_t llama_kv_freeze::session_bytes(size_t n_entries) const {
    return kvs_header_bytes + layer_k.size()*kvs_layer_bytes + n_entries*kvs_entry_bytes + 8 + n_entries*store.token_bytes();
}

void llama_kv_freeze::resident_to_host(llama_seq_id seq_id, const std::vector<std::pair<llama_pos, uint32_t>> & res,
        std::vector<llama_kv_host_slot> & slot, std::vector<uint64_t> & sums, const char * op) {
    slot.clear();
    sums.assign(res.size(), 0);
    if (res.empty()) {
        return;
    }
    // ascending cell order: consecutive cells land in consecutive slots (one copy per run, as offload does)
    std::vector<std::pair<uint32_t, size_t>> by_cell; // (cell, index into res)
    for (size_t i = 0; i < res.size(); ++i) {
        by_cell.emplace_back(res[i].second, i);
    }
    std::sort(by_cell.begin(), by_cell.end());

    std::vector<llama_kv_host_slot> got;
    try {
        got = store.alloc((uint32_t) res.size());
    } catch (const std::bad_alloc &) {
        KVF_FAIL(ASRKF_EBACKEND, "%s: out of host memory for %zu tokens (%zu bytes each)", op, res.size(), store.token_bytes());
    }
    std::vector<uint32_t> cell(res.size());
    for (size_t k = 0; k < by_cell.size(); ++k) {
        cell[k] = by_cell[k].first;
    }
    std::vector<uint64_t> ksums(res.size(), 0);
    try {
        copy_to_host(stream(seq_id), cell, got, ksums.data());
        finish_copies();
    } catch (...) {
        finish_copies();
        for (const auto & s : got) {
            store.release(s);
        }
        throw;
    }
    slot.resize(res.size());
    for (size_t k = 0; k < by_cell.size(); ++k) {
        slot[by_cell[k].second] = got[k];
        sums[by_cell[k].second] = ksums[k];
    }
}

void llama_kv_freeze::verify_slots(const std::vector<const llama_kv_freeze_record *> & rec, const std::vector<llama_pos> & pos,
        const char * op) {
    std::vector<llama_kv_host_slot> slot;
    slot.reserve(rec.size());
    for (const auto * r : rec) {
        slot.push_back(r->slot);
    }
    std::vector<uint64_t> sums(rec.size());
    store.checksums(slot.data(), slot.size(), sums.data());
    for (size_t i = 0; i < rec.size(); ++i) {
        if (sums[i] != rec[i]->checksum) {
            KVF_FAIL(ASRKF_ECHECKSUM, "%s: the host copy of position %d failed its checksum (corrupted); nothing was changed", op, pos[i]);
        }
    }
}

void llama_kv_freeze::session_save(llama_seq_id seq_id, uint8_t * out, size_t size, size_t & n_out) {
    sync();

    if (iswa) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "session save: the model's sliding-window layers keep their K/V outside the managed "
                "cache, so a session would miss them");
    }

    const uint32_t strm = stream(seq_id);
    auto & c = cells(seq_id);

    const auto res = resident(seq_id);
    const auto off = offloaded(seq_id);

    n_out = session_bytes(res.size() + off.size());
    if (!out) {
        return;
    }
    if (size < n_out) {
        KVF_FAIL(ASRKF_EINVAL, "session save: the output holds %zu bytes, %zu are needed", size, n_out);
    }

    if (c.get_has_shift()) {
        KVF_FAIL(ASRKF_EREFUSED, "session save: a K-shift is pending; decode once (or call llama_memory_update) first");
    }
    for (const auto & [p, i] : res) {
        if (c.seq_count(i) != 1) {
            KVF_FAIL(ASRKF_EREFUSED, "session save: the cell of position %d is shared with another sequence", p);
        }
    }

    // the host copies travel with their checksums: a copy that fails its checksum now is not written
    {
        std::vector<const llama_kv_freeze_record *> rec;
        for (const llama_pos p : off) {
            rec.push_back(&records.at({seq_id, p}));
        }
        verify_slots(rec, off, "session save");
    }

    // resident rows: gathered into slots of the host store (in ascending cell order, as offload does), hashed as
    // they land, written out, and released
    kvs_slots tmp{store, {}};
    std::vector<uint64_t> sums;
    resident_to_host(seq_id, res, tmp.slot, sums, "session save");

    // entries by position: resident and offloaded merged
    std::vector<kvs_out> order;
    order.reserve(res.size() + off.size());
    for (size_t i = 0; i < res.size(); ++i) {
        const uint32_t cell = res[i].second;
        order.push_back({res[i].first, cell, (uint8_t) (c.is_frozen(cell) ? ASRKF_CELL_FROZEN : ASRKF_CELL_ACTIVE),
                c.ext_get(cell), sums[i], &tmp.slot[i]});
    }
    for (const llama_pos p : off) {
        const auto & rec = records.at({seq_id, p});
        order.push_back({p, rec.cell, (uint8_t) ASRKF_CELL_OFFLOADED, rec.ext, rec.checksum, &rec.slot});
    }
    std::sort(order.begin(), order.end(), [](const kvs_out & a, const kvs_out & b) { return a.pos < b.pos; });

    GGML_ASSERT(kvs_write(*this, kv->v_heads[strm], order, (uint32_t) res.size(), out) == n_out);
}

// the session layout of entries whose rows are all in host slots (by position); returns the bytes written
static size_t kvs_write(llama_kv_freeze & kvf, uint32_t head, const std::vector<kvs_out> & order, uint32_t n_resident,
        uint8_t * out) {
    llama_kv_host_store & store = kvf.store;
    const uint32_t n_layer = (uint32_t) kvf.layer_k.size();

    kvs_writer w{out};
    w.bytes(kvs_magic, sizeof(kvs_magic));
    w.put<uint32_t>(kvs_version);
    w.put<uint32_t>(kvs_bom);
    w.put<uint32_t>((uint32_t) sizeof(llama_kv_cell_ext));
    w.put<uint32_t>(n_layer);
    w.put<uint32_t>(kvf.kv->get_size());
    w.put<int32_t>((int32_t) kvf.kv->type_k());
    w.put<int32_t>((int32_t) kvf.kv->type_v());
    w.put<uint32_t>(kvf.v_trans() ? 1 : 0);
    w.put<uint32_t>(head);
    w.put<uint32_t>((uint32_t) order.size());
    w.put<uint32_t>(n_resident);
    w.put<uint64_t>(store.token_bytes());
    for (uint32_t il = 0; il < n_layer; ++il) {
        w.put<int32_t>(kvf.layer_il[il]);
        w.put<uint64_t>(store.k_row_bytes(il));
        w.put<uint64_t>(store.v_row_bytes(il));
    }
    for (const auto & e : order) {
        w.put<int32_t>(e.pos);
        w.put<uint32_t>(e.cell);
        const uint8_t pad[4] = { e.state, 0, 0, 0 };
        w.bytes(pad, 4);
        w.bytes(&e.ext, sizeof(e.ext));
        w.put<uint64_t>(e.checksum);
    }
    w.put<uint64_t>(fnv1a(out, (size_t) (w.p - out)));

    // the rows, entry after entry, copied on the store's threads: one thread copied ~1.2 GB/s (3.9 GB for a
    // 30k-token chat of an 8B model took 3 s on the H200's host)
    uint8_t * rows = w.p;
    const size_t tb = store.token_bytes();
    kvs_copy_rows(store, order.size(), [&](size_t j, uint32_t il, bool is_v, size_t off) {
        uint8_t * dst = rows + j*tb + off;
        const uint8_t * src = is_v ? store.v_row(*order[j].slot, il) : store.k_row(*order[j].slot, il);
        memcpy(dst, src, is_v ? store.v_row_bytes(il) : store.k_row_bytes(il));
    });
    w.p += order.size()*tb;
    return (size_t) (w.p - out);
}

// parse and validate everything but the rows' checksums; entries ordered by position
static void kvs_parse(const llama_kv_freeze & kvf, const uint8_t * data, size_t size, uint32_t & head,
        std::vector<kvs_entry> & entries, const uint8_t *& rows) {
    kvs_reader r{data, data + size};

    char magic[8];
    r.bytes(magic, sizeof(magic));
    if (memcmp(magic, kvs_magic, sizeof(magic)) != 0) {
        KVF_FAIL(ASRKF_EINVAL, "session load: not asrkf session K/V data (bad magic)");
    }
    const uint32_t version = r.get<uint32_t>();
    if (version != kvs_version) {
        KVF_FAIL(ASRKF_EINVAL, "session load: K/V data format version %u, this library reads version %u", version, kvs_version);
    }
    if (r.get<uint32_t>() != kvs_bom) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data was written on a machine of the other byte order");
    }
    const uint32_t ext_bytes = r.get<uint32_t>();
    if (ext_bytes != sizeof(llama_kv_cell_ext)) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data holds %u-byte cell extensions, this llama.cpp has %zu (another llama.cpp version)",
                ext_bytes, sizeof(llama_kv_cell_ext));
    }
    const uint32_t n_layer = r.get<uint32_t>();
    const uint32_t n_cells = r.get<uint32_t>();
    const int32_t  type_k  = r.get<int32_t>();
    const int32_t  type_v  = r.get<int32_t>();
    const uint32_t v_trans = r.get<uint32_t>();
    head                   = r.get<uint32_t>();
    const uint32_t n_entries  = r.get<uint32_t>();
    const uint32_t n_resident = r.get<uint32_t>();
    const uint64_t token_bytes = r.get<uint64_t>();

    const llama_kv_cache & cache = *kvf.kv;
    if (n_layer != kvf.layer_k.size()) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data has %u layers, this cache %zu (another model)", n_layer, kvf.layer_k.size());
    }
    if (type_k != (int32_t) cache.type_k() || type_v != (int32_t) cache.type_v()) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data holds K %s / V %s, this cache K %s / V %s (another --kv-type)",
                ggml_type_name((ggml_type) type_k), ggml_type_name((ggml_type) type_v),
                ggml_type_name(cache.type_k()), ggml_type_name(cache.type_v()));
    }
    if (n_cells != cache.get_size()) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data comes from a cache of %u cells, this one has %u (another device budget)",
                n_cells, cache.get_size());
    }
    if ((v_trans != 0) != kvf.v_trans()) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data was saved with flash attention %s, this context has it %s",
                v_trans ? "off" : "on", kvf.v_trans() ? "off" : "on");
    }
    if (token_bytes != kvf.store.token_bytes()) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data has %llu bytes a token, this cache %zu (another model)",
                (unsigned long long) token_bytes, kvf.store.token_bytes());
    }
    for (uint32_t il = 0; il < n_layer; ++il) {
        const int32_t  lid = r.get<int32_t>();
        const uint64_t kb  = r.get<uint64_t>();
        const uint64_t vb  = r.get<uint64_t>();
        if (lid != kvf.layer_il[il] || kb != kvf.store.k_row_bytes(il) || vb != kvf.store.v_row_bytes(il)) {
            KVF_FAIL(ASRKF_EINVAL, "session load: layer %u of the K/V data (model layer %d, %llu + %llu bytes a row) does not match "
                    "this cache (model layer %d, %zu + %zu) (another model)", il, lid, (unsigned long long) kb,
                    (unsigned long long) vb, kvf.layer_il[il], kvf.store.k_row_bytes(il), kvf.store.v_row_bytes(il));
        }
    }
    const uint64_t need = kvs_header_bytes + (uint64_t) n_layer*kvs_layer_bytes + (uint64_t) n_entries*(kvs_entry_bytes + token_bytes) + 8;
    if (need != size) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data is %zu bytes, its header says %llu (truncated or padded)",
                size, (unsigned long long) need);
    }

    entries.resize(n_entries);
    uint32_t n_res = 0;
    std::vector<uint8_t> used(n_cells, 0);
    llama_pos res_max = -1;
    llama_pos off_max = -1;
    for (uint32_t i = 0; i < n_entries; ++i) {
        auto & e = entries[i];
        e.pos  = r.get<int32_t>();
        e.cell = r.get<uint32_t>();
        uint8_t pad[4];
        r.bytes(pad, 4);
        e.state = pad[0];
        r.bytes(&e.ext, sizeof(e.ext));
        e.checksum = r.get<uint64_t>();
    }
    const uint64_t sum = fnv1a(data, (size_t) (r.p - data));
    if (r.get<uint64_t>() != sum) {
        KVF_FAIL(ASRKF_EINVAL, "session load: the K/V data's table failed its checksum (corrupted)");
    }
    for (uint32_t i = 0; i < n_entries; ++i) {
        const auto & e = entries[i];
        if (e.pos < 0 || (i > 0 && e.pos <= entries[i - 1].pos)) {
            KVF_FAIL(ASRKF_EINVAL, "session load: entry %u has position %d, not above the previous one", i, e.pos);
        }
        if (e.cell >= n_cells) {
            KVF_FAIL(ASRKF_EINVAL, "session load: position %d names cell %u of %u", e.pos, e.cell, n_cells);
        }
        if (e.state == ASRKF_CELL_OFFLOADED) {
            off_max = e.pos;
            continue;
        }
        if (e.state != ASRKF_CELL_ACTIVE && e.state != ASRKF_CELL_FROZEN) {
            KVF_FAIL(ASRKF_EINVAL, "session load: position %d has unknown state %u", e.pos, e.state);
        }
        if (used[e.cell]++) {
            KVF_FAIL(ASRKF_EINVAL, "session load: cell %u holds two positions", e.cell);
        }
        res_max = e.pos;
        n_res++;
    }
    if (n_res != n_resident) {
        KVF_FAIL(ASRKF_EINVAL, "session load: %u resident entries, the header says %u", n_res, n_resident);
    }
    if (off_max >= 0 && off_max > res_max) {
        KVF_FAIL(ASRKF_EINVAL, "session load: offloaded position %d is above the newest resident one (%d)", off_max, res_max);
    }
    if (head >= n_cells) {
        head = 0;
    }
    rows = r.p;
}

void llama_kv_freeze::session_load(llama_seq_id seq_id, const uint8_t * data, size_t size, bool check_only) {
    sync();

    if (iswa) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "session load: the model's sliding-window layers keep their K/V outside the managed cache");
    }
    if (!data) {
        KVF_FAIL(ASRKF_EINVAL, "session load: data is NULL");
    }

    const uint32_t strm = stream(seq_id);
    auto & c = cells(seq_id);

    uint32_t head = 0;
    std::vector<kvs_entry> entries;
    const uint8_t * rows = nullptr;
    kvs_parse(*this, data, size, head, entries, rows);

    // the sequence's current content is replaced: its own cells may be reused, no other sequence's
    for (const auto & e : entries) {
        if (e.state != ASRKF_CELL_OFFLOADED && !c.is_empty(e.cell) && !(c.seq_has(e.cell, seq_id) && c.seq_count(e.cell) == 1)) {
            KVF_FAIL(ASRKF_EREFUSED, "session load: cell %u (for position %d) is in use by another sequence", e.cell, e.pos);
        }
    }
    if (c.get_has_shift()) {
        KVF_FAIL(ASRKF_EREFUSED, "session load: a K-shift is pending; decode once (or call llama_memory_update) first");
    }
    if (check_only) {
        return;
    }

    // every row into a host slot and checked before anything in the cache changes
    const size_t   tb      = store.token_bytes();
    const uint32_t n_layer = (uint32_t) layer_k.size();
    kvs_slots in{store, {}};
    if (!entries.empty()) {
        try {
            in.slot = store.alloc((uint32_t) entries.size());
        } catch (const std::bad_alloc &) {
            KVF_FAIL(ASRKF_EBACKEND, "session load: out of host memory for %zu tokens (%zu bytes each)", entries.size(), tb);
        }
    }
    kvs_copy_rows(store, entries.size(), [&](size_t i, uint32_t il, bool is_v, size_t off) {
        const uint8_t * src = rows + i*tb + off;
        uint8_t * dst = is_v ? store.v_row(in.slot[i], il) : store.k_row(in.slot[i], il);
        memcpy(dst, src, is_v ? store.v_row_bytes(il) : store.k_row_bytes(il));
    });
    (void) n_layer;
    std::vector<uint64_t> sums(entries.size());
    store.checksums(in.slot.data(), in.slot.size(), sums.data());
    for (size_t i = 0; i < entries.size(); ++i) {
        if (sums[i] != entries[i].checksum) {
            KVF_FAIL(ASRKF_ECHECKSUM, "session load: the K/V rows of position %d failed their checksum (corrupted data); nothing was changed",
                    entries[i].pos);
        }
    }

    // replace: the sequence is removed (its host copies with it), the entries become host records, and the
    // resident ones are thawed into their original cells (all free now), which keeps the attention sums
    // bit-identical to the session that was saved; the thaw does not hash the rows again
    if (!kv->seq_rm(seq_id, -1, -1)) {
        KVF_FAIL(ASRKF_EREFUSED, "session load: the sequence could not be removed: %s", asrkf_last_error());
    }
    std::vector<llama_pos> active;
    std::vector<llama_pos> frozen;
    for (size_t i = 0; i < entries.size(); ++i) {
        const auto & e = entries[i];
        llama_kv_freeze_record rec;
        rec.slot     = in.slot[i];
        rec.ext      = e.ext;
        rec.checksum = e.checksum;
        rec.cell     = e.cell;
        records[{seq_id, e.pos}] = rec;
        if (e.state == ASRKF_CELL_ACTIVE) {
            active.push_back(e.pos);
        } else if (e.state == ASRKF_CELL_FROZEN) {
            frozen.push_back(e.pos);
        }
    }
    in.keep = true; // owned by the records now
    epoch++;

    thaw(seq_id, active, false, /*verify =*/ false); // checked above, under the same lock
    thaw(seq_id, frozen, true,  /*verify =*/ false);

    kv->v_heads[strm] = head;
}

//
// parking: a conversation kept in the host store while another one uses the device cells
//

void llama_kv_freeze::park(llama_seq_id seq_id, int64_t park_id) {
    sync();

    if (iswa) {
        KVF_FAIL(ASRKF_EUNSUPPORTED, "park: the model's sliding-window layers keep their K/V outside the managed cache");
    }
    if (parked.count(park_id)) {
        KVF_FAIL(ASRKF_EINVAL, "park: id %lld holds a parked sequence already", (long long) park_id);
    }

    const uint32_t strm = stream(seq_id);
    auto & c = cells(seq_id);
    if (c.get_has_shift()) {
        KVF_FAIL(ASRKF_EREFUSED, "park: a K-shift is pending; decode once (or call llama_memory_update) first");
    }

    const auto res = resident(seq_id);
    const auto off = offloaded(seq_id);
    for (const auto & [p, i] : res) {
        if (c.seq_count(i) != 1) {
            KVF_FAIL(ASRKF_EREFUSED, "park: the cell of position %d is shared with another sequence", p);
        }
    }

    // the resident rows go to host slots (the only copy a park makes); the offloaded ones stay where they are
    kvs_slots tmp{store, {}};
    std::vector<uint64_t> sums;
    resident_to_host(seq_id, res, tmp.slot, sums, "park");

    llama_kv_parked pk;
    pk.head = kv->v_heads[strm];
    pk.entries.reserve(res.size() + off.size());
    for (size_t i = 0; i < res.size(); ++i) {
        const uint32_t cell = res[i].second;
        llama_kv_freeze_record rec;
        rec.slot     = tmp.slot[i];
        rec.ext      = c.ext_get(cell);
        rec.checksum = sums[i];
        rec.cell     = cell;
        pk.entries.push_back({res[i].first, (uint8_t) (c.is_frozen(cell) ? ASRKF_CELL_FROZEN : ASRKF_CELL_ACTIVE), rec});
    }
    for (const llama_pos p : off) {
        pk.entries.push_back({p, (uint8_t) ASRKF_CELL_OFFLOADED, records.at({seq_id, p})});
    }
    std::sort(pk.entries.begin(), pk.entries.end(),
            [](const llama_kv_parked_entry & a, const llama_kv_parked_entry & b) { return a.pos < b.pos; });

    // commit: the records change owner (no copy), then the sequence's cells are released
    parked.emplace(park_id, std::move(pk));
    tmp.keep = true;
    for (const llama_pos p : off) {
        records.erase({seq_id, p});
    }
    epoch++;
    if (!kv->seq_rm(seq_id, -1, -1)) {
        // cannot happen for a whole sequence; the parked copy is complete, so unpark can still restore it
        KVF_FAIL(ASRKF_EREFUSED, "park: the sequence could not be removed: %s", asrkf_last_error());
    }
}

void llama_kv_freeze::unpark(int64_t park_id, llama_seq_id seq_id) {
    sync();

    auto it = parked.find(park_id);
    if (it == parked.end()) {
        KVF_FAIL(ASRKF_EINVAL, "unpark: no sequence is parked under id %lld", (long long) park_id);
    }
    const uint32_t strm = stream(seq_id);
    auto & c = cells(seq_id);
    if (c.seq_pos_max(seq_id) >= 0 || has_offloaded(seq_id, -1, -1)) {
        KVF_FAIL(ASRKF_EREFUSED, "unpark: sequence %d is not empty; park or remove its positions first", seq_id);
    }
    if (c.get_has_shift()) {
        KVF_FAIL(ASRKF_EREFUSED, "unpark: a K-shift is pending; decode once (or call llama_memory_update) first");
    }

    const llama_kv_parked & pk = it->second;
    std::vector<const llama_kv_freeze_record *> res_rec;
    std::vector<llama_pos> res_pos;
    for (const auto & e : pk.entries) {
        if (e.state != ASRKF_CELL_OFFLOADED) {
            res_rec.push_back(&e.rec);
            res_pos.push_back(e.pos);
        }
    }
    uint32_t n_free = 0;
    for (uint32_t i = 0; i < c.size(); ++i) {
        n_free += c.is_empty(i) ? 1 : 0;
    }
    if (n_free < res_rec.size()) {
        KVF_FAIL(ASRKF_EREFUSED, "unpark: %zu resident positions need as many free cells, the cache has %u",
                res_rec.size(), n_free);
    }
    // the rows going back to the device are checked now, before anything changes (the offloaded ones are checked
    // when they are thawed, as always)
    verify_slots(res_rec, res_pos, "unpark");

    // commit: the records change owner back, and the resident ones are thawed into their cells (the original ones
    // when free), not hashed again
    std::vector<llama_pos> active;
    std::vector<llama_pos> frozen;
    for (const auto & e : pk.entries) {
        records[{seq_id, e.pos}] = e.rec;
        if (e.state == ASRKF_CELL_ACTIVE) {
            active.push_back(e.pos);
        } else if (e.state == ASRKF_CELL_FROZEN) {
            frozen.push_back(e.pos);
        }
    }
    const uint32_t head = pk.head;
    parked.erase(it);
    epoch++;

    thaw(seq_id, active, false, /*verify =*/ false);
    thaw(seq_id, frozen, true,  /*verify =*/ false);

    kv->v_heads[strm] = head < kv->get_size() ? head : 0;
}

void llama_kv_freeze::drop_parked(int64_t park_id) {
    sync();
    auto it = parked.find(park_id);
    if (it == parked.end()) {
        KVF_FAIL(ASRKF_EINVAL, "drop parked: no sequence is parked under id %lld", (long long) park_id);
    }
    for (const auto & e : it->second.entries) {
        store.release(e.rec.slot);
    }
    parked.erase(it);
}

size_t llama_kv_freeze::parked_tokens() const {
    size_t n = 0;
    for (const auto & [id, pk] : parked) {
        n += pk.entries.size();
    }
    return n;
}

void llama_kv_freeze::parked_save(int64_t park_id, uint8_t * out, size_t size, size_t & n_out) {
    sync();
    auto it = parked.find(park_id);
    if (it == parked.end()) {
        KVF_FAIL(ASRKF_EINVAL, "parked save: no sequence is parked under id %lld", (long long) park_id);
    }
    const llama_kv_parked & pk = it->second;
    n_out = session_bytes(pk.entries.size());
    if (!out) {
        return;
    }
    if (size < n_out) {
        KVF_FAIL(ASRKF_EINVAL, "parked save: the output holds %zu bytes, %zu are needed", size, n_out);
    }
    std::vector<const llama_kv_freeze_record *> rec;
    std::vector<llama_pos> pos;
    std::vector<kvs_out> order;
    uint32_t n_resident = 0;
    for (const auto & e : pk.entries) {
        rec.push_back(&e.rec);
        pos.push_back(e.pos);
        order.push_back({e.pos, e.rec.cell, e.state, e.rec.ext, e.rec.checksum, &e.rec.slot});
        n_resident += e.state != ASRKF_CELL_OFFLOADED ? 1 : 0;
    }
    verify_slots(rec, pos, "parked save");
    GGML_ASSERT(kvs_write(*this, pk.head, order, n_resident, out) == n_out);
}
