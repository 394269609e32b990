// The fastkv TensorRT plugins (README.md beside this file lists their inputs, outputs, fields and shape formulas)
// and the C entry points IPluginRegistry::loadLibrary looks for. Output shapes are functions of input shapes only,
// never of data, so an engine with these plugins stays CUDA-graph capturable.
#include <algorithm>
#include <climits>
#include <initializer_list>

#include "kernels.h"
#include "plugin.h"

namespace fastkv_trt {

void set_logger_finder(ILoggerFinder* finder);
char const* take_error_message();

namespace {

bool is_activation(DataType t) { return t == DataType::kHALF || t == DataType::kBF16; }
int dtype_of(DataType t) { return t == DataType::kBF16 ? FASTKV_BF16 : FASTKV_F16; }

// False only when `e` is a build-time constant other than `v`.
bool may_equal(IDimensionExpr const* e, int64_t v) { return !e->isConstant() || e->getConstantValue() == v; }

// Rank and extents of `d` against `want`; -1 on either side (unknown at build time, or any) matches.
bool dims_match(Dims const& d, std::initializer_list<int64_t> want) {
  if (d.nbDims != static_cast<int32_t>(want.size())) return false;
  int i = 0;
  for (int64_t w : want) {
    if (w >= 0 && d.d[i] >= 0 && d.d[i] != w) return false;
    ++i;
  }
  return true;
}

std::string str(Dims const& d) {
  std::string s = "[";
  for (int i = 0; i < d.nbDims; ++i) s += (i ? ", " : "") + std::to_string(d.d[i]);
  return s + "]";
}

size_t align256(size_t bytes) { return (bytes + 255) / 256 * 256; }

// GQA: every KV head serves the same number of query heads. Empty when fine.
std::string group_error(int32_t n_heads, int32_t n_kv_heads) {
  if (n_heads % n_kv_heads == 0) return "";
  return "n_heads (" + std::to_string(n_heads) + ") must be a multiple of n_kv_heads (" + std::to_string(n_kv_heads) +
         ")";
}

// What the attention kernels take: GQA groups, a head_dim they support and, to decode, groups of at most 8.
std::string attention_error(int32_t n_heads, int32_t n_kv_heads, int32_t head_dim, bool decode) {
  if (std::string e = group_error(n_heads, n_kv_heads); !e.empty()) return e;
  if (!attention_head_dim_supported(head_dim))
    return "head_dim " + std::to_string(head_dim) + " is not supported by the attention kernels";
  if (decode && n_heads / n_kv_heads > 8) return "decode needs n_heads / n_kv_heads <= 8";
  return "";
}

template <typename T>
IPluginV3* copy_of(T const* p) noexcept {
  try {
    return new T(*p);
  } catch (...) {
    return nullptr;
  }
}

}  // namespace

// Shape checks shared by configurePlugin (build time, extents may be -1) and onShapeChange (run time, all known):
// every plugin implements `validate`; enqueue can then trust the shapes.
class CheckedPlugin : public Plugin {
 public:
  using Plugin::Plugin;
  int32_t configurePlugin(DynamicPluginTensorDesc const* in, int32_t nb_in, DynamicPluginTensorDesc const*,
                          int32_t nb_out) noexcept override {
    std::vector<Dims> dims;
    for (int32_t i = 0; i < nb_in; ++i) dims.push_back(in[i].desc.dims);
    return check(dims, nb_out);
  }
  int32_t onShapeChange(PluginTensorDesc const* in, int32_t nb_in, PluginTensorDesc const*,
                        int32_t nb_out) noexcept override {
    std::vector<Dims> dims;
    for (int32_t i = 0; i < nb_in; ++i) dims.push_back(in[i].dims);
    nb_inputs_ = nb_in;
    return check(dims, nb_out);
  }

 protected:
  // Empty when `in` (extents -1 where unknown) fits the plugin's fields; else what is wrong.
  virtual std::string validate(std::vector<Dims> const& in) const = 0;
  int32_t nb_inputs() const { return nb_inputs_; }

