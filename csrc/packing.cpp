// fusedrl._C: sequence packing and load balancing on the host.
//
//   pack_by_budget(lengths, budget) -> list[list[int]]
//       best-fit-decreasing bin packing of sequence lengths into bins of
//       `budget` tokens (of equally tight bins, the most recently used).
//   balanced_partition(lengths, k, a, b, equal_size) -> list[list[int]]
//       k-way Karmarkar-Karp largest differencing method (LDM) under the cost
//       cost(L) = a*L + b*L^2 per sequence; with equal_size the balanced
//       variant (items enter k at a time) keeps group sizes within one.
//
// The Python module fusedrl/_packing_py.py implements the same algorithms
// step for step (same orderings, same tie-breaks, same float operations in
// the same order), so both return identical results; tests hold them to it.
// Arguments are validated in fusedrl/packing.py; the checks here are a second
// line of defence and raise ValueError (std::invalid_argument) as well.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace py = pybind11;

// Both implementations must round every cost the same way: a fused
// multiply-add would change the last bit and, through a tie, the result.
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#define FUSEDRL_NO_FMA
#elif defined(__GNUC__)
#define FUSEDRL_NO_FMA __attribute__((optimize("fp-contract=off")))
#else
#define FUSEDRL_NO_FMA
#endif

namespace {

// Item, bin and partition ids: 32 bits halve the memory traffic of the
// random-access arrays (linked lists, heap), which is what the time goes to.
using Index = int32_t;
constexpr int64_t kMaxItems = int64_t{1} << 30;  // partition ids reach 2n
using Lengths = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

// The caller's int64 buffer, read in place (the array argument keeps it alive
// while the GIL is released).
struct LengthView {
  const int64_t* data;
  size_t count;
  size_t size() const { return count; }
  bool empty() const { return count == 0; }
  int64_t operator[](size_t i) const { return data[i]; }
  const int64_t* begin() const { return data; }
  const int64_t* end() const { return data + count; }
};

LengthView checked_view(const Lengths& lengths) {
  if (lengths.ndim() != 1) {
    throw std::invalid_argument("lengths must be 1-D, got " + std::to_string(lengths.ndim()) + " dims");
  }
  if (lengths.shape(0) >= kMaxItems) {
    throw std::invalid_argument("lengths may hold at most 2^30 - 1 sequences, got " + std::to_string(lengths.shape(0)));
  }
  const LengthView view{lengths.data(), static_cast<size_t>(lengths.shape(0))};
  for (size_t i = 0; i < view.size(); ++i) {
    if (view[i] < 1) {
      throw std::invalid_argument("lengths must be >= 1, got lengths[" + std::to_string(i) +
                                  "] = " + std::to_string(view[i]));
    }
  }
  return view;
}

// Indices sorted by length, longest first; equal lengths keep index order.
// A stable counting sort when the longest length is small next to n (the
// common case: lengths are token counts), else a comparison sort.
std::vector<Index> longest_first(const LengthView& lengths) {
  const Index n = static_cast<Index>(lengths.size());
  std::vector<Index> order(lengths.size());
  if (n == 0) return order;
  const int64_t longest = *std::max_element(lengths.begin(), lengths.end());
  if (longest <= 4 * static_cast<int64_t>(n) + 1024) {
    std::vector<Index> start(static_cast<size_t>(longest) + 2, 0);  // bucket L at start[longest - L]
    for (int64_t len : lengths) ++start[longest - len + 1];
    for (size_t b = 1; b < start.size(); ++b) start[b] += start[b - 1];
    for (Index i = 0; i < n; ++i) order[start[longest - lengths[i]]++] = i;
    return order;
  }
  std::iota(order.begin(), order.end(), Index{0});
  std::stable_sort(order.begin(), order.end(),
                   [&](Index x, Index y) { return lengths[x] > lengths[y]; });
  return order;
}

// lengths[order[p]] for every position p, in one tight loop: its loads do not
// depend on each other, so the CPU overlaps their cache misses; read inside a
// packing loop (behind that loop's own dependencies) each one stalled it.
std::vector<int64_t> sorted_lengths(const LengthView& lengths, const std::vector<Index>& order) {
  std::vector<int64_t> out(order.size());
  for (size_t p = 0; p < order.size(); ++p) out[p] = lengths[order[p]];
  return out;
}

// The members of each group, from every item's group label: one sweep over
// the items, so each list comes out in ascending index order without a sort.
std::vector<std::vector<Index>> group_lists(const std::vector<Index>& group_of, size_t num_groups) {
  std::vector<size_t> sizes(num_groups, 0);
  for (Index g : group_of) ++sizes[g];
  std::vector<std::vector<Index>> out(num_groups);
  for (size_t g = 0; g < num_groups; ++g) out[g].reserve(sizes[g]);
  for (size_t item = 0; item < group_of.size(); ++item) out[group_of[item]].push_back(static_cast<Index>(item));
  return out;
}

// Integers in [0, size): insert, erase and "smallest member >= x" in
// O(log_64 size), a bitset with one summary level per factor of 64.
class SuccessorSet {
 public:
  static constexpr int64_t kNone = -1;

