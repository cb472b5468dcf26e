#!/usr/bin/env python3
# hf_side_by_side.py -- Hugging Face transformers on the same real-size checkpoint as moescope's CUDA
# backend, on the GPU machine: (1) a float32 reference of routes, logits and greedy tokens that
# tests/cuda_real_size_test.cpp (CudaRealSize.RoutesAndTokensAgreeWithTransformers) compares the CUDA
# backend with, and (2) transformers' own bf16 throughput (generate with its own cache, and a 1x2048
# prefill), to print beside `moescope bench`. Needs one CUDA GPU, torch 2.9+, transformers 5.x,
# safetensors; no network. docs/CUDA.md ("Against transformers at real size") gives the thresholds.
#
# Exact command (run from the repository root on the GPU machine, after
# `moescope make-model --arch qwen2_moe --preset qwen1.5-moe-a2.7b --seed 0 --out /tmp/qwen1.5-moe-a2.7b-random`;
# bench/cuda_device_check.sh runs both, then the test):
#
#     python3 tools/hf_side_by_side.py --model /tmp/qwen1.5-moe-a2.7b-random --out $OUT/hf
#
# then
#
#     MOESCOPE_REAL_SIZE_MODEL=/tmp/qwen1.5-moe-a2.7b-random MOESCOPE_REAL_SIZE_REFERENCE=$OUT/hf/reference.json \
#         build-cuda/tests/cuda_real_size_test
#
# Options: --prompts N (4) --prompt-len L (64) --new-tokens T (32) --seed S (0): the reference's random
# prompts (ids in [100, 150000), seeded) and greedy length. --ref-dtype float32|bfloat16 (float32),
# --ref-attn eager|sdpa (eager). Throughput: --tp-batches 1,8 --tp-prompt-len 128 --tp-new-tokens 128
# --prefill-tokens 2048 --repeats 3 --experts-impl auto|grouped_mm|eager (auto: the faster of the two on a
# short generate). --skip-reference / --skip-throughput run one stage only.
#
# Stages (each catches its own failure, out-of-memory included, prints it and the next stage still runs;
# the exit status is 1 when a stage failed):
#
#   reference   the checkpoint loaded on the GPU in --ref-dtype (float32: 14.3B parameters = 57 GB of the
#               H100's 80), --ref-attn attention, eager experts, TF32 off. Per prompt: `generate` greedy
#               for T tokens with its KV cache (raw logits -> greedy_ids, greedy_margins = top-1 minus top-2
#               logit, the 32 largest logits of every step), then ONE full forward over prompt + greedy
#               tokens 0..T-2 with hooks on every router: router logits -> softmax in float32 -> top-k ->
#               renormalised when norm_topk_prob (the weights the experts used, checked against that
#               formula), margin = k-th minus (k+1)-th probability. Writes OUT/reference.json.
#   throughput  the checkpoint reloaded in bfloat16, sdpa attention, the chosen experts implementation.
#               First transformers' own bf16 routes for the reference's tokens (one forward per prompt over
#               prompt + float32 greedy tokens), compared with the float32 routes as sets: the summary is
#               added to reference.json as "transformers_bf16_routes" {"pairs", "agree", "agreement",
#               "disagreements_at_margin_ge_1e-2", ...}. Then
#               a 1 x --prefill-tokens forward (tokens/s), then for each batch size `generate` greedy with
#               its own (dynamic) cache, --tp-new-tokens new tokens (min = max, no eos), batch of
#               same-length random prompts (no padding), --repeats timed runs after a warm-up, CUDA
#               synchronised around each. Decode tokens/s = batch * (T - 1) / (time of generate(T) - time
#               of generate(1)): the prefill and first token taken out, as `moescope bench` times its
#               decode steps only. Writes OUT/hf_throughput.json.
#
# reference.json (read by tests/cuda_real_size_test.cpp), the layout of tools/README.md's reference.json
# and of tests/fixtures/default_model/reference.json:
#   {"model": DIR, "arch", "sparse_layers", "num_experts", "top_k", "renormalize_topk", "new_tokens",
#    "prompt_len", "seed", "ref_dtype", "attn_implementation", "experts_implementation",
#    "transformers_version", "torch_version", "device",
#    "weights_probe": [{"name", "row", "values"}]      # first 8 values of a few rows, from the files: the
#                                                      # test checks it loaded the same checkpoint
#    "prompts": [{"prompt_ids", "greedy_ids" [T], "greedy_margins" [T],
#                 "last_logits_top": {"ids", "values"} (32 largest logits after the prompt), "last_logits_max_abs",
#                 "step_logits_top": [{"ids", "values", "max_abs"}] per greedy step (step 0 = last_logits_top),
#                 "routes": [{"layer", "topk_ids", "topk_weights", "margin"}] per MoE layer, the prompt tokens,
#                 "decode_routes": the same for greedy tokens 0..T-2 fed back}]}
#
# Budget on an H100 with the checkpoint in the page cache: about 1 min to load in float32, seconds for the
# ~40 reference passes, about 1 min to reload in bfloat16, 1-2 min of timed generation.