 private:
  int32_t check(std::vector<Dims> const& in, int32_t nb_out) const {
    if (nb_out != getNbOutputs()) return fail("expects " + std::to_string(getNbOutputs()) + " outputs");
    try {
      std::string const bad = validate(in);
      return bad.empty() ? 0 : fail(bad);
    } catch (std::exception const& e) {
      return fail(e.what());
    }
  }
  int32_t nb_inputs_ = 0;
};

// Window scores → per-query-head pooling → group sum (docs/method.md §3): group scores [Hk, S−W] f32 and, with
// tsp = 1, their sum over KV heads [S−W] (what TSP ranks).
class WindowScores final : public CheckedPlugin {
 public:
  enum { kHeads, kKvHeads, kHeadDim, kWindow, kKernel, kPool, kTsp };
  static Schema const& schema() {
    static Schema const s{"FastKVWindowScores",
                          {{"n_heads", 1, 4096},
                           {"n_kv_heads", 1, 4096},
                           {"head_dim", 8, 256},
                           {"window", 1, 1 << 20},
                           {"kernel", 1, 1 << 10},
                           {"pool", 0, 1},
                           {"tsp", 0, 1}}};
    return s;
  }
  static std::string check(std::vector<int32_t> const& v) {
    if (std::string e = group_error(v[kHeads], v[kKvHeads]); !e.empty()) return e;
    if (v[kHeadDim] % 8) return "head_dim must be a multiple of 8";
    if (v[kKernel] % 2 == 0) return "kernel must be odd";
    return "";
  }
  explicit WindowScores(std::vector<int32_t> v) : CheckedPlugin(schema(), std::move(v)) {}
  IPluginV3* clone() noexcept override { return copy_of(this); }
  int32_t getNbOutputs() const noexcept override { return 1 + field(kTsp); }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return is_activation(d.type);
    if (pos == 1) return d.type == io[0].desc.type;
    return d.type == DataType::kFLOAT;  // lse and the outputs
  }
  int32_t getOutputDataTypes(DataType* out, int32_t nb_out, DataType const* in, int32_t nb_in) const noexcept override {
    if (nb_in != 2 && nb_in != 3) return fail("takes 2 or 3 inputs (q_window, keys[, lse])");
    if (!is_activation(in[0]) || in[1] != in[0]) return fail("q_window and keys must both be f16 or both bf16");
    std::fill(out, out + nb_out, DataType::kFLOAT);
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nb_in, DimsExprs const*, int32_t, DimsExprs* out,
                          int32_t nb_out, IExprBuilder& b) noexcept override {
    if ((nb_in != 2 && nb_in != 3) || nb_out != getNbOutputs()) return fail("wrong number of inputs or outputs");
    DimsExprs const &q = in[0], &k = in[1];
    if (q.nbDims != 3 || k.nbDims != 3 || (nb_in == 3 && in[2].nbDims != 2))
      return fail("q_window must be [H, W, D], keys [S, Hk, D], lse [H, S]");
    if (!may_equal(q.d[0], field(kHeads)) || !may_equal(q.d[1], field(kWindow)) ||
        !may_equal(q.d[2], field(kHeadDim)) || !may_equal(k.d[1], field(kKvHeads)) ||
        !may_equal(k.d[2], field(kHeadDim)) || (nb_in == 3 && !may_equal(in[2].d[0], field(kHeads))))
      return fail("input shapes do not match n_heads, n_kv_heads, head_dim, window");
    IDimensionExpr const* n = b.operation(DimensionOperation::kSUB, *k.d[0], *b.constant(field(kWindow)));
    out[0].nbDims = 2;
    out[0].d[0] = b.constant(field(kKvHeads));
    out[0].d[1] = n;
    if (nb_out == 2) {
      out[1].nbDims = 1;
      out[1].d[0] = n;
    }
    return 0;
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t nb_in, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    int const s = static_cast<int>(in[1].max.d[0]), n = std::max(s - field(kWindow), 0);
    size_t bytes = align256(sizeof(float) * field(kHeads) * n);
    if (nb_in == 2) bytes += sizeof(float) * fastkv_window_scores_workspace(field(kHeads), s, field(kWindow));
    return bytes;
  }
  int32_t enqueue(PluginTensorDesc const* in_desc, PluginTensorDesc const*, void const* const* in, void* const* out,
                  void* workspace, cudaStream_t stream) noexcept override {
    int const h = field(kHeads), hk = field(kKvHeads), d = field(kHeadDim), w = field(kWindow);
    int const s = static_cast<int>(in_desc[1].dims.d[0]), n = s - w;
    float* scores = static_cast<float*>(workspace);
    float* norm = reinterpret_cast<float*>(static_cast<char*>(workspace) + align256(sizeof(float) * h * n));
    // The attention's lse [H, S]: the last W columns belong to the window's queries.
    float const* lse = nb_inputs() == 3 ? static_cast<float const*>(in[2]) + n : nullptr;
    int e = fastkv_window_scores(in[0], in[1], d, int64_t{hk} * d, lse, s, lse ? nullptr : norm, scores, h, hk, d, s,
                                 w, dtype_of(in_desc[0].type), stream);
    float* group = static_cast<float*>(out[0]);
    if (!e) e = fastkv_pool_group(scores, h, hk, n, field(kKernel), field(kPool), group, stream);
    if (!e && field(kTsp)) e = fastkv_sum_heads(group, hk, n, static_cast<float*>(out[1]), stream);
    return e ? fail("CUDA error " + std::to_string(e) + " in enqueue") : 0;
  }