  explicit SuccessorSet(int64_t size) {
    int64_t words = size;
    do {
      words = (words + 63) / 64;
      levels_.emplace_back(static_cast<size_t>(words), 0);
    } while (words > 1);
  }

  void insert(int64_t x) {
    for (auto& level : levels_) {
      level[x / 64] |= uint64_t{1} << (x % 64);
      x /= 64;
    }
  }

  void erase(int64_t x) {
    for (auto& level : levels_) {
      level[x / 64] &= ~(uint64_t{1} << (x % 64));
      if (level[x / 64] != 0) break;  // the summaries above still hold
      x /= 64;
    }
  }

  int64_t next(int64_t x) const {
    size_t d = 0;
    for (; d < levels_.size(); ++d) {  // climb until a word holds a member >= x
      const int64_t w = x / 64;
      if (w >= static_cast<int64_t>(levels_[d].size())) return kNone;
      const uint64_t word = levels_[d][w] & (~uint64_t{0} << (x % 64));
      if (word != 0) {
        x = w * 64 + __builtin_ctzll(word);
        break;
      }
      x = w + 1;  // the next word of this level, as a position one level up
    }
    if (d == levels_.size()) return kNone;
    while (d-- > 0) x = x * 64 + __builtin_ctzll(levels_[d][x]);  // descend to the lowest member
    return x;
  }

 private:
  std::vector<std::vector<uint64_t>> levels_;  // levels_[0]: one bit per integer
};

// Open bins by remaining room, for budgets small next to the input: one
// stack of bins per room value (the most recently stored on top) and a
// SuccessorSet of the non-empty rooms.
class BinsByRoom {
 public:
  BinsByRoom(int64_t budget, size_t max_bins) : rooms_(budget + 1), top_(budget + 1, -1), below_(max_bins, -1) {}

  void put(int64_t room, Index bin) {
    if (top_[room] == -1) rooms_.insert(room);
    below_[bin] = top_[room];
    top_[room] = bin;
  }

  // Remove and return the most recently stored bin with the least room >= need,
  // or -1; *room is set only when a bin is found.
  Index take(int64_t need, int64_t* room) {
    const int64_t found = rooms_.next(need);
    if (found == SuccessorSet::kNone) return -1;
    const Index bin = top_[found];
    top_[found] = below_[bin];
    if (top_[found] == -1) rooms_.erase(found);
    *room = found;
    return bin;
  }

 private:
  SuccessorSet rooms_;
  std::vector<Index> top_;
  std::vector<Index> below_;
};

// The same rule for any budget: a set ordered by (room, -store stamp).
class BinsInTree {
 public:
  void put(int64_t room, Index bin) { open_.insert({room, -(++stamp_), bin}); }

