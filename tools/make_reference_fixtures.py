#!/usr/bin/env python3
# make_reference_fixtures.py -- build tiny Mixture-of-Experts reference fixtures for moescope's C++ tests.
#
# For each case (Qwen2-MoE x2, Mixtral, OLMoE, Qwen3-MoE) this script builds a tiny random model with
# Hugging Face transformers' own config/model classes, saves it as a bf16 checkpoint in hub layout
# (config.json + one model.safetensors with the classic per-expert tensor names that published
# checkpoints use), reloads that checkpoint in float32 with transformers, and records reference
# outputs (last-position logits, 24 greedy tokens with margins, per-layer expert routes) in
# reference.json.  Everything runs on CPU in float32 and takes seconds.  See tools/README.md for the
# fixture format.
#
# Exact command (run from the repository root; needs torch, transformers 5.x, safetensors, numpy):
#
#     python3 tools/make_reference_fixtures.py --out tests/fixtures/reference
#
# Every assumption about transformers' behaviour is checked at run time; the script stops at the
# first failed check with an AssertionError that says what was expected.

import argparse
import dataclasses
import inspect
import json
import os
import re
import shutil
import sys

try:
    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, GenerationConfig
except ImportError as exc:  # pragma: no cover - only on a machine without the stack
    sys.exit(f"make_reference_fixtures: missing dependency: {exc}. Needs torch, transformers>=5, safetensors.")

VOCAB = 384
HIDDEN = 64
MAX_POS = 512
PROMPT_LENS = (9, 17)  # prompt A, prompt B
NEW_TOKENS = 24
FIRST_PROMPT_ID = 3  # prompt ids are drawn from [3, VOCAB); 0 = pad
SIZE_WARN_BYTES = 1_048_576  # ~1 MB per case directory: warn above
SIZE_FAIL_BYTES = 1_600_000  # hard limit

# family -> (config class name, model class name)
FAMILY_CLASSES = {
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM"),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM"),
}

# Each case: family, config kwargs (rope theta given separately), and the intended values that are
# re-checked against the instantiated model.
CASES = [
    dict(
        name="qwen2_moe_gqa_shared", family="qwen2_moe", seed=1001, rope_theta=10000.0,
        cfg=dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=96,
                 num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
                 decoder_sparse_step=1, mlp_only_layers=[1], tie_word_embeddings=False,
                 rms_norm_eps=1e-6, use_sliding_window=False, qkv_bias=True),
    ),
    dict(
        name="qwen2_moe_norm_tied", family="qwen2_moe", seed=1002, rope_theta=1000000.0,
        cfg=dict(num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=80, moe_intermediate_size=48, shared_expert_intermediate_size=64,
                 num_experts=6, num_experts_per_tok=3, norm_topk_prob=True,
                 decoder_sparse_step=2, mlp_only_layers=[], tie_word_embeddings=True,
                 rms_norm_eps=1e-5, use_sliding_window=False, qkv_bias=True),
    ),
    dict(
        name="mixtral_gqa", family="mixtral", seed=1003, rope_theta=1000000.0,
        cfg=dict(num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
                 intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
                 sliding_window=None, tie_word_embeddings=False, rms_norm_eps=1e-6,
                 router_jitter_noise=0.0),
    ),
    dict(
        name="olmoe_qknorm", family="olmoe", seed=1004, rope_theta=10000.0,
        cfg=dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                 intermediate_size=32, num_experts=16, num_experts_per_tok=4, norm_topk_prob=False,
                 tie_word_embeddings=False, rms_norm_eps=1e-6, clip_qkv=None, attention_bias=False),
    ),
    dict(
        name="qwen3_moe_headdim", family="qwen3_moe", seed=1005, rope_theta=1000000.0,
        cfg=dict(num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 intermediate_size=64, moe_intermediate_size=32, num_experts=12, num_experts_per_tok=3,
                 norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[0],
                 tie_word_embeddings=False, rms_norm_eps=1e-6, use_sliding_window=False,
                 attention_bias=False),
    ),
]


def log(msg=""):
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# Case geometry (what the checkpoint must look like, derived from the intended config only)
# ----------------------------------------------------------------------------------------------