 private:
  std::string validate(std::vector<Dims> const& in) const override {
    if (in.size() != 2 && in.size() != 3) return "takes 2 or 3 inputs (q_window, keys[, lse])";
    int64_t const h = field(kHeads), hk = field(kKvHeads), d = field(kHeadDim), w = field(kWindow);
    if (!dims_match(in[0], {h, w, d})) return "q_window " + str(in[0]) + " must be [n_heads, window, head_dim]";
    if (!dims_match(in[1], {-1, hk, d})) return "keys " + str(in[1]) + " must be [S, n_kv_heads, head_dim]";
    int64_t const s = in[1].d[0];
    if (s >= 0 && s < w) return "keys have " + std::to_string(s) + " rows, fewer than the window";
    if (s > INT_MAX) return "keys have more than 2^31 rows";
    if (in.size() == 3 && !dims_match(in[2], {h, s})) return "lse " + str(in[2]) + " must be [n_heads, S]";
    return "";
  }
};

// Top-k per row with k a function of the row length: for scores [rows, n] (or [n]) over L = n + W tokens,
// k = clamp(floor(L·rate_num / rate_den) − W, 0, n); output [rows, k + W] int32: the k indices ascending, then
// n..n+W−1 (fastkv_top_k). rate_num/rate_den = retain rate gives the KV budget C = ⌊L·r⌋, = TSP rate gives T.
class TopK final : public CheckedPlugin {
 public:
  enum { kNum, kDen, kWindow };
  static Schema const& schema() {
    static Schema const s{"FastKVTopK", {{"rate_num", 0, 1 << 30}, {"rate_den", 1, 1 << 30}, {"window", 1, 1 << 20}}};
    return s;
  }
  static std::string check(std::vector<int32_t> const&) { return ""; }
  explicit TopK(std::vector<int32_t> v) : CheckedPlugin(schema(), std::move(v)) {}
  IPluginV3* clone() noexcept override { return copy_of(this); }
  int32_t getNbOutputs() const noexcept override { return 1; }