import argparse
import gc
import json
import math
import os
import statistics
import struct
import sys
import time
import traceback

T0 = time.time()


def log(msg=""):
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


try:
    import torch
    import torch.nn.functional as F
    import transformers
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, GenerationConfig
except ImportError as exc:  # pragma: no cover - only on a machine without the stack
    sys.exit(f"hf_side_by_side: missing dependency: {exc}. Needs torch, transformers>=5, safetensors.")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_reference_fixtures as mrf  # noqa: E402  (decoder layers, MoE blocks, router output parsing)

PROMPT_ID_LO, PROMPT_ID_HI = 100, 150000  # random prompt ids are drawn from [LO, HI)
TOP_LOGITS = 32
GIB = 1024 ** 3


class StageSkipped(Exception):
    """A stage that cannot run here (e.g. not enough GPU memory); printed, not a crash."""


# ----------------------------------------------------------------------------------------------
# The checkpoint on disk (no torch): tensor names, shapes, files
# ----------------------------------------------------------------------------------------------

def read_checkpoint(model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        config = json.load(f)
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"hf_side_by_side: no .safetensors file in {model_dir}")
    where, numel, nbytes, dtypes = {}, 0, 0, set()
    for name in files:
        path = os.path.join(model_dir, name)
        with open(path, "rb") as fh:
            (header_len,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(header_len))
        for key, meta in header.items():
            if key == "__metadata__":
                continue
            where[key] = path
            numel += math.prod(meta["shape"])
            nbytes += meta["data_offsets"][1] - meta["data_offsets"][0]
            dtypes.add(meta["dtype"])
    return dict(config=config, files=files, where=where, numel=numel, nbytes=nbytes, dtypes=sorted(dtypes))


def routing_facts(config):
    model_type = config.get("model_type", "")
    num_experts = config.get("num_local_experts") or config.get("num_experts")
    renorm = True if model_type == "mixtral" else bool(config.get("norm_topk_prob", False))
    return num_experts, int(config["num_experts_per_tok"]), renorm


def file_tensor(ckpt, name, rows=None):
    """A tensor (or rows [a, b) of it) read from the safetensors files, on the CPU."""
    with safe_open(ckpt["where"][name], framework="pt", device="cpu") as f:
        if rows is None:
            return f.get_tensor(name)
        return f.get_slice(name)[rows[0]:rows[1]]


# ----------------------------------------------------------------------------------------------
# GPU helpers
# ----------------------------------------------------------------------------------------------

def gpu_memory(tag):
    free, total = torch.cuda.mem_get_info()
    log(f"  GPU memory {tag}: {torch.cuda.memory_allocated() / GIB:.1f} GiB allocated by torch, "
        f"{free / GIB:.1f} of {total / GIB:.1f} GiB free")


def free_gpu():
    gc.collect()
    torch.cuda.empty_cache()


def sync_time(fn):
    torch.cuda.synchronize()
    t = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, result


def spread(values):
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def set_experts(model, impl):
    """Sets transformers 5's experts implementation; returns what the config then says."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(impl)
    else:
        model.config._experts_implementation = impl
    return getattr(model.config, "_experts_implementation", "n/a (transformers without a choice)")


def load_model(model_dir, dtype, attn, experts):
    kw = dict(dtype=dtype, attn_implementation=attn, device_map="cuda", output_loading_info=True)
    t = time.time()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, experts_implementation=experts, **kw)
    except (TypeError, ValueError) as exc:
        if "experts_implementation" not in str(exc):
            raise
        log(f"  note: from_pretrained rejected experts_implementation ({exc}); loading without it")
        model, info = AutoModelForCausalLM.from_pretrained(model_dir, **kw)
    model.eval()
    used = set_experts(model, experts)
    devices = sorted({p.device.type for p in model.parameters()})
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    log(f"  loaded {type(model).__name__} in {time.time() - t:.1f} s: parameters on {devices} as {dtypes}, "
        f"attention {getattr(model.config, '_attn_implementation', '?')}, experts {used}")
    if devices != ["cuda"]:
        raise RuntimeError(f"parameters on {devices}: expected every one on the GPU (no offloading)")
    problems = {}
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs", "conversion_errors"):
        val = (info or {}).get(key)
        if val:
            problems[key] = sorted(str(x) for x in val)[:8]
    gpu_memory("after loading")
    return model, problems


def sparse_layers_of(model):
    return mrf.sparse_layers_of(model)


# ----------------------------------------------------------------------------------------------
# Reference stage
# ----------------------------------------------------------------------------------------------

def expert_matrices(experts, e, E, inter, hidden):
    """(gate [I,H], up [I,H], down [H,I], layout) of expert e in transformers' in-memory layout, or None."""
    gu, dn = getattr(experts, "gate_up_proj", None), getattr(experts, "down_proj", None)
    if torch.is_tensor(gu) and torch.is_tensor(dn):
        if tuple(gu.shape) == (E, 2 * inter, hidden) and tuple(dn.shape) == (E, hidden, inter):
            return gu[e, :inter], gu[e, inter:], dn[e], "fused gate_up_proj [E, 2I, H]"
        if tuple(gu.shape) == (E, hidden, 2 * inter) and tuple(dn.shape) == (E, inter, hidden):
            return gu[e, :, :inter].t(), gu[e, :, inter:].t(), dn[e].t(), "fused gate_up_proj [E, H, 2I]"
        return None
    try:
        mod = experts[e]
    except (TypeError, IndexError):
        return None
    names = [("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2")]
    for g, u, d in names:
        if all(hasattr(mod, n) for n in (g, u, d)):
            return getattr(mod, g).weight, getattr(mod, u).weight, getattr(mod, d).weight, "per-expert modules"
    return None


