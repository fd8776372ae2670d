// Exact top-k masks of CPU score tensors (issue 29): the native engine behind
// spare_kernels.topk.topk_masks on the CPU (op spare_kernels_cpu::topk_select).
//
// Over a list of contiguous score tensors (fp32 / fp16 / bf16 -> 32-bit keys of the float32 value;
// with any fp64 tensor in the call, 64-bit keys of the float64 value of every tensor), split into
// groups of consecutive tensors with k per group, it finds each group's k-th largest key by a radix
// select and writes bit-packed masks (rows, ceil(cols / 8)) uint8, LSB first, zero padding bits
// (maskfmt.h), rows = shape[0], cols = numel / rows. Unit scores (block / row / module means) come
// in as float64 (units, 1) tensors: each output byte is then 0 or 1 (a bool view).
//
// Keys are spare_kernels.topk._Keys' (order-preserving, -0.0 == +0.0) with the sign bit flipped, so
// that digits are plain unsigned bit fields (as in csrc/cuda/topk_kernels.h).
//
// Work: every tensor is cut into items of whole output bytes (about kItemEntries entries; a byte's
// entries are consecutive flat entries, so an item is one flat range and items follow flat order).
// A pass is ONE parallel region whose workers claim items from an atomic counter (dynamic: a worker
// that the OS deschedules under load holds back only the item it is on) and count into a
// worker-local histogram, added into its group's histogram when the worker moves on to another group
// and at the end. Passes (all active groups move level by level together):
//   0        every score: NaN flags per tensor, histogram of the top digit (digit0 bits).
//   1, 2..   the keys in each active group's chosen bin: histogram of the next digit (kDigit bits).
//            When the chosen bins of all active groups hold at most cand_bytes of (key, item) pairs,
//            this pass also writes them out, and every later level (and the tie count) reads only
//            them, on the calling thread.
//   ties     only for a group whose threshold's ties are cut, without candidates: the keys equal to
//            the threshold per item (a scan in item order then gives each item's first tie rank).
//   pack     every score: the mask bytes, and the number of entries selected (checked against k).
// A group stops early when its chosen bin holds exactly the keys still needed.
//
// Ties: every key above the group's threshold is on; of the keys equal to it the first `need` in
// group order (tensors in the given order, entries in flat order), as the generic engine does.
// Extra memory: worker histograms (threads x 2^digit0 x 4 bytes), group histograms (active groups x
// 2^digit0 x 8 bytes), per-item tables (~80 bytes an item) and the candidates (<= cand_bytes); all
// allocated through ATen (spare_kernels.utils.measure_peak sees them).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