  // The k of a row of n scores; the same formula as getOutputShapes builds.
  int64_t k_of(int64_t n) const {
    int64_t const w = field(kWindow), budget = (n + w) * field(kNum) / field(kDen);
    return std::min(std::max(budget - w, int64_t{0}), n);
  }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    return d.format == TensorFormat::kLINEAR && d.type == (pos == 0 ? DataType::kFLOAT : DataType::kINT32);
  }
  int32_t getOutputDataTypes(DataType* out, int32_t nb_out, DataType const* in, int32_t nb_in) const noexcept override {
    if (nb_in != 1 || nb_out != 1 || in[0] != DataType::kFLOAT) return fail("takes one f32 input (scores)");
    out[0] = DataType::kINT32;
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nb_in, DimsExprs const*, int32_t, DimsExprs* out,
                          int32_t nb_out, IExprBuilder& b) noexcept override {
    if (nb_in != 1 || nb_out != 1 || in[0].nbDims < 1 || in[0].nbDims > 2)
      return fail("takes one input, scores [rows, n] or [n]");
    using Op = DimensionOperation;
    DimsExprs const& s = in[0];
    IDimensionExpr const& n = *s.d[s.nbDims - 1];
    IDimensionExpr const& w = *b.constant(field(kWindow));
    IDimensionExpr const* budget = b.operation(
        Op::kFLOOR_DIV, *b.operation(Op::kPROD, *b.operation(Op::kSUM, n, w), *b.constant(field(kNum))),
        *b.constant(field(kDen)));
    IDimensionExpr const* k =
        b.operation(Op::kMIN, *b.operation(Op::kMAX, *b.operation(Op::kSUB, *budget, w), *b.constant(0)), n);
    out[0] = s;
    out[0].d[s.nbDims - 1] = b.operation(Op::kSUM, *k, w);
    return 0;
  }
  int32_t enqueue(PluginTensorDesc const* in_desc, PluginTensorDesc const*, void const* const* in, void* const* out,
                  void*, cudaStream_t stream) noexcept override {
    Dims const& d = in_desc[0].dims;
    int const rows = d.nbDims == 2 ? static_cast<int>(d.d[0]) : 1, n = static_cast<int>(d.d[d.nbDims - 1]);
    int const k = static_cast<int>(k_of(n)), w = field(kWindow);
    int const e = fastkv_top_k(static_cast<float const*>(in[0]), rows, n, k, w, static_cast<uint32_t*>(out[0]), k + w,
                               stream);
    return e ? fail("CUDA error " + std::to_string(e) + " in enqueue") : 0;
  }

 private:
  std::string validate(std::vector<Dims> const& in) const override {
    if (in.size() != 1 || in[0].nbDims < 1 || in[0].nbDims > 2) return "takes one input, scores [rows, n] or [n]";
    for (int i = 0; i < in[0].nbDims; ++i)
      if (in[0].d[i] > INT_MAX - (1 << 20)) return "scores " + str(in[0]) + " are too large";
    return "";
  }
};

