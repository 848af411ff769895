// DeepSeek-V3 MoE routing ops: schemas, and CPU implementations with the reference's exact semantics
// (r1kernels/reference/moe.py). CUDA kernels: csrc/cuda/moe.cu, bound in csrc/cuda/moe_launch.cpp.
//   moe_route           logits [T, E], bias [E] -> (weights fp32 [T, K], ids int64 [T, K], s_sel fp32 [T, K])
//   moe_route_backward  grad of weights -> grad of logits [T, E] (through the gathered sigmoid only)
//   moe_permute_index   ids [T, K] -> (row_map int64 [T*K], tokens_per_expert int64 [E]) (stable by slot)
//   moe_permute         hidden [T, H] -> [T*K, H] with out[row_map[t*K+k]] = hidden[t]
//   moe_unpermute       x [T*K, H] -> [T, H] = sum_k w[t,k] x[row_map[t*K+k]] (fp32 accumulation)
//   moe_unpermute_backward -> (grad_x [T*K, H], grad_w fp32 [T, K])
#include <limits>
#include <tuple>

#include "checks.h"

namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> moe_route_cpu(const at::Tensor& logits, const at::Tensor& bias,
                                                             int64_t top_k, int64_t n_group, int64_t topk_group,
                                                             double scale, bool norm) {
  R1K_CHECK_CPU(logits);
  R1K_CHECK(logits.dim() == 2, "logits must be [T, E]");
  const int64_t T = logits.size(0), E = logits.size(1);
  R1K_CHECK(n_group >= 1 && E % n_group == 0 && topk_group >= 1 && topk_group <= n_group && top_k >= 1 &&
                top_k <= topk_group * (E / n_group) && E / n_group >= 2,
            "bad routing config");
  at::Tensor s = logits.to(at::kFloat).sigmoid();
  at::Tensor c = (s + bias.to(at::kFloat)).view({T, n_group, E / n_group});
  at::Tensor group = std::get<0>(c.sort(true, -1, true)).narrow(-1, 0, 2).sum(-1);
  at::Tensor gidx = std::get<1>(group.sort(true, -1, true)).narrow(-1, 0, topk_group);
  at::Tensor keep = at::zeros({T, n_group}, logits.options().dtype(at::kBool)).scatter_(1, gidx, true);
  c = c.masked_fill(keep.logical_not().unsqueeze(-1), -std::numeric_limits<float>::infinity()).view({T, E});
  at::Tensor ids = std::get<1>(c.sort(true, -1, true)).narrow(-1, 0, top_k).contiguous();
  at::Tensor s_sel = s.gather(1, ids);
  at::Tensor w = norm ? s_sel / (s_sel.sum(-1, true) + 1e-20) : s_sel;
  return {w * scale, ids, s_sel};
}

at::Tensor moe_route_backward_cpu(const at::Tensor& grad_w, const at::Tensor& ids, const at::Tensor& s_sel,
                                  int64_t num_experts, double scale, bool norm, at::ScalarType dtype) {
  R1K_CHECK_CPU(grad_w);
  at::Tensor g = grad_w.to(at::kFloat), s = s_sel.to(at::kFloat);
  at::Tensor gs;
  if (norm) {
    at::Tensor S = s.sum(-1, true) + 1e-20;
    gs = (g / S - (g * s).sum(-1, true) / (S * S)) * scale;
  } else {
    gs = g * scale;
  }
  at::Tensor gx = gs * s * (1 - s);
  return at::zeros({ids.size(0), num_experts}, grad_w.options().dtype(at::kFloat)).scatter_(1, ids, gx).to(dtype);
}

std::tuple<at::Tensor, at::Tensor> moe_permute_index_cpu(const at::Tensor& ids, int64_t num_experts) {
  R1K_CHECK_CPU(ids);
  at::Tensor flat = ids.reshape({-1}).to(at::kLong);
  at::Tensor order = std::get<1>(flat.sort(true, 0, false));
  at::Tensor row_map = at::empty_like(order);
  row_map.index_put_({order}, at::arange(order.numel(), order.options()));
  return {row_map, at::bincount(flat, {}, num_experts)};
}

at::Tensor moe_permute_cpu(const at::Tensor& hidden, const at::Tensor& row_map, int64_t top_k) {
  R1K_CHECK_CPU(hidden);
  const int64_t T = hidden.size(0), H = hidden.size(1);
  R1K_CHECK(row_map.numel() == T * top_k, "row_map must have T*top_k entries");
  at::Tensor src = hidden.unsqueeze(1).expand({T, top_k, H}).reshape({T * top_k, H});
  return at::empty({T * top_k, H}, hidden.options()).index_copy_(0, row_map, src);
}

at::Tensor moe_unpermute_cpu(const at::Tensor& x, const at::Tensor& row_map, const std::optional<at::Tensor>& w,
                             int64_t top_k) {
  R1K_CHECK_CPU(x);
  R1K_CHECK(x.size(0) % top_k == 0 && row_map.numel() == x.size(0), "x and row_map must have T*top_k rows");
  const int64_t T = x.size(0) / top_k, H = x.size(1);
  at::Tensor g = x.index_select(0, row_map).view({T, top_k, H}).to(at::kFloat);
  if (w.has_value()) g = g * w->to(at::kFloat).reshape({T, top_k}).unsqueeze(-1);
  return g.sum(1).to(x.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> moe_unpermute_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                                                              const at::Tensor& row_map, const at::Tensor& w) {
  R1K_CHECK_CPU(grad_out);
  const int64_t T = w.size(0), K = w.size(1), H = x.size(1);
  at::Tensor g = grad_out.to(at::kFloat).unsqueeze(1);
  at::Tensor gx = (g * w.to(at::kFloat).unsqueeze(-1)).reshape({T * K, H}).to(x.scalar_type());
  at::Tensor grad_x = at::empty_like(x).index_copy_(0, row_map, gx);
  at::Tensor grad_w = (g * x.index_select(0, row_map).view({T, K, H}).to(at::kFloat)).sum(-1);
  return {grad_x, grad_w};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(r1kernels, m) {
  m.def("moe_route(Tensor logits, Tensor bias, int top_k, int n_group, int topk_group, float scale, bool norm)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("moe_route_backward(Tensor grad_weights, Tensor ids, Tensor s_sel, int num_experts, float scale, bool norm,"
        " ScalarType dtype) -> Tensor");
  m.def("moe_permute_index(Tensor ids, int num_experts) -> (Tensor, Tensor)");
  m.def("moe_permute(Tensor hidden, Tensor row_map, int top_k) -> Tensor");
  m.def("moe_unpermute(Tensor x, Tensor row_map, Tensor? weights, int top_k) -> Tensor");
  m.def("moe_unpermute_backward(Tensor grad_out, Tensor x, Tensor row_map, Tensor weights) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(r1kernels, CPU, m) {
  m.impl("moe_route", &moe_route_cpu);
  m.impl("moe_route_backward", &moe_route_backward_cpu);
  m.impl("moe_permute_index", &moe_permute_index_cpu);
  m.impl("moe_permute", &moe_permute_cpu);
  m.impl("moe_unpermute", &moe_unpermute_cpu);
  m.impl("moe_unpermute_backward", &moe_unpermute_backward_cpu);
}
