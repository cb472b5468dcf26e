#include <algorithm>
#include <cmath>

#include "backend/cpu/kernels.h"
#include "backend/cpu/layers.h"

namespace moescope::cpu {
namespace {

// HF rotate_half RoPE: pairs (i, i + head_dim/2) rotate by pos * inv_freq[i].
void apply_rope(float* head, int head_dim, int32_t pos, std::span<const float> inv_freq) {
  const int half = head_dim / 2;
  for (int i = 0; i < half; ++i) {
    const float angle = static_cast<float>(pos) * inv_freq[i];
    const float cos = std::cos(angle), sin = std::sin(angle);
    const float a = head[i], b = head[i + half];
    head[i] = a * cos - b * sin;
    head[i + half] = b * cos + a * sin;
  }
}

}  // namespace

void attention(float* out, const float* x, const TokenLayout& layout, int layer, const LayerWeights& w,
               const ModelConfig& c, std::span<const float> rope_inv_freq) {
  const int num_tokens = static_cast<int>(layout.token_seq.size());
  const int hd = c.head_dim, q_size = c.q_size(), kv_size = c.kv_size();
  const int group = c.num_attention_heads / c.num_key_value_heads;  // query heads per kv head (GQA)
  std::vector<float> q(static_cast<size_t>(num_tokens) * q_size);   // [T, heads * head_dim]
  std::vector<float> k(static_cast<size_t>(num_tokens) * kv_size);  // [T, kv_heads * head_dim]
  std::vector<float> v(static_cast<size_t>(num_tokens) * kv_size);  // [T, kv_heads * head_dim]
  const MatmulJob qkv[] = {{q.data(), x, num_tokens, &w.q_proj, 0, q_size, &w.q_bias},
                           {k.data(), x, num_tokens, &w.k_proj, 0, kv_size, &w.k_bias},
                           {v.data(), x, num_tokens, &w.v_proj, 0, kv_size, &w.v_bias}};
  matmul_jobs(qkv);

  if (c.qk_norm == QkNorm::Full) {  // OLMoE: over the whole projection
    rms_norm(q.data(), q.data(), num_tokens, q_size, w.q_norm, c.rms_norm_eps);
    rms_norm(k.data(), k.data(), num_tokens, kv_size, w.k_norm, c.rms_norm_eps);
  } else if (c.qk_norm == QkNorm::PerHead) {  // Qwen3-MoE: each head over head_dim
    rms_norm(q.data(), q.data(), num_tokens * c.num_attention_heads, hd, w.q_norm, c.rms_norm_eps);
    rms_norm(k.data(), k.data(), num_tokens * c.num_key_value_heads, hd, w.k_norm, c.rms_norm_eps);
  }
  if (c.clip_qkv > 0.0f) {
    for (auto* t : {&q, &k, &v})
      for (float& e : *t) e = std::clamp(e, -c.clip_qkv, c.clip_qkv);
  }

  for (int t = 0; t < num_tokens; ++t) {  // RoPE, then append k/v to the sequence's cache
    const int32_t pos = layout.token_pos[t];
    for (int h = 0; h < c.num_attention_heads; ++h) apply_rope(&q[static_cast<size_t>(t) * q_size + h * hd], hd, pos, rope_inv_freq);
    for (int h = 0; h < c.num_key_value_heads; ++h) apply_rope(&k[static_cast<size_t>(t) * kv_size + h * hd], hd, pos, rope_inv_freq);
    SequenceCache& cache = *layout.caches[layout.token_seq[t]];
    auto& kc = cache.k[layer];
    auto& vc = cache.v[layer];
    const size_t need = static_cast<size_t>(pos + 1) * kv_size;
    if (kc.size() < need) {
      kc.resize(std::max(need, kc.size() * 2));
      vc.resize(kc.size());
    }
    std::copy_n(&k[static_cast<size_t>(t) * kv_size], kv_size, kc.data() + static_cast<size_t>(pos) * kv_size);
    std::copy_n(&v[static_cast<size_t>(t) * kv_size], kv_size, vc.data() + static_cast<size_t>(pos) * kv_size);
  }

  // Causal attention of each (token, head) over positions 0..pos of its own sequence.
  std::vector<float> attn(static_cast<size_t>(num_tokens) * q_size);  // [T, heads * head_dim]
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  // Small passes (a tiny model, a short context) are not worth waking the thread team for.
  const int64_t work = static_cast<int64_t>(num_tokens) * c.num_attention_heads * hd * (layout.token_pos.back() + 1);
#pragma omp parallel for collapse(2) schedule(dynamic) if (work > (1 << 16))
  for (int t = 0; t < num_tokens; ++t) {
    for (int h = 0; h < c.num_attention_heads; ++h) {
      const int32_t pos = layout.token_pos[t];
      const SequenceCache& cache = *layout.caches[layout.token_seq[t]];
      const float* kc = cache.k[layer].data();
      const float* vc = cache.v[layer].data();
      const float* qh = &q[static_cast<size_t>(t) * q_size + h * hd];
      const int kvh = h / group;
      std::vector<float> scores(static_cast<size_t>(pos) + 1);
      for (int p = 0; p <= pos; ++p) {
        const float* kp = kc + static_cast<size_t>(p) * kv_size + kvh * hd;
        float s = 0.0f;
        for (int i = 0; i < hd; ++i) s += qh[i] * kp[i];
        scores[p] = s * scale;
      }
      softmax(scores.data(), pos + 1);
      float* oh = &attn[static_cast<size_t>(t) * q_size + h * hd];
      std::fill_n(oh, hd, 0.0f);
      for (int p = 0; p <= pos; ++p) {
        const float* vp = vc + static_cast<size_t>(p) * kv_size + kvh * hd;
        for (int i = 0; i < hd; ++i) oh[i] += scores[p] * vp[i];
      }
    }
  }
  matmul(out, attn.data(), num_tokens, w.o_proj);
}

}  // namespace moescope::cpu