// Row gather: src [R, B, E], idx [B, C] → dst [B, C, E] with dst[b, c, :] = src[idx[b, c], b, :] (selected K/V rows
// of each KV head from [S, Hk, D] into a head-major cache); src [R, E], idx [C] → [C, E] (hidden rows after TSP);
// src [R], idx [C] → [C] (position ids). Elements of 2 or 4 bytes; an index ≥ R leaves its row unwritten.
class Gather final : public CheckedPlugin {
 public:
  static Schema const& schema() {
    static Schema const s{"FastKVGather", {}};
    return s;
  }
  static std::string check(std::vector<int32_t> const&) { return ""; }
  explicit Gather(std::vector<int32_t> v) : CheckedPlugin(schema(), std::move(v)) {}
  IPluginV3* clone() noexcept override { return copy_of(this); }
  int32_t getNbOutputs() const noexcept override { return 1; }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 1) return d.type == DataType::kINT32;
    if (pos == 2) return d.type == io[0].desc.type;
    return is_activation(d.type) || d.type == DataType::kFLOAT || d.type == DataType::kINT32;
  }
  int32_t getOutputDataTypes(DataType* out, int32_t nb_out, DataType const* in, int32_t nb_in) const noexcept override {
    if (nb_in != 2 || nb_out != 1 || in[1] != DataType::kINT32) return fail("takes src and int32 idx");
    out[0] = in[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nb_in, DimsExprs const*, int32_t, DimsExprs* out,
                          int32_t nb_out, IExprBuilder&) noexcept override {
    if (nb_in != 2 || nb_out != 1) return fail("takes two inputs (src, idx)");
    DimsExprs const &src = in[0], &idx = in[1];
    if (src.nbDims < 1 || src.nbDims > 3 || idx.nbDims != (src.nbDims == 3 ? 2 : 1))
      return fail("src [R, B, E] needs idx [B, C]; src [R, E] or [R] needs idx [C]");
    out[0].nbDims = src.nbDims;
    if (src.nbDims == 3) {
      out[0].d[0] = idx.d[0];
      out[0].d[1] = idx.d[1];
      out[0].d[2] = src.d[2];
    } else {
      out[0].d[0] = idx.d[0];
      if (src.nbDims == 2) out[0].d[1] = src.d[1];
    }
    return 0;
  }
  int32_t enqueue(PluginTensorDesc const* in_desc, PluginTensorDesc const*, void const* const* in, void* const* out,
                  void*, cudaStream_t stream) noexcept override {
    Dims const &s = in_desc[0].dims, &i = in_desc[1].dims;
    int64_t const es = is_activation(in_desc[0].type) ? 2 : 4;
    int64_t const batches = s.nbDims == 3 ? s.d[1] : 1, row = (s.nbDims == 1 ? 1 : s.d[s.nbDims - 1]) * es;
    int64_t const count = i.d[i.nbDims - 1];
    int const e = fastkv_gather_rows(in[0], row, batches * row, s.d[0], static_cast<uint32_t const*>(in[1]), count,
                                     static_cast<int>(count), static_cast<int>(batches), out[0], count * row, row,
                                     static_cast<int>(row), stream);
    return e ? fail("CUDA error " + std::to_string(e) + " in enqueue") : 0;
  }

 private:
  std::string validate(std::vector<Dims> const& in) const override {
    if (in.size() != 2) return "takes two inputs (src, idx)";
    Dims const &s = in[0], &i = in[1];
    if (s.nbDims < 1 || s.nbDims > 3 || i.nbDims != (s.nbDims == 3 ? 2 : 1))
      return "src " + str(s) + " and idx " + str(i) + ": src [R, B, E] needs idx [B, C]; src [R, E] or [R] idx [C]";
    if (s.nbDims == 3 && !dims_match(i, {s.d[1], -1})) return "idx " + str(i) + " must have src's B rows";
    int64_t const row = (s.nbDims == 1 ? 1 : s.d[s.nbDims - 1]) * 4;
    if (row > INT_MAX / 2 || i.d[i.nbDims - 1] > INT_MAX || s.d[0] > INT_MAX) return "src or idx too large";
    return "";
  }
};