def check_against_files(model, ckpt, sparse, E):
    """Spot checks that the loaded parameters are the checkpoint's (embedding and LM-head rows, a router,
    a bias, one expert's three matrices in transformers' fused layout)."""
    cfg = ckpt["config"]
    hidden = cfg["hidden_size"]
    inter = cfg.get("moe_intermediate_size") or cfg["intermediate_size"]
    checked = []

    def same(label, mine, theirs):
        a, b = mine.detach().float().cpu(), theirs.float()
        if tuple(a.shape) != tuple(b.shape) or not torch.equal(a, b):
            raise AssertionError(f"loaded {label} {tuple(a.shape)} differs from the checkpoint's "
                                 f"{tuple(b.shape)}: the reference would not be of this checkpoint")
        checked.append(label)

    same("model.embed_tokens.weight[100:104]", model.model.embed_tokens.weight[100:104],
         file_tensor(ckpt, "model.embed_tokens.weight", (100, 104)))
    if "lm_head.weight" in ckpt["where"]:
        same("lm_head.weight[0:4]", model.lm_head.weight[0:4], file_tensor(ckpt, "lm_head.weight", (0, 4)))
    layers = mrf.decoder_layers(model)
    last = sparse[-1]
    block = mrf.moe_block(layers[last])
    block_name = "mlp" if getattr(layers[last], "mlp", None) is block else "block_sparse_moe"
    prefix = f"model.layers.{last}.{block_name}."
    same(prefix + "gate.weight", block.gate.weight, file_tensor(ckpt, prefix + "gate.weight"))
    bias = f"model.layers.{last}.self_attn.q_proj.bias"
    if bias in ckpt["where"]:
        same(bias, layers[last].self_attn.q_proj.bias, file_tensor(ckpt, bias))
    e = E - 1
    mats = expert_matrices(block.experts, e, E, inter, hidden)
    if mats is None:
        log(f"  note: unknown in-memory expert layout ({type(block.experts).__name__}); expert spot check skipped")
    else:
        for mine, roles in zip(mats[:3], (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))):
            name = next((f"{prefix}experts.{e}.{r}.weight" for r in roles
                         if f"{prefix}experts.{e}.{r}.weight" in ckpt["where"]), None)
            if name is None:
                raise AssertionError(f"no {prefix}experts.{e}.{{{','.join(roles)}}}.weight in the checkpoint")
            same(f"{name} ({mats[3]})", mine, file_tensor(ckpt, name))
    log(f"  loaded parameters equal the checkpoint's: {', '.join(checked)}")


def weights_probe(ckpt, sparse, model):
    layers = mrf.decoder_layers(model)
    block = mrf.moe_block(layers[sparse[0]])
    block_name = "mlp" if getattr(layers[sparse[0]], "mlp", None) is block else "block_sparse_moe"
    names = [("model.embed_tokens.weight", 100), (f"model.layers.{sparse[0]}.{block_name}.gate.weight", 0)]
    if "lm_head.weight" in ckpt["where"]:
        names.append(("lm_head.weight", 0))
    return [{"name": n, "row": r, "values": [float(v) for v in file_tensor(ckpt, n, (r, r + 1))[0, :8].float().tolist()]}
            for n, r in names]