namespace spare {
namespace {

// Entries per item: 2^16 (256 KB of fp32 scores) makes ~13000 items at SD-1.5's 860 M scores:
// enough claims to balance two workers when one is descheduled, few enough that claiming (one
// atomic add) and the per-item tables cost nothing.
constexpr int64_t kItemEntries = 1 << 16;
// Digits after the top one: 11 bits, an 8 KB worker histogram (L1-resident; this host: 48 KB L1d).
// These passes touch only the keys of the chosen bin, so their histogram is rarely written anyway.
constexpr int kDigit = 11;
// Below this many entries in a pass, it runs on the calling thread (no parallel region to wake).
constexpr int64_t kInline = 1 << 17;
// Worker-local counts are uint32: a worker flushes them before 2^32 - 1 could be reached.
constexpr int64_t kFlushAt = (int64_t{1} << 32) - 4 * kItemEntries * 8;
// Candidates a worker stages before reserving room in the shared array (one atomic add per flush).
constexpr int kStage = 512;

// A group's rule: still selecting; all off (k = 0); all on (k = n); key >= thr; key > thr, plus the
// first `need` keys equal to thr (the pack gives each item kGE, kGT or kPartial from its tie ranks).
enum Rule : int8_t { kActive, kOff, kOn, kGE, kGT, kPartial };

struct Tens {
  const void* p;
  at::ScalarType dt;
  int64_t rows, cols, rb, group, item0, item1;
};
struct Item {
  int64_t t, q0, q1, e0, e1;
};

inline uint32_t key32(uint32_t u) {
  const uint32_t k = u ^ ((0u - (u >> 31)) | 0x80000000u);
  return k + (k == 0x7FFFFFFFu);  // -0.0 -> +0.0's key
}
inline uint64_t key64(uint64_t u) {
  const uint64_t k = u ^ ((uint64_t{0} - (u >> 63)) | (uint64_t{1} << 63));
  return k + (k == ~(uint64_t{1} << 63));
}

template <typename S>
inline uint32_t bits32(const S* p, int64_t i) {
  const float f = static_cast<float>(p[i]);
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
template <>
inline uint32_t bits32<float>(const float* p, int64_t i) {
  uint32_t u;
  std::memcpy(&u, p + i, 4);
  return u;
}
template <>
inline uint32_t bits32<c10::BFloat16>(const c10::BFloat16* p, int64_t i) {
  return static_cast<uint32_t>(p[i].x) << 16;
}
template <typename S>
inline uint64_t bits64(const S* p, int64_t i) {
  const double d = static_cast<double>(static_cast<float>(p[i]));
  uint64_t u;
  std::memcpy(&u, &d, 8);
  return u;
}
template <>
inline uint64_t bits64<double>(const double* p, int64_t i) {
  uint64_t u;
  std::memcpy(&u, p + i, 8);
  return u;
}

template <typename K>
struct KeyOf;
template <>
struct KeyOf<uint32_t> {
  template <typename S>
  static uint32_t bits(const S* p, int64_t i) { return bits32(p, i); }
  static uint32_t key(uint32_t u) { return key32(u); }
  static bool nan(uint32_t u) { return (u & 0x7FFFFFFFu) > 0x7F800000u; }
};
template <>
struct KeyOf<uint64_t> {
  template <typename S>
  static uint64_t bits(const S* p, int64_t i) { return bits64(p, i); }
  static uint64_t key(uint64_t u) { return key64(u); }
  static bool nan(uint64_t u) { return (u & ~(uint64_t{1} << 63)) > 0x7FF0000000000000ull; }
};

// f(typed data pointer) for the tensor's dtype (fp64 only with 64-bit keys: the caller's rule).
template <typename K, typename F>
inline void visit(const Tens& t, F&& f) {
  switch (t.dt) {
    case at::kFloat: f(static_cast<const float*>(t.p)); break;
    case at::kHalf: f(static_cast<const c10::Half*>(t.p)); break;
    case at::kBFloat16: f(static_cast<const c10::BFloat16*>(t.p)); break;
    default:
      if constexpr (sizeof(K) == 8) f(static_cast<const double*>(t.p));
      break;
  }
}

// body(worker, item index) over `work` in ONE parallel region, items claimed dynamically; then
// body(worker, -1) once per worker (its flush).
template <typename B>
void run_pass(const std::vector<int64_t>& work, int64_t entries, int64_t nw, const B& body) {
  if (work.empty()) return;
  std::atomic<int64_t> next{0};
  const int64_t n = static_cast<int64_t>(work.size());
  auto loop = [&](int64_t w) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      body(w, work[i]);
    body(w, -1);
  };
  const int64_t use = entries < kInline ? 1 : std::min<int64_t>(nw, n);
  if (use <= 1) {
    loop(0);
    return;
  }
  at::parallel_for(0, use, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) loop(w);
  });
}