// Causal GQA flash attention. mode 0 (prefill): q [S, H, D], k/v [Sk, Hk, D] (the last S of Sk positions are the
// queries) → out [S, H, D], lse [H, S] f32 (what FastKVWindowScores reads). mode 1 (decode): q [H, D] over a
// head-major cache k/v [Hk, L, D] → out [H, D]. Positions q_pos [S] (decode [1]) and k_pos [Hk, Sk] (decode
// [Hk, L]) int32 are read only with sliding_window > 0, which also hides keys with q_pos − k_pos ≥ sliding_window;
// prefill keys are not yet compressed, so every KV head has the same positions and row 0 of k_pos is read.
class Attention final : public CheckedPlugin {
 public:
  enum { kHeads, kKvHeads, kHeadDim, kMode, kSlidingWindow };
  static Schema const& schema() {
    static Schema const s{"FastKVAttention",
                          {{"n_heads", 1, 4096},
                           {"n_kv_heads", 1, 4096},
                           {"head_dim", 8, 256},
                           {"mode", 0, 1},
                           {"sliding_window", 0, INT_MAX}}};
    return s;
  }
  static std::string check(std::vector<int32_t> const& v) {
    return attention_error(v[kHeads], v[kKvHeads], v[kHeadDim], v[kMode] == 1);
  }
  explicit Attention(std::vector<int32_t> v) : CheckedPlugin(schema(), std::move(v)) {}
  IPluginV3* clone() noexcept override { return copy_of(this); }
  int32_t getNbOutputs() const noexcept override { return field(kMode) == 0 ? 2 : 1; }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return is_activation(d.type);
    if (pos == 3 || pos == 4) return d.type == DataType::kINT32;           // q_pos, k_pos
    return d.type == (pos == 6 ? DataType::kFLOAT : io[0].desc.type);  // q, k, v, out share a type; lse is f32
  }
  int32_t getOutputDataTypes(DataType* out, int32_t nb_out, DataType const* in, int32_t nb_in) const noexcept override {
    if (nb_in != 5 || nb_out != getNbOutputs()) return fail("takes five inputs (q, k, v, q_pos, k_pos)");
    if (!is_activation(in[0]) || in[1] != in[0] || in[2] != in[0]) return fail("q, k, v must share f16 or bf16");
    if (in[3] != DataType::kINT32 || in[4] != DataType::kINT32) return fail("q_pos and k_pos must be int32");
    out[0] = in[0];
    if (nb_out == 2) out[1] = DataType::kFLOAT;
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const* in, int32_t nb_in, DimsExprs const*, int32_t, DimsExprs* out,
                          int32_t nb_out, IExprBuilder& b) noexcept override {
    if (nb_in != 5 || nb_out != getNbOutputs()) return fail("takes five inputs (q, k, v, q_pos, k_pos)");
    int const rank = field(kMode) == 0 ? 3 : 2;
    if (in[0].nbDims != rank) return fail(rank == 3 ? "prefill q must be [S, H, D]" : "decode q must be [H, D]");
    out[0] = in[0];
    if (nb_out == 2) {
      out[1].nbDims = 2;
      out[1].d[0] = b.constant(field(kHeads));
      out[1].d[1] = in[0].d[0];
    }
    return 0;
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    if (field(kMode) == 0) return 0;
    return sizeof(float) * decode_attention_workspace(field(kHeads), static_cast<int>(in[1].max.d[1]), field(kHeadDim));
  }
  int32_t enqueue(PluginTensorDesc const* in_desc, PluginTensorDesc const*, void const* const* in, void* const* out,
                  void* workspace, cudaStream_t stream) noexcept override {
    int const h = field(kHeads), hk = field(kKvHeads), d = field(kHeadDim), dtype = dtype_of(in_desc[0].type);
    int const window = field(kSlidingWindow);
    auto const* q_pos = static_cast<uint32_t const*>(in[3]);
    auto const* k_pos = static_cast<uint32_t const*>(in[4]);
    int e;
    if (field(kMode) == 0) {
      int const s = static_cast<int>(in_desc[0].dims.d[0]), sk = static_cast<int>(in_desc[1].dims.d[0]);
      e = prefill_attention(in[0], in[1], in[2], q_pos, k_pos, window, out[0], static_cast<float*>(out[1]), s, sk, h,
                            hk, d, dtype, stream);
    } else {
      int const len = static_cast<int>(in_desc[1].dims.d[1]);
      e = decode_attention(in[0], in[1], in[2], q_pos, k_pos, window, out[0], static_cast<float*>(workspace), len, h,
                           hk, d, dtype, stream);
    }
    return e ? fail("CUDA error " + std::to_string(e) + " in enqueue") : 0;
  }

 private:
  std::string validate(std::vector<Dims> const& in) const override {
    if (in.size() != 5) return "takes five inputs (q, k, v, q_pos, k_pos)";
    int64_t const h = field(kHeads), hk = field(kKvHeads), d = field(kHeadDim);
    if (field(kMode) == 0) {
      if (!dims_match(in[0], {-1, h, d})) return "q " + str(in[0]) + " must be [S, n_heads, head_dim]";
      if (!dims_match(in[1], {-1, hk, d})) return "k " + str(in[1]) + " must be [Sk, n_kv_heads, head_dim]";
      if (in[0].d[0] >= 0 && in[1].d[0] >= 0 && in[1].d[0] < in[0].d[0]) return "k has fewer rows than q";
      if (!dims_match(in[3], {in[0].d[0]})) return "q_pos " + str(in[3]) + " must be [S]";
      if (!dims_match(in[4], {hk, in[1].d[0]})) return "k_pos " + str(in[4]) + " must be [n_kv_heads, Sk]";
    } else {
      if (!dims_match(in[0], {h, d})) return "q " + str(in[0]) + " must be [n_heads, head_dim]";
      if (!dims_match(in[1], {hk, -1, d})) return "k " + str(in[1]) + " must be [n_kv_heads, L, head_dim]";
      if (in[1].d[1] == 0) return "the cache is empty";
      if (!dims_match(in[3], {1})) return "q_pos " + str(in[3]) + " must be [1]";
      if (!dims_match(in[4], {hk, in[1].d[1]})) return "k_pos " + str(in[4]) + " must be [n_kv_heads, L]";
    }
    if (!dims_match(in[2], {in[1].d[0], in[1].d[1], in[1].d[2]})) return "v " + str(in[2]) + " must match k";
    if (in[1].d[0] > INT_MAX || in[1].d[1] > INT_MAX) return "k is too large";
    return "";
  }
};

