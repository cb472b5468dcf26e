// Every CUDA kernel against the CPU backend's kernels (the oracle), on fresh random inputs, with the
// max error printed. Skips without a GPU.
#include <fmt/format.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <numeric>
#include <random>

#include "backend/cpu/cpu_backend.h"
#include "backend/cpu/kernels.h"
#include "backend/cpu/layers.h"
#include "backend/cuda/blas.h"
#include "backend/cuda/kernels.h"
#include "cuda_test_util.h"
#include "test_util.h"

namespace moescope {
namespace {

using cuda::DeviceBuffer;
using test::Bf16Tensor;
using test::expect_close;
using test::random_bf16;
using test::random_f32;
using test::to_device;
using test::to_host;

constexpr double k_f32_tol = 2e-5;   // f32 activations and accumulation, bf16 weights: only the order of sums differs
constexpr double k_bf16_tol = 1e-2;  // an intermediate rounded to bf16 (the large path's activations, the KV cache)
// --matmul-precision high: the large path's activations as hi + lo bf16 terms (2^-17 relative each), the
// weights exact: two orders of magnitude below the bf16 tolerance, within a few f32 tolerances.
constexpr double k_split_tol = 1e-4;

class CudaKernels : public test::GpuTest {};

// --- gemv: the small-batch product ----------------------------------------------------------------------

TEST_F(CudaKernels, GemvMatchesCpuMatmul) {
  std::mt19937 rng(1);
  struct Case { int tokens, n, k; };
  // One row per warp (n < 8192), two (n < 32768), four (larger); k not a multiple of 256; 1..8 tokens.
  for (const Case& cs : {Case{1, 300, 2048}, Case{3, 77, 64}, Case{8, 1000, 1408}, Case{2, 9000, 136}, Case{5, 40000, 64},
                        Case{4, 33, 5632}}) {
    const Bf16Tensor w = random_bf16({cs.n, cs.k}, rng, 1.0f / std::sqrt(static_cast<float>(cs.k)));
    const std::vector<float> x = random_f32(static_cast<size_t>(cs.tokens) * cs.k, rng);
    std::vector<float> ref(static_cast<size_t>(cs.tokens) * cs.n);
    cpu::matmul(ref.data(), x.data(), cs.tokens, w.view);

    auto d_w = to_device(w.bits);
    auto d_x = to_device(x);
    auto d_y = test::poisoned(ref.size());
    cuda::gemv(d_y.data(), cs.n, d_x.data(), d_w.data(), cs.tokens, cs.n, cs.k, false, nullptr);
    expect_close(fmt::format("gemv T={} n={} k={}", cs.tokens, cs.n, cs.k), to_host(d_y, ref.size()), ref, k_f32_tol);

    // accumulate: y += x . w (the o_proj residual add)
    const std::vector<float> y0 = random_f32(ref.size(), rng);
    auto d_acc = to_device(y0);
    cuda::gemv(d_acc.data(), cs.n, d_x.data(), d_w.data(), cs.tokens, cs.n, cs.k, true, nullptr);
    std::vector<float> ref_acc(ref.size());
    for (size_t i = 0; i < ref.size(); ++i) ref_acc[i] = y0[i] + ref[i];
    expect_close("  ... accumulate", to_host(d_acc, ref.size()), ref_acc, k_f32_tol);
  }
}

// One token's product with its RMSNorm inside (gemv_normed: a decode step of one sequence runs no norm
// kernel before q/k/v) against the CPU's rms_norm then matmul.
TEST_F(CudaKernels, GemvNormedMatchesCpuNormThenMatmul) {
  std::mt19937 rng(21);
  struct Case { int n, k; };
  for (const Case& cs : {Case{6144, 2048}, Case{300, 1408}, Case{77, 64}, Case{5, 136}}) {
    const Bf16Tensor w = random_bf16({cs.n, cs.k}, rng, 1.0f / std::sqrt(static_cast<float>(cs.k)));
    const Bf16Tensor norm_weight = random_bf16({cs.k}, rng, 0.1f, 1.0f);
    const std::vector<float> x = random_f32(static_cast<size_t>(cs.k), rng, 3.0f);
    std::vector<float> normed(x.size()), ref(static_cast<size_t>(cs.n));
    cpu::rms_norm(normed.data(), x.data(), 1, cs.k, norm_weight.view, 1e-6f);
    cpu::matmul(ref.data(), normed.data(), 1, w.view);
    auto d_w = to_device(w.bits);
    auto d_norm = to_device(norm_weight.widened());
    auto d_x = to_device(x);
    auto d_y = test::poisoned(ref.size());
    cuda::gemv_normed(d_y.data(), d_x.data(), d_norm.data(), 1e-6f, d_w.data(), cs.n, cs.k, nullptr);
    expect_close(fmt::format("gemv_normed n={} k={}", cs.n, cs.k), to_host(d_y, ref.size()), ref, k_f32_tol);
  }
}

TEST_F(CudaKernels, CublasGemmMatchesCpuMatmulOnBf16Activations) {
  std::mt19937 rng(2);
  const int tokens = 37, n = 300, k = 512;
  const Bf16Tensor w = random_bf16({n, k}, rng, 0.05f);
  const std::vector<float> x = test::round_bf16(random_f32(static_cast<size_t>(tokens) * k, rng));
  std::vector<float> ref(static_cast<size_t>(tokens) * n);
  cpu::matmul(ref.data(), x.data(), tokens, w.view);
  auto d_w = to_device(w.bits);
  auto d_x = to_device(test::to_bf16_bits(x));
  auto d_y = test::poisoned(ref.size());
  cuda::Blas blas;
  blas.gemm(d_y.data(), n, d_x.data(), d_w.data(), tokens, n, k, 0.0f);
  expect_close("cuBLAS gemm beta 0", to_host(d_y, ref.size()), ref, 1e-4);
  const std::vector<float> y0 = random_f32(ref.size(), rng);
  auto d_acc = to_device(y0);
  blas.gemm(d_acc.data(), n, d_x.data(), d_w.data(), tokens, n, k, 1.0f);
  std::vector<float> ref_acc(ref.size());
  for (size_t i = 0; i < ref.size(); ++i) ref_acc[i] = y0[i] + ref[i];
  expect_close("cuBLAS gemm beta 1", to_host(d_acc, ref.size()), ref_acc, 1e-4);

  // --matmul-precision high: f32 activations (not rounded) as two bf16 terms, against the CPU's f32 product.
  const std::vector<float> xf = random_f32(static_cast<size_t>(tokens) * k, rng);
  std::vector<float> ref_f(ref.size());
  cpu::matmul(ref_f.data(), xf.data(), tokens, w.view);
  auto d_hi = to_device(test::to_bf16_bits(xf));
  auto d_lo = to_device(test::to_bf16_lo_bits(xf));
  for (const float beta : {0.0f, 1.0f}) {
    auto d_split = beta == 0.0f ? test::poisoned(ref.size()) : to_device(y0);
    blas.gemm(d_split.data(), n, cuda::ConstBf16Pair{d_hi.data(), d_lo.data()}, d_w.data(), tokens, n, k, beta);
    std::vector<float> want = ref_f;
    if (beta != 0.0f)
      for (size_t i = 0; i < want.size(); ++i) want[i] += y0[i];
    expect_close(fmt::format("cuBLAS gemm, two bf16 terms, beta {}", beta), to_host(d_split, ref.size()), want, k_split_tol);
  }
  // One term of the same f32 activations is off by the bf16 rounding: the check above can tell.
  auto d_one = test::poisoned(ref.size());
  blas.gemm(d_one.data(), n, d_hi.data(), d_w.data(), tokens, n, k, 0.0f);
  EXPECT_GT(test::compare(to_host(d_one, ref.size()), ref_f).relative(), 3 * k_split_tol) << "hi term alone";
}

// --- RMSNorm with the feed-forward fold ---------------------------------------------------------------

TEST_F(CudaKernels, RmsNormFoldsFeedForwardOutputLikeTheCpu) {
  std::mt19937 rng(3);
  for (const int hidden : {64, 2048, 200}) {
    const int tokens = 5, slots = 3;
    const Bf16Tensor weight = random_bf16({hidden}, rng, 0.1f, 1.0f);
    const std::vector<float> x = random_f32(static_cast<size_t>(tokens) * hidden, rng);
    const std::vector<float> ffn = random_f32(static_cast<size_t>(tokens) * slots * hidden, rng);
    const std::vector<float> scale = random_f32(tokens, rng);
    // CPU: x += (slot 0 + slot 1 + scale * slot 2), then rms_norm.
    std::vector<float> x_ref = x;
    for (int t = 0; t < tokens; ++t)
      for (int i = 0; i < hidden; ++i) {
        const float* f = &ffn[(static_cast<size_t>(t) * slots) * hidden + i];
        x_ref[static_cast<size_t>(t) * hidden + i] += f[0] + f[hidden] + scale[t] * f[2 * hidden];
      }
    std::vector<float> h_ref(x_ref.size());
    cpu::rms_norm(h_ref.data(), x_ref.data(), tokens, hidden, weight.view, 1e-6f);

    auto d_w = to_device(weight.widened());
    auto d_x = to_device(x);
    auto d_ffn = to_device(ffn);
    auto d_scale = to_device(scale);
    auto d_h = test::poisoned(h_ref.size());
    DeviceBuffer<uint16_t> d_hb(h_ref.size()), d_hb_lo(h_ref.size());
    cuda::rms_norm(d_h.data(), {d_hb.data(), d_hb_lo.data()}, d_x.data(), nullptr, tokens, hidden, d_w.data(), 1e-6f,
                   {d_ffn.data(), slots, d_scale.data()}, nullptr);
    const auto h = to_host(d_h, h_ref.size());
    expect_close(fmt::format("rms_norm hidden {} (residual after fold)", hidden), to_host(d_x, x.size()), x_ref, k_f32_tol);
    expect_close(fmt::format("rms_norm hidden {} (normed)", hidden), h, h_ref, k_f32_tol);
    const auto hb = to_host(d_hb, h_ref.size());
    const auto hb_lo = to_host(d_hb_lo, h_ref.size());
    for (size_t i = 0; i < h.size(); ++i) {
      ASSERT_EQ(hb[i], f32_to_bf16(h[i])) << "bf16 copy of element " << i;
      ASSERT_EQ(hb_lo[i], f32_to_bf16(h[i] - bf16_to_f32(hb[i]))) << "lo term of element " << i;
    }
    {  // the bf16 terms alone (a large pass's input norm): the same residual and terms, no f32 output
      auto d_x_only = to_device(x);
      DeviceBuffer<uint16_t> d_hb2(h_ref.size()), d_hb2_lo(h_ref.size());
      cuda::rms_norm(nullptr, {d_hb2.data(), d_hb2_lo.data()}, d_x_only.data(), nullptr, tokens, hidden, d_w.data(),
                     1e-6f, {d_ffn.data(), slots, d_scale.data()}, nullptr);
      EXPECT_EQ(to_host(d_x_only, x.size()), to_host(d_x, x.size())) << "residual after the fold, bf16 terms alone";
      EXPECT_EQ(to_host(d_hb2, hb.size()), hb) << "hi terms without the f32 output";
      EXPECT_EQ(to_host(d_hb2_lo, hb_lo.size()), hb_lo) << "lo terms without the f32 output";
      EXPECT_THROW(cuda::rms_norm(nullptr, nullptr, d_x_only.data(), nullptr, tokens, hidden, d_w.data(), 1e-6f, {},
                                  nullptr),
                   std::exception)
          << "no output at all";
    }

    // A subset of rows (the final norm of each sequence's last token), no fold.
    const std::vector<int32_t> rows = {4, 1};
    auto d_rows = to_device(rows);
    auto d_x2 = to_device(x);
    auto d_out = test::poisoned(rows.size() * hidden);
    cuda::rms_norm(d_out.data(), nullptr, d_x2.data(), d_rows.data(), 2, hidden, d_w.data(), 1e-6f, {}, nullptr);
    std::vector<float> sub_ref(rows.size() * hidden);
    for (size_t r = 0; r < rows.size(); ++r)
      cpu::rms_norm(&sub_ref[r * hidden], &x[static_cast<size_t>(rows[r]) * hidden], 1, hidden, weight.view, 1e-6f);
    expect_close("rms_norm of rows {4, 1}", to_host(d_out, sub_ref.size()), sub_ref, k_f32_tol);
  }
}

TEST_F(CudaKernels, SwigluBf16MatchesCpuSwiglu) {
  std::mt19937 rng(4);
  // inter 96: four columns a thread (swiglu_bf16_vec4_kernel); 90: one (inter % 4 != 0)
  for (const int inter : {96, 90}) {
    SCOPED_TRACE(fmt::format("inter {}", inter));
    const int tokens = 7;
    const std::vector<float> gate_up = random_f32(static_cast<size_t>(tokens) * 2 * inter, rng, 2.0f);
    std::vector<float> ref(static_cast<size_t>(tokens) * inter);
    for (int t = 0; t < tokens; ++t)
      cpu::swiglu(&ref[static_cast<size_t>(t) * inter], &gate_up[static_cast<size_t>(t) * 2 * inter],
                  &gate_up[static_cast<size_t>(t) * 2 * inter + inter], inter);
    auto d_in = to_device(gate_up);
    DeviceBuffer<uint16_t> d_out(ref.size()), d_lo(ref.size());
    cuda::swiglu_bf16(d_out.data(), d_in.data(), tokens, inter, nullptr);
    const auto bits = to_host(d_out, ref.size());
    std::vector<float> got(bits.size());
    for (size_t i = 0; i < bits.size(); ++i) got[i] = bf16_to_f32(bits[i]);
    expect_close("swiglu_bf16", got, ref, 4e-3);  // one bf16 rounding
    cuda::swiglu_bf16({d_out.data(), d_lo.data()}, d_in.data(), tokens, inter, nullptr);
    const auto hi = to_host(d_out, ref.size()), lo = to_host(d_lo, ref.size());
    for (size_t i = 0; i < hi.size(); ++i) got[i] = bf16_to_f32(hi[i]) + bf16_to_f32(lo[i]);
    expect_close("swiglu_bf16, hi + lo", got, ref, k_split_tol);
  }
}

// --- router and grouping -------------------------------------------------------------------------------

TEST_F(CudaKernels, RouterTopkMatchesCpuSoftmaxAndSelectExperts) {
  std::mt19937 rng(5);
  struct Case { int tokens, hidden, experts, top_k; bool norm, shared; };
  // 1 to 8 tokens a block (router_topk picks from the token count: 1 below 264, 2, 4, 8 from 1056), the
  // last block partial.
  for (const Case& cs : {Case{37, 64, 8, 2, false, true}, Case{5, 2048, 60, 4, false, true}, Case{64, 256, 128, 8, true, false},
                        Case{1, 64, 16, 4, true, false}, Case{301, 2048, 60, 4, false, true}, Case{601, 256, 60, 4, true, true},
                        Case{1100, 2048, 60, 4, true, true}}) {
    const int rows = cs.experts + (cs.shared ? 1 : 0);
    Bf16Tensor w = random_bf16({rows, cs.hidden}, rng, 4.0f / std::sqrt(static_cast<float>(cs.hidden)));
    // Expert 5 is a copy of expert 3: equal probabilities, which torch.topk orders by the lower id.
    std::copy_n(&w.bits[3 * static_cast<size_t>(cs.hidden)], cs.hidden, &w.bits[5 * static_cast<size_t>(cs.hidden)]);
    const std::vector<float> x = random_f32(static_cast<size_t>(cs.tokens) * cs.hidden, rng);

    std::vector<float> logits(static_cast<size_t>(cs.tokens) * rows);
    cpu::matmul(logits.data(), x.data(), cs.tokens, w.view);
    std::vector<int32_t> ref_ids(static_cast<size_t>(cs.tokens) * cs.top_k);
    std::vector<float> ref_w(ref_ids.size()), ref_gate(cs.tokens), margins(cs.tokens);
    for (int t = 0; t < cs.tokens; ++t) {
      std::vector<float> p(&logits[static_cast<size_t>(t) * rows], &logits[static_cast<size_t>(t) * rows] + cs.experts);
      cpu::softmax(p.data(), cs.experts);
      cpu::select_experts(p.data(), cs.experts, cs.top_k, cs.norm, &ref_ids[static_cast<size_t>(t) * cs.top_k],
                          &ref_w[static_cast<size_t>(t) * cs.top_k]);
      std::vector<float> sorted = p;
      std::sort(sorted.begin(), sorted.end(), std::greater<>());
      margins[t] = cs.top_k < cs.experts ? sorted[cs.top_k - 1] - sorted[cs.top_k] : 1.0f;
      if (cs.shared) ref_gate[t] = 1.0f / (1.0f + std::exp(-logits[static_cast<size_t>(t) * rows + cs.experts]));
    }

    auto d_w = to_device(w.bits);
    auto d_x = to_device(x);
    DeviceBuffer<int32_t> d_ids(ref_ids.size());
    auto d_wts = test::poisoned(ref_ids.size());
    auto d_gate = test::poisoned(cs.tokens);
    // The recorder's tallies: the kernel adds to what is there (counts start at 7, sums at 3 units).
    std::vector<unsigned long long> tallies(2 * static_cast<size_t>(cs.experts), 7);
    std::fill(tallies.begin() + cs.experts, tallies.end(), 3);
    DeviceBuffer<unsigned long long> d_tallies(tallies.size());
    CUDA_CHECK(cudaMemcpy(d_tallies.data(), tallies.data(), d_tallies.bytes(), cudaMemcpyHostToDevice));
    cuda::router_topk(d_ids.data(), d_wts.data(), cs.shared ? d_gate.data() : nullptr, d_x.data(), d_w.data(), cs.tokens,
                      cs.hidden, cs.experts, cs.top_k, cs.norm, nullptr,
                      {d_tallies.data(), d_tallies.data() + cs.experts});
    const auto ids = to_host(d_ids, ref_ids.size());
    const auto wts = to_host(d_wts, ref_ids.size());
    // The tallies equal the kernel's own routes counted here: each weight in units of 2^-32, rounded to
    // nearest, so the integer sums are exact whatever order the atomics ran in.
    for (size_t i = 0; i < ids.size(); ++i) {
      ++tallies[static_cast<size_t>(ids[i])];
      tallies[static_cast<size_t>(cs.experts + ids[i])] +=
          static_cast<unsigned long long>(std::nearbyint(static_cast<double>(wts[i] * 4294967296.0f)));
    }
    std::vector<unsigned long long> got(tallies.size());
    CUDA_CHECK(cudaMemcpy(got.data(), d_tallies.data(), d_tallies.bytes(), cudaMemcpyDeviceToHost));
    EXPECT_EQ(got, tallies);
    int near_ties = 0;
    double max_w = 0.0;
    for (int t = 0; t < cs.tokens; ++t) {
      const size_t at = static_cast<size_t>(t) * cs.top_k;
      const bool same = std::equal(ids.begin() + at, ids.begin() + at + cs.top_k, ref_ids.begin() + at);
      if (!same && margins[t] < 1e-6f) {  // a different choice between probabilities equal to f32 rounding
        ++near_ties;
        continue;
      }
      EXPECT_TRUE(same) << "token " << t << " (margin " << margins[t] << ")";
      for (int j = 0; j < cs.top_k; ++j) max_w = std::max(max_w, static_cast<double>(std::fabs(wts[at + j] - ref_w[at + j])));
    }
    std::printf("  router E=%d k=%d norm=%d: %d tokens, max weight diff %.3g, %d near-ties skipped\n", cs.experts,
                cs.top_k, cs.norm, cs.tokens, max_w, near_ties);
    // The f32 logits differ from the CPU's in the order of the sums only (the inputs are not rounded to
    // bf16 here): at hidden 2048 the largest weight difference seen over 1100 tokens was 2.0e-6.
    EXPECT_LE(max_w, 1e-5);
    if (cs.shared) expect_close("  shared-expert gate", to_host(d_gate, cs.tokens), ref_gate, 1e-6);

    // The same tokens in passes of other sizes (other tokens a block) get the same routes to the bit: a
    // token's logits are summed in one order whatever the block holds. From 8 tokens a block, the same
    // holds without the activations staged in shared memory (MOESCOPE_CUDA_ROUTER_STAGED=0).
    if (cs.tokens >= 8 * cuda::multiprocessors()) {
      DeviceBuffer<int32_t> plain_ids(ref_ids.size());
      auto plain_wts = test::poisoned(ref_ids.size());
      auto plain_gate = test::poisoned(cs.tokens);
      cuda::set_router_staged_allowed(false);
      cuda::router_topk(plain_ids.data(), plain_wts.data(), cs.shared ? plain_gate.data() : nullptr, d_x.data(),
                        d_w.data(), cs.tokens, cs.hidden, cs.experts, cs.top_k, cs.norm, nullptr);
      cuda::set_router_staged_allowed(true);
      EXPECT_EQ(to_host(plain_ids, ids.size()), ids) << "routes without the staged activations";
      const auto pw = to_host(plain_wts, wts.size());
      EXPECT_EQ(std::memcmp(pw.data(), wts.data(), wts.size() * sizeof(float)), 0) << "weights without staging";
      if (cs.shared) {
        const auto pg = to_host(plain_gate, cs.tokens), g = to_host(d_gate, cs.tokens);
        EXPECT_EQ(std::memcmp(pg.data(), g.data(), cs.tokens * sizeof(float)), 0) << "shared gates without staging";
      }
      std::printf("  router %d tokens: staged and unstaged activations give the same routes to the bit\n", cs.tokens);
    }
    if (cs.tokens > 8) {
      const int few = 7;
      DeviceBuffer<int32_t> few_ids(static_cast<size_t>(few) * cs.top_k);
      auto few_wts = test::poisoned(static_cast<size_t>(few) * cs.top_k);
      auto few_gate = test::poisoned(few);
      cuda::router_topk(few_ids.data(), few_wts.data(), cs.shared ? few_gate.data() : nullptr, d_x.data(), d_w.data(),
                        few, cs.hidden, cs.experts, cs.top_k, cs.norm, nullptr);
      const size_t n = static_cast<size_t>(few) * cs.top_k;
      EXPECT_EQ(to_host(few_ids, n), std::vector<int32_t>(ids.begin(), ids.begin() + static_cast<std::ptrdiff_t>(n)));
      const auto fw = to_host(few_wts, n);
      EXPECT_EQ(std::memcmp(fw.data(), wts.data(), n * sizeof(float)), 0) << "routing weights of the first " << few << " tokens";
      if (cs.shared) {
        const auto fg = to_host(few_gate, few), g = to_host(d_gate, cs.tokens);
        EXPECT_EQ(std::memcmp(fg.data(), g.data(), few * sizeof(float)), 0) << "shared gates of the first " << few << " tokens";
      }
    }
  }
}

TEST_F(CudaKernels, AlignGroupsPairsByExpertInPairOrder) {
  std::mt19937 rng(6);
  for (const auto& [num_pairs, num_experts] :
       {std::pair{4, 60}, std::pair{37 * 2, 8}, std::pair{2048 * 4, 60}, std::pair{300, 256}, std::pair{6144 * 4, 60}}) {
    std::uniform_int_distribution<int32_t> pick(0, num_experts - 1);
    std::vector<int32_t> ids(num_pairs);
    for (auto& id : ids) id = pick(rng);
    // Expected, on the host: a stable counting sort.
    std::vector<int32_t> offsets(num_experts + 1, 0), sorted, active, tile_expert, tile_row;
    for (int32_t id : ids) ++offsets[id + 1];
    for (int e = 0; e < num_experts; ++e) offsets[e + 1] += offsets[e];
    for (int e = 0; e < num_experts; ++e) {
      for (int p = 0; p < num_pairs; ++p)
        if (ids[p] == e) sorted.push_back(p);
      if (offsets[e + 1] > offsets[e]) active.push_back(e);
      for (int r = offsets[e]; r < offsets[e + 1]; r += cuda::expert_tile_rows(num_pairs, num_experts)) {
        tile_expert.push_back(e);
        tile_row.push_back(r);
      }
    }
    ASSERT_LE(static_cast<int>(tile_expert.size()),
              cuda::max_expert_tiles(num_pairs, num_experts, cuda::expert_tile_rows(num_pairs, num_experts)));

    auto d_ids = to_device(ids);
    DeviceBuffer<int32_t> memory(static_cast<size_t>(cuda::expert_groups_ints(num_pairs, num_experts)));
    CUDA_CHECK(cudaMemset(memory.data(), 0xff, memory.bytes()));
    const cuda::ExpertGroups g = cuda::carve_expert_groups(memory.data(), num_pairs, num_experts);
    cuda::align_by_expert(g, d_ids.data(), num_pairs, num_experts, nullptr);
    auto read = [&](const int32_t* p, size_t n) {
      std::vector<int32_t> out(n);
      if (n > 0) CUDA_CHECK(cudaMemcpy(out.data(), p, n * sizeof(int32_t), cudaMemcpyDeviceToHost));
      return out;
    };
    EXPECT_EQ(read(g.sorted_pairs, num_pairs), sorted);
    EXPECT_EQ(read(g.expert_offsets, num_experts + 1), offsets);
    EXPECT_EQ(read(g.num_active, 1)[0], static_cast<int32_t>(active.size()));
    EXPECT_EQ(read(g.active_experts, active.size()), active);
    EXPECT_EQ(read(g.num_tiles, 1)[0], static_cast<int32_t>(tile_expert.size()));
    EXPECT_EQ(read(g.tile_expert, tile_expert.size()), tile_expert);
    EXPECT_EQ(read(g.tile_row, tile_row.size()), tile_row);
    std::printf("  align: %d pairs over %d experts -> %zu active, %zu tiles\n", num_pairs, num_experts, active.size(),
                tile_expert.size());
  }
}

// Small passes: router_small (the post-attention norm, router and grouping in one launch) against the
// separate kernels on the same input: rms_norm, router_topk on its output, align_by_expert on the ids.
// Two launches in a row (the second on other tokens): the last block's ticket must be reset by the first.
TEST_F(CudaKernels, RouterSmallNormsRoutesAndGroupsAsTheSeparateKernels) {
  std::mt19937 rng(11);
  struct Case { int tokens, experts, top_k; bool shared, norm; };
  for (const Case& cs : {Case{1, 60, 4, true, false}, Case{3, 60, 4, true, false}, Case{8, 60, 4, false, true},
                         Case{2, 8, 2, false, false}, Case{8, 128, 8, true, true}, Case{5, 16, 4, true, false}}) {
    const int hidden = 256, T = cs.tokens, P = T * cs.top_k, rows = cs.experts + (cs.shared ? 1 : 0);
    const Bf16Tensor w = random_bf16({rows, hidden}, rng, 0.25f);
    auto d_w = to_device(w.bits);
    std::vector<float> norm_weight = random_f32(hidden, rng, 0.1f);
    for (float& v : norm_weight) v += 1.0f;
    auto d_norm = to_device(norm_weight);
    DeviceBuffer<unsigned> ticket(1);
    CUDA_CHECK(cudaMemset(ticket.data(), 0, sizeof(unsigned)));
    DeviceBuffer<float> logits(static_cast<size_t>(T) * rows);
    const int64_t ints = cuda::expert_groups_ints(P, cs.experts);
    for (int launch = 0; launch < 2; ++launch) {
      auto d_x = to_device(random_f32(static_cast<size_t>(T) * hidden, rng, 3.0f));
      DeviceBuffer<int32_t> ids(P), ids_ref(P);
      auto wts = test::poisoned(P), wts_ref = test::poisoned(P), gate = test::poisoned(T), gate_ref = test::poisoned(T);
      auto h = test::poisoned(static_cast<size_t>(T) * hidden), h_ref = test::poisoned(static_cast<size_t>(T) * hidden);
      DeviceBuffer<float> x_copy(static_cast<size_t>(T) * hidden);
      CUDA_CHECK(cudaMemcpy(x_copy.data(), d_x.data(), x_copy.bytes(), cudaMemcpyDeviceToDevice));
      DeviceBuffer<int32_t> fused(static_cast<size_t>(ints)), aligned(static_cast<size_t>(ints));
      CUDA_CHECK(cudaMemset(fused.data(), 0xff, fused.bytes()));
      CUDA_CHECK(cudaMemset(aligned.data(), 0xff, aligned.bytes()));
      const cuda::ExpertGroups gf = cuda::carve_expert_groups(fused.data(), P, cs.experts);
      const cuda::ExpertGroups ga = cuda::carve_expert_groups(aligned.data(), P, cs.experts);
      DeviceBuffer<unsigned long long> tallies(2 * static_cast<size_t>(cs.experts));
      CUDA_CHECK(cudaMemset(tallies.data(), 0, tallies.bytes()));
      cuda::router_small(ids.data(), wts.data(), cs.shared ? gate.data() : nullptr, h.data(), d_x.data(), d_norm.data(),
                         1e-6f, d_w.data(), T, hidden, cs.experts, cs.top_k, cs.norm, gf,
                         {tallies.data(), tallies.data() + cs.experts}, logits.data(), ticket.data(), nullptr);
      cuda::rms_norm(h_ref.data(), nullptr, x_copy.data(), nullptr, T, hidden, d_norm.data(), 1e-6f, {}, nullptr);
      cuda::router_topk(ids_ref.data(), wts_ref.data(), cs.shared ? gate_ref.data() : nullptr, h_ref.data(), d_w.data(),
                        T, hidden, cs.experts, cs.top_k, cs.norm, nullptr);
      cuda::align_by_expert(ga, ids.data(), P, cs.experts, nullptr);
      const std::string label = fmt::format("router_small T={} E={} k={} shared={} launch {}", T, cs.experts, cs.top_k,
                                            cs.shared, launch + 1);
      expect_close(label + ": normed rows", to_host(h, h.size()), to_host(h_ref, h_ref.size()), 1e-6);
      const auto got_ids = to_host(ids, P);
      EXPECT_EQ(got_ids, to_host(ids_ref, P)) << label;
      expect_close(label + ": routing weights", to_host(wts, P), to_host(wts_ref, P), 1e-5);
      if (cs.shared) expect_close(label + ": shared gate", to_host(gate, T), to_host(gate_ref, T), 1e-5);
      auto read = [&](const int32_t* p, size_t n) {
        std::vector<int32_t> out(n);
        CUDA_CHECK(cudaMemcpy(out.data(), p, n * sizeof(int32_t), cudaMemcpyDeviceToHost));
        return out;
      };
      const int active = read(ga.num_active, 1)[0];
      EXPECT_EQ(read(gf.sorted_pairs, P), read(ga.sorted_pairs, P)) << label;
      EXPECT_EQ(read(gf.expert_offsets, cs.experts + 1), read(ga.expert_offsets, cs.experts + 1)) << label;
      EXPECT_EQ(read(gf.num_active, 1)[0], active) << label;
      EXPECT_EQ(read(gf.active_experts, active), read(ga.active_experts, active)) << label;
      EXPECT_EQ(read(gf.num_tiles, 1), read(ga.num_tiles, 1)) << label;
      EXPECT_EQ(read(gf.tile_expert, active), read(ga.tile_expert, active)) << label;
      EXPECT_EQ(read(gf.tile_row, active), read(ga.tile_row, active)) << label;
      std::vector<unsigned long long> counts(2 * static_cast<size_t>(cs.experts));
      CUDA_CHECK(cudaMemcpy(counts.data(), tallies.data(), tallies.bytes(), cudaMemcpyDeviceToHost));
      for (int e = 0; e < cs.experts; ++e)
        EXPECT_EQ(counts[e], static_cast<unsigned long long>(std::count(got_ids.begin(), got_ids.end(), e))) << label;
    }
  }
  std::printf("  router_small on 1 to 8 tokens: the separate kernels' norm, routes and groups, two launches in a row\n");
}

// --- experts: the whole MoE block against cpu::moe ----------------------------------------------------

struct MoeCase {
  int tokens, hidden, experts, top_k, inter, shared_inter;
  bool norm;
};

// The MoE block's weights on the host (CPU views) and on the device (the CUDA backend's layout).
struct MoeWeights {
  ModelConfig config;
  LayerWeights layer;
  std::vector<Bf16Tensor> keep;  // storage behind the views
  DeviceBuffer<uint16_t> router, gate_up, down, shared_gate_up, shared_down;