class Geo:
    def __init__(self, case):
        c = case["cfg"]
        self.family = case["family"]
        self.layers = c["num_hidden_layers"]
        self.nh = c["num_attention_heads"]
        self.nkv = c["num_key_value_heads"]
        self.hd = c.get("head_dim") or HIDDEN // self.nh
        self.eps = c["rms_norm_eps"]
        self.theta = case["rope_theta"]
        self.tied = c["tie_word_embeddings"]
        self.num_experts = c.get("num_experts", c.get("num_local_experts"))
        self.top_k = c["num_experts_per_tok"]
        self.dense_inter = c["intermediate_size"]
        if self.family in ("qwen2_moe", "qwen3_moe"):
            self.moe_inter = c["moe_intermediate_size"]
            step, only = c["decoder_sparse_step"], c["mlp_only_layers"]
            # HF rule (Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer):
            #   sparse  <=>  layer_idx not in mlp_only_layers and num_experts > 0
            #                and (layer_idx + 1) % decoder_sparse_step == 0
            self.sparse = [i for i in range(self.layers)
                           if i not in only and self.num_experts > 0 and (i + 1) % step == 0]
            self.sparse_rule = (f"sparse iff layer not in mlp_only_layers={only} and "
                                f"(layer+1) % decoder_sparse_step({step}) == 0; other layers are dense "
                                f"MLPs with intermediate_size={self.dense_inter}")
        else:
            self.moe_inter = c["intermediate_size"]
            self.sparse = list(range(self.layers))
            self.sparse_rule = "every layer is sparse (family has no dense layers)"
        self.renorm = True if self.family == "mixtral" else bool(c["norm_topk_prob"])
        self.shared_inter = c.get("shared_expert_intermediate_size")
        self.block = "block_sparse_moe" if self.family == "mixtral" else "mlp"
        self.expert_names = ("w1", "w3", "w2") if self.family == "mixtral" else ("gate_proj", "up_proj", "down_proj")

    def expected_hub_shapes(self):
        """Hub tensor name -> shape, as published checkpoints of this family name them."""
        H, V = HIDDEN, VOCAB
        q, kv = self.nh * self.hd, self.nkv * self.hd
        s = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
        if not self.tied:
            s["lm_head.weight"] = (V, H)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            s[p + "input_layernorm.weight"] = (H,)
            s[p + "post_attention_layernorm.weight"] = (H,)
            s[p + "self_attn.q_proj.weight"] = (q, H)
            s[p + "self_attn.k_proj.weight"] = (kv, H)
            s[p + "self_attn.v_proj.weight"] = (kv, H)
            s[p + "self_attn.o_proj.weight"] = (H, q)
            if self.family == "qwen2_moe":
                s[p + "self_attn.q_proj.bias"] = (q,)
                s[p + "self_attn.k_proj.bias"] = (kv,)
                s[p + "self_attn.v_proj.bias"] = (kv,)
            if self.family == "olmoe":  # RMSNorm over the whole projection
                s[p + "self_attn.q_norm.weight"] = (q,)
                s[p + "self_attn.k_norm.weight"] = (kv,)
            if self.family == "qwen3_moe":  # per-head RMSNorm
                s[p + "self_attn.q_norm.weight"] = (self.hd,)
                s[p + "self_attn.k_norm.weight"] = (self.hd,)
            if i in self.sparse:
                b = p + self.block + "."
                s[b + "gate.weight"] = (self.num_experts, H)
                g, u, d = self.expert_names
                I = self.moe_inter
                for e in range(self.num_experts):
                    s[f"{b}experts.{e}.{g}.weight"] = (I, H)
                    s[f"{b}experts.{e}.{u}.weight"] = (I, H)
                    s[f"{b}experts.{e}.{d}.weight"] = (H, I)
                if self.family == "qwen2_moe":
                    Is = self.shared_inter
                    s[b + "shared_expert.gate_proj.weight"] = (Is, H)
                    s[b + "shared_expert.up_proj.weight"] = (Is, H)
                    s[b + "shared_expert.down_proj.weight"] = (H, Is)
                    s[b + "shared_expert_gate.weight"] = (1, H)
            else:
                I = self.dense_inter
                s[p + "mlp.gate_proj.weight"] = (I, H)
                s[p + "mlp.up_proj.weight"] = (I, H)
                s[p + "mlp.down_proj.weight"] = (H, I)
        return s


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def accepted_params(fn):
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def config_fields(cls):
    names = accepted_params(cls.__init__)
    if dataclasses.is_dataclass(cls):
        names |= {f.name for f in dataclasses.fields(cls)}
    return names


def build_config(case):
    cfg_cls = getattr(transformers, FAMILY_CLASSES[case["family"]][0])
    fields = config_fields(cfg_cls)
    kw = dict(vocab_size=VOCAB, hidden_size=HIDDEN, max_position_embeddings=MAX_POS,
              hidden_act="silu", pad_token_id=0, bos_token_id=None, eos_token_id=None,
              attention_dropout=0.0, use_cache=True)
    kw.update(case["cfg"])
    if "rope_parameters" in fields:  # transformers 5 style
        kw["rope_parameters"] = {"rope_type": "default", "rope_theta": float(case["rope_theta"])}
        rope_style = "rope_parameters"
    else:
        kw["rope_theta"] = float(case["rope_theta"])
        rope_style = "rope_theta (legacy)"
    unknown = sorted(k for k in kw if k not in fields)
    if unknown:
        log(f"  note: {cfg_cls.__name__} has no declared field for {unknown}; passed as extra kwargs "
            f"(checked against the built model below)")
    cfg = cfg_cls(**kw)
    cfg.architectures = [FAMILY_CLASSES[case["family"]][1]]
    return cfg, rope_style


def decoder_layers(model):
    layers = getattr(getattr(model, "model", None), "layers", None)
    assert layers is not None, "expected model.model.layers (decoder layer list)"
    return layers


def moe_block(layer):
    for attr in ("mlp", "block_sparse_moe"):
        blk = getattr(layer, attr, None)
        if blk is not None:
            return blk
    raise AssertionError(f"decoder layer {type(layer).__name__} has neither .mlp nor .block_sparse_moe")


def is_sparse_block(blk):
    return hasattr(blk, "experts") and hasattr(blk, "gate")


def sparse_layers_of(model):
    return [i for i, l in enumerate(decoder_layers(model)) if is_sparse_block(moe_block(l))]


def rms_eps_of(mod):
    for a in ("variance_epsilon", "eps"):
        if hasattr(mod, a):
            return float(getattr(mod, a))
    return None