  Index take(int64_t need, int64_t* room) {  // as BinsByRoom::take
    auto it = open_.lower_bound({need, std::numeric_limits<int64_t>::min(), 0});
    if (it == open_.end()) return -1;
    const Index bin = std::get<2>(*it);
    *room = std::get<0>(*it);
    open_.erase(it);
    return bin;
  }

 private:
  std::set<std::tuple<int64_t, int64_t, Index>> open_;
  int64_t stamp_ = 0;
};

// Best-fit decreasing: each sequence, longest first, goes to the open bin
// with the least room that fits it (of equally tight bins, the one stored
// most recently), else to a new bin.
template <class OpenBins>
std::vector<std::vector<Index>> best_fit_decreasing(const LengthView& lengths, const std::vector<Index>& order,
                                                    int64_t budget, OpenBins& open) {
  // A bin with less room than the shortest sequence can take nothing more:
  // it is closed (never stored).
  const std::vector<int64_t> sorted = sorted_lengths(lengths, order);
  const int64_t shortest = sorted.back();
  std::vector<Index> bin_of(lengths.size());
  Index num_bins = 0;
  for (size_t p = 0; p < order.size(); ++p) {
    const Index i = order[p];
    const int64_t len = sorted[p];
    int64_t room = budget;
    Index bin = open.take(len, &room);
    if (bin == -1) bin = num_bins++;
    bin_of[i] = bin;
    if (room - len >= shortest) open.put(room - len, bin);
  }
  return group_lists(bin_of, static_cast<size_t>(num_bins));
}

std::vector<std::vector<Index>> pack_impl(const LengthView& lengths, int64_t budget) {
  const std::vector<Index> order = longest_first(lengths);
  if (order.empty()) return {};
  if (budget <= 16 * static_cast<int64_t>(lengths.size()) + 65536) {  // room-indexed arrays stay small
    BinsByRoom open(budget, lengths.size());
    return best_fit_decreasing(lengths, order, budget, open);
  }
  BinsInTree open;
  return best_fit_decreasing(lengths, order, budget, open);
}

// One non-empty subset of a k-way partition: its cost and a node of the join
// tree: nodes below n are items, node n + j is the j-th join (its two halves
// live in the differencer's `halves_`, appended in creation order).
struct Subset {
  double cost;
  Index node;
};

// A partition stores only its non-empty subsets, largest cost first; the
// other k - size() subsets are empty and cost 0. Every non-empty subset costs
// > 0 (lengths >= 1, a or b > 0), so empties always sort last and the sparse
// form orders exactly like the dense one while a merge costs O(non-empty), not O(k).
using Partition = std::vector<Subset>;

struct HeapEntry {
  double spread;  // max - min subset cost of the partition
  Index id;       // creation order, breaks spread ties (smaller first)
  Index slot;     // index of the partition in the pool
};

struct LargerSpreadFirst {
  bool operator()(const HeapEntry& x, const HeapEntry& y) const {
    if (x.spread != y.spread) return x.spread < y.spread;
    return x.id > y.id;
  }
};

// A 4-ary max-heap: half the levels of a binary heap, and a node's four
// children share a cache line, so a pop at a million entries misses the cache
// about half as often. Keys are unique (ids), so the pop order is the same as
// any other max-heap's.
class QuadHeap {
 public:
  void reserve(size_t n) { data_.reserve(n); }
  bool empty() const { return data_.empty(); }
  size_t size() const { return data_.size(); }
  const HeapEntry& top() const { return data_.front(); }

  void push(const HeapEntry& entry) {
    size_t at = data_.size();
    data_.push_back(entry);
    while (at > 0) {
      const size_t parent = (at - 1) / 4;
      if (!below_(data_[parent], entry)) break;
      data_[at] = data_[parent];
      at = parent;
    }
    data_[at] = entry;
  }