class RouterCapture:
    """Forward hooks on every MoE layer's router: its input (the post-attention-norm hidden state) and output."""

    def __init__(self, model, sparse):
        self.enabled, self.calls, self.handles = False, {}, []
        layers = mrf.decoder_layers(model)
        for i in sparse:
            gate = mrf.moe_block(layers[i]).gate
            self.handles.append(gate.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, i):
        def hook(mod, args, kwargs, output):
            if not self.enabled:
                return
            x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
            assert torch.is_tensor(x), f"layer {i}: no input tensor for the router {type(mod).__name__}"
            self.calls.setdefault(i, []).append((x.detach().reshape(-1, x.shape[-1]).clone(), output))
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def routes_of_layer(x, gate, E, k, renorm, router_out, tag):
    """Routes as transformers computes them: logits = x . W_gate^T (in the model's dtype), softmax in float32,
    top-k, renormalised when renorm. Returns (ids, weights the experts used, margin, notes)."""
    n = x.shape[0]
    logits = F.linear(x, gate.weight).float()
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    vals, ids = torch.topk(probs, k, dim=-1)
    if renorm:
        vals = vals / vals.sum(dim=-1, keepdim=True)
    top = torch.topk(probs, k + 1, dim=-1).values
    margin = top[:, k - 1] - top[:, k]
    r_ids, r_w = mrf.parse_router_output(router_out, n, E, k, tag)
    if r_ids is None:  # a router that returns logits only: the formula is what the experts use
        return ids, vals, margin, "formula (router returns logits only)"
    r_ids = r_ids.long()
    differ = (r_ids.sort(dim=-1).values != ids.sort(dim=-1).values).any(dim=-1)  # as sets
    if bool(differ.any()):
        worst = float(margin[differ].max())
        assert worst < 1e-6, f"[{tag}] router ids differ from softmax/top-k at a margin of {worst:.3g}"
    same = (r_ids == ids).all(dim=-1)  # same ids in the same order: the weights must agree slot by slot
    # float32: the same arithmetic; bfloat16 routers round their weights to bf16 (2^-8 relative)
    tol = 1e-5 if x.dtype == torch.float32 else 8e-3
    if bool(same.any()):
        err = float((r_w[same] - vals[same]).abs().max())
        assert err <= tol, f"[{tag}] router weights differ from the softmax/top-k formula by {err:.3g}"
    return r_ids, r_w.float(), margin, "router module output (checked against the formula)"


def topk_logits(row):
    v, i = torch.topk(row.float(), TOP_LOGITS)
    return {"ids": [int(x) for x in i.tolist()], "values": [float(x) for x in v.tolist()],
            "max_abs": float(row.float().abs().max())}


def finite(values, what):
    for v in values:
        if not math.isfinite(v):
            raise AssertionError(f"non-finite value in {what}")
    return values


