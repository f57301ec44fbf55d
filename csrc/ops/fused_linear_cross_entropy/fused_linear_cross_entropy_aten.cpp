// fused_linear_cross_entropy_aten.cpp — ATen layer of fused_linear_cross_entropy: checks, the chunk
// loop (GEMMs through at::mm / at::addmm, so oneDNN / cuBLAS pick the matmul kernel: AMX or
// AVX512-BF16 on CPU), and the CPU (always) and CUDA (LLMCORE_WITH_CUDA) registrations.
//
// The (N, V) logits are never held: rows are taken `chunk` at a time (a (chunk, V) buffer in the
// input dtype, reused), and for each chunk
//   x   = hidden_c @ weight.T (+ bias)               GEMM 1
//   loss_c, dx = fused row pass (the kernels)         x overwritten by dx in place
//   dhidden_c = dx @ weight                           GEMM 2
//   dweight  += dx^T @ hidden_c,  dbias += sum(dx)    GEMM 3
// Gradients are produced in the forward (Liger's scheme) when the python op asks for them
// (reduction mean / sum with inputs that need grad): three GEMMs in all and nothing but the
// gradients themselves kept for the backward, which is then a scale by the upstream scalar.
// reduction='none' takes a per-token upstream gradient that is unknown in the forward, so its
// backward recomputes (fused_linear_cross_entropy_bwd: the same loop with row_grad).
// Vocabulary order, for a vocabulary much larger than the batch (V > 2 N, e.g. 151936 vs 4096), where
// the row order's per-chunk dweight accumulation (V x H read and written per chunk) would cost more
// than the GEMMs: pass 1 (row chunks) computes the loss and every row's lse; pass 2 walks vocabulary
// blocks of all rows: x_b = hidden @ weight_b.T, dx_b from lse, dweight_b = dx_b^T @ hidden in one
// GEMM (written once), dhidden += dx_b @ weight_b (an (N, H) accumulator, fp32 for 16-bit). Four
// GEMMs instead of three, and no (V, H) accumulation traffic.
// Only labelled rows (target != ignore_index) enter the loop: they are gathered first (when some
// are ignored), so prompt / padding tokens cost no GEMM work, and the results are scattered back.
// 16-bit dweight over several chunks accumulates in an fp32 buffer (one rounding at the end).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "common/checks.h"
#include "fused_linear_cross_entropy/fused_linear_cross_entropy.h"