  HeapEntry pop() {
    const HeapEntry top = data_.front();
    const HeapEntry last = data_.back();
    data_.pop_back();
    const size_t n = data_.size();
    if (n == 0) return top;
    size_t at = 0;
    for (;;) {
      const size_t first = 4 * at + 1;
      if (first >= n) break;
      size_t best = first;
      const size_t end = std::min(first + 4, n);
      for (size_t c = first + 1; c < end; ++c) {
        if (below_(data_[best], data_[c])) best = c;
      }
      if (!below_(last, data_[best])) break;
      data_[at] = data_[best];
      at = best;
    }
    data_[at] = last;
    return top;
  }

 private:
  std::vector<HeapEntry> data_;
  LargerSpreadFirst below_;
};

// Largest differencing over k-way partitions. The initial partitions are
// added first (their subsets sorted by cost, largest first) and live in one
// flat array; merged ones live in recycled vectors. The initial ones are
// consumed in sorted order from a list, merged ones from a heap: the same pop
// order as one heap over everything (keys are unique), with a far smaller heap.
class Differencer {
 public:
  Differencer(Index num_items, int64_t k, Index num_partitions) : k_(k), num_items_(num_items), offsets_{0} {
    halves_.reserve(static_cast<size_t>(num_items));
    initial_.reserve(static_cast<size_t>(num_items));
    offsets_.reserve(static_cast<size_t>(num_partitions) + 1);
    queue_.reserve(static_cast<size_t>(num_partitions));
    pool_.reserve(static_cast<size_t>(num_partitions));
    heap_.reserve(static_cast<size_t>(num_partitions));
  }

  // Add an initial partition from its non-empty subsets, largest cost first.
  void add(const Subset* subsets, size_t count) {
    initial_.insert(initial_.end(), subsets, subsets + count);
    offsets_.push_back(initial_.size());
    const Index slot = static_cast<Index>(offsets_.size()) - 2;
    queue_.push_back(entry(view(slot), slot));
  }

  // Merge until one partition is left: the two with the largest spreads are
  // joined largest subset with smallest subset, then re-sorted (stable).
  std::vector<std::vector<Index>> run() {
    const LargerSpreadFirst below;
    if (!std::is_sorted(queue_.begin(), queue_.end(), [&](const HeapEntry& x, const HeapEntry& y) { return below(y, x); })) {
      std::sort(queue_.begin(), queue_.end(), [&](const HeapEntry& x, const HeapEntry& y) { return below(y, x); });
    }
    Partition merged;
    while ((queue_.size() - head_) + heap_.size() > 1) {
      const HeapEntry first = pop(below);
      const HeapEntry second = pop(below);
      merge(view(first.slot), view(second.slot), merged);
      sort_by_cost(merged);
      const Index slot = store(merged, first.slot, second.slot);
      heap_.push(entry(view(slot), slot));
    }
    return groups(view(head_ < queue_.size() ? queue_[head_].slot : heap_.top().slot));
  }

 private:
  struct View {
    const Subset* data;
    size_t size;
  };

  Index num_initial() const { return static_cast<Index>(offsets_.size()) - 1; }

  // Slots below num_initial() are initial partitions, the rest index pool_.
  View view(Index slot) const {
    if (slot < num_initial()) return {initial_.data() + offsets_[slot], offsets_[slot + 1] - offsets_[slot]};
    const Partition& p = pool_[slot - num_initial()];
    return {p.data(), p.size()};
  }

  HeapEntry entry(View p, Index slot) {
    const double low = static_cast<int64_t>(p.size) < k_ ? 0.0 : p.data[p.size - 1].cost;
    return {p.data[0].cost - low, next_id_++, slot};
  }

  HeapEntry pop(const LargerSpreadFirst& below) {
    if (head_ < queue_.size() && (heap_.empty() || below(heap_.top(), queue_[head_]))) return queue_[head_++];
    return heap_.pop();
  }