@torch.no_grad()
def reference_stage(args, ckpt, prompts):
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.ref_dtype]
    E, k, renorm = routing_facts(ckpt["config"])
    vocab = ckpt["config"]["vocab_size"]
    n_tok = args.prompt_len + args.new_tokens
    need = ckpt["numel"] * (4 if dtype == torch.float32 else 2)
    # working memory: logits of the full forward and of generate (float32), the CUDA context, allocator slack
    work = 3 * n_tok * vocab * 4 + 2 * GIB
    free, total = torch.cuda.mem_get_info()
    log(f"reference: {ckpt['numel'] / 1e9:.2f}B parameters in {args.ref_dtype} need {need / GIB:.1f} GiB "
        f"+ ~{work / GIB:.1f} GiB working memory; the GPU has {free / GIB:.1f} of {total / GIB:.1f} GiB free")
    if need + work > free:
        raise StageSkipped(f"not enough GPU memory for the {args.ref_dtype} reference ({(need + work) / GIB:.1f} GiB "
                           f"needed, {free / GIB:.1f} GiB free); --ref-dtype bfloat16 needs half")

    log(f"  loading {args.model} in {args.ref_dtype} onto the GPU ({args.ref_attn} attention, eager experts)")
    model, problems = load_model(args.model, dtype, args.ref_attn, "eager")
    if problems:
        raise AssertionError(f"from_pretrained reports {problems}: some weights would be random, not the checkpoint's")
    sparse = sparse_layers_of(model)
    assert sparse, "no MoE layer found in the loaded model"
    check_against_files(model, ckpt, sparse, E)
    probe = weights_probe(ckpt, sparse, model)

    gc_cfg = GenerationConfig(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                              num_beams=1, eos_token_id=None, bos_token_id=None, pad_token_id=0,
                              repetition_penalty=1.0, output_scores=True, output_logits=True,
                              return_dict_in_generate=True, use_cache=True)
    model.generation_config = gc_cfg
    cap = RouterCapture(model, sparse)
    out_prompts, notes = [], set()
    min_route, min_greedy = float("inf"), float("inf")
    try:
        for p, ids in enumerate(prompts):
            t = time.time()
            x = torch.tensor([ids], device="cuda")
            P, T = len(ids), args.new_tokens
            # 1. greedy with transformers' own KV cache
            res = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc_cfg)
            seq = res.sequences
            assert tuple(seq.shape) == (1, P + T), f"generate returned {tuple(seq.shape)}, expected (1, {P + T})"
            assert torch.equal(seq[:, :P], x), "generate changed the prompt"
            raw = res.logits if getattr(res, "logits", None) is not None else res.scores
            raw = torch.stack([r[0].float() for r in raw])  # [T, vocab]
            scores = torch.stack([s[0].float() for s in res.scores])
            assert torch.equal(raw, scores), "generation scores != raw logits: a logits processor is active"
            greedy = seq[0, P:]
            assert torch.equal(raw.argmax(-1), greedy), "generated tokens are not the argmax of the step logits"
            top2 = torch.topk(raw, 2, dim=-1).values
            margins = finite([float(m) for m in (top2[:, 0] - top2[:, 1]).tolist()], "greedy_margins")
            steps = [topk_logits(raw[s]) for s in range(T)]
            # 2. one full forward over prompt + greedy tokens 0..T-2, every router hooked
            full_ids = seq[:, :P + T - 1]
            cap.calls.clear()
            cap.enabled = True
            out = model(input_ids=full_ids, use_cache=False, output_router_logits=True)
            cap.enabled = False
            full = out.logits[0, P - 1:].float()
            kv_rel = float((full - raw).abs().max()) / max(float(raw.abs().max()), 1e-30)
            for s, (a, b) in enumerate(zip(full.argmax(-1).tolist(), greedy.tolist())):
                if a != b:
                    log(f"  WARNING: prompt {p} step {s}: the full forward picks {a}, the cached decode {b} "
                        f"(margin {margins[s]:.2e})")
            routes, decode_routes = [], []
            rl = getattr(out, "router_logits", None)
            rl = [r for r in rl if r is not None] if rl is not None else None
            if rl is not None and len(rl) != len(sparse):
                log(f"  note: output_router_logits gave {len(rl)} tensors for {len(sparse)} MoE layers; cross-check skipped")
                rl = None
            for li, layer in enumerate(sparse):
                calls = cap.calls.get(layer, [])
                assert len(calls) == 1, f"layer {layer}: router called {len(calls)} times in one forward"
                xin, rout = calls[0]
                assert xin.shape[0] == P + T - 1, f"layer {layer}: router saw {xin.shape[0]} tokens"
                gate = mrf.moe_block(mrf.decoder_layers(model)[layer]).gate
                r_ids, r_w, margin, note = routes_of_layer(xin, gate, E, k, renorm, rout, f"prompt {p} layer {layer}")
                notes.add(note)
                if rl is not None:  # second path: transformers' own router-logits output
                    ids2 = torch.topk(rl[li].reshape(-1, rl[li].shape[-1]).float(), k, dim=-1).indices
                    differ = (ids2.sort(dim=-1).values != r_ids.sort(dim=-1).values).any(dim=-1)  # as sets
                    if bool(differ.any()):
                        assert float(margin[differ].max()) < 1e-6, \
                            f"layer {layer}: output_router_logits top-k != hooked routes"
                ids_l = [[int(e) for e in row] for row in r_ids.tolist()]
                w_l = [[float(w) for w in row] for row in r_w.tolist()]
                m_l = finite([float(m) for m in margin.tolist()], "route margins")
                routes.append({"layer": layer, "topk_ids": ids_l[:P], "topk_weights": w_l[:P], "margin": m_l[:P]})
                decode_routes.append({"layer": layer, "topk_ids": ids_l[P:], "topk_weights": w_l[P:],
                                      "margin": m_l[P:]})
                min_route = min(min_route, min(m_l))
            cap.calls.clear()
            min_greedy = min(min_greedy, min(margins))
            near_routes = sum(m < 1e-2 for r in routes + decode_routes for m in r["margin"])
            out_prompts.append({"prompt_ids": [int(i) for i in ids],
                                "greedy_ids": [int(i) for i in greedy.tolist()],
                                "greedy_margins": margins,
                                "last_logits_top": {"ids": steps[0]["ids"], "values": steps[0]["values"]},
                                "last_logits_max_abs": steps[0]["max_abs"],
                                "step_logits_top": steps,
                                "routes": routes, "decode_routes": decode_routes})
            log(f"  prompt {p}: {P} tokens, greedy {[int(i) for i in greedy[:8].tolist()]}..., "
                f"min greedy margin {min(margins):.3g} ({sum(m < 1e-2 for m in margins)} steps < 1e-2), "
                f"route margins < 1e-2: {near_routes} of {len(sparse) * (P + T - 1)}, "
                f"cached decode vs full forward rel {kv_rel:.2e}, {time.time() - t:.1f} s")
            del res, out, full, raw, scores
    finally:
        cap.remove()
    log(f"  routes taken from: {'; '.join(sorted(notes))}")
    ref = {"model": os.path.abspath(args.model), "arch": (ckpt["config"].get("architectures") or ["?"])[0],
           "sparse_layers": sparse, "num_experts": E, "top_k": k, "renormalize_topk": renorm,
           "new_tokens": args.new_tokens, "prompt_len": args.prompt_len, "seed": args.seed,
           "ref_dtype": args.ref_dtype, "attn_implementation": getattr(model.config, "_attn_implementation", "?"),
           "experts_implementation": getattr(model.config, "_experts_implementation", "n/a"),
           "transformers_version": transformers.__version__, "torch_version": torch.__version__,
           "device": torch.cuda.get_device_name(0), "weights_probe": probe, "prompts": out_prompts}
    path = os.path.join(args.out, "reference.json")
    with open(path, "w") as f:
        f.write(json.dumps(ref, separators=(",", ":"), allow_nan=False))
        f.write("\n")
    log(f"SUMMARY reference: {len(out_prompts)} prompts x ({args.prompt_len} + {args.new_tokens}) tokens, "
        f"{len(sparse)} MoE layers, min route margin {min_route:.3g}, min greedy margin {min_greedy:.3g}; "
        f"wrote {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    del model
    return path


# ----------------------------------------------------------------------------------------------
# transformers' own bf16 routes against its float32 reference (in the throughput stage's bf16 model)
# ----------------------------------------------------------------------------------------------

@torch.no_grad()
def bf16_routes(args, ckpt, model):
    """Routes of transformers in bfloat16 (the model the throughput stage times) for the reference's
    tokens: one forward over each prompt + its float32 greedy tokens 0..T-2, every router hooked. Compared
    with the float32 routes as sets of experts per (token, layer); the summary goes into reference.json
    ("transformers_bf16_routes"), where tests/cuda_real_size_test.cpp sets moescope's bf16 mode beside it."""
    path = os.path.join(args.out, "reference.json")
    if not os.path.exists(path):
        log("  bf16 routes: no reference.json in --out (the reference stage did not run); skipped")
        return None
    with open(path) as f:
        ref = json.load(f)
    E, k, renorm = routing_facts(ckpt["config"])
    sparse = sparse_layers_of(model)
    if sparse != ref["sparse_layers"]:
        raise AssertionError(f"bf16 model's MoE layers {sparse} != the reference's {ref['sparse_layers']}")
    cap = RouterCapture(model, sparse)
    pairs = agree = 0
    ge_tie, margins = 0, []
    try:
        for p, pr in enumerate(ref["prompts"]):
            ids = pr["prompt_ids"] + pr["greedy_ids"][:-1]
            P = len(pr["prompt_ids"])
            cap.calls.clear()
            cap.enabled = True
            model(input_ids=torch.tensor([ids], device="cuda"), use_cache=False)
            cap.enabled = False
            for layer, r_pre, r_dec in zip(sparse, pr["routes"], pr["decode_routes"]):
                xin, rout = cap.calls[layer][0]
                gate = mrf.moe_block(mrf.decoder_layers(model)[layer]).gate
                r_ids, _, _, _ = routes_of_layer(xin, gate, E, k, renorm, rout, f"bf16 prompt {p} layer {layer}")
                got = r_ids.tolist()
                want = r_pre["topk_ids"] + r_dec["topk_ids"]
                margin = r_pre["margin"] + r_dec["margin"]
                assert len(got) == len(want) == P + len(pr["greedy_ids"]) - 1
                for g, w, m in zip(got, want, margin):
                    pairs += 1
                    if sorted(g) == sorted(w):
                        agree += 1
                    else:
                        margins.append(m)
                        ge_tie += m >= 1e-2
            cap.calls.clear()
    finally:
        cap.remove()
    summary = {"pairs": pairs, "agree": agree, "agreement": agree / pairs, "disagreements_at_margin_ge_1e-2": ge_tie,
               "largest_disagreement_margin": max(margins) if margins else 0.0, "dtype": "bfloat16",
               "attn_implementation": getattr(model.config, "_attn_implementation", "?"),
               "experts_implementation": getattr(model.config, "_experts_implementation", "n/a"),
               "how": "one forward over prompt + float32 greedy tokens 0..T-2; top-k sets vs the float32 reference"}
    ref["transformers_bf16_routes"] = summary
    with open(path, "w") as f:
        f.write(json.dumps(ref, separators=(",", ":"), allow_nan=False))
        f.write("\n")
    log(f"SUMMARY hf bf16 routes vs float32: {agree} of {pairs} agree ({100 * agree / pairs:.3f}%), "
        f"{ge_tie} disagreements at a margin >= 1e-2; added to {path}")
    return summary


# ----------------------------------------------------------------------------------------------
# Throughput stage
# ----------------------------------------------------------------------------------------------

def make_generation_config(new_tokens):
    return GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, num_beams=1,
                            eos_token_id=None, bos_token_id=None, pad_token_id=0, repetition_penalty=1.0,
                            use_cache=True, return_dict_in_generate=False)