def check_model_structure(model, geo, tag):
    """Validate the instantiated model against the intended geometry."""
    cfg = model.config
    layers = decoder_layers(model)
    assert len(layers) == geo.layers, f"[{tag}] {len(layers)} layers, expected {geo.layers}"
    sp = sparse_layers_of(model)
    assert sp == geo.sparse, f"[{tag}] sparse layers {sp} != expected {geo.sparse} ({geo.sparse_rule})"
    ne = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    assert ne == geo.num_experts, f"[{tag}] config says {ne} experts, expected {geo.num_experts}"
    assert cfg.num_experts_per_tok == geo.top_k, f"[{tag}] top_k {cfg.num_experts_per_tok} != {geo.top_k}"
    assert cfg.hidden_act == "silu", f"[{tag}] hidden_act {cfg.hidden_act} (script assumes silu)"
    if geo.family != "mixtral":
        assert bool(cfg.norm_topk_prob) == geo.renorm, f"[{tag}] norm_topk_prob {cfg.norm_topk_prob} != {geo.renorm}"
    for i in geo.sparse:
        gate = moe_block(layers[i]).gate
        if hasattr(gate, "top_k"):
            assert gate.top_k == geo.top_k, f"[{tag}] layer {i} router top_k {gate.top_k} != {geo.top_k}"
        w = gate.weight
        assert tuple(w.shape) == (geo.num_experts, HIDDEN), f"[{tag}] layer {i} router weight {tuple(w.shape)}"
        if hasattr(gate, "bias") and gate.bias is not None:
            raise AssertionError(f"[{tag}] layer {i} router has a bias; not expected for this family")
    attn = layers[0].self_attn
    assert attn.q_proj.out_features == geo.nh * geo.hd, \
        f"[{tag}] q_proj out {attn.q_proj.out_features} != heads*head_dim {geo.nh * geo.hd} (head_dim not honoured?)"
    assert attn.k_proj.out_features == geo.nkv * geo.hd, f"[{tag}] k_proj out {attn.k_proj.out_features}"
    assert (attn.q_proj.bias is not None) == (geo.family == "qwen2_moe"), f"[{tag}] unexpected q_proj bias presence"
    # RMSNorm epsilon
    n_norm = 0
    for name, mod in model.named_modules():
        if "RMSNorm" in type(mod).__name__:
            eps = rms_eps_of(mod)
            assert eps is not None and abs(eps - geo.eps) < 1e-12, f"[{tag}] {name} eps={eps}, expected {geo.eps}"
            n_norm += 1
    assert n_norm > 0, f"[{tag}] no RMSNorm modules found"
    # RoPE: inv_freq must be 1/theta^(2j/head_dim) with no scaling
    rots = [(n, m) for n, m in model.named_modules() if "RotaryEmbedding" in type(m).__name__]
    assert rots, f"[{tag}] no rotary embedding module found"
    expect = 1.0 / (geo.theta ** (torch.arange(0, geo.hd, 2, dtype=torch.int64).double() / geo.hd))
    n_checked = 0
    for n, m in rots:
        cands = {bn: b for bn, b in m.named_buffers(recurse=False)
                 if bn.endswith("inv_freq") and not bn.startswith("original")}
        if not cands and torch.is_tensor(getattr(m, "inv_freq", None)):
            cands = {"inv_freq": m.inv_freq}
        for bn, inv in cands.items():
            assert inv.numel() == geo.hd // 2, \
                f"[{tag}] {n}.{bn} has {inv.numel()} entries, head_dim/2={geo.hd // 2}"
            assert torch.allclose(inv.double(), expect, rtol=1e-5, atol=0), (
                f"[{tag}] {n}.{bn} does not match rope_theta={geo.theta}: "
                f"{inv[:3].tolist()} vs {expect[:3].tolist()}")
            n_checked += 1
        sc = getattr(m, "attention_scaling", 1.0)
        assert abs(float(sc) - 1.0) < 1e-12, f"[{tag}] {n} attention_scaling={sc} (expected default RoPE)"
    assert n_checked > 0, f"[{tag}] no inv_freq buffer found on {[n for n, _ in rots]}"
    # tying
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    same = emb.data_ptr() == head.data_ptr()
    assert same == geo.tied, f"[{tag}] lm_head tied to embed_tokens: {same}, expected {geo.tied}"
    return n_checked


# ----------------------------------------------------------------------------------------------
# Weight re-draw
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def redraw_weights(model, geo, seed, weight_std):
    g = torch.Generator().manual_seed(seed)
    norm_params, router_params = set(), set()
    for _, mod in model.named_modules():
        if "RMSNorm" in type(mod).__name__:
            norm_params.add(id(mod.weight))
    for i in geo.sparse:
        router_params.add(id(moe_block(decoder_layers(model)[i]).gate.weight))
    counts = {"norm": 0, "router": 0, "bias": 0, "weight": 0}
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        r = torch.randn(p.shape, generator=g, dtype=torch.float32)
        if id(p) in norm_params:
            p.copy_(1.0 + 0.1 * r)
            counts["norm"] += 1
        elif id(p) in router_params:
            p.copy_(0.5 * r)
            counts["router"] += 1
        elif name.endswith(".bias"):
            p.copy_(0.1 * r)
            counts["bias"] += 1
        else:
            p.copy_(weight_std * r)
            counts["weight"] += 1
    assert counts["router"] == len(geo.sparse), f"re-drew {counts['router']} routers, expected {len(geo.sparse)}"
    assert counts["norm"] > 0
    return counts


# ----------------------------------------------------------------------------------------------
# In-memory (transformers-internal) names -> hub names
# ----------------------------------------------------------------------------------------------