  // Copy `merged` into a pool vector, recycling the inputs' vectors (buffers
  // keep their capacity, so steady-state merges allocate nothing); returns its slot.
  Index store(const Partition& merged, Index first, Index second) {
    for (Index old : {second, first}) {
      if (old >= num_initial()) free_.push_back(static_cast<size_t>(old - num_initial()));
    }
    size_t index;
    if (free_.empty()) {
      index = pool_.size();
      pool_.push_back(merged);
    } else {
      index = free_.back();
      free_.pop_back();
      pool_[index].assign(merged.begin(), merged.end());
    }
    return num_initial() + static_cast<Index>(index);
  }

  // Dense rule: subset j of the result = x[j] joined with y[k-1-j]. Only the
  // positions where either side is non-empty are visited, in increasing j.
  void merge(View x, View y, Partition& out) {
    const int64_t p = static_cast<int64_t>(x.size);
    const int64_t q = static_cast<int64_t>(y.size);
    const int64_t y_only = std::max(p, k_ - q);  // first j where only y contributes
    out.resize(static_cast<size_t>(p + (k_ - y_only)));
    Subset* dst = out.data();
    for (int64_t j = 0; j < p; ++j) {
      const int64_t other = k_ - 1 - j;
      *dst++ = other < q ? join(x.data[j], y.data[other]) : x.data[j];
    }
    for (int64_t j = y_only; j < k_; ++j) *dst++ = y.data[k_ - 1 - j];
  }

  // A join appends one tree node (sequential writes only; the old linked list
  // of members wrote to a random item's link on every join).
  Subset join(const Subset& u, const Subset& v) {
    halves_.push_back({u.node, v.node});
    return {u.cost + v.cost, num_items_ + static_cast<Index>(halves_.size()) - 1};
  }

  // Largest cost first, stable. Partitions are mostly small: an insertion sort
  // there avoids std::stable_sort's buffer allocation on every merge.
  static void sort_by_cost(Partition& p) {
    if (p.size() > 32) {
      std::stable_sort(p.begin(), p.end(), [](const Subset& u, const Subset& v) { return u.cost > v.cost; });
      return;
    }
    for (size_t i = 1; i < p.size(); ++i) {
      const Subset moving = p[i];
      size_t j = i;
      for (; j > 0 && p[j - 1].cost < moving.cost; --j) p[j] = p[j - 1];
      p[j] = moving;
    }
  }

  // Label every item with its group: the final subsets' labels flow down the
  // join tree in one sweep over the joins, newest first (a join's halves are
  // older than it), so the reads are sequential and the writes independent --
  // no pointer chasing through a linked list of items. group_lists then
  // sweeps the items in index order.
  std::vector<std::vector<Index>> groups(View p) const {
    std::vector<Index> label(static_cast<size_t>(num_items_) + halves_.size());
    for (size_t j = 0; j < p.size; ++j) label[p.data[j].node] = static_cast<Index>(j);
    for (size_t join = halves_.size(); join-- > 0;) {
      const Index group = label[static_cast<size_t>(num_items_) + join];
      label[halves_[join].first] = group;
      label[halves_[join].second] = group;
    }
    label.resize(static_cast<size_t>(num_items_));
    return group_lists(label, static_cast<size_t>(k_));
  }