def generate(model, x, new_tokens):
    gcfg = make_generation_config(new_tokens)
    model.generation_config = gcfg
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gcfg)
    assert tuple(out.shape) == (x.shape[0], x.shape[1] + new_tokens), \
        f"generate returned {tuple(out.shape)} for {tuple(x.shape)} + {new_tokens}"
    return out


def prefill_forward(model, x):
    try:
        return model(input_ids=x, use_cache=False, logits_to_keep=1)
    except TypeError as exc:  # a transformers without logits_to_keep: all positions' logits
        if "logits_to_keep" not in str(exc):
            raise
        return model(input_ids=x, use_cache=False)


def pick_experts(model, args, x):
    """The experts implementation to time with: the given one, or the faster of grouped_mm and eager on a
    16-token batch-1 generate (after a warm-up), when both give the same greedy tokens' logits to bf16 noise."""
    candidates = ["grouped_mm", "eager"] if args.experts_impl == "auto" else [args.experts_impl]
    times, first_logits = {}, None
    for impl in candidates:
        try:
            used = set_experts(model, impl)
            logits = prefill_forward(model, x).logits[0, -1].float()
            if first_logits is None:
                first_logits = logits
            rel = float((logits - first_logits).abs().max()) / max(float(first_logits.abs().max()), 1e-30)
            generate(model, x, 4)  # warm-up
            seconds, _ = sync_time(lambda: generate(model, x, 16))
            times[impl] = seconds
            log(f"  experts '{impl}' (config says {used}): 16-token generate {seconds * 1e3:.0f} ms; last logits "
                f"vs '{candidates[0]}' rel {rel:.2e}")
        except Exception as exc:  # noqa: BLE001 - an implementation that fails here is simply not used
            log(f"  experts '{impl}' not usable: {type(exc).__name__}: {str(exc)[:300]}")
            free_gpu()
    if not times:
        raise RuntimeError(f"no experts implementation of {candidates} ran")
    best = min(times, key=times.get)
    set_experts(model, best)
    log(f"  timing with experts '{best}'")
    return best, times