def to_hub_state_dict(model, geo):
    """Map the model's state_dict to the classic per-expert hub layout (no dependence on save_pretrained)."""
    sd = model.state_dict()
    out = {}
    layout = set()
    g_name, u_name, d_name = geo.expert_names
    E, I, H = geo.num_experts, geo.moe_inter, HIDDEN
    pat = re.compile(r"^model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.(.+)$")
    for k, v in sd.items():
        v = v.detach()
        if geo.tied and k == "lm_head.weight":
            continue
        m = pat.match(k)
        if not m or int(m.group(1)) not in geo.sparse:
            out[k] = v.clone().contiguous()
            continue
        i, rest = int(m.group(1)), m.group(3)
        b = f"model.layers.{i}.{geo.block}."
        if rest == "experts.gate_up_proj":
            # transformers 5 MixtralExperts-style: [E, 2*I, H]; forward does
            #   gate, up = linear(x, gate_up_proj[e]).chunk(2, dim=-1)  -> first half = gate, second = up
            # (conversion_mapping: MergeModulelist(dim=0) + Concatenate(dim=1) of [gate/w1, up/w3]).
            assert tuple(v.shape) == (E, 2 * I, H), (
                f"{k}: shape {tuple(v.shape)}, expected [E, 2*I, H]=({E}, {2 * I}, {H}); "
                "a transposed [E, H, 2*I] layout is not handled by this script")
            for e in range(E):
                out[f"{b}experts.{e}.{g_name}.weight"] = v[e, :I, :].clone().contiguous()
                out[f"{b}experts.{e}.{u_name}.weight"] = v[e, I:, :].clone().contiguous()
            layout.add("fused gate_up_proj [E,2I,H]")
        elif rest == "experts.down_proj":
            assert tuple(v.shape) == (E, H, I), f"{k}: shape {tuple(v.shape)}, expected [E, H, I]=({E}, {H}, {I})"
            for e in range(E):
                out[f"{b}experts.{e}.{d_name}.weight"] = v[e].clone().contiguous()
            layout.add("fused down_proj [E,H,I]")
        elif rest.startswith("experts."):
            mm = re.match(r"^experts\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w2|w3)\.weight$", rest)
            assert mm, f"unrecognised expert tensor {k}"
            role = {"gate_proj": g_name, "w1": g_name, "up_proj": u_name, "w3": u_name,
                    "down_proj": d_name, "w2": d_name}[mm.group(2)]
            out[f"{b}experts.{mm.group(1)}.{role}.weight"] = v.clone().contiguous()
            layout.add("per-expert modules")
        elif rest == "gate.weight":
            out[b + "gate.weight"] = v.clone().contiguous()
        elif geo.family == "qwen2_moe" and (rest.startswith("shared_expert.") or rest == "shared_expert_gate.weight"):
            out[b + rest] = v.clone().contiguous()
        else:
            raise AssertionError(f"unexpected tensor in sparse block: {k} {tuple(v.shape)}")
    return out, sorted(layout)


def check_hub_keys(hub, geo, tag):
    exp = geo.expected_hub_shapes()
    missing = sorted(set(exp) - set(hub))
    extra = sorted(set(hub) - set(exp))
    assert not missing and not extra, f"[{tag}] hub key set mismatch: missing={missing[:8]} extra={extra[:8]}"
    bad = [(k, tuple(hub[k].shape), exp[k]) for k in exp if tuple(hub[k].shape) != exp[k]]
    assert not bad, f"[{tag}] hub tensor shapes differ from expected: {bad[:6]}"


def dir_size(path):
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path)
               if os.path.isfile(os.path.join(path, f)))


def read_safetensors_dir(path):
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    tensors, metas = {}, []
    for f in files:
        fp = os.path.join(path, f)
        with safe_open(fp, framework="pt") as h:
            metas.append(h.metadata())
        part = load_file(fp)
        dup = set(part) & set(tensors)
        assert not dup, f"duplicate tensors across shards: {sorted(dup)[:5]}"
        tensors.update(part)
    return files, tensors, metas


# ----------------------------------------------------------------------------------------------
# Save
# ----------------------------------------------------------------------------------------------