template <typename K>
std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> select(std::vector<Tens>& ts, int64_t G,
                                                                 const std::vector<int64_t>& ks,
                                                                 int64_t digit0, int64_t cand_bytes) {
  using KO = KeyOf<K>;
  constexpr int kBits = static_cast<int>(sizeof(K) * 8);
  const int64_t n = static_cast<int64_t>(ts.size());
  std::vector<int> widths{static_cast<int>(digit0)}, shifts{kBits - static_cast<int>(digit0)};
  while (shifts.back() > 0) {
    widths.push_back(std::min(kDigit, shifts.back()));
    shifts.push_back(shifts.back() - widths.back());
  }
  const int levels = static_cast<int>(widths.size());

  // items, outputs, group sizes
  std::vector<Item> items;
  std::vector<at::Tensor> out;
  std::vector<int64_t> gsize(G, 0), gfirst(G, -1), glast(G, -1);
  for (int64_t t = 0; t < n; ++t) {
    Tens& x = ts[t];
    out.push_back(at::empty({x.rows, x.rb}, at::kByte));
    const int64_t bytes = x.rows * x.rb;
    // bytes per item: ~kItemEntries entries (a byte holds cols / rb entries on average)
    const int64_t step = bytes ? std::max<int64_t>(1, kItemEntries * x.rb / std::max<int64_t>(1, x.cols)) : 1;
    x.item0 = static_cast<int64_t>(items.size());
    for (int64_t q0 = 0; q0 < bytes; q0 += step) {
      const int64_t q1 = std::min(bytes, q0 + step);
      items.push_back({t, q0, q1, (q0 / x.rb) * x.cols + (q0 % x.rb) * 8, (q1 / x.rb) * x.cols + (q1 % x.rb) * 8});
    }
    x.item1 = static_cast<int64_t>(items.size());
    gsize[x.group] += x.rows * x.cols;
    if (gfirst[x.group] < 0) gfirst[x.group] = t;
    glast[x.group] = t;
  }
  const int64_t nitems = static_cast<int64_t>(items.size());
  std::vector<int8_t> rule(G);
  std::vector<int64_t> need(ks), slot(G, -1);
  std::vector<K> prefix(G, 0), thr(G, 0);
  std::vector<int64_t> in_bin(G, 0);
  int64_t nact = 0;
  for (int64_t g = 0; g < G; ++g) {
    rule[g] = ks[g] == 0 ? kOff : ks[g] == gsize[g] ? kOn : kActive;
    if (rule[g] == kActive) slot[g] = nact++;
  }
  std::vector<int64_t> info{-1, 0, -1};  // [first NaN tensor, full passes, level that wrote candidates]
  const int64_t nw = std::max<int64_t>(1, at::get_num_threads());
  const int64_t maxbins = int64_t{1} << std::max<int64_t>(digit0, kDigit);
  at::Tensor local_t = at::zeros({nw, maxbins}, at::kInt);
  at::Tensor shared_t = at::zeros({std::max<int64_t>(nact, 1), maxbins}, at::kLong);
  uint32_t* local = reinterpret_cast<uint32_t*>(local_t.data_ptr<int32_t>());
  int64_t* shared = shared_t.data_ptr<int64_t>();
  std::vector<int64_t> cur(nw, -1), since(nw, 0);
  int64_t bins = 0;  // bins of the current level
  auto flush = [&](int64_t w) {
    uint32_t* h = local + w * maxbins;
    if (cur[w] >= 0) {
      int64_t* s = shared + slot[cur[w]] * maxbins;
      for (int64_t b = 0; b < bins; ++b)
        if (h[b]) {
          __atomic_fetch_add(s + b, static_cast<int64_t>(h[b]), __ATOMIC_RELAXED);
          h[b] = 0;
        }
    }
    cur[w] = -1;
    since[w] = 0;
  };
  // the worker w is about to count an item of group g
  auto enter = [&](int64_t w, int64_t g, int64_t entries) {
    if (cur[w] != g || since[w] + entries > kFlushAt) flush(w);
    cur[w] = g;
    since[w] += entries;
  };
  auto all_items = [&](auto&& want) {
    std::vector<int64_t> work;
    int64_t entries = 0;
    for (int64_t i = 0; i < nitems; ++i)
      if (want(ts[items[i].t].group)) {
        work.push_back(i);
        entries += items[i].e1 - items[i].e0;
      }
    return std::make_pair(work, entries);
  };
  // picks level lvl's digit of every active group from its histogram
  auto choose = [&](int lvl) {
    const int64_t nb = int64_t{1} << widths[lvl];
    for (int64_t g = 0; g < G; ++g) {
      if (rule[g] != kActive) continue;
      const int64_t* h = shared + slot[g] * maxbins;
      int64_t above = 0, d = nb - 1;
      for (; d > 0 && above + h[d] < need[g]; --d) above += h[d];
      need[g] -= above;
      in_bin[g] = h[d];
      prefix[g] = static_cast<K>((prefix[g] << widths[lvl]) | static_cast<K>(d));
      if (lvl == levels - 1) {
        thr[g] = prefix[g];
        rule[g] = in_bin[g] == need[g] ? kGE : kPartial;
      } else if (in_bin[g] == need[g]) {
        thr[g] = static_cast<K>(prefix[g] << shifts[lvl]);  // the bin's lowest key
        rule[g] = kGE;
      }
    }
  };
  auto any_active = [&]() { return std::any_of(rule.begin(), rule.end(), [](int8_t r) { return r == kActive; }); };

  // ---- pass 0: NaN flags and the top digit
  std::vector<uint8_t> nan_flag(n, 0);
  bins = int64_t{1} << widths[0];
  {
    auto [work, entries] = all_items([](int64_t) { return true; });
    const int sh = shifts[0];
    run_pass(work, entries, nw, [&](int64_t w, int64_t i) {
      if (i < 0) return flush(w);
      const Item& it = items[i];
      const Tens& x = ts[it.t];
      const bool count = rule[x.group] == kActive;
      if (count) enter(w, x.group, it.e1 - it.e0);
      uint32_t* h = local + w * maxbins;
      bool bad = false;
      visit<K>(x, [&](auto p) {
        if (count) {
          for (int64_t e = it.e0; e < it.e1; ++e) {
            const K u = KO::bits(p, e);
            bad |= KO::nan(u);
            ++h[KO::key(u) >> sh];
          }
        } else {
          for (int64_t e = it.e0; e < it.e1; ++e) bad |= KO::nan(KO::bits(p, e));
        }
      });
      if (bad) __atomic_store_n(&nan_flag[it.t], uint8_t{1}, __ATOMIC_RELAXED);
    });
    info[1] = 1;
  }
  for (int64_t t = 0; t < n; ++t)
    if (nan_flag[t]) {
      info[0] = t;
      return {std::vector<at::Tensor>{}, info};
    }
  if (nact) choose(0);

  // ---- levels 1..: full passes over the chosen bins' keys, or the candidates
  at::Tensor ckey_t, citem_t;
  int64_t ncand = 0;
  for (int lvl = 1; lvl < levels && any_active(); ++lvl) {
    bins = int64_t{1} << widths[lvl];
    shared_t.zero_();
    const int hs = shifts[lvl - 1], sh = shifts[lvl];
    const K dmask = static_cast<K>(bins - 1);
    if (info[2] < 0) {
      int64_t total = 0;
      for (int64_t g = 0; g < G; ++g)
        if (rule[g] == kActive) total += in_bin[g];
      const bool compact = total * static_cast<int64_t>(sizeof(K) + 4) <= cand_bytes;
      if (compact) {
        ckey_t = at::empty({total * static_cast<int64_t>(sizeof(K))}, at::kByte);
        citem_t = at::empty({total}, at::kInt);
      }
      K* ckey = compact ? reinterpret_cast<K*>(ckey_t.data_ptr<uint8_t>()) : nullptr;
      int32_t* citem = compact ? citem_t.data_ptr<int32_t>() : nullptr;
      std::atomic<int64_t> cursor{0};
      std::vector<K> sk(compact ? nw * kStage : 0);
      std::vector<int32_t> si(compact ? nw * kStage : 0);
      std::vector<int> sn(nw, 0);
      auto stage_flush = [&](int64_t w) {
        const int64_t c = sn[w];
        if (!c) return;
        const int64_t at_ = cursor.fetch_add(c, std::memory_order_relaxed);
        const int64_t fit = std::max<int64_t>(0, std::min(c, total - at_));  // more only if scores changed
        std::memcpy(ckey + at_, sk.data() + w * kStage, fit * sizeof(K));
        std::memcpy(citem + at_, si.data() + w * kStage, fit * sizeof(int32_t));
        sn[w] = 0;
      };
      auto [work, entries] = all_items([&](int64_t g) { return rule[g] == kActive; });
      run_pass(work, entries, nw, [&](int64_t w, int64_t i) {
        if (i < 0) {
          if (compact) stage_flush(w);
          return flush(w);
        }
        const Item& it = items[i];
        const Tens& x = ts[it.t];
        enter(w, x.group, it.e1 - it.e0);
        uint32_t* h = local + w * maxbins;
        const K pre = prefix[x.group];
        visit<K>(x, [&](auto p) {
          for (int64_t e = it.e0; e < it.e1; ++e) {
            const K k = KO::key(KO::bits(p, e));
            if ((k >> hs) != pre) continue;
            ++h[(k >> sh) & dmask];
            if (compact) {
              const int64_t s = w * kStage + sn[w];
              sk[s] = k;
              si[s] = static_cast<int32_t>(i);
              if (++sn[w] == kStage) stage_flush(w);
            }
          }
        });
      });
      ++info[1];
      if (compact) {
        TORCH_CHECK(cursor.load() == total, "topk_select: candidate count differs between passes (scores "
                    "modified during selection?)");
        info[2] = lvl;
        ncand = total;
      }
    } else {
      const K* ckey = reinterpret_cast<const K*>(ckey_t.data_ptr<uint8_t>());
      const int32_t* citem = citem_t.data_ptr<int32_t>();
      for (int64_t c = 0; c < ncand; ++c) {
        const int64_t g = ts[items[citem[c]].t].group;
        const K k = ckey[c];
        if (rule[g] == kActive && (k >> hs) == prefix[g]) ++shared[slot[g] * maxbins + ((k >> sh) & dmask)];
      }
    }
    choose(lvl);
  }
  local_t = at::Tensor();
  shared_t = at::Tensor();

  // ---- ties: each item's first tie rank in its group (groups whose ties are cut)
  std::vector<int64_t> tie_base(nitems, 0), tie_cnt(nitems, 0);
  bool any_partial = std::any_of(rule.begin(), rule.end(), [](int8_t r) { return r == kPartial; });
  if (any_partial) {
    if (info[2] >= 0) {
      const K* ckey = reinterpret_cast<const K*>(ckey_t.data_ptr<uint8_t>());
      const int32_t* citem = citem_t.data_ptr<int32_t>();
      for (int64_t c = 0; c < ncand; ++c) {
        const int64_t g = ts[items[citem[c]].t].group;
        if (rule[g] == kPartial && ckey[c] == thr[g]) ++tie_cnt[citem[c]];
      }
    } else {
      auto [work, entries] = all_items([&](int64_t g) { return rule[g] == kPartial; });
      run_pass(work, entries, nw, [&](int64_t, int64_t i) {
        if (i < 0) return;
        const Item& it = items[i];
        const Tens& x = ts[it.t];
        const K th = thr[x.group];
        int64_t c = 0;
        visit<K>(x, [&](auto p) {
          for (int64_t e = it.e0; e < it.e1; ++e) c += KO::key(KO::bits(p, e)) == th;
        });
        tie_cnt[i] = c;
      });
      ++info[1];
    }
    for (int64_t g = 0; g < G; ++g) {
      if (rule[g] != kPartial) continue;
      int64_t cum = 0;
      for (int64_t t = gfirst[g]; t <= glast[g]; ++t)
        for (int64_t i = ts[t].item0; i < ts[t].item1; ++i) {
          tie_base[i] = cum;
          cum += tie_cnt[i];
        }
    }
  }
  ckey_t = citem_t = at::Tensor();

  // ---- pack: every mask byte, and the count of entries selected per item
  std::vector<int64_t> selected(nitems, 0);
  {
    std::vector<int64_t> work(nitems);
    int64_t entries = 0;
    for (int64_t i = 0; i < nitems; ++i) {
      work[i] = i;
      entries += items[i].e1 - items[i].e0;
    }
    run_pass(work, entries, nw, [&](int64_t, int64_t i) {
      if (i < 0) return;
      const Item& it = items[i];
      const Tens& x = ts[it.t];
      const int64_t g = x.group;
      uint8_t* o = out[it.t].data_ptr<uint8_t>();
      int64_t r = it.q0 / x.rb, c = it.q0 % x.rb, sel = 0;
      // the item's rule: a cut group's ties are all on before the cut, none after it
      int8_t ru = rule[g];
      int64_t left = 0;  // ties this item may still take (kPartial)
      if (ru == kPartial) {
        left = need[g] - tie_base[i];
        ru = left <= 0 ? kGT : left >= tie_cnt[i] ? kGE : kPartial;
      }
      const K th = thr[g];
      visit<K>(x, [&](auto p) {
        for (int64_t q = it.q0; q < it.q1; ++q) {
          const int64_t e = r * x.cols + c * 8;
          const int nb = static_cast<int>(std::min<int64_t>(8, x.cols - c * 8));
          uint32_t byte = 0;
          if (ru == kOn) {
            byte = (1u << nb) - 1;
          } else if (ru == kGE) {
            for (int j = 0; j < nb; ++j) byte |= static_cast<uint32_t>(KO::key(KO::bits(p, e + j)) >= th) << j;
          } else if (ru == kGT) {
            for (int j = 0; j < nb; ++j) byte |= static_cast<uint32_t>(KO::key(KO::bits(p, e + j)) > th) << j;
          } else if (ru == kPartial) {
            for (int j = 0; j < nb; ++j) {
              const K k = KO::key(KO::bits(p, e + j));
              const bool tie = k == th && left > 0;
              left -= tie;
              byte |= static_cast<uint32_t>(k > th || tie) << j;
            }
          }
          o[q] = static_cast<uint8_t>(byte);
          sel += __builtin_popcount(byte);
          if (++c == x.rb) {
            c = 0;
            ++r;
          }
        }
      });
      selected[i] = sel;
    });
    ++info[1];
  }
  std::vector<int64_t> gsel(G, 0);
  for (int64_t i = 0; i < nitems; ++i) gsel[ts[items[i].t].group] += selected[i];
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(gsel[g] == ks[g], "topk_select: group ", g, " selected ", gsel[g], " entries, expected ", ks[g],
                " (scores modified during selection?)");
  return {out, info};
}

}  // namespace