@torch.no_grad()
def throughput_stage(args, ckpt):
    vocab = ckpt["config"]["vocab_size"]
    hi = min(PROMPT_ID_HI, vocab)
    gen = torch.Generator().manual_seed(args.seed + 1)
    log(f"  loading {args.model} in bfloat16 onto the GPU (sdpa attention)")
    model, problems = load_model(args.model, torch.bfloat16, "sdpa",
                                 "grouped_mm" if args.experts_impl == "auto" else args.experts_impl)
    if problems:
        log(f"  WARNING: from_pretrained reports {problems} (speed is still measured)")
    try:
        bf16_routes(args, ckpt, model)
    except Exception:  # noqa: BLE001 - reported; the throughput is still measured
        log(f"  bf16 routes FAILED:\n{traceback.format_exc()}")
    x1 = torch.randint(PROMPT_ID_LO, hi, (1, args.tp_prompt_len), generator=gen).cuda()
    impl, impl_times = pick_experts(model, args, x1)
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
              "model": os.path.abspath(args.model), "dtype": "bfloat16",
              "attn_implementation": getattr(model.config, "_attn_implementation", "?"),
              "experts_implementation": impl, "experts_candidates_16_token_seconds": impl_times,
              "cache": "transformers' default (DynamicCache)", "prompt_len": args.tp_prompt_len,
              "new_tokens": args.tp_new_tokens, "repeats": args.repeats,
              "decode_rate": "batch * (new_tokens - 1) / (t(generate new_tokens) - t(generate 1))"}

    # prefill: one forward of 1 x prefill_tokens
    try:
        xp = torch.randint(PROMPT_ID_LO, hi, (1, args.prefill_tokens), generator=gen).cuda()
        prefill_forward(model, xp)  # warm-up
        rates = [args.prefill_tokens / sync_time(lambda: prefill_forward(model, xp))[0] for _ in range(args.repeats)]
        s = spread(rates)
        result["prefill"] = {"tokens": args.prefill_tokens, "tokens_per_s_median": s["median"], "min": s["min"],
                             "max": s["max"]}
        log(f"SUMMARY hf prefill 1x{args.prefill_tokens}: {s['median']:.1f} tok/s (min {s['min']:.1f}, max {s['max']:.1f} "
            f"over {args.repeats})")
        del xp
    except torch.cuda.OutOfMemoryError as exc:
        log(f"  prefill 1x{args.prefill_tokens}: OUT OF GPU MEMORY ({str(exc)[:200]}); going on")
        result["prefill"] = {"tokens": args.prefill_tokens, "error": "out of GPU memory"}
        free_gpu()

    result["decode"] = []
    T = args.tp_new_tokens
    for b in args.tp_batches:
        try:
            x = torch.randint(PROMPT_ID_LO, hi, (b, args.tp_prompt_len), generator=gen).cuda()
            generate(model, x, 8)  # warm-up (kernels, allocator, cache growth)
            rates, e2e, first, same = [], [], None, True
            for r in range(args.repeats):
                t_full, out = sync_time(lambda: generate(model, x, T))
                t_one, _ = sync_time(lambda: generate(model, x, 1))
                rates.append(b * (T - 1) / max(t_full - t_one, 1e-9))
                e2e.append(b * T / t_full)
                ids = out[:, x.shape[1]:].tolist()
                first = ids if first is None else first
                same &= ids == first
                log(f"  batch {b} run {r}: generate({T}) {t_full:.2f} s, generate(1) {t_one:.3f} s -> decode "
                    f"{rates[-1]:.1f} tok/s, end to end {e2e[-1]:.1f} tok/s")
            s, se = spread(rates), spread(e2e)
            result["decode"].append({"batch_size": b, "tokens_per_s_median": s["median"], "min": s["min"],
                                     "max": s["max"], "end_to_end_tokens_per_s_median": se["median"],
                                     "same_tokens_every_run": same})
            log(f"SUMMARY hf decode batch {b}: {s['median']:.1f} tok/s (min {s['min']:.1f}, max {s['max']:.1f} over "
                f"{args.repeats}; with prefill {se['median']:.1f} tok/s){'' if same else '  tokens differ between runs'}")
            del x, out
        except torch.cuda.OutOfMemoryError as exc:
            log(f"  decode batch {b}: OUT OF GPU MEMORY ({str(exc)[:200]}); going on")
            result["decode"].append({"batch_size": b, "error": "out of GPU memory"})
            free_gpu()
    del model
    path = os.path.join(args.out, "hf_throughput.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    log(f"SUMMARY hf {result['gpu']}, torch {result['torch']}, transformers {result['transformers']}, bf16, "
        f"{result['attn_implementation']} attention, experts {impl}; wrote {path}")
    return result


