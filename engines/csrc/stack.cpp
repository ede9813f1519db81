// One decode step through every layer of an OPT-shaped decoder (layer norms, q/k/v/o, ReLU
// MLP, learned positions: no RoPE, no gate) in one call: the same operations, in the same
// order and dtypes, as engines/decoder.py's layer loop, so the same values bit for bit; what it
// saves is the Python between them, paid at every batch size. It calls skinny_linear and
// decode_attention, defined before it in the one translation unit (kernels.py's SOURCES).
//
// x (B, E) the step's hidden states; p: 16 tensors a layer, in the order ln1 w, b, q w, b,
// k w, b, v w, b, o w, b, ln2 w, b, fc1 w, b, fc2 w, b (an empty tensor for a missing bias or
// norm weight); kc, vc: each layer's cache (B, KV, T, D); the new keys and values go to slot
// `start`, and attention reads slots [0, start] where keep (B, start + 1) is true.
#include <torch/extension.h>

#include <vector>

torch::Tensor decode_stack(torch::Tensor x, std::vector<torch::Tensor> p,
                           std::vector<torch::Tensor> kc, std::vector<torch::Tensor> vc,
                           int64_t start, torch::Tensor keep, bool pre_norm, int64_t H,
                           double eps1, double eps2) {
  const int64_t B = x.size(0), L = (int64_t)kc.size();
  TORCH_CHECK((int64_t)p.size() == 16 * L && (int64_t)vc.size() == L,
              "decode_stack: 16 parameters and a K and a V cache a layer");
  auto bias = [](const torch::Tensor& b) {
    return b.numel() ? c10::optional<torch::Tensor>(b) : c10::nullopt;
  };
  auto lin = [&](const torch::Tensor& h, int64_t i, bool relu) {
    return skinny_linear(h, p[i], bias(p[i + 1]), relu);
  };
  auto norm = [&](const torch::Tensor& h, int64_t i, double eps) {  // weight, bias optional
    return at::layer_norm(h, {h.size(-1)}, bias(p[i]), bias(p[i + 1]), eps);
  };
  for (int64_t l = 0; l < L; ++l) {
    const int64_t i = 16 * l;
    const int64_t KV = kc[l].size(1), D = kc[l].size(3);
    const double scale = 1.0 / std::sqrt((double)D);
    torch::Tensor h = pre_norm ? norm(x, i, eps1) : x;
    const torch::Tensor q = lin(h, i + 2, false), k = lin(h, i + 4, false),
                        v = lin(h, i + 6, false);
    kc[l].narrow(2, start, 1).copy_(k.view({B, 1, KV, D}).transpose(1, 2));
    vc[l].narrow(2, start, 1).copy_(v.view({B, 1, KV, D}).transpose(1, 2));
    const torch::Tensor keys = kc[l].narrow(2, 0, start + 1),
                        values = vc[l].narrow(2, 0, start + 1);
    const torch::Tensor a =
        decode_attention(q.view({B, 1, H, D}).transpose(1, 2), keys, values, keep, scale);
    torch::Tensor o = lin(a.view({B, H * D}), i + 8, false);
    x = pre_norm ? x + o : norm(x + o, i, eps1);
    h = pre_norm ? norm(x, i + 10, eps2) : x;
    h = lin(lin(h, i + 12, true), i + 14, false);
    x = pre_norm ? x + h : norm(x + h, i + 10, eps2);
  }
  return x;
}