def save_checkpoint(model_bf16, geo, case_dir, tag):
    if os.path.isdir(case_dir):
        shutil.rmtree(case_dir)
    os.makedirs(case_dir)
    params = accepted_params(model_bf16.save_pretrained)
    kw = {}
    if "safe_serialization" in params:
        kw["safe_serialization"] = True
    if "max_shard_size" in params:
        kw["max_shard_size"] = "2GB"
    model_bf16.save_pretrained(case_dir, **kw)
    written = sorted(os.listdir(case_dir))
    log(f"  save_pretrained({', '.join(f'{k}={v!r}' for k, v in kw.items())}) wrote: {written}")
    assert "config.json" in written, "save_pretrained did not write config.json"

    hub, layout = to_hub_state_dict(model_bf16, geo)
    check_hub_keys(hub, geo, tag)
    log(f"  in-memory expert layout: {', '.join(layout) or 'n/a'}")

    files, saved, metas = read_safetensors_dir(case_dir)
    index_files = [f for f in written if f.endswith(".index.json")]
    fused = sorted(k for k in saved if re.search(r"experts\.(gate_up_proj|down_proj)$", k) or
                   re.search(r"experts\.(gate_up_proj|down_proj)\.", k))
    reasons = []
    if files != ["model.safetensors"] or index_files:
        reasons.append(f"files {files} index {index_files}")
    if fused:
        reasons.append(f"{len(fused)} fused expert tensors (e.g. {fused[0]})")
    if set(saved) != set(hub):
        only_saved = sorted(set(saved) - set(hub))
        only_hub = sorted(set(hub) - set(saved))
        reasons.append(f"key set differs (saved-only {len(only_saved)} e.g. {only_saved[:3]}, "
                       f"hub-only {len(only_hub)} e.g. {only_hub[:3]})")
    else:
        diff = [k for k in hub if saved[k].dtype != torch.bfloat16 or not torch.equal(saved[k], hub[k])]
        if diff:
            reasons.append(f"{len(diff)} tensors differ in value/dtype (e.g. {diff[:3]})")
            log(f"  WARNING: save_pretrained used hub names but {len(diff)} tensors differ from this script's "
                f"split; the script's version is written and then validated by the reload checks")
    if any((m or {}).get("format") != "pt" for m in metas):
        reasons.append(f"metadata {metas}")
    if reasons:
        log("  rewriting model.safetensors with per-expert hub names: " + "; ".join(reasons))
        for f in os.listdir(case_dir):
            if f.endswith(".safetensors") or f.endswith(".index.json"):
                os.remove(os.path.join(case_dir, f))
        save_file({k: hub[k].to(torch.bfloat16).contiguous() for k in sorted(hub)},
                  os.path.join(case_dir, "model.safetensors"), metadata={"format": "pt"})
    else:
        log("  save_pretrained already wrote the per-expert hub layout (bit-identical); kept as is")
    # keep only config.json + model.safetensors
    for f in sorted(os.listdir(case_dir)):
        if f not in ("config.json", "model.safetensors"):
            os.remove(os.path.join(case_dir, f))
            log(f"  removed extra file {f}")

    # re-open and verify the final file
    files, saved, metas = read_safetensors_dir(case_dir)
    assert files == ["model.safetensors"], f"expected exactly one model.safetensors, found {files}"
    assert not any(f.endswith(".index.json") for f in os.listdir(case_dir)), "index file left over"
    assert metas[0] is not None and metas[0].get("format") == "pt", f"metadata {metas[0]} lacks format=pt"
    check_hub_keys(saved, geo, tag)
    nonbf16 = [k for k, v in saved.items() if v.dtype != torch.bfloat16]
    assert not nonbf16, f"non-bf16 tensors in checkpoint: {nonbf16[:5]}"
    for k in hub:
        assert torch.equal(saved[k], hub[k].to(torch.bfloat16)), f"final file tensor {k} differs from model"
    for li in (0, 1):
        keys = sorted(k for k in saved if k.startswith(f"model.layers.{li}."))
        short = [f"{k[len(f'model.layers.{li}.'):]}{list(saved[k].shape)}" for k in keys]
        experts = [s for s in short if ".experts." in s]
        rest = [s for s in short if ".experts." not in s]
        shown = rest + experts[:3] + ([f"... +{len(experts) - 3} more expert tensors"] if len(experts) > 3 else [])
        log(f"  layer {li} keys ({len(keys)}): " + ", ".join(shown))
    top = sorted(k for k in saved if not k.startswith("model.layers."))
    log(f"  non-layer keys: {top}")
    with open(os.path.join(case_dir, "config.json")) as f:
        cj = json.load(f)
    assert cj.get("architectures", [None])[0] == FAMILY_CLASSES[geo.family][1], \
        f"config.json architectures={cj.get('architectures')}"
    rope_keys = {k: cj[k] for k in ("rope_parameters", "rope_theta", "rope_scaling") if k in cj}
    log(f"  config.json: model_type={cj.get('model_type')} architectures={cj.get('architectures')} "
        f"{rope_keys} head_dim={cj.get('head_dim')} dtype={cj.get('dtype', cj.get('torch_dtype'))} "
        f"transformers_version={cj.get('transformers_version')}")
    return saved


# ----------------------------------------------------------------------------------------------
# Reload
# ----------------------------------------------------------------------------------------------