  int64_t k_;
  Index num_items_;
  std::vector<std::pair<Index, Index>> halves_;  // join j: the nodes it joined
  std::vector<Subset> initial_;   // subsets of the initial partitions, back to back
  std::vector<size_t> offsets_;   // initial partition s = initial_[offsets_[s], offsets_[s + 1])
  std::vector<Partition> pool_;   // merged partitions
  std::vector<size_t> free_;      // pool_ entries free for reuse
  std::vector<HeapEntry> queue_;  // initial partitions, largest spread first
  size_t head_ = 0;               // next unconsumed entry of queue_
  QuadHeap heap_;                 // merged partitions, a max-heap under LargerSpreadFirst
  Index next_id_ = 0;
};

FUSEDRL_NO_FMA double sequence_cost(int64_t length, double a, double b) {
  const double len = static_cast<double>(length);
  const double linear = a * len;
  const double quadratic = b * (len * len);
  return linear + quadratic;
}

std::vector<std::vector<Index>> partition_impl(const LengthView& lengths, int64_t k,
                                               double a, double b, bool equal_size) {
  const Index n = static_cast<Index>(lengths.size());
  if (n == 0) return std::vector<std::vector<Index>>(static_cast<size_t>(k));
  if (k == 1) {  // what the differencing would return, without n merges
    std::vector<std::vector<Index>> one(1, std::vector<Index>(lengths.size()));
    std::iota(one[0].begin(), one[0].end(), Index{0});
    return one;
  }
  // Both variants add partitions longest item first, so in the common case
  // the initial queue is already in pop order and needs no sort.
  const std::vector<Index> order = longest_first(lengths);
  const std::vector<int64_t> sorted = sorted_lengths(lengths, order);
  Differencer ldm(n, k, static_cast<Index>(equal_size ? n / k + (n % k != 0) : n));
  if (!equal_size) {
    // Item i starts as the partition ({i}, {}, ..., {}).
    for (Index pos = 0; pos < n; ++pos) {
      const Subset single{sequence_cost(sorted[pos], a, b), order[pos]};
      ldm.add(&single, 1);
    }
    return ldm.run();
  }
  // Balanced LDM: items sorted longest first enter k at a time, one per
  // subset, so every subset of every partition holds one item per chunk.
  std::vector<Subset> chunk;
  for (int64_t start = 0; start < n; start += k) {
    chunk.clear();
    for (int64_t pos = start; pos < std::min<int64_t>(n, start + k); ++pos) {
      chunk.push_back({sequence_cost(sorted[pos], a, b), order[pos]});
    }
    ldm.add(chunk.data(), chunk.size());
  }
  return ldm.run();
}

std::vector<std::vector<Index>> pack_by_budget(const Lengths& lengths, int64_t budget) {
  if (budget < 1) throw std::invalid_argument("budget must be >= 1, got " + std::to_string(budget));
  const LengthView lens = checked_view(lengths);
  for (size_t i = 0; i < lens.size(); ++i) {
    if (lens[i] > budget) {
      throw std::invalid_argument("lengths[" + std::to_string(i) + "] = " + std::to_string(lens[i]) +
                                  " exceeds budget = " + std::to_string(budget));
    }
  }
  py::gil_scoped_release release;
  return pack_impl(lens, budget);
}

std::vector<std::vector<Index>> balanced_partition(const Lengths& lengths, int64_t k, double a,
                                                   double b, bool equal_size) {
  if (k < 1) throw std::invalid_argument("k must be >= 1, got " + std::to_string(k));
  if (!(std::isfinite(a) && a >= 0)) throw std::invalid_argument("a must be finite and >= 0");
  if (!(std::isfinite(b) && b >= 0)) throw std::invalid_argument("b must be finite and >= 0");
  if (a == 0 && b == 0) throw std::invalid_argument("a and b must not both be 0");
  const LengthView lens = checked_view(lengths);
  py::gil_scoped_release release;
  return partition_impl(lens, k, a, b, equal_size);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "fusedrl C++ core: sequence packing (best-fit decreasing) and k-way balancing (LDM)";
  m.def("pack_by_budget", &pack_by_budget, py::arg("lengths"), py::arg("budget"),
        "Best-fit-decreasing bins of `budget` tokens; returns lists of indices (ascending).");
  m.def("balanced_partition", &balanced_partition, py::arg("lengths"), py::arg("k"), py::arg("a"),
        py::arg("b"), py::arg("equal_size"),
        "k-way largest differencing under cost a*L + b*L^2; returns k lists of indices.");
}