// Decode attention on a preallocated cache, updated in place (as TensorRT-LLM's and Edge-LLM's attention plugins
// update theirs): qkv [1, (H + 2·Hk)·D] is the new token's q|k|v row after RoPE; its K/V go to slot cache_len of
// k_cache / v_cache [Hk, C, D] with position pos in cache_pos [Hk, C] (int32), cache_len [1] (int32) grows by one,
// and q attends over the cache_len entries → out [H, D]. The four cache inputs are written: they must be engine
// inputs (bindings the runner owns), which TensorRT never copies or reuses. Their extents are the capacity C, not
// the length, so shapes are fixed for a whole generation and the step is CUDA-graph capturable; a full cache drops
// the new entry. sliding_window > 0 also hides entries with pos − cache_pos ≥ sliding_window.
class CacheAttention final : public CheckedPlugin {
 public:
  enum { kHeads, kKvHeads, kHeadDim, kSlidingWindow };
  static Schema const& schema() {
    static Schema const s{
        "FastKVCacheAttention",
        {{"n_heads", 1, 4096}, {"n_kv_heads", 1, 4096}, {"head_dim", 8, 256}, {"sliding_window", 0, INT_MAX}}};
    return s;
  }
  static std::string check(std::vector<int32_t> const& v) {
    return attention_error(v[kHeads], v[kKvHeads], v[kHeadDim], true);
  }
  explicit CacheAttention(std::vector<int32_t> v) : CheckedPlugin(schema(), std::move(v)) {}
  IPluginV3* clone() noexcept override { return copy_of(this); }
  int32_t getNbOutputs() const noexcept override { return 1; }