# ----------------------------------------------------------------------------------------------

def int_list(text):
    return [int(v) for v in text.split(",") if v.strip()]


def main():
    ap = argparse.ArgumentParser(description="transformers beside moescope's CUDA backend on a real-size checkpoint")
    ap.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
    ap.add_argument("--out", required=True, help="output directory: reference.json, hf_throughput.json")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ref-dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--ref-attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--tp-batches", type=int_list, default=[1, 8])
    ap.add_argument("--tp-prompt-len", type=int, default=128)
    ap.add_argument("--tp-new-tokens", type=int, default=128)
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--experts-impl", choices=["auto", "grouped_mm", "eager"], default="auto")
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    if args.prompts < 1 or args.prompt_len < 1 or args.new_tokens < 2 or args.repeats < 1 or args.tp_new_tokens < 2:
        ap.error("--prompts, --prompt-len, --repeats must be positive; --new-tokens and --tp-new-tokens at least 2")

    log(f"hf_side_by_side: transformers {transformers.__version__}, torch {torch.__version__}, "
        f"python {sys.version.split()[0]}")
    if not torch.cuda.is_available():
        sys.exit("hf_side_by_side: no CUDA device; this script runs transformers on the GPU only "
                 "(a CPU run at this size would take hours)")
    log(f"GPU: {torch.cuda.get_device_name(0)}")
    # TF32 off: float32 products in full float32 (the reference); no effect on the bf16 throughput stage. The
    # legacy flags, as tools/train_default_model.py sets them (one API only: torch refuses a mix of the two).
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    os.makedirs(args.out, exist_ok=True)
    ckpt = read_checkpoint(args.model)
    cfg = ckpt["config"]
    E, k, renorm = routing_facts(cfg)
    log(f"checkpoint {args.model}: {ckpt['files']}, {len(ckpt['where'])} tensors, {ckpt['numel'] / 1e9:.2f}B "
        f"parameters, {ckpt['nbytes'] / 1e9:.1f} GB {ckpt['dtypes']}; {cfg.get('architectures')}, "
        f"{cfg['num_hidden_layers']} layers, hidden {cfg['hidden_size']}, {E} experts top-{k} "
        f"(renormalised: {renorm}), vocab {cfg['vocab_size']}")

    gen = torch.Generator().manual_seed(args.seed)
    hi = min(PROMPT_ID_HI, cfg["vocab_size"])
    prompts = torch.randint(PROMPT_ID_LO, hi, (args.prompts, args.prompt_len), generator=gen).tolist()

    failures = []

    def stage(name, fn, *a):
        log(f"=== {name} ===")
        t = time.time()
        try:
            fn(*a)
            log(f"=== {name} done in {time.time() - t:.1f} s ===")
        except StageSkipped as exc:
            log(f"=== {name} SKIPPED: {exc} ===")
            failures.append(name)
        except torch.cuda.OutOfMemoryError as exc:
            log(f"=== {name} OUT OF GPU MEMORY after {time.time() - t:.1f} s: {str(exc)[:400]}; "
                f"going on to the next stage ===")
            failures.append(name)
        except Exception:  # noqa: BLE001 - reported; the next stage still runs
            log(f"=== {name} FAILED after {time.time() - t:.1f} s ===\n{traceback.format_exc()}")
            failures.append(name)
        free_gpu()
        gpu_memory(f"after {name}")

    if not args.skip_reference:
        stage("reference", reference_stage, args, ckpt, prompts)
    if not args.skip_throughput:
        stage("throughput", throughput_stage, args, ckpt)
    log(f"SUMMARY hf_side_by_side done in {time.time() - T0:.0f} s; failed stages: {failures or 'none'}")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