// topk_select(scores, groups, ks, digit0, cand_bytes) -> (masks, [first NaN tensor or -1, full passes,
// level that wrote candidates or -1]). groups: per tensor, 0, 1, ... in order (consecutive tensors share
// a group); ks: per group, 0 <= k <= its entries. On NaN scores the mask list is empty.
std::tuple<std::vector<at::Tensor>, std::vector<int64_t>> topk_select(const std::vector<at::Tensor>& scores,
                                                                      at::IntArrayRef groups, at::IntArrayRef ks,
                                                                      int64_t digit0, int64_t cand_bytes) {
  const int64_t n = static_cast<int64_t>(scores.size());
  TORCH_CHECK(static_cast<int64_t>(groups.size()) == n, "topk_select: groups: expected one group per score tensor (",
              n, "), got ", groups.size());
  TORCH_CHECK(digit0 >= 8 && digit0 <= 16, "topk_select: digit0: expected 8..16 bits, got ", digit0);
  TORCH_CHECK(cand_bytes >= 0, "topk_select: cand_bytes: expected >= 0, got ", cand_bytes);
  bool wide = false;
  std::vector<Tens> ts;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor& x = scores[t];
    const auto dt = x.scalar_type();
    TORCH_CHECK(x.device().is_cpu() && x.is_contiguous() && x.dim() >= 1 && !x.is_neg() && !x.is_conj() &&
                    (dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble),
                "topk_select: scores[", t, "]: expected a contiguous CPU fp32/fp16/bf16/fp64 tensor with a dim, got ",
                x.toString(), " of shape ", x.sizes());
    const int64_t g = groups[t];
    TORCH_CHECK(t == 0 ? g == 0 : (g == groups[t - 1] || g == groups[t - 1] + 1),
                "topk_select: groups: expected 0, 1, ... in order (consecutive tensors share a group), got ", groups);
    wide |= dt == at::kDouble;
    int64_t cols = 1;
    for (int64_t d = 1; d < x.dim(); ++d) cols *= x.size(d);
    ts.push_back({x.data_ptr(), dt, x.size(0), cols, (cols + 7) / 8, g, 0, 0});
  }
  const int64_t G = n ? groups[n - 1] + 1 : 0;
  TORCH_CHECK(static_cast<int64_t>(ks.size()) == G, "topk_select: ks: expected one k per group (", G, "), got ",
              ks.size());
  std::vector<int64_t> gsize(G, 0);
  for (const Tens& x : ts) gsize[x.group] += x.rows * x.cols;
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(ks[g] >= 0 && ks[g] <= gsize[g], "topk_select: ks[", g, "]: expected 0..", gsize[g], ", got ", ks[g]);
  std::vector<int64_t> kv(ks.begin(), ks.end());
  return wide ? select<uint64_t>(ts, G, kv, digit0, cand_bytes) : select<uint32_t>(ts, G, kv, digit0, cand_bytes);
}

}  // namespace spare