  bool supportsFormatCombination(int32_t pos, DynamicPluginTensorDesc const* io, int32_t, int32_t) noexcept override {
    PluginTensorDesc const& d = io[pos].desc;
    if (d.format != TensorFormat::kLINEAR) return false;
    if (pos == 0) return is_activation(d.type);
    if (pos >= 3 && pos <= 5) return d.type == DataType::kINT32;  // cache_pos, cache_len, pos
    return d.type == io[0].desc.type;                              // k_cache, v_cache, out
  }
  int32_t getOutputDataTypes(DataType* out, int32_t nb_out, DataType const* in, int32_t nb_in) const noexcept override {
    if (nb_in != 6 || nb_out != 1) return fail("takes six inputs (qkv, k_cache, v_cache, cache_pos, cache_len, pos)");
    if (!is_activation(in[0]) || in[1] != in[0] || in[2] != in[0]) return fail("qkv and the caches must share f16 or bf16");
    if (in[3] != DataType::kINT32 || in[4] != DataType::kINT32 || in[5] != DataType::kINT32)
      return fail("cache_pos, cache_len and pos must be int32");
    out[0] = in[0];
    return 0;
  }
  int32_t getOutputShapes(DimsExprs const*, int32_t nb_in, DimsExprs const*, int32_t, DimsExprs* out, int32_t nb_out,
                          IExprBuilder& b) noexcept override {
    if (nb_in != 6 || nb_out != 1) return fail("takes six inputs (qkv, k_cache, v_cache, cache_pos, cache_len, pos)");
    out[0].nbDims = 2;
    out[0].d[0] = b.constant(field(kHeads));
    out[0].d[1] = b.constant(field(kHeadDim));
    return 0;
  }
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* in, int32_t, DynamicPluginTensorDesc const*,
                          int32_t) const noexcept override {
    return sizeof(float) * cache_attention_workspace(field(kHeads), static_cast<int>(in[1].max.d[1]), field(kHeadDim));
  }
  int32_t enqueue(PluginTensorDesc const* in_desc, PluginTensorDesc const*, void const* const* in, void* const* out,
                  void* workspace, cudaStream_t stream) noexcept override {
    int const capacity = static_cast<int>(in_desc[1].dims.d[1]);
    // The caches are written: engine inputs, owned by the runner (see above).
    auto* const k = const_cast<void*>(in[1]);
    auto* const v = const_cast<void*>(in[2]);
    auto* const cache_pos = static_cast<uint32_t*>(const_cast<void*>(in[3]));
    auto* const len = static_cast<uint32_t*>(const_cast<void*>(in[4]));
    int const e = cache_attention(in[0], k, v, cache_pos, len, capacity, static_cast<uint32_t const*>(in[5]),
                                  field(kSlidingWindow), out[0], static_cast<float*>(workspace), field(kHeads),
                                  field(kKvHeads), field(kHeadDim), dtype_of(in_desc[0].type), stream);
    return e ? fail("CUDA error " + std::to_string(e) + " in enqueue") : 0;
  }

 private:
  std::string validate(std::vector<Dims> const& in) const override {
    if (in.size() != 6) return "takes six inputs (qkv, k_cache, v_cache, cache_pos, cache_len, pos)";
    int64_t const h = field(kHeads), hk = field(kKvHeads), d = field(kHeadDim);
    if (!dims_match(in[0], {1, (h + 2 * hk) * d})) return "qkv " + str(in[0]) + " must be [1, (n_heads + 2·n_kv_heads)·head_dim]";
    if (!dims_match(in[1], {hk, -1, d})) return "k_cache " + str(in[1]) + " must be [n_kv_heads, C, head_dim]";
    if (in[1].d[1] == 0) return "the cache has no capacity";
    if (!dims_match(in[2], {hk, in[1].d[1], d})) return "v_cache " + str(in[2]) + " must match k_cache";
    if (!dims_match(in[3], {hk, in[1].d[1]})) return "cache_pos " + str(in[3]) + " must be [n_kv_heads, C]";
    if (!dims_match(in[4], {1})) return "cache_len " + str(in[4]) + " must be [1]";
    if (!dims_match(in[5], {1})) return "pos " + str(in[5]) + " must be [1]";
    if (in[1].d[1] > INT_MAX) return "k_cache is too large";
    return "";
  }
};

}  // namespace fastkv_trt

// The plugin-library entry points of TensorRT 10/11 (IPluginRegistry::loadLibrary, trtexec --staticPlugins).
extern "C" {

__attribute__((visibility("default"))) void setLoggerFinder(nvinfer1::ILoggerFinder* finder) {
  fastkv_trt::set_logger_finder(finder);
}

__attribute__((visibility("default"))) nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nb_creators) {
  using namespace fastkv_trt;
  static Creator<WindowScores> window_scores;
  static Creator<TopK> top_k;
  static Creator<Gather> gather;
  static Creator<Attention> attention;
  static Creator<CacheAttention> cache_attention;
  static IPluginCreatorInterface* const all[] = {&window_scores, &top_k, &gather, &attention, &cache_attention};
  nb_creators = 5;
  return all;
}

// Why the last failed call (createPlugin, getOutputShapes, ...) of this thread failed, then forgets it: TensorRT's
// API only returns nullptr / -1. Valid until the next call of this function on the same thread.
__attribute__((visibility("default"))) char const* fastkv_trt_take_error() { return fastkv_trt::take_error_message(); }

}  // extern "C"