  MoeWeights(const MoeCase& cs, std::mt19937& rng) {
    config.hidden_size = cs.hidden;
    config.num_experts = cs.experts;
    config.num_experts_per_tok = cs.top_k;
    config.moe_intermediate_size = cs.inter;
    config.shared_expert_intermediate_size = cs.shared_inter;
    config.norm_topk_prob = cs.norm;
    keep.reserve(4 + 3 * static_cast<size_t>(cs.experts) + 4);
    auto add = [&](std::vector<int64_t> shape, float stddev) -> const TensorView& {
      keep.push_back(random_bf16(std::move(shape), rng, stddev));
      return keep.back().view;
    };
    const float s_in = 1.0f / std::sqrt(static_cast<float>(cs.hidden));
    layer.is_moe = true;
    layer.router = add({cs.experts, cs.hidden}, 4.0f * s_in);
    std::vector<uint16_t> gu, dn;
    for (int e = 0; e < cs.experts; ++e) {
      MlpWeights m{add({cs.inter, cs.hidden}, s_in), add({cs.inter, cs.hidden}, s_in),
                   add({cs.hidden, cs.inter}, 1.0f / std::sqrt(static_cast<float>(cs.inter)))};
      layer.experts.push_back(m);
      const auto& g = keep[keep.size() - 3].bits;
      const auto& u = keep[keep.size() - 2].bits;
      const auto& d = keep[keep.size() - 1].bits;
      gu.insert(gu.end(), g.begin(), g.end());
      gu.insert(gu.end(), u.begin(), u.end());
      dn.insert(dn.end(), d.begin(), d.end());
    }
    std::vector<uint16_t> router_bits = keep[0].bits;
    if (cs.shared_inter > 0) {
      layer.shared_expert = {add({cs.shared_inter, cs.hidden}, s_in), add({cs.shared_inter, cs.hidden}, s_in),
                             add({cs.hidden, cs.shared_inter}, 1.0f / std::sqrt(static_cast<float>(cs.shared_inter)))};
      const size_t n = keep.size();
      std::vector<uint16_t> sgu = keep[n - 3].bits;
      sgu.insert(sgu.end(), keep[n - 2].bits.begin(), keep[n - 2].bits.end());
      shared_gate_up = to_device(sgu);
      shared_down = to_device(keep[n - 1].bits);
      layer.shared_expert_gate = add({1, cs.hidden}, s_in);
      router_bits.insert(router_bits.end(), keep.back().bits.begin(), keep.back().bits.end());
    }
    router = to_device(router_bits);
    gate_up = to_device(gu);
    down = to_device(dn);
  }