namespace llmcore {
namespace {

enum class Reduction { None, Mean, Sum };

Reduction parse_reduction(c10::string_view r) {
  if (r == "mean") return Reduction::Mean;
  if (r == "sum") return Reduction::Sum;
  if (r == "none") return Reduction::None;
  LLMCORE_CHECK(false, "argument 'reduction' must be 'mean', 'sum' or 'none', got '", std::string(r), "'");
  return Reduction::Mean;
}

struct Opts {
  int64_t ignore_index;
  double label_smoothing, z_loss, softcap;
  Reduction reduction;
  int64_t chunk_rows;
  int64_t vocab_chunk;
};

void check_inputs(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
                  const c10::optional<at::Tensor>& bias, const Opts& o) {
  check_float(hidden, "hidden");
  check_float(weight, "weight");
  check_dim(hidden, "hidden", 2);
  check_dim(weight, "weight", 2);
  check_same_device(hidden, "hidden", weight, "weight");
  check_same_dtype(hidden, "hidden", weight, "weight");
  LLMCORE_CHECK(weight.size(1) == hidden.size(1), "argument 'weight' must have shape (V, H) with H = hidden.size(1) = ",
                hidden.size(1), ", got ", weight.sizes());
  LLMCORE_CHECK(weight.size(0) > 0, "argument 'weight' must have at least one row (vocabulary size V > 0), got ",
                weight.sizes());
  check_defined(target, "target");
  LLMCORE_CHECK(target.scalar_type() == at::kLong || target.scalar_type() == at::kInt,
                "argument 'target' must be int64 or int32, got ", target.scalar_type());
  check_same_device(hidden, "hidden", target, "target");
  LLMCORE_CHECK(target.dim() == 1 && target.size(0) == hidden.size(0), "argument 'target' must have shape (N,) with N = ",
                "hidden.size(0) = ", hidden.size(0), ", got ", target.sizes());
  if (bias.has_value() && bias->defined()) {
    check_float(*bias, "bias");
    check_same_device(hidden, "hidden", *bias, "bias");
    check_same_dtype(hidden, "hidden", *bias, "bias");
    check_shape(*bias, "bias", {weight.size(0)});
  }
  LLMCORE_CHECK(o.label_smoothing >= 0.0 && o.label_smoothing <= 1.0,
                "argument 'label_smoothing' must be in [0, 1], got ", o.label_smoothing);
  LLMCORE_CHECK(std::isfinite(o.z_loss) && o.z_loss >= 0.0, "argument 'z_loss' must be finite and >= 0, got ", o.z_loss);
  LLMCORE_CHECK(std::isfinite(o.softcap) && o.softcap >= 0.0, "argument 'softcap' must be finite and > 0 (0 = off), got ",
                o.softcap);
  LLMCORE_CHECK(o.chunk_rows >= 0, "argument 'chunk_rows' must be >= 0 (0 = automatic), got ", o.chunk_rows);
  LLMCORE_CHECK(o.vocab_chunk >= 0, "argument 'vocab_chunk' must be >= 0 (0 = automatic), got ", o.vocab_chunk);
}

// Rows per chunk: a (chunk, V) logits buffer of about 32 MB on CPU (it and the row pass stay close to
// the caches; the GEMMs are still wide enough to run at full rate) and 256 MB on CUDA.
int64_t pick_chunk(int64_t n, int64_t V, int64_t elsize, bool cuda, int64_t chunk_rows) {
  if (chunk_rows > 0) return std::min(chunk_rows, std::max<int64_t>(n, 1));
  const int64_t budget = (cuda ? int64_t(256) : int64_t(32)) << 20;
  const int64_t most = std::max<int64_t>(1, budget / (V * elsize));
  if (n <= most) return std::max<int64_t>(n, 1);
  // equal chunks (no short last one), rounded up to 16 rows for the GEMMs
  const int64_t nchunks = (n + most - 1) / most;
  int64_t c = (n + nchunks - 1) / nchunks;
  if (c > 64) c = std::min(n, (c + 15) / 16 * 16);
  return c;
}

void run_rows(FlceRowsParams& p, const at::Tensor& like) {
  if (p.rows == 0) return;
  if (like.is_cpu()) {
    // at least ~32K logits per task: a small problem stays on one thread (waking the pool costs more)
    const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(p.V, 1));
    at::parallel_for(0, p.rows, grain, [&](int64_t b, int64_t e) { fused_linear_cross_entropy_rows_cpu(p, b, e); });
    return;
  }
#ifdef LLMCORE_WITH_CUDA
  const c10::cuda::CUDAGuard guard(like.device());
  LLMCORE_CUDA_CHECK(fused_linear_cross_entropy_rows_cuda(p, at::cuda::getCurrentCUDAStream()),
                     "fused_linear_cross_entropy_rows_cuda");
#else
  LLMCORE_CHECK(false, "fused_linear_cross_entropy: llmcore was built without CUDA support, got a tensor on ",
                like.device());
#endif
}

bool is_16bit(at::ScalarType s) { return s == at::kHalf || s == at::kBFloat16; }

struct Result {
  at::Tensor loss_rows, dhidden, dweight, dbias;  // dbias undefined without bias
  int64_t n_valid = 0;
};

// The chunk loop. row_grad: (N,) upstream gradient per row (loss dtype) or undefined; scale: gradient
// multiplier before the reduction's (1 / n_valid for mean is applied here).
Result run(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target_in,
           const c10::optional<at::Tensor>& bias_opt, const Opts& o, const at::Tensor& row_grad_in, double scale,
           bool grads) {
  check_inputs(hidden, weight, target_in, bias_opt, o);
  const bool has_bias = bias_opt.has_value() && bias_opt->defined();
  const int64_t N = hidden.size(0), H = hidden.size(1), V = weight.size(0);
  const auto loss_dtype = hidden.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor target = target_in.to(at::kLong);
  const at::Tensor valid = target.ne(o.ignore_index);
  const at::Tensor bad = valid.logical_and(target.lt(0).logical_or(target.ge(V)));
  if (N > 0 && bad.any().item<bool>()) {
    const int64_t row = bad.nonzero().select(1, 0)[0].item<int64_t>();
    LLMCORE_CHECK(false, "argument 'target' must hold class indices in [0, V = ", V, ") or ignore_index = ",
                  o.ignore_index, ", got ", target[row].item<int64_t>(), " at row ", row);
  }
  Result res;
  res.n_valid = N > 0 ? valid.sum().item<int64_t>() : 0;
  const int64_t n = res.n_valid;
  if (o.reduction == Reduction::Mean) scale /= double(std::max<int64_t>(n, 1));
  const bool compact = n < N;
  at::Tensor idx, h = hidden, t = target, rg = row_grad_in;
  if (compact) {
    idx = valid.nonzero().select(1, 0);
    h = hidden.index_select(0, idx);
    t = target.index_select(0, idx);
    if (rg.defined()) rg = rg.index_select(0, idx);
  }
  t = t.contiguous();
  if (rg.defined()) rg = rg.to(loss_dtype).contiguous();
  const auto opts = hidden.options();
  at::Tensor loss_c = at::empty({n}, opts.dtype(loss_dtype));
  at::Tensor dh_c, dw_acc, tmp, db_acc;
  const int64_t chunk = pick_chunk(n, V, hidden.element_size(), hidden.is_cuda(), o.chunk_rows);
  const int64_t nchunks = n == 0 ? 0 : (n + chunk - 1) / chunk;
  // Vocabulary order (see the file comment) when the row order would accumulate a (V, H) dweight over
  // several chunks of a vocabulary much larger than the batch, or when asked for.
  const bool vocab_order = grads && n > 0 &&
      (o.vocab_chunk > 0 || (o.chunk_rows == 0 && nchunks > 1 && V > 2 * n));
  const bool row_grads = grads && !vocab_order;
  const bool acc32 = row_grads && is_16bit(hidden.scalar_type()) && nchunks > 1;
  at::Tensor lse_c = vocab_order ? at::empty({n}, opts.dtype(loss_dtype)) : at::Tensor();
  if (grads) {
    dh_c = at::empty({n, H}, opts);
    // written in full by the first chunk (n > 0) before any accumulation
    dw_acc = n == 0 ? at::zeros({V, H}, opts) : at::empty({V, H}, acc32 ? opts.dtype(at::kFloat) : opts);
    if (acc32) tmp = at::empty({V, H}, opts);
    if (has_bias) db_acc = at::zeros({V}, opts.dtype(loss_dtype));
  }
  FlceRowsParams p;
  p.scale = scale, p.label_smoothing = o.label_smoothing, p.z_loss = o.z_loss, p.softcap = o.softcap;
  p.dtype = to_dtype(hidden.scalar_type());
  if (n > 0) {
    at::Tensor buf = at::empty({chunk, V}, opts);
    const at::Tensor wt = weight.t();
    p.V = p.V_total = V, p.write_grad = row_grads;
    for (int64_t r0 = 0; r0 < n; r0 += chunk) {
      const int64_t m = std::min(chunk, n - r0);
      const at::Tensor hc = h.narrow(0, r0, m);
      at::Tensor lc = buf.narrow(0, 0, m);
      if (has_bias) at::addmm_out(lc, *bias_opt, hc, wt);
      else at::mm_out(lc, hc, wt);
      p.logits = lc.data_ptr(), p.ld = lc.stride(0), p.rows = m;
      p.target = t.data_ptr<int64_t>() + r0;
      p.loss = static_cast<char*>(loss_c.data_ptr()) + r0 * loss_c.element_size();
      p.lse = vocab_order ? static_cast<char*>(lse_c.data_ptr()) + r0 * lse_c.element_size() : nullptr;
      p.row_grad = rg.defined() ? static_cast<const char*>(rg.data_ptr()) + r0 * rg.element_size() : nullptr;
      run_rows(p, hidden);
      if (!row_grads) continue;
      at::Tensor dhc = dh_c.narrow(0, r0, m);
      at::mm_out(dhc, lc, weight);
      if (acc32) {
        at::mm_out(tmp, lc.t(), hc);
        if (r0 == 0) dw_acc.copy_(tmp);
        else dw_acc.add_(tmp);
      } else if (r0 == 0) {
        at::mm_out(dw_acc, lc.t(), hc);
      } else {
        dw_acc.addmm_(lc.t(), hc);
      }
      if (has_bias) db_acc.add_(lc.sum(0, false, loss_dtype));
    }
  }
  if (vocab_order) {
    // pass 2, over vocabulary blocks of all n rows: each dweight block is one GEMM over every row
    // (written once), and dhidden (n, H) accumulates over the blocks (in fp32 for 16-bit inputs).
    const int64_t most = o.vocab_chunk > 0 ? o.vocab_chunk
        : std::max<int64_t>(64, ((hidden.is_cuda() ? int64_t(256) : int64_t(32)) << 20) / (n * hidden.element_size()));
    const int64_t nblocks = (V + most - 1) / most;
    int64_t vb_max = (V + nblocks - 1) / nblocks;
    if (vb_max > 64) vb_max = std::min(V, (vb_max + 15) / 16 * 16);
    const bool dh32 = is_16bit(hidden.scalar_type()) && nblocks > 1;
    at::Tensor dh_acc = dh32 ? at::empty({n, H}, opts.dtype(at::kFloat)) : dh_c;
    at::Tensor dh_tmp = dh32 ? at::empty({n, H}, opts) : at::Tensor();
    at::Tensor buf = at::empty({n * vb_max}, opts);
    p.lse_given = true, p.write_grad = true, p.lse = lse_c.data_ptr(), p.V_total = V;
    p.target = t.data_ptr<int64_t>(), p.rows = n;
    p.row_grad = rg.defined() ? rg.data_ptr() : nullptr;
    for (int64_t v0 = 0; v0 < V; v0 += vb_max) {
      const int64_t vb = std::min(vb_max, V - v0);
      at::Tensor lb = buf.narrow(0, 0, n * vb).view({n, vb});
      const at::Tensor wb = weight.narrow(0, v0, vb);
      if (has_bias) at::addmm_out(lb, bias_opt->narrow(0, v0, vb), h, wb.t());
      else at::mm_out(lb, h, wb.t());
      p.logits = lb.data_ptr(), p.ld = vb, p.V = vb, p.v0 = v0;
      run_rows(p, hidden);
      at::Tensor dwb = dw_acc.narrow(0, v0, vb);
      at::mm_out(dwb, lb.t(), h);
      if (dh32) {
        at::mm_out(dh_tmp, lb, wb);
        if (v0 == 0) dh_acc.copy_(dh_tmp);
        else dh_acc.add_(dh_tmp);
      } else if (v0 == 0) {
        at::mm_out(dh_acc, lb, wb);
      } else {
        dh_acc.addmm_(lb, wb);
      }
      if (has_bias) db_acc.narrow(0, v0, vb).copy_(lb.sum(0, false, loss_dtype));
    }
    if (dh32) dh_c = dh_acc.to(hidden.scalar_type());
  }
  res.loss_rows = compact ? at::zeros({N}, opts.dtype(loss_dtype)).index_copy_(0, idx, loss_c) : loss_c;
  if (grads) {
    if (compact) {  // labelled rows from the chunks, zeros at the ignored ones
      res.dhidden = at::empty({N, H}, opts).index_copy_(0, idx, dh_c);
      res.dhidden.index_fill_(0, valid.logical_not().nonzero().select(1, 0), 0);
    } else {
      res.dhidden = dh_c;
    }
    res.dweight = acc32 ? dw_acc.to(hidden.scalar_type()) : dw_acc;
    if (has_bias) res.dbias = db_acc.to(hidden.scalar_type());
  }
  return res;
}

at::Tensor none_like(const at::Tensor& hidden) { return at::empty({0}, hidden.options()); }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_fwd(
    const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target, const c10::optional<at::Tensor>& bias,
    int64_t ignore_index, double label_smoothing, double z_loss, double softcap, c10::string_view reduction,
    bool compute_grads, int64_t chunk_rows, int64_t vocab_chunk) {
  const Opts o{ignore_index, label_smoothing, z_loss, softcap, parse_reduction(reduction), chunk_rows, vocab_chunk};
  LLMCORE_CHECK(!(compute_grads && o.reduction == Reduction::None),
                "argument 'compute_grads' must be False for reduction='none' (its backward recomputes)");
  Result r = run(hidden, weight, target, bias, o, at::Tensor(), 1.0, compute_grads);
  at::Tensor loss = r.loss_rows;
  if (o.reduction != Reduction::None) {
    loss = r.loss_rows.sum();
    if (o.reduction == Reduction::Mean) loss = loss / double(std::max<int64_t>(r.n_valid, 1));
  }
  if (!compute_grads) return {loss, none_like(hidden), none_like(hidden), none_like(hidden)};
  const bool has_bias = bias.has_value() && bias->defined();
  return {loss, r.dhidden, r.dweight, has_bias ? r.dbias : none_like(hidden)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_linear_cross_entropy_bwd(
    const at::Tensor& grad_loss, const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& target,
    const c10::optional<at::Tensor>& bias, int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
    c10::string_view reduction, int64_t chunk_rows, int64_t vocab_chunk) {
  const Opts o{ignore_index, label_smoothing, z_loss, softcap, parse_reduction(reduction), chunk_rows, vocab_chunk};
  check_defined(grad_loss, "grad_loss");
  at::Tensor row_grad;
  double scale = 1.0;
  if (o.reduction == Reduction::None) {
    LLMCORE_CHECK(grad_loss.dim() == 1 && grad_loss.size(0) == hidden.size(0),
                  "argument 'grad_loss' must have shape (N,) = (", hidden.size(0), ",) for reduction='none', got ",
                  grad_loss.sizes());
    row_grad = grad_loss;
  } else {
    LLMCORE_CHECK(grad_loss.numel() == 1, "argument 'grad_loss' must be a scalar for reduction='",
                  std::string(reduction), "', got shape ", grad_loss.sizes());
    scale = grad_loss.item<double>();
  }
  Result r = run(hidden, weight, target, bias, o, row_grad, scale, true);
  const bool has_bias = bias.has_value() && bias->defined();
  return {r.dhidden, r.dweight, has_bias ? r.dbias : none_like(hidden)};
}

}  // namespace

TORCH_LIBRARY_IMPL(llmcore, CPU, m) {
  m.impl("fused_linear_cross_entropy_fwd", &fused_linear_cross_entropy_fwd);
  m.impl("fused_linear_cross_entropy_bwd", &fused_linear_cross_entropy_bwd);
}

#ifdef LLMCORE_WITH_CUDA
TORCH_LIBRARY_IMPL(llmcore, CUDA, m) {
  m.impl("fused_linear_cross_entropy_fwd", &fused_linear_cross_entropy_fwd);
  m.impl("fused_linear_cross_entropy_bwd", &fused_linear_cross_entropy_bwd);
}
#endif

}  // namespace llmcore