def reload_f32(case_dir, tag):
    base = dict(dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    try:
        model, info = AutoModelForCausalLM.from_pretrained(case_dir, experts_implementation="eager", **base)
    except (TypeError, ValueError) as exc:
        if "experts_implementation" not in str(exc):
            raise
        log(f"  note: from_pretrained rejected experts_implementation ({exc}); loading without it")
        model, info = AutoModelForCausalLM.from_pretrained(case_dir, **base)
    if hasattr(model, "set_experts_implementation"):
        try:
            model.set_experts_implementation("eager")
        except Exception as exc:  # noqa: BLE001 - informational only
            log(f"  note: set_experts_implementation('eager') failed: {exc}")
    model.eval()
    return model, info


def check_loading_info(info, geo, model, tag):
    problems, other = {}, {}
    problem_keys = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs", "conversion_errors")
    for key, val in (info or {}).items():
        if not val:
            continue
        if key not in problem_keys:
            other[key] = val
            continue
        items = list(val) if isinstance(val, (set, list, tuple, dict)) else [val]
        if key == "missing_keys" and geo.tied:
            items = [k for k in items if k != "lm_head.weight"]
        items = sorted(str(x) for x in items)
        if items:
            problems[key] = items[:10]
    assert not problems, f"[{tag}] from_pretrained loading info reports problems: {problems}"
    if geo.tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(), \
            f"[{tag}] reloaded lm_head is not tied to embed_tokens"
    log(f"  loading info clean (keys: {sorted(info or {})}){f'; other entries: {other}' if other else ''}")


# ----------------------------------------------------------------------------------------------
# Routing capture + independent checks
# ----------------------------------------------------------------------------------------------

def topk_reference(x2d, weight, k, renorm):
    logits = F.linear(x2d.float(), weight.float())
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    vals, ids = torch.topk(probs, k, dim=-1)
    if renorm:
        vals = vals / vals.sum(dim=-1, keepdim=True)
    srt = torch.sort(probs, dim=-1, descending=True).values
    margin = srt[:, k - 1] - srt[:, k]
    return ids, vals, margin


def parse_router_output(out, n_tok, E, k, tag):
    """Return (ids, weights) from a router's output, or (None, None) if it returns logits only."""
    if torch.is_tensor(out):
        assert tuple(out.shape[-1:]) == (E,), f"[{tag}] router returned tensor {tuple(out.shape)}"
        return None, None
    assert isinstance(out, (tuple, list)), f"[{tag}] router returned {type(out)}"
    tens = [t for t in out if torch.is_tensor(t)]
    ints = [t for t in tens if not t.is_floating_point()]
    flts = [t for t in tens if t.is_floating_point()]
    assert len(ints) == 1, f"[{tag}] router output has {len(ints)} integer tensors; expected one (indices)"
    ids = ints[0].reshape(n_tok, -1)
    assert ids.shape[1] == k, f"[{tag}] router indices {tuple(ints[0].shape)}, expected (*, {k})"
    w = [t for t in flts if t.shape[-1] == k]
    if w:
        weights = w[-1].reshape(n_tok, k).float()
    else:
        full = [t for t in flts if t.shape[-1] == E]
        assert full, f"[{tag}] router output has no weight tensor: {[tuple(t.shape) for t in tens]}"
        # (scores_scattered[N,E], indices) or (logits, scores_scattered, indices): scattered scores are last
        weights = full[-1].reshape(n_tok, E).float().gather(1, ids)
    return ids, weights


class RouteCapture:
    def __init__(self, model, geo):
        self.model, self.geo, self.handles = model, geo, []
        self.router_calls, self.block_calls = {}, {}
        layers = decoder_layers(model)
        for i in geo.sparse:
            blk = moe_block(layers[i])
            self.handles.append(blk.gate.register_forward_hook(self._mk(i, self.router_calls), with_kwargs=True))
            self.handles.append(blk.register_forward_hook(self._mk(i, self.block_calls), with_kwargs=True))

    def _mk(self, i, store):
        def hook(mod, args, kwargs, output):
            if args:
                x = args[0]
            else:
                x = kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            assert torch.is_tensor(x), f"layer {i}: could not find the input tensor of {type(mod).__name__}"
            store.setdefault(i, []).append((x.detach().clone(),
                                            output if not torch.is_tensor(output) else output.detach().clone()))
        return hook

    def clear(self):
        self.router_calls.clear()
        self.block_calls.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def silu_mlp(x, g, u, d):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def reference_moe_output(x2d, ids, weights, hub32, geo, i):
    """Recompute the sparse block output from the checkpoint's hub tensors and the captured routes."""
    b = f"model.layers.{i}.{geo.block}."
    gn, un, dn = geo.expert_names
    out = torch.zeros_like(x2d)
    for t in range(x2d.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            y = silu_mlp(x2d[t:t + 1], hub32[f"{b}experts.{e}.{gn}.weight"], hub32[f"{b}experts.{e}.{un}.weight"],
                         hub32[f"{b}experts.{e}.{dn}.weight"])
            out[t] += weights[t, j] * y[0]
    if geo.family == "qwen2_moe":
        sh = silu_mlp(x2d, hub32[b + "shared_expert.gate_proj.weight"], hub32[b + "shared_expert.up_proj.weight"],
                      hub32[b + "shared_expert.down_proj.weight"])
        out = out + torch.sigmoid(F.linear(x2d, hub32[b + "shared_expert_gate.weight"])) * sh
    return out


@torch.no_grad()
def compute_routes(model, geo, cap, ids_tensor, hub32, tag):
    n = ids_tensor.shape[1]
    E, k = geo.num_experts, geo.top_k
    cap.clear()
    out = model(input_ids=ids_tensor, use_cache=False, output_router_logits=True)
    routes, min_margin, max_block_err, src = [], float("inf"), 0.0, set()
    for i in geo.sparse:
        rc = cap.router_calls.get(i, [])
        bc = cap.block_calls.get(i, [])
        assert len(rc) == 1 and len(bc) == 1, f"[{tag}] layer {i}: router called {len(rc)}x, block {len(bc)}x"
        x_in, r_out = rc[0]
        x2d = x_in.reshape(-1, HIDDEN).float()
        assert x2d.shape[0] == n, f"[{tag}] layer {i}: router saw {x2d.shape[0]} tokens, expected {n}"
        gate_w = moe_block(decoder_layers(model)[i]).gate.weight
        my_ids, my_w, margin = topk_reference(x2d, gate_w, k, geo.renorm)
        r_ids, r_w = parse_router_output(r_out, n, E, k, f"{tag} layer {i}")
        if r_ids is None:
            ids_used, w_used = my_ids, my_w
            src.add("recomputed (router returns logits only)")
        else:
            assert torch.equal(r_ids.long(), my_ids.long()), \
                f"[{tag}] layer {i}: router ids {r_ids.tolist()} != softmax-topk ids {my_ids.tolist()}"
            assert torch.allclose(r_w, my_w, rtol=1e-5, atol=1e-7), (
                f"[{tag}] layer {i}: router weights differ from softmax/topk"
                f"{'/renorm' if geo.renorm else ''} formula: max err {(r_w - my_w).abs().max().item():.3e}")
            ids_used, w_used = r_ids.long(), r_w
            src.add("router module output (checked against softmax/topk formula)")
        # the block output must equal the routed experts (+ shared expert) computed from the checkpoint tensors
        bx, bout = bc[0]
        bout = bout[0] if isinstance(bout, (tuple, list)) else bout
        ref = reference_moe_output(bx.reshape(-1, HIDDEN).float(), ids_used, w_used, hub32, geo, i)
        err = (bout.reshape(-1, HIDDEN).float() - ref).abs().max().item()
        scale = ref.abs().max().item()
        assert err <= 1e-4 * scale + 1e-7, (
            f"[{tag}] layer {i}: MoE block output != sum_k w_k * expert(x) from the checkpoint's per-expert tensors "
            f"(max err {err:.3e}, scale {scale:.3e}): expert naming/orientation or routing semantics are wrong")
        max_block_err = max(max_block_err, err / max(scale, 1e-30))
        min_margin = min(min_margin, margin.min().item())
        routes.append({"layer": i,
                       "topk_ids": [[int(e) for e in row] for row in ids_used.tolist()],
                       "topk_weights": [[float(w) for w in row] for row in w_used.float().tolist()],
                       "margin": [float(m) for m in margin.tolist()]})
    # second, independent path: output_router_logits
    rl = getattr(out, "router_logits", None)
    assert rl is not None, f"[{tag}] model(..., output_router_logits=True) returned no router_logits"
    rl = [t for t in rl if t is not None]
    assert len(rl) == len(geo.sparse), f"[{tag}] {len(rl)} router_logits entries for {len(geo.sparse)} sparse layers"
    for r, t in zip(routes, rl):
        t2 = t.reshape(-1, E).float()
        assert t2.shape[0] == n, f"[{tag}] router_logits for layer {r['layer']} has {t2.shape[0]} rows"
        ids2 = torch.topk(t2, k, dim=-1).indices.tolist()
        assert ids2 == r["topk_ids"], \
            f"[{tag}] layer {r['layer']}: output_router_logits top-k {ids2} != hook ids {r['topk_ids']}"
    return out.logits, routes, min_margin, max_block_err, src


@torch.no_grad()
def greedy(model, ids_tensor, last_logits, tag):
    gc = GenerationConfig(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False, num_beams=1,
                          eos_token_id=None, bos_token_id=None, pad_token_id=0, repetition_penalty=1.0,
                          output_scores=True, output_logits=True, return_dict_in_generate=True, use_cache=True)
    model.generation_config = gc
    res = model.generate(ids_tensor, attention_mask=torch.ones_like(ids_tensor), generation_config=gc)
    p = ids_tensor.shape[1]
    seq = res.sequences
    assert seq.shape == (1, p + NEW_TOKENS), f"[{tag}] generate returned {tuple(seq.shape)}, expected (1, {p + NEW_TOKENS})"
    assert torch.equal(seq[:, :p], ids_tensor), f"[{tag}] generate changed the prompt"
    raw = getattr(res, "logits", None)
    scores = getattr(res, "scores", None)
    assert scores is not None and len(scores) == NEW_TOKENS, f"[{tag}] expected {NEW_TOKENS} score tensors"
    if raw is None:
        log("  note: generate returned no raw logits; using scores (checked against a full forward below)")
        raw = scores
    assert len(raw) == NEW_TOKENS
    raw = torch.stack([r[0].float() for r in raw])  # [24, V]
    sc = torch.stack([s[0].float() for s in scores])
    assert torch.equal(raw, sc), f"[{tag}] generation scores != raw logits: a logits processor is active"
    new = seq[0, p:]
    assert torch.equal(raw.argmax(-1), new), f"[{tag}] generated tokens are not the argmax of the step logits"
    d0 = (raw[0] - last_logits).abs().max().item()
    assert d0 < 1e-4, f"[{tag}] first generation step logits differ from the prompt forward by {d0:.3e}"
    # teacher-forced full forward (no cache) must reproduce the cached decode
    full = model(input_ids=seq[:, :-1], use_cache=False).logits[0, p - 1:].float()
    dmax = (full - raw).abs().max().item()
    assert dmax < 1e-3, f"[{tag}] KV-cached decode logits differ from a full forward by {dmax:.3e}"
    top2 = torch.topk(raw, 2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).tolist()
    for s, (a, b) in enumerate(zip(full.argmax(-1).tolist(), new.tolist())):
        if a != b:
            assert margins[s] < 1e-3, f"[{tag}] step {s}: full-forward argmax {a} != generated {b} (margin {margins[s]:.3e})"
            log(f"  WARNING: step {s} near-tie: full forward picks {a}, cached decode {b} (margin {margins[s]:.2e})")
    return [int(t) for t in new.tolist()], [float(m) for m in margins], dmax


def finite_list(xs, what):
    for x in xs:
        assert x == x and abs(x) != float("inf"), f"non-finite value in {what}"
    return xs


# ----------------------------------------------------------------------------------------------
# Main per-case driver
# ----------------------------------------------------------------------------------------------

def run_case(case, out_root, weight_std):
    tag = case["name"]
    geo = Geo(case)
    fam_cls = getattr(transformers, FAMILY_CLASSES[case["family"]][1])
    log(f"== {tag} ({fam_cls.__name__}) ==")
    log(f"  sparse layers {geo.sparse}: {geo.sparse_rule}")
    cfg, rope_style = build_config(case)
    torch.manual_seed(case["seed"])
    model = fam_cls(cfg)
    model.eval()
    n_rot = check_model_structure(model, geo, tag + "/built")
    counts = redraw_weights(model, geo, case["seed"] + 7, weight_std)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"  built: {n_params} params, rope via {rope_style} (theta={geo.theta}, {n_rot} inv_freq buffer(s) checked), "
        f"re-drawn {counts}")
    model = model.to(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    orig = {k: v.detach().clone() for k, v in model.state_dict().items()}

    case_dir = os.path.join(out_root, tag)
    saved = save_checkpoint(model, geo, case_dir, tag)
    hub32 = {k: v.float() for k, v in saved.items()}

    # reload from disk in float32
    ref_model, info = reload_f32(case_dir, tag)
    check_loading_info(info, geo, ref_model, tag)
    log(f"  reloaded: attn={getattr(ref_model.config, '_attn_implementation', '?')} "
        f"experts={getattr(ref_model.config, '_experts_implementation', 'n/a')} "
        f"class={type(ref_model).__name__}")
    check_model_structure(ref_model, geo, tag + "/reloaded")
    rsd = ref_model.state_dict()
    assert set(rsd) == set(orig), (f"[{tag}] reloaded state_dict keys differ: only-reloaded "
                                   f"{sorted(set(rsd) - set(orig))[:5]} only-original {sorted(set(orig) - set(rsd))[:5]}")
    for k, v in rsd.items():
        assert v.dtype == torch.float32, f"[{tag}] reloaded {k} is {v.dtype}, expected float32"
        assert torch.equal(v, orig[k].float()), f"[{tag}] reloaded {k} != bf16 original (wrong mapping or random init)"
    log(f"  all {len(rsd)} reloaded tensors equal the bf16 originals widened to f32")
    del model

    cap = RouteCapture(ref_model, geo)
    gen = torch.Generator().manual_seed(case["seed"] + 1000)
    prompts, min_route, min_greedy, worst_block, worst_kv, srcs = [], float("inf"), float("inf"), 0.0, 0.0, set()
    try:
        for plen in PROMPT_LENS:
            ids = torch.randint(FIRST_PROMPT_ID, VOCAB, (1, plen), generator=gen, dtype=torch.long)
            logits, routes, mrm, blk_err, src = compute_routes(ref_model, geo, cap, ids, hub32, tag)
            srcs |= src
            with torch.no_grad():
                plain = ref_model(input_ids=ids, use_cache=False).logits
            dl = (plain - logits).abs().max().item()
            assert dl < 1e-5, f"[{tag}] output_router_logits changed the logits by {dl:.3e}"
            last = logits[0, -1].float()
            assert last.shape == (VOCAB,)
            gids, gmarg, kv_err = greedy(ref_model, ids, last, tag)
            prompts.append({"prompt_ids": [int(t) for t in ids[0].tolist()],
                            "last_logits": finite_list([float(x) for x in last.tolist()], "last_logits"),
                            "greedy_ids": gids,
                            "greedy_margins": finite_list(gmarg, "greedy_margins"),
                            "routes": routes})
            min_route, min_greedy = min(min_route, mrm), min(min_greedy, min(gmarg))
            worst_block, worst_kv = max(worst_block, blk_err), max(worst_kv, kv_err)
            log(f"  prompt len {plen}: greedy {gids[:8]}... min greedy margin {min(gmarg):.4g}, "
                f"min route margin {mrm:.4g}, MoE block rel err {blk_err:.2e}, cached-vs-full {kv_err:.2e}")
    finally:
        cap.remove()
    log(f"  routes taken from: {'; '.join(sorted(srcs))}")

    ref = {"case": tag,
           "arch": FAMILY_CLASSES[case["family"]][1],
           "sparse_layers": geo.sparse,
           "sparse_rule": geo.sparse_rule,
           "num_experts": geo.num_experts,
           "top_k": geo.top_k,
           "renormalize_topk": geo.renorm,
           "transformers_version": transformers.__version__,
           "torch_version": torch.__version__,
           "prompts": prompts}
    with open(os.path.join(case_dir, "config.json")) as f:
        arch = json.load(f)["architectures"][0]
    assert arch == ref["arch"], f"[{tag}] config.json architectures[0]={arch} != {ref['arch']}"
    with open(os.path.join(case_dir, "reference.json"), "w") as f:
        f.write(json.dumps(ref, separators=(",", ":"), allow_nan=False))
        f.write("\n")
    size = dir_size(case_dir)
    files = {f: os.path.getsize(os.path.join(case_dir, f)) for f in sorted(os.listdir(case_dir))}
    log(f"  files: {files} total {size} bytes")
    assert size <= SIZE_FAIL_BYTES, f"[{tag}] case directory is {size} bytes (> {SIZE_FAIL_BYTES})"
    if size > SIZE_WARN_BYTES:
        log(f"  WARNING: {tag} is {size} bytes, above ~1 MB")
    return dict(case=tag, params=n_params, file=files["model.safetensors"], dir=size,
                route=min_route, greedy=min_greedy, block=worst_block, kv=worst_kv)


def main():
    ap = argparse.ArgumentParser(description=__doc__ or "build MoE reference fixtures")
    ap.add_argument("--out", required=True, help="output root, e.g. tests/fixtures/reference")
    ap.add_argument("--weight-std", type=float, default=0.02,
                    help="std of re-drawn linear/embedding weights (norms: 1+0.1*randn, routers: 0.5, biases: 0.1)")
    ap.add_argument("--cases", nargs="*", default=None, help="subset of case names (default: all)")
    args = ap.parse_args()

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)
    log(f"transformers {transformers.__version__}, torch {torch.__version__}, python {sys.version.split()[0]}")
    if not transformers.__version__.startswith("5."):
        log("WARNING: this script was written against transformers 5.x; continuing, all checks still apply")
    names = [c["name"] for c in CASES]
    chosen = CASES if not args.cases else [c for c in CASES if c["name"] in args.cases]
    unknown = sorted(set(args.cases or []) - set(names))
    assert not unknown, f"unknown case(s) {unknown}; known: {names}"
    os.makedirs(args.out, exist_ok=True)
    rows = [run_case(c, args.out, args.weight_std) for c in chosen]

    log("")
    log(f"{'case':24} {'params':>8} {'safetensors':>12} {'dir bytes':>10} {'min route margin':>17} "
        f"{'min greedy margin':>18} {'moe rel err':>12} {'kv err':>9}")
    for r in rows:
        log(f"{r['case']:24} {r['params']:>8} {r['file']:>12} {r['dir']:>10} {r['route']:>17.4g} "
            f"{r['greedy']:>18.4g} {r['block']:>12.2e} {r['kv']:>9.2e}")
    log(f"OK: {len(rows)} case(s) written under {args.out}")


if __name__ == "__main__":
    main()