  cuda::ExpertWeights device_view(const MoeCase& cs) const {
    cuda::ExpertWeights w;
    w.gate_up = gate_up.data();
    w.down = down.data();
    w.inter = cs.inter;
    if (cs.shared_inter > 0) {
      w.dense_gate_up = shared_gate_up.data();
      w.dense_down = shared_down.data();
      w.dense_inter = cs.shared_inter;
    }
    return w;
  }
};

// Runs router -> align -> experts (small or large path) -> fold into a zero residual; returns the block
// output [T, hidden] and the routes.
struct MoeRun {
  std::vector<float> out;
  std::vector<int32_t> ids;
  std::vector<float> weights;
};

// The three ways the backend runs a MoE block: small passes (f32 GEMVs), large passes with bf16
// activations, and large passes with --matmul-precision high (hi + lo terms).
enum class MoePath { Small, Large, LargeHigh };

// shared_grouped: the shared expert in the grouped launches whatever the tiles (MOESCOPE_CUDA_SHARED_GROUPED=1).
MoeRun run_moe_on_gpu(const MoeCase& cs, const MoeWeights& mw, const std::vector<float>& x, MoePath path,
                      bool shared_grouped = false) {
  const bool small = path == MoePath::Small, high = path == MoePath::LargeHigh;
  const int T = cs.tokens, H = cs.hidden, P = T * cs.top_k;
  const bool shared = cs.shared_inter > 0;
  const int slots = cs.top_k + (shared ? 1 : 0);
  const cuda::ExpertWeights ew = mw.device_view(cs);
  auto d_x = to_device(x);
  auto d_xb = to_device(test::to_bf16_bits(x));
  auto d_xb_lo = to_device(test::to_bf16_lo_bits(x));
  const cuda::Bf16Pair xb{d_xb.data(), high ? d_xb_lo.data() : nullptr};
  DeviceBuffer<int32_t> d_ids(P);
  DeviceBuffer<float> d_wts(P), d_gate(T);
  DeviceBuffer<int32_t> groups_mem(static_cast<size_t>(cuda::expert_groups_ints(P, cs.experts)));
  const cuda::ExpertGroups groups = cuda::carve_expert_groups(groups_mem.data(), P, cs.experts);
  auto d_ffn = test::poisoned(static_cast<size_t>(T) * slots * H);

  // The router on x itself (the backend's small passes norm inside router_small, tested on its own above).
  cuda::router_topk(d_ids.data(), d_wts.data(), shared ? d_gate.data() : nullptr, d_x.data(), mw.router.data(), T, H,
                    cs.experts, cs.top_k, cs.norm, nullptr);
  cuda::align_by_expert(groups, d_ids.data(), P, cs.experts, nullptr);
  if (small) {
    const int ld_h = (std::max(cs.inter, cs.shared_inter) + 7) / 8 * 8;
    DeviceBuffer<float> h(static_cast<size_t>(P + T) * ld_h);
    cuda::experts_gate_up_small(h.data(), ld_h, d_x.data(), ew, groups, T, H, cs.experts, cs.top_k, nullptr);
    cuda::experts_down_small(d_ffn.data(), slots, h.data(), ld_h, d_wts.data(), ew, groups, T, H, cs.experts, cs.top_k,
                             nullptr);
  } else {
    DeviceBuffer<uint16_t> hb_mem(static_cast<size_t>(P) * cs.inter * 2);
    const cuda::Bf16Pair hb{hb_mem.data(), high ? hb_mem.data() + static_cast<size_t>(P) * cs.inter : nullptr};
    DeviceBuffer<uint16_t> act_mem(static_cast<size_t>(T) * cs.shared_inter * 2);
    const cuda::Bf16Pair act{act_mem.data(), high ? act_mem.data() + static_cast<size_t>(T) * cs.shared_inter : nullptr};
    // As the backend: the shared expert in the grouped launches for decode-sized passes, else cuBLAS.
    const bool dense_grouped = shared && (shared_grouped || cuda::grouped_takes_dense(T, cs.experts, cs.top_k));
    cuda::experts_gate_up_grouped(hb, xb, ew, groups, T, H, cs.experts, cs.top_k, nullptr,
                                  dense_grouped ? act : cuda::Bf16Pair{});
    cuda::experts_down_grouped(d_ffn.data(), slots, hb, d_wts.data(), ew, groups, T, H, cs.experts, cs.top_k, nullptr,
                               dense_grouped ? cuda::ConstBf16Pair(act) : cuda::ConstBf16Pair{});
    if (shared && !dense_grouped) {
      cuda::Blas blas;
      DeviceBuffer<float> gu(static_cast<size_t>(T) * 2 * cs.shared_inter);
      blas.gemm(gu.data(), 2 * cs.shared_inter, xb, ew.dense_gate_up, T, 2 * cs.shared_inter, H, 0.0f);
      cuda::swiglu_bf16(act, gu.data(), T, cs.shared_inter, nullptr);
      blas.gemm(d_ffn.data() + static_cast<size_t>(cs.top_k) * H, slots * H, act, ew.dense_down, T, H,
                cs.shared_inter, 0.0f);
    }
  }
  // Fold into a zero residual: x becomes exactly the block's output.
  DeviceBuffer<float> residual(static_cast<size_t>(T) * H), normed(static_cast<size_t>(T) * H);
  CUDA_CHECK(cudaMemset(residual.data(), 0, residual.bytes()));
  auto ones = to_device(std::vector<float>(H, 1.0f));
  cuda::rms_norm(normed.data(), nullptr, residual.data(), nullptr, T, H, ones.data(), 1e-6f,
                 {d_ffn.data(), slots, shared ? d_gate.data() : nullptr}, nullptr);
  return {to_host(residual, static_cast<size_t>(T) * H), to_host(d_ids, P), to_host(d_wts, P)};
}

void check_moe_run(const MoeCase& cs, MoePath path, const MoeRun& got, const test::CaptureSink& sink,
                   const std::vector<float>& ref, const char* kernels);

void check_moe(const MoeCase& cs, MoePath path, std::mt19937& rng) {
  const MoeWeights mw(cs, rng);
  std::vector<float> x = random_f32(static_cast<size_t>(cs.tokens) * cs.hidden, rng);
  // The large path reads bf16 activations: give the CPU the same input. With two terms it reads x itself.
  if (path == MoePath::Large) x = test::round_bf16(x);
  test::CaptureSink sink;
  std::vector<float> ref(x.size());
  cpu::moe(ref.data(), x.data(), cs.tokens, 0, mw.layer, mw.config, &sink);
  // The grouped GEMMs of one activation term run on wgmma where the GPU has the sm_90a code: then the same
  // input also goes through wgmma with every expert's last rows in tiles of their own (MOESCOPE_CUDA_TAIL=0)
  // and through the mma.sync kernels (MOESCOPE_CUDA_WGMMA=0), each checked against the CPU. The tails
  // only move rows between CTAs (each output is the same sum of the same products), so those two wgmma
  // runs must agree to the bit; the largest difference to mma.sync is printed.
  const bool wgmma = path == MoePath::Large && cuda::wgmma_available();
  struct Setting {
    bool wgmma, tails;
    const char* label;
  };
  const std::vector<Setting> settings =
      wgmma ? std::vector<Setting>{{true, true, " (wgmma)"}, {true, false, " (wgmma, no tails)"}, {false, true, " (mma.sync)"}}
            : std::vector<Setting>{{false, true, ""}};
  std::vector<MoeRun> runs;
  for (const Setting& setting : settings) {
    cuda::set_wgmma_allowed(setting.wgmma);
    cuda::set_expert_tails_allowed(setting.tails);
    runs.push_back(run_moe_on_gpu(cs, mw, x, path));
    cuda::set_wgmma_allowed(true);
    cuda::set_expert_tails_allowed(true);
    check_moe_run(cs, path, runs.back(), sink, ref, setting.label);
  }
  // Prefill-sized passes may take the shared expert into the grouped launches too, its tiles spread among
  // the routed ones (MOESCOPE_CUDA_SHARED_GROUPED=1): against the CPU as well.
  if (path != MoePath::Small && cs.shared_inter > 0 && !cuda::grouped_takes_dense(cs.tokens, cs.experts, cs.top_k))
    check_moe_run(cs, path, run_moe_on_gpu(cs, mw, x, path, true), sink, ref, " (shared expert in the grouped launches)");
  if (runs.size() == 3) {
    EXPECT_EQ(std::memcmp(runs[0].out.data(), runs[1].out.data(), runs[0].out.size() * sizeof(float)), 0)
        << "T=" << cs.tokens << ": wgmma with and without tails differ";
    double most = 0.0;
    for (size_t i = 0; i < runs[0].out.size(); ++i)
      most = std::max(most, static_cast<double>(std::fabs(runs[0].out[i] - runs[2].out[i])));
    std::printf("    wgmma against mma.sync: max |diff| %.3g\n", most);
  }
}

void check_moe_run(const MoeCase& cs, MoePath path, const MoeRun& got, const test::CaptureSink& sink,
                   const std::vector<float>& ref, const char* kernels) {
  const char* name = path == MoePath::Small ? "small" : path == MoePath::Large ? "large" : "large (two terms)";
  const std::string label = fmt::format("moe {} path{} T={} E={} k={} inter={} shared={} norm={}", name, kernels,
                                        cs.tokens, cs.experts, cs.top_k, cs.inter, cs.shared_inter, cs.norm);
  // The routes: same router input on both sides, so the same choices (random data: no near-ties expected).
  // Routing weights: the router's f32 dot products over `hidden` elements differ from the CPU's only in
  // the order of the sums, a few 2^-24 x sqrt(hidden) relative; bf16-rounded inputs make every product
  // exact and leave ~1e-7, unrounded ones (the small path, two terms) ~1e-6 at hidden 2048 (seen: 1.07e-6).
  const double weight_tol = path == MoePath::Large ? 1e-6 : 1e-5;
  const auto& ref_routes = sink.routes.at(0);
  int differing = 0;
  for (int t = 0; t < cs.tokens; ++t)
    for (int j = 0; j < cs.top_k; ++j) {
      const size_t at = static_cast<size_t>(t) * cs.top_k + j;
      if (got.ids[at] != ref_routes.ids[t][j]) ++differing;
      EXPECT_NEAR(got.weights[at], ref_routes.weights[t][j], weight_tol) << label << " token " << t << " slot " << j;
    }
  EXPECT_EQ(differing, 0) << label << ": routes differ from the CPU's";
  expect_close(label, got.out, ref, path == MoePath::Small ? 1e-5 : path == MoePath::Large ? k_bf16_tol : k_split_tol);
}

// One token's down projections folded into the residual by the down kernel (experts_down_fold) against
// down_small_kernel's slots folded by rms_norm: x equal to the bit. Routed experts with a gated shared
// expert (at the real shapes too), top-6 (two rounds of the kernel's four experts at once), no shared
// expert, and the dense MLP alone (top_k 0).
TEST_F(CudaKernels, DownFoldAddsTheSlotsAsTheNormsFoldToTheBit) {
  std::mt19937 rng(23);
  struct Case {
    MoeCase moe;
    bool dense_alone;
  };
  for (const Case& c : {Case{MoeCase{1, 256, 16, 4, 64, 96, false}, false}, Case{MoeCase{1, 2048, 60, 4, 1408, 5632, true}, false},
                        Case{MoeCase{1, 192, 12, 6, 48, 64, true}, false}, Case{MoeCase{1, 128, 8, 2, 40, 0, true}, false},
                        Case{MoeCase{1, 256, 4, 2, 64, 96, false}, true}}) {
    const MoeCase& cs = c.moe;
    const MoeWeights mw(cs, rng);
    cuda::ExpertWeights ew = mw.device_view(cs);
    const int top_k = c.dense_alone ? 0 : cs.top_k, experts = c.dense_alone ? 0 : cs.experts;
    if (c.dense_alone) ew.gate_up = ew.down = nullptr, ew.inter = 0;
    const bool shared = ew.dense_down != nullptr;
    const int hidden = cs.hidden, slots = top_k + (shared ? 1 : 0);
    const int ld_h = (std::max(cs.inter, cs.shared_inter) + 7) / 8 * 8;
    // Distinct experts for the one token, routing weights and the shared expert's gate.
    std::vector<int32_t> ids(static_cast<size_t>(cs.experts));
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    ids.resize(static_cast<size_t>(top_k));
    std::vector<float> weights = random_f32(static_cast<size_t>(top_k), rng, 0.3f);
    auto d_ids = to_device(ids.empty() ? std::vector<int32_t>{0} : ids);
    auto d_wts = to_device(weights.empty() ? std::vector<float>{0.0f} : weights);
    auto d_gate = to_device(std::vector<float>{0.37f});
    auto d_h = to_device(random_f32(static_cast<size_t>(top_k + 1) * ld_h, rng));
    const std::vector<float> x = random_f32(static_cast<size_t>(hidden), rng, 2.0f);
    DeviceBuffer<int32_t> groups_mem(static_cast<size_t>(cuda::expert_groups_ints(std::max(top_k, 1), cs.experts)));
    const cuda::ExpertGroups groups = cuda::carve_expert_groups(groups_mem.data(), std::max(top_k, 1), cs.experts);
    if (top_k > 0) cuda::align_by_expert(groups, d_ids.data(), top_k, cs.experts, nullptr);
    // The slots, then rms_norm's fold.
    auto d_ffn = test::poisoned(static_cast<size_t>(slots) * hidden);
    cuda::experts_down_small(d_ffn.data(), slots, d_h.data(), ld_h, d_wts.data(), ew, groups, 1, hidden, experts, top_k,
                             nullptr);
    auto x_slots = to_device(x);
    auto ones = to_device(std::vector<float>(static_cast<size_t>(hidden), 1.0f));
    DeviceBuffer<float> normed(static_cast<size_t>(hidden));
    cuda::rms_norm(normed.data(), nullptr, x_slots.data(), nullptr, 1, hidden, ones.data(), 1e-6f,
                   {d_ffn.data(), slots, shared && !c.dense_alone ? d_gate.data() : nullptr}, nullptr);
    // The fold in the down kernel.
    auto x_fold = to_device(x);
    cuda::experts_down_fold(x_fold.data(), d_h.data(), ld_h, d_ids.data(), d_wts.data(),
                            shared && !c.dense_alone ? d_gate.data() : nullptr, ew, hidden, top_k, nullptr);
    const auto a = to_host(x_slots, static_cast<size_t>(hidden)), b = to_host(x_fold, static_cast<size_t>(hidden));
    EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
        << "hidden " << hidden << " top_k " << top_k << " shared " << shared;
    double moved = 0.0;  // the fold did add something
    for (int i = 0; i < hidden; ++i) moved = std::max(moved, static_cast<double>(std::fabs(b[i] - x[i])));
    EXPECT_GT(moved, 0.0);
  }
  std::printf("  one token's down projections folded into x by the down kernel: rms_norm's fold of the slots to the bit\n");
}

// The small gate/up kernel's dense group norming the residual itself (DenseNorm, one or two tokens: it
// then runs beside router_small instead of after it) against the same kernel reading router_small's
// normed rows: every output of the launch, routed and dense, equal to the bit. Three tokens take the
// kernel without its own norm (the same outputs by construction).
TEST_F(CudaKernels, SmallGateUpNormsTheSharedExpertInputAsTheRouter) {
  std::mt19937 rng(17);
  for (int T : {1, 2, 3}) {
    const MoeCase cs{T, 256, 16, 4, 64, 96, false};
    const MoeWeights mw(cs, rng);
    const cuda::ExpertWeights ew = mw.device_view(cs);
    const int hidden = cs.hidden, P = T * cs.top_k, rows = cs.experts + 1, ld_h = 96;
    std::vector<float> norm_weight = random_f32(hidden, rng, 0.1f);
    for (float& v : norm_weight) v += 1.0f;
    auto d_norm = to_device(norm_weight);
    auto d_x = to_device(random_f32(static_cast<size_t>(T) * hidden, rng, 3.0f));
    DeviceBuffer<unsigned> ticket(1);
    CUDA_CHECK(cudaMemset(ticket.data(), 0, sizeof(unsigned)));
    DeviceBuffer<float> logits(static_cast<size_t>(T) * rows), wts(P), gate(T), h(static_cast<size_t>(T) * hidden);
    DeviceBuffer<int32_t> ids(P), groups_mem(static_cast<size_t>(cuda::expert_groups_ints(P, cs.experts)));
    const cuda::ExpertGroups groups = cuda::carve_expert_groups(groups_mem.data(), P, cs.experts);
    cuda::router_small(ids.data(), wts.data(), gate.data(), h.data(), d_x.data(), d_norm.data(), 1e-6f,
                       mw.router.data(), T, hidden, cs.experts, cs.top_k, cs.norm, groups, {}, logits.data(),
                       ticket.data(), nullptr);
    const size_t out_size = static_cast<size_t>(P + T) * ld_h;
    auto read_h = test::poisoned(out_size), own_norm = test::poisoned(out_size);
    cuda::experts_gate_up_small(read_h.data(), ld_h, h.data(), ew, groups, T, hidden, cs.experts, cs.top_k, nullptr);
    cuda::experts_gate_up_small(own_norm.data(), ld_h, h.data(), ew, groups, T, hidden, cs.experts, cs.top_k, nullptr,
                                {d_x.data(), d_norm.data(), 1e-6f});
    const auto a = to_host(read_h, out_size), b = to_host(own_norm, out_size);
    EXPECT_EQ(std::memcmp(a.data(), b.data(), out_size * sizeof(float)), 0) << T << " tokens";
    // Written where it should be: every dense row's shared_inter outputs are finite.
    for (int t = 0; t < T; ++t)
      for (int n = 0; n < cs.shared_inter; ++n)
        ASSERT_TRUE(std::isfinite(b[static_cast<size_t>(P + t) * ld_h + n])) << "token " << t << " column " << n;
  }
  std::printf("  small gate/up, shared expert normed by its own blocks: the outputs of router_small's rows to the bit\n");
}

TEST_F(CudaKernels, MoeBlockSmallPathMatchesCpuMoe) {
  std::mt19937 rng(7);
  for (const MoeCase& cs : {MoeCase{1, 2048, 16, 4, 1408, 5632, false}, MoeCase{3, 64, 8, 2, 32, 96, false},
                           MoeCase{8, 256, 16, 4, 48, 0, true}, MoeCase{5, 128, 6, 3, 48, 64, true}})
    check_moe(cs, MoePath::Small, rng);
}

// The grouped GEMMs' two configurations (cuda::expert_tile_rows): tiles of 64 rows when the pairs average
// fewer than 48 per expert (decode batches), of 128 from there (prefill). Each list covers both, with
// experts whose rows are no multiple of 16 (and, with 128-row tiles, experts of two tiles), inter and hidden
// below or between multiples of the tile's columns (inter 32, 48, 96: 64 gate/up columns per tile; hidden 64,
// 192: 128 down columns; on wgmma 128 gate/up and 256 down columns) and the k tiles (inter 48 against 64,
// 96 against 32), and the real shapes of Qwen1.5-MoE-A2.7B (hidden 2048, 60 experts, inter 1408, top-4,
// shared 5632) at 64 and 512 tokens (64-row tiles) and 2048 x 8 experts top-2 at 600 tokens (150 pairs
// per expert: 128-row tiles, two per expert), then 540 and 2048 tokens whose experts mostly end 1 to 32
// rows past a full tile (the wgmma kernel's tails, WgmmaGemm::TAIL). A shared expert goes into the grouped launches with 64-row
// tiles (cuda::grouped_takes_dense: 37, 130, 64 and 512 tokens, the last 2 of 130 in a tile of their own)
// and through cuBLAS with 128-row tiles (500, 600 and 1000 tokens), and those three again with the shared
// expert's tiles spread among the routed ones in the grouped launches.
const std::vector<MoeCase>& large_path_cases() {
  static const std::vector<MoeCase> cases = {
      // 64-row tiles: 9, 50 pairs per expert on average
      MoeCase{37, 64, 8, 2, 32, 96, false},
      MoeCase{9, 128, 12, 3, 32, 0, true},
      MoeCase{130, 2048, 16, 4, 1408, 5632, false},
      MoeCase{100, 192, 6, 2, 48, 0, true},  // 33 pairs per expert
      MoeCase{64, 2048, 60, 4, 1408, 5632, true},
      MoeCase{512, 2048, 60, 4, 1408, 5632, true},
      // 128-row tiles: 50, 150, 167, 250 pairs per expert on average
      MoeCase{200, 256, 16, 4, 48, 0, true},
      MoeCase{600, 2048, 8, 2, 1408, 5632, true},
      MoeCase{500, 192, 6, 2, 96, 64, false},
      MoeCase{1000, 256, 8, 2, 48, 64, true},
      // 135 pairs per expert: on wgmma most experts' last rows (1 to 32 past a full tile) ride with that tile
      // (n8 to n32 tail products), a few have 128 or fewer, or more than 32 past (a tile of their own)
      MoeCase{540, 256, 8, 2, 96, 0, true},
      MoeCase{2048, 2048, 60, 4, 1408, 0, false},  // the real shapes at a 2048-token prefill, ~137 per expert
  };
  return cases;
}

TEST_F(CudaKernels, MoeBlockLargePathMatchesCpuMoe) {
  std::mt19937 rng(8);
  for (const MoeCase& cs : large_path_cases()) check_moe(cs, MoePath::Large, rng);
}

// --matmul-precision high: the same grouped GEMMs and cuBLAS products over hi + lo activation terms,
// against the CPU on unrounded activations, 100x tighter than the bf16 path.
TEST_F(CudaKernels, MoeBlockLargePathWithTwoTermsMatchesCpuMoe) {
  std::mt19937 rng(18);
  for (const MoeCase& cs : large_path_cases()) check_moe(cs, MoePath::LargeHigh, rng);
}

TEST_F(CudaKernels, DenseMlpBothPathsMatchCpuMlp) {
  std::mt19937 rng(9);
  const int hidden = 256, inter = 96;
  const float s_in = 1.0f / std::sqrt(static_cast<float>(hidden));
  const Bf16Tensor g = random_bf16({inter, hidden}, rng, s_in), u = random_bf16({inter, hidden}, rng, s_in),
                   d = random_bf16({hidden, inter}, rng, 1.0f / std::sqrt(static_cast<float>(inter)));
  const MlpWeights mlp{g.view, u.view, d.view};
  std::vector<uint16_t> gu = g.bits;
  gu.insert(gu.end(), u.bits.begin(), u.bits.end());
  auto d_gu = to_device(gu);
  auto d_down = to_device(d.bits);
  cuda::ExpertWeights ew;
  ew.dense_gate_up = d_gu.data();
  ew.dense_down = d_down.data();
  ew.dense_inter = inter;
  for (const int tokens : {1, 6, 40}) {
    const bool small = tokens <= cuda::k_small_batch_max_tokens;
    std::vector<float> x = random_f32(static_cast<size_t>(tokens) * hidden, rng);
    if (!small) x = test::round_bf16(x);
    std::vector<float> ref(x.size());
    cpu::mlp(ref.data(), x.data(), tokens, mlp);
    auto d_x = to_device(x);
    auto d_out = test::poisoned(x.size());
    if (small) {
      DeviceBuffer<float> h(static_cast<size_t>(tokens) * inter);
      cuda::experts_gate_up_small(h.data(), inter, d_x.data(), ew, {}, tokens, hidden, 0, 0, nullptr);
      cuda::experts_down_small(d_out.data(), 1, h.data(), inter, nullptr, ew, {}, tokens, hidden, 0, 0, nullptr);
    } else {
      cuda::Blas blas;
      auto d_xb = to_device(test::to_bf16_bits(x));
      DeviceBuffer<float> gate_up(static_cast<size_t>(tokens) * 2 * inter);
      DeviceBuffer<uint16_t> act(static_cast<size_t>(tokens) * inter);
      blas.gemm(gate_up.data(), 2 * inter, d_xb.data(), d_gu.data(), tokens, 2 * inter, hidden, 0.0f);
      cuda::swiglu_bf16(act.data(), gate_up.data(), tokens, inter, nullptr);
      blas.gemm(d_out.data(), hidden, act.data(), d_down.data(), tokens, hidden, inter, 0.0f);
    }
    expect_close(fmt::format("dense mlp {} path T={}", small ? "small" : "large", tokens), to_host(d_out, x.size()), ref,
                 small ? 1e-5 : k_bf16_tol);
  }
}

// --- attention: q/k/v post-processing, paged cache, prefill and decode kernels ------------------------

struct AttentionCase {
  const char* name;
  int hidden, heads, kv_heads, head_dim;
  QkNorm qk_norm;
  bool bias;
  float clip;
  int long_block_size = 0;  // > 0: the long passes below, with cache blocks of this many tokens
};

// With the bf16 cache, prefill tiles of head_dim 16, 32, 64 and 128 run on the tensor cores (q and P
// rounded to bf16 as well: see attention.cu), head_dim 8 and the f32 cache on the CUDA cores; decode rows
// on the CUDA cores. The tolerance stays k_bf16_tol: the cache's rounding of k and v alone measured 2e-3
// relative before (docs/CUDA.md); rounding q as well adds an error of the same kind and size as rounding
// k, and rounding P moves each weight by at most 2^-9 relative (2e-3), errors of random sign that partly
// cancel over the keys and the o_proj sum, so the total stays well below 1e-2.
//
// The short passes: three sequences with a paged cache of 4-token blocks in scattered order. Pass 1: B's
// prompt (5 tokens), C's first chunk (9). Pass 2: A's prompt (20), B's decode (1 token at position 5),
// C's second chunk (7 tokens from position 9).
// The long passes (long_block_size > 0): pass 1: A's prompt of 150 tokens (tiles of 64, 64 and 22 rows),
// B's prompt (5); pass 2: A's chunk of 130 tokens from position 150 after its cached prefix (tiles from
// positions 150, 214 and 278: key blocks of 64 that cross the tiles' diagonals at other offsets than 0),
// B's decode. The cache blocks of both sequences are shuffled. Passes of 128 tokens or more (the long
// ones) take qkv_rope_cache's row kernel, per-head norm included; the short ones its per-head kernel.
// Each pass's attention output goes through o_proj on the CPU and is compared with cpu::attention; then
// the cached keys and values.
TEST_F(CudaKernels, AttentionMatchesCpuAttentionOverPagedCache) {
  std::mt19937 rng(10);
  for (const AttentionCase& ac : {AttentionCase{"qwen2 gqa bias", 64, 4, 2, 16, QkNorm::None, true, 0.0f},
                                 AttentionCase{"olmoe full qk-norm clip", 64, 4, 4, 16, QkNorm::Full, false, 0.08f},
                                 AttentionCase{"qwen3 per-head qk-norm hd32", 64, 4, 2, 32, QkNorm::PerHead, false, 0.0f},
                                 AttentionCase{"mixtral gqa hd8", 64, 8, 2, 8, QkNorm::None, false, 0.0f},
                                 AttentionCase{"hd128", 256, 2, 1, 128, QkNorm::None, true, 0.0f},
                                 AttentionCase{"long gqa4 hd128 blocks of 16", 256, 8, 2, 128, QkNorm::None, true, 0.0f, 16},
                                 AttentionCase{"long gqa2 hd64 blocks of 4", 128, 4, 2, 64, QkNorm::None, false, 0.0f, 4},
                                 AttentionCase{"long gqa2 hd96 blocks of 16", 192, 4, 2, 96, QkNorm::PerHead, false, 0.0f,
                                               16}}) {
    ModelConfig c;
    c.hidden_size = ac.hidden;
    c.num_attention_heads = ac.heads;
    c.num_key_value_heads = ac.kv_heads;
    c.head_dim = ac.head_dim;
    c.qk_norm = ac.qk_norm;
    c.clip_qkv = ac.clip;
    c.rms_norm_eps = 1e-6f;
    c.rope_theta = 10000.0;
    const int q_size = c.q_size(), kv_size = c.kv_size(), width = q_size + 2 * kv_size;
    const float s_in = 1.0f / std::sqrt(static_cast<float>(ac.hidden));
    std::vector<Bf16Tensor> keep;
    keep.reserve(12);
    auto add = [&](std::vector<int64_t> shape, float stddev, float mean = 0.0f) -> TensorView {
      keep.push_back(random_bf16(std::move(shape), rng, stddev, mean));
      return keep.back().view;
    };
    LayerWeights w;
    w.q_proj = add({q_size, ac.hidden}, s_in);
    w.k_proj = add({kv_size, ac.hidden}, s_in);
    w.v_proj = add({kv_size, ac.hidden}, s_in);
    w.o_proj = add({ac.hidden, q_size}, 1.0f / std::sqrt(static_cast<float>(q_size)));
    if (ac.bias) {
      w.q_bias = add({q_size}, 0.1f);
      w.k_bias = add({kv_size}, 0.1f);
      w.v_bias = add({kv_size}, 0.1f);
    }
    if (ac.qk_norm == QkNorm::Full) {
      w.q_norm = add({q_size}, 0.1f, 1.0f);
      w.k_norm = add({kv_size}, 0.1f, 1.0f);
    } else if (ac.qk_norm == QkNorm::PerHead) {
      w.q_norm = add({ac.head_dim}, 0.1f, 1.0f);
      w.k_norm = add({ac.head_dim}, 0.1f, 1.0f);
    }
    std::vector<float> inv_freq;
    for (int i = 0; i < ac.head_dim / 2; ++i)
      inv_freq.push_back(1.0f / std::pow(static_cast<float>(c.rope_theta), static_cast<float>(2 * i) / static_cast<float>(ac.head_dim)));
    auto widen = [](const TensorView& t) {
      std::vector<float> v(static_cast<size_t>(t.numel()));
      if (!t.empty()) to_f32(t.dtype, t.data, v.data(), v.size());
      return v;
    };
    std::vector<float> bias;
    if (ac.bias) {
      for (const TensorView* t : {&w.q_bias, &w.k_bias, &w.v_bias}) {
        const auto v = widen(*t);
        bias.insert(bias.end(), v.begin(), v.end());
      }
    }
    auto d_bias = to_device(bias);
    auto d_qn = to_device(widen(w.q_norm));
    auto d_kn = to_device(widen(w.k_norm));
    auto d_inv = to_device(inv_freq);
    cuda::QkvParams qp;
    qp.num_heads = ac.heads;
    qp.num_kv_heads = ac.kv_heads;
    qp.head_dim = ac.head_dim;
    qp.bias = ac.bias ? d_bias.data() : nullptr;
    qp.qk_norm = ac.qk_norm == QkNorm::Full ? cuda::QkNormKind::Full
                 : ac.qk_norm == QkNorm::PerHead ? cuda::QkNormKind::PerHead : cuda::QkNormKind::None;
    qp.q_norm = ac.qk_norm != QkNorm::None ? d_qn.data() : nullptr;
    qp.k_norm = ac.qk_norm != QkNorm::None ? d_kn.data() : nullptr;
    qp.eps = c.rms_norm_eps;
    qp.clip = ac.clip;
    qp.rope_inv_freq = d_inv.data();

    // Paged cache: sequence s owns the blocks tables[s] (scattered on purpose).
    struct Chunk { int seq, start, n; };
    int block_size = 4, num_blocks = 64;
    std::vector<std::vector<int32_t>> tables = {{17, 3, 40, 8, 22, 63}, {5, 30}, {12, 0, 51, 9}};
    std::vector<std::vector<Chunk>> passes = {{{1, 0, 5}, {2, 0, 9}}, {{0, 0, 20}, {1, 5, 1}, {2, 9, 7}}};
    if (ac.long_block_size > 0) {
      block_size = ac.long_block_size;
      const int blocks_a = (281 + block_size - 1) / block_size, blocks_b = (7 + block_size - 1) / block_size;
      num_blocks = blocks_a + blocks_b + 3;  // a few never used
      std::vector<int32_t> ids(static_cast<size_t>(num_blocks));
      std::iota(ids.begin(), ids.end(), 0);
      std::shuffle(ids.begin(), ids.end(), rng);
      tables = {std::vector<int32_t>(ids.begin(), ids.begin() + blocks_a),
                std::vector<int32_t>(ids.begin() + blocks_a, ids.begin() + blocks_a + blocks_b)};
      // The third pass decodes sequence 0 at position 280: few rows, so the decode kernel splits the
      // positions over blocks and merges their parts (flash-decoding).
      passes = {{{0, 0, 150}, {1, 0, 5}}, {{0, 150, 130}, {1, 5, 1}}, {{0, 280, 1}, {1, 6, 1}}};
    }
    const int num_seqs = static_cast<int>(tables.size());
    int max_blocks = 0;
    for (const auto& t : tables) max_blocks = std::max(max_blocks, static_cast<int>(t.size()));
    DeviceBuffer<uint16_t> k_cache(static_cast<size_t>(num_blocks) * block_size * kv_size),
        v_cache(static_cast<size_t>(num_blocks) * block_size * kv_size);
    // The same passes through an f32 cache (--kv-cache-dtype float32): nothing rounded to bf16 on the way.
    DeviceBuffer<float> k_cache32(k_cache.size()), v_cache32(v_cache.size());
    std::vector<int32_t> table_flat(static_cast<size_t>(num_seqs) * max_blocks, 0);
    for (int s = 0; s < num_seqs; ++s) std::copy(tables[s].begin(), tables[s].end(), table_flat.begin() + s * max_blocks);
    auto d_tables = to_device(table_flat);
    // Room for decode rows split over their positions, as the backend keeps it.
    DeviceBuffer<float> split_partials(static_cast<size_t>(cuda::decode_split_floats(ac.head_dim)));
    DeviceBuffer<unsigned> split_tickets(static_cast<size_t>(cuda::decode_split_blocks()));
    CUDA_CHECK(cudaMemset(split_tickets.data(), 0, split_tickets.bytes()));

    std::vector<cpu::SequenceCache> cpu_caches(static_cast<size_t>(num_seqs));
    for (auto& sc : cpu_caches) {
      sc.k.resize(1);
      sc.v.resize(1);
    }
    for (size_t pass = 0; pass < passes.size(); ++pass) {
      cpu::TokenLayout layout;
      std::vector<int32_t> token_pos, token_seq, slots, decode_rows;
      std::vector<cuda::PrefillTile> tiles;
      for (const Chunk& ch : passes[pass]) {
        const int row0 = static_cast<int>(token_pos.size());
        layout.caches.push_back(&cpu_caches[ch.seq]);
        const int32_t s = static_cast<int32_t>(layout.caches.size()) - 1;
        for (int i = 0; i < ch.n; ++i) {
          const int pos = ch.start + i;
          layout.token_seq.push_back(s);
          layout.token_pos.push_back(pos);
          token_pos.push_back(pos);
          token_seq.push_back(ch.seq);  // the device tables are indexed by the sequence itself
          slots.push_back(tables[ch.seq][pos / block_size] * block_size + pos % block_size);
        }
        if (ch.n == 1) decode_rows.push_back(row0);
        else
          for (int i = 0; i < ch.n; i += cuda::k_prefill_tile_rows)
            tiles.push_back({ch.seq, row0 + i, std::min(cuda::k_prefill_tile_rows, ch.n - i), ch.start + i});
      }
      const int T = static_cast<int>(token_pos.size());
      const std::vector<float> x = random_f32(static_cast<size_t>(T) * ac.hidden, rng);
      std::vector<float> ref(static_cast<size_t>(T) * ac.hidden);
      cpu::attention(ref.data(), x.data(), layout, 0, w, c, inv_freq);

      // q/k/v without bias on the CPU (the kernel adds it), then the kernels under test.
      std::vector<float> q(static_cast<size_t>(T) * q_size), k(static_cast<size_t>(T) * kv_size), v(k.size());
      cpu::matmul(q.data(), x.data(), T, w.q_proj);
      cpu::matmul(k.data(), x.data(), T, w.k_proj);
      cpu::matmul(v.data(), x.data(), T, w.v_proj);
      std::vector<float> qkv(static_cast<size_t>(T) * width);
      for (int t = 0; t < T; ++t) {
        std::copy_n(&q[static_cast<size_t>(t) * q_size], q_size, &qkv[static_cast<size_t>(t) * width]);
        std::copy_n(&k[static_cast<size_t>(t) * kv_size], kv_size, &qkv[static_cast<size_t>(t) * width + q_size]);
        std::copy_n(&v[static_cast<size_t>(t) * kv_size], kv_size, &qkv[static_cast<size_t>(t) * width + q_size + kv_size]);
      }
      auto d_qkv = to_device(qkv);
      auto d_pos = to_device(token_pos);
      auto d_seq = to_device(token_seq);
      auto d_slots = to_device(slots);
      auto d_decode = to_device(decode_rows);
      std::vector<int32_t> tile_ints;
      for (const auto& tl : tiles) tile_ints.insert(tile_ints.end(), {tl.seq, tl.row, tl.num_rows, tl.pos});
      auto d_tiles = to_device(tile_ints);
      DeviceBuffer<float> d_q(static_cast<size_t>(T) * q_size);
      auto d_attn = test::poisoned(static_cast<size_t>(T) * q_size);
      cuda::qkv_rope_cache(d_q.data(), k_cache.data(), v_cache.data(), d_qkv.data(), d_pos.data(), d_slots.data(), T, qp,
                           nullptr);
      cuda::AttentionBatch ab;
      ab.block_tables = d_tables.data();
      ab.max_blocks = max_blocks;
      ab.block_size = block_size;
      ab.prefill_tiles = reinterpret_cast<const cuda::PrefillTile*>(d_tiles.data());
      ab.num_prefill_tiles = static_cast<int>(tiles.size());
      ab.decode_rows = d_decode.data();
      ab.num_decode = static_cast<int>(decode_rows.size());
      ab.token_seq = d_seq.data();
      ab.token_pos = d_pos.data();
      ab.split_partials = split_partials.data();
      ab.split_tickets = split_tickets.data();
      DeviceBuffer<uint16_t> d_attn_hi(static_cast<size_t>(T) * q_size), d_attn_lo(d_attn_hi.size());
      cuda::attention(d_attn.data(), {d_attn_hi.data(), d_attn_lo.data()}, d_q.data(), k_cache.data(), v_cache.data(),
                      ab, ac.heads, ac.kv_heads, ac.head_dim, nullptr);
      const auto attn = to_host(d_attn, static_cast<size_t>(T) * q_size);
      {  // the bf16 terms o_proj reads, bit for bit: hi = bf16(out), lo = bf16(out - hi)
        const auto hi = to_host(d_attn_hi, attn.size()), lo = to_host(d_attn_lo, attn.size());
        size_t wrong = 0;
        for (size_t i = 0; i < attn.size(); ++i) {
          const uint16_t h = f32_to_bf16(attn[i]);
          if (hi[i] != h || lo[i] != f32_to_bf16(attn[i] - bf16_to_f32(h))) ++wrong;
        }
        EXPECT_EQ(wrong, 0u) << ac.name << " pass " << pass + 1 << ": bf16 copy of the attention output";
      }
      std::vector<float> got(ref.size());
      cpu::matmul(got.data(), attn.data(), T, w.o_proj);
      expect_close(fmt::format("attention {} pass {} ({} prefill tiles, {} decode rows)", ac.name, pass + 1, tiles.size(),
                               decode_rows.size()),
                   got, ref, k_bf16_tol);
      if (!tiles.empty() && cuda::wgmma_available()) {
        // Prefill tiles took their products on wgmma: the same batch on the mma.sync kernel, each against the CPU.
        auto d_attn_sync = test::poisoned(static_cast<size_t>(T) * q_size);
        cuda::set_wgmma_allowed(false);
        cuda::attention(d_attn_sync.data(), nullptr, d_q.data(), k_cache.data(), v_cache.data(), ab, ac.heads,
                        ac.kv_heads, ac.head_dim, nullptr);
        cuda::set_wgmma_allowed(true);
        const auto attn_sync = to_host(d_attn_sync, attn.size());
        std::vector<float> got_sync(ref.size());
        cpu::matmul(got_sync.data(), attn_sync.data(), T, w.o_proj);
        expect_close(fmt::format("attention {} pass {}, mma.sync", ac.name, pass + 1), got_sync, ref, k_bf16_tol);
        double most = 0.0;
        for (size_t i = 0; i < attn.size(); ++i) most = std::max(most, static_cast<double>(std::fabs(attn[i] - attn_sync[i])));
        std::printf("    wgmma against mma.sync: max |diff| %.3g\n", most);
      }
      {
        DeviceBuffer<float> d_q32(static_cast<size_t>(T) * q_size);
        auto d_attn32 = test::poisoned(static_cast<size_t>(T) * q_size);
        cuda::qkv_rope_cache(d_q32.data(), k_cache32.data(), v_cache32.data(), d_qkv.data(), d_pos.data(), d_slots.data(),
                             T, qp, nullptr);
        cuda::attention(d_attn32.data(), nullptr, d_q32.data(), k_cache32.data(), v_cache32.data(), ab, ac.heads,
                        ac.kv_heads, ac.head_dim, nullptr);
        const auto attn32 = to_host(d_attn32, static_cast<size_t>(T) * q_size);
        std::vector<float> got32(ref.size());
        cpu::matmul(got32.data(), attn32.data(), T, w.o_proj);
        expect_close(fmt::format("attention {} pass {}, f32 cache", ac.name, pass + 1), got32, ref, k_f32_tol);
      }

      // The cache holds the CPU's k and v (after norm, clip and RoPE), rounded to bf16.
      const auto kc = to_host(k_cache, k_cache.size()), vc = to_host(v_cache, v_cache.size());
      std::vector<float> got_kv, ref_kv;
      for (const Chunk& ch : passes[pass])
        for (int pos = ch.start; pos < ch.start + ch.n; ++pos) {
          const size_t slot = static_cast<size_t>(tables[ch.seq][pos / block_size]) * block_size + pos % block_size;
          for (int i = 0; i < kv_size; ++i) {
            got_kv.push_back(bf16_to_f32(kc[slot * kv_size + i]));
            ref_kv.push_back(cpu_caches[ch.seq].k[0][static_cast<size_t>(pos) * kv_size + i]);
            got_kv.push_back(bf16_to_f32(vc[slot * kv_size + i]));
            ref_kv.push_back(cpu_caches[ch.seq].v[0][static_cast<size_t>(pos) * kv_size + i]);
          }
        }
      expect_close("  ... cached k and v", got_kv, ref_kv, 8e-3);
    }
  }
}

// --- greedy sampling on the device ------------------------------------------------------------------------

// torch.argmax: the first NaN if the row has one, else the first largest value.
int32_t torch_argmax(std::span<const float> row) {
  for (size_t i = 0; i < row.size(); ++i)
    if (std::isnan(row[i])) return static_cast<int32_t>(i);
  return static_cast<int32_t>(std::max_element(row.begin(), row.end()) - row.begin());
}

TEST_F(CudaKernels, GreedyKeysPickTheFirstLargestLogitLikeTorchArgmax) {
  std::mt19937 rng(41);
  for (const int vocab : {1, 37, 8192, 8193, 151936}) {
    const int rows = 9;
    std::vector<float> logits = random_f32(static_cast<size_t>(rows) * vocab, rng, 4.0f);
    auto row = [&](int r) { return std::span<float>(logits.data() + static_cast<size_t>(r) * vocab, vocab); };
    std::uniform_int_distribution<int> pick(0, vocab - 1);
    // Row 1: the largest value twice (the first must win, in whichever block each falls); row 2: it at the
    // very end; row 3: all equal; row 4: negative values only; row 5: -inf everywhere but one +inf; row 6:
    // a NaN; row 7: -0.0 and +0.0 tied at the top (equal as floats: the first wins).
    const int a = pick(rng), b = pick(rng);
    row(1)[a] = 100.0f;
    row(1)[b] = 100.0f;
    row(2)[vocab - 1] = 100.0f;
    std::fill(row(3).begin(), row(3).end(), 0.5f);
    for (float& v : row(4)) v = -std::fabs(v) - 1.0f;
    std::fill(row(5).begin(), row(5).end(), -INFINITY);
    row(5)[b] = INFINITY;
    row(6)[a] = NAN;
    for (float& v : row(7)) v = -std::fabs(v) - 1.0f;
    row(7)[b] = -0.0f;
    row(7)[a] = 0.0f;
    const auto d_logits = to_device(logits);
    DeviceBuffer<unsigned long long> d_keys(rows);
    cuda::greedy_keys(d_keys.data(), d_logits.data(), rows, vocab, nullptr);
    const std::vector<unsigned long long> keys = to_host(d_keys, rows);
    for (int r = 0; r < rows; ++r) {
      int32_t want = torch_argmax(row(r));
      if (r == 7 && vocab > 1) want = std::min(a, b);  // -0.0 == +0.0: the first of the two
      EXPECT_EQ(cuda::greedy_token(keys[r]), want) << "vocab " << vocab << " row " << r;
    }
  }
  std::printf("  9 rows per vocabulary of 1, 37, 8192, 8193 and 151936 logits: each row's argmax as torch.argmax\n");
}

TEST_F(CudaKernels, ReadBandwidthIsMeasured) {
  const cuda::BandwidthSample s = cuda::measure_read_bandwidth(size_t{256} << 20, 3);
  std::printf("  read bandwidth over 256 MB: best %.1f GB/s, median %.1f, min %.1f\n", s.best_gb_per_s, s.median_gb_per_s,
              s.min_gb_per_s);
  EXPECT_GT(s.min_gb_per_s, 50.0);
  EXPECT_GE(s.best_gb_per_s, s.median_gb_per_s);
}

}  // namespace
}  // namespace moescope
