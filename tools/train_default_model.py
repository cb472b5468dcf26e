#!/usr/bin/env python3
# train_default_model.py -- train moescope's default model, models/moescope-tiny-gsm8k: a small
# Qwen2-MoE (Qwen2MoeForCausalLM, built and trained by Hugging Face transformers) with its own
# byte-level BPE tokenizer, on the GSM8K train split only; then evaluate it and write the fixtures of
# tests/default_model_test.cpp. Needs one CUDA GPU, torch 2.9+, transformers 5.x, tokenizers,
# safetensors; no network. docs/DEFAULT_MODEL.md describes the model and the figures this printed.
#
# Exact command (run from the repository root on the GPU machine; the data is GSM8K's train.jsonl and
# test.jsonl copied into an ignored folder, see docs/DEFAULT_MODEL.md):
#
#     python3 tools/train_default_model.py --data .device-data/gsm8k --work /tmp/moescope-train \
#         --steps 1300 --experts-impl grouped_mm --aux-coef 0.0003
#
# --steps auto (the default) picks min(--max-epochs epochs, what fits --time-budget seconds at the
# step time measured before training) and prints the number it chose; give that number to repeat a
# run. --smoke runs the whole pipeline for a few steps on a data subset (seconds); --smoke-first does
# that and then the real run in the same process. --export DIR packs the outputs into DIR as they
# become ready (model.tgz*, results.tgz), split into parts under 15 MiB. --evaluate MODEL_DIR skips
# training and runs only the evaluation and the fixtures on a checkpoint already made (about a minute):
#
#     python3 tools/train_default_model.py --data .device-data/gsm8k --work /tmp/moescope-eval \
#         --evaluate models/moescope-tiny-gsm8k --export $OUT
#
# What it writes under --work:
#   model/      config.json, model.safetensors (bf16, per-expert hub tensor names), tokenizer.json,
#               tokenizer_config.json, generation_config.json  -> models/moescope-tiny-gsm8k/
#   fixtures/   reference.json, tokenizer_golden.json, chat_template.json -> tests/fixtures/default_model/
#   report/     train_log.json (loss curve), eval.json (perplexities, samples), loss_curve.png
#
# Fixture formats (tests/fixtures/default_model/, read by tests/default_model_test.cpp):
#   reference.json: as tools/README.md's reference.json (sparse_layers, num_experts, top_k, versions,
#     prompts[].prompt_ids / greedy_ids / greedy_margins / routes[]) plus per prompt "text", "chat",
#     "messages" (chat prompts), "last_logits_top" {ids, values} (the 32 largest last-position logits),
#     "last_logits_max_abs", and "decode_routes" (routes of the generated tokens fed back, i.e. greedy
#     tokens 0..N-2, from a full forward over prompt + greedy tokens). All from the bf16 checkpoint on
#     disk reloaded in float32 with eager attention and eager experts on the CPU.
#   tokenizer_golden.json: as tests/fixtures/tokenizer/qwen_golden.json (tools/make_tokenizer_fixtures.py).
#   chat_template.json: cases[] {messages, add_generation_prompt, text, ids}: transformers'
#     apply_chat_template(tokenize=False) and the tokenizers ids of that text.
#
# Determinism: every random choice is seeded (--seed); the GPU's atomic adds (the MoE scatter, index_add_)
# make bitwise-identical reruns unlikely, the figures should agree to a few units in the last digit shown.

import argparse
import copy
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import sys
import tarfile
import time
import traceback
import types
import unicodedata

T0 = time.time()


def log(msg=""):
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


try:
    import torch
    import torch.nn.functional as F
    import transformers
    import tokenizers
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, GenerationConfig
except ImportError as exc:  # pragma: no cover - only on a machine without the stack
    sys.exit(f"train_default_model: missing dependency: {exc}. Needs torch, transformers>=5, tokenizers.")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import make_reference_fixtures as ref  # noqa: E402  (checkpoint writing, reloading and route checks)

# ---------------------------------------------------------------------------------------------------
# The model and its tokenizer
# ---------------------------------------------------------------------------------------------------

MODEL_NAME = "moescope-tiny-gsm8k"
VOCAB = 4096
HIDDEN = 256
MAX_POS = 2048
ROPE_THETA = 10000.0
ARCH = dict(num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=512,                # the dense layer's MLP
            moe_intermediate_size=64, shared_expert_intermediate_size=128,
            num_experts=16, num_experts_per_tok=2, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[3],  # layer 3 dense, the other 7 MoE
            tie_word_embeddings=True,             # keeps the bf16 file under 20 MB
            rms_norm_eps=1e-6, use_sliding_window=False, qkv_bias=True)
MAX_FILE_BYTES = 20_000_000
FIXTURE_NEW_TOKENS = 32

# make_reference_fixtures.py reads these module globals; its helpers then work for this model.
ref.HIDDEN, ref.VOCAB, ref.MAX_POS, ref.NEW_TOKENS = HIDDEN, VOCAB, MAX_POS, FIXTURE_NEW_TOKENS

EOT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIALS = [EOT, IM_START, IM_END]
SYSTEM = "You are a helpful assistant."
# Qwen1.5's ChatML template, byte for byte (a default system message when the conversation has none).
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# Qwen2/2.5/3's pre-tokenizer, as in their tokenizer.json: digits one by one, then bytes.
QWEN_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                      r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
QWEN_PRE_TOKENIZER = {"type": "Sequence", "pretokenizers": [
    {"type": "Split", "pattern": {"Regex": QWEN_SPLIT_PATTERN}, "behavior": "Isolated", "invert": False},
    dict(BYTE_LEVEL)]}


def chat_text(question, answer=None):
    """The Qwen1.5 template rendered for [user question (, assistant answer)]."""
    s = f"{IM_START}system\n{SYSTEM}{IM_END}\n{IM_START}user\n{question}{IM_END}\n{IM_START}assistant\n"
    return s if answer is None else s + answer + IM_END + "\n"


def raw_text(question, answer):
    # A space, not a newline: the pre-tokenizer joins punctuation and the newlines after it ("?\n" is one
    # piece), so with a newline a bare question's final "?" would be a token only ChatML text ever has,
    # and a raw prompt would be answered as a chat turn. "? Janet" splits into "?" and " Janet".
    return question + " " + answer


# ---------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------

def load_jsonl(path):
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            r = json.loads(line)
            assert isinstance(r.get("question"), str) and isinstance(r.get("answer"), str), f"{path}:{n}: no question/answer"
            rows.append({"question": r["question"], "answer": r["answer"]})
    assert rows, f"{path}: empty"
    return rows


def split_train(train_rows, seed, n_val=150):
    """A seeded held-out slice of the train split (for the validation loss), and the problems trained on."""
    order = list(range(len(train_rows)))
    random.Random(seed).shuffle(order)
    return [train_rows[i] for i in order[:n_val]], [train_rows[i] for i in order[n_val:]]


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------

SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIALS))


def train_tokenizer(texts, vocab_size):
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # Special tokens are not in the text the merges are learnt from: split them out.
    pieces = [p for t in texts for p in SPECIAL_RE.split(t) if p]
    tok.train_from_iterator(pieces, trainer=trainer, length=len(pieces))
    j = json.loads(tok.to_str())
    # The same pipeline blocks as Qwen's tokenizer.json, written out explicitly.
    j["normalizer"] = {"type": "NFC"}
    j["pre_tokenizer"] = copy.deepcopy(QWEN_PRE_TOKENIZER)
    j["post_processor"] = dict(BYTE_LEVEL)
    j["decoder"] = dict(BYTE_LEVEL)
    m = j["model"]
    assert m["type"] == "BPE", m["type"]
    m.update({"dropout": None, "unk_token": None, "continuing_subword_prefix": "", "end_of_word_suffix": "",
              "fuse_unk": False, "byte_fallback": False, "ignore_merges": False})
    added = {a["content"]: a for a in j["added_tokens"]}
    for s in SPECIALS:
        assert s in added and added[s]["special"], f"special token {s} missing from added_tokens: {list(added)}"
        assert m["vocab"].get(s) == added[s]["id"], f"{s}: vocab id {m['vocab'].get(s)} != added id {added[s]['id']}"
        assert not added[s]["normalized"], f"{s} is marked normalized"
    text = json.dumps(j, ensure_ascii=False)
    tok = Tokenizer.from_str(text)
    back = json.loads(tok.to_str())
    assert back["pre_tokenizer"] == QWEN_PRE_TOKENIZER, f"pre_tokenizer did not survive: {back['pre_tokenizer']}"
    assert back["normalizer"] == {"type": "NFC"}, back["normalizer"]
    return tok, text


def tokenizer_config(eos):
    added = {}
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": MAX_POS,
        "pad_token": EOT,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_tokenizer_files(tok, tok_json_text, out_dir, tokenizer_class):
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        f.write(tok_json_text)
    cfg = tokenizer_config(IM_END)
    cfg["tokenizer_class"] = tokenizer_class
    for s in SPECIALS:
        cfg["added_tokens_decoder"][str(tok.token_to_id(s))] = {
            "content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False, "special": True}
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2, ensure_ascii=False)
        f.write("\n")


def check_hf_tokenizer(tok_dir, tok, texts, questions):
    """transformers' tokenizer for the directory must encode as `tokenizers` does and render the template as
    chat_text() does. Returns (the HF tokenizer, the tokenizer_class that passed), or (None, None)."""
    cfg_path = os.path.join(tok_dir, "tokenizer_config.json")
    for cls in ("Qwen2Tokenizer", "PreTrainedTokenizerFast", "TokenizersBackend"):
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
        cfg["tokenizer_class"] = cls
        with open(cfg_path, "w", encoding="utf-8") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)
            f.write("\n")
        try:
            hf = AutoTokenizer.from_pretrained(tok_dir)
            bad = [t for t in texts
                   if hf(t, add_special_tokens=False)["input_ids"] != tok.encode(t, add_special_tokens=False).ids]
            assert not bad, f"{len(bad)} of {len(texts)} texts encode differently, e.g. {bad[0][:80]!r}"
            for q in questions:
                r = hf.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                assert r == chat_text(q), f"chat template renders {r!r}, expected {chat_text(q)!r}"
                r = hf.apply_chat_template([{"role": "user", "content": q}, {"role": "assistant", "content": "A."}],
                                           tokenize=False)
                assert r == chat_text(q, "A."), f"chat template renders {r!r}"
            log(f"  transformers loads the tokenizer as {type(hf).__name__} (tokenizer_class {cls}): "
                f"{len(texts)} texts encode to the same ids, the chat template renders as expected")
            return hf, cls
        except Exception as exc:  # noqa: BLE001 - try the next class, report each failure
            log(f"  tokenizer_class {cls}: {type(exc).__name__}: {str(exc)[:300]}")
    log("WARNING: transformers does not load the tokenizer consistently; chat fixtures fall back to chat_text()")
    return None, None


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------

def build_model(seed, ids, aux_coef):
    case = dict(name=MODEL_NAME, family="qwen2_moe", seed=seed, rope_theta=ROPE_THETA, cfg=dict(ARCH))
    geo = ref.Geo(case)
    cfg, rope_style = ref.build_config(case)
    cfg.bos_token_id = ids[EOT]
    cfg.eos_token_id = ids[IM_END]
    cfg.pad_token_id = ids[EOT]
    cfg.router_aux_loss_coef = aux_coef
    cfg.output_router_logits = False
    torch.manual_seed(seed)
    model = transformers.Qwen2MoeForCausalLM(cfg)
    ref.check_model_structure(model, geo, "built")
    # Every matrix must start random: a zero-initialised router would send every token to experts 0..k-1.
    g = torch.Generator().manual_seed(seed + 1)
    std = float(getattr(cfg, "initializer_range", 0.02))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and float(p.float().std()) == 0.0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
                log(f"  {name} {tuple(p.shape)} was constant after init: drawn from N(0, {std}^2)")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"model: {n_params:,} parameters (tied embeddings counted once), sparse layers {geo.sparse}, "
        f"rope via {rope_style}, experts implementation default "
        f"{getattr(model.config, '_experts_implementation', 'n/a')}, attention {getattr(model.config, '_attn_implementation', '?')}")
    return model, geo, case, n_params


def experts_modules(model, geo, check_layout=False):
    mods = [ref.moe_block(ref.decoder_layers(model)[i]).experts for i in geo.sparse]
    if check_layout:
        for m in mods:
            assert tuple(m.gate_up_proj.shape) == (ARCH["num_experts"], 2 * ARCH["moe_intermediate_size"], HIDDEN), \
                f"experts.gate_up_proj {tuple(m.gate_up_proj.shape)}: not the fused [E, 2I, H] layout assumed here"
            assert tuple(m.down_proj.shape) == (ARCH["num_experts"], HIDDEN, ARCH["moe_intermediate_size"]), \
                f"experts.down_proj {tuple(m.down_proj.shape)}"
    return mods


def grouped_bf16_forward(self, hidden_states, top_k_index, top_k_weights):
    """Training-only expert path: transformers' grouped_mm maths (tokens sorted by expert, one grouped GEMM
    for gate/up and one for down) with the operands cast to bf16 explicitly, so it runs whatever autocast
    does with torch._grouped_mm. Checked against the eager experts before it is used."""
    shape = hidden_states.shape
    hidden_states = hidden_states.reshape(-1, shape[-1])
    n = hidden_states.shape[0]
    top_k_index = top_k_index.reshape(n, -1)
    k = top_k_index.shape[1]
    num_experts = self.gate_up_proj.shape[0]
    if top_k_weights.numel() == n * num_experts and num_experts != k:  # dense [N, E] scores (Mixtral-style routers)
        top_k_weights = top_k_weights.reshape(n, num_experts).gather(1, top_k_index)
    assert top_k_weights.numel() == n * k, f"top_k_weights {tuple(top_k_weights.shape)} for {n} tokens x top-{k}"
    flat_ids = top_k_index.reshape(-1)
    token_idx = torch.arange(n, device=hidden_states.device).repeat_interleave(k)
    perm = torch.argsort(flat_ids, stable=True)
    token_g = token_idx[perm]
    x_g = hidden_states[token_g].to(torch.bfloat16)
    w_g = top_k_weights.reshape(-1)[perm]
    counts = torch.bincount(flat_ids, minlength=num_experts)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    gate_up = torch._grouped_mm(x_g, self.gate_up_proj.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    gate, up = gate_up.chunk(2, dim=-1)
    h = self.act_fn(gate) * up
    y = torch._grouped_mm(h, self.down_proj.to(torch.bfloat16).transpose(-2, -1), offs=offs)
    y = y.float() * w_g.float().unsqueeze(-1)
    out = torch.zeros(hidden_states.shape, dtype=torch.float32, device=hidden_states.device)
    out.index_add_(0, token_g, y)
    return out.to(hidden_states.dtype).reshape(shape)


def set_experts_impl(model, geo, name):
    mods = experts_modules(model, geo, check_layout=(name == "grouped_bf16"))
    for m in mods:
        m.__dict__.pop("forward", None)
    stock = "eager" if name == "grouped_bf16" else name
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation(stock)
    else:
        model.config._experts_implementation = stock
    if name == "grouped_bf16":
        for m in mods:
            m.forward = types.MethodType(grouped_bf16_forward, m)


class RouterLogits:
    """Forward hooks on the routers: the raw router logits of every MoE layer, for the load-balancing loss."""

    def __init__(self, model, geo):
        self.logits = []
        self.handles = [ref.moe_block(ref.decoder_layers(model)[i]).gate.register_forward_hook(self._hook,
                                                                                              with_kwargs=True)
                        for i in geo.sparse]

    def _hook(self, mod, args, kwargs, output):
        x = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values()), None))
        assert torch.is_tensor(x), f"router {type(mod).__name__}: no input tensor"
        self.logits.append(F.linear(x.reshape(-1, mod.weight.shape[1]), mod.weight).float())

    def remove(self):
        for h in self.handles:
            h.remove()


def load_balancing_loss(router_logits, num_experts, top_k, valid):
    """Switch Transformer's auxiliary loss (eqs. 4-6), as transformers' load_balancing_loss_func computes it,
    per MoE layer over the real (not padding) tokens and averaged over layers: num_experts * sum_e f_e * P_e,
    which is top_k when the load is balanced. valid: [B*L] bool."""
    losses = []
    for logits in router_logits:
        assert logits.shape[0] == valid.shape[0], f"router logits {tuple(logits.shape)} for {valid.shape[0]} tokens"
        probs = torch.softmax(logits[valid], dim=-1)
        sel = torch.topk(probs, top_k, dim=-1).indices
        tokens_per_expert = F.one_hot(sel, num_experts).float().mean(dim=0)  # [top_k, E]
        prob_per_expert = probs.mean(dim=0)                                   # [E]
        losses.append(num_experts * (tokens_per_expert * prob_per_expert.unsqueeze(0)).sum())
    return torch.stack(losses).mean()


def lm_loss(model, x, y, reduction="mean"):
    """Cross-entropy over the targets that are not -100 (padding)."""
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=x, use_cache=False).logits
    assert logits.shape == (x.shape[0], x.shape[1], VOCAB), f"logits {tuple(logits.shape)}"
    return F.cross_entropy(logits.float().reshape(-1, VOCAB), y.reshape(-1), ignore_index=-100, reduction=reduction)


def pick_experts_impl(model, geo, batch, hooks, aux_coef):
    """The fastest expert implementation whose loss equals the eager one's on a real batch."""
    x, y = batch
    results = {}
    ref_loss = None
    for name in ("eager", "grouped_bf16", "grouped_mm"):
        try:
            set_experts_impl(model, geo, name)
            with torch.no_grad():
                hooks.logits.clear()
                loss = lm_loss(model, x, y).item()
            if ref_loss is None:
                ref_loss = loss
            assert math.isfinite(loss) and abs(loss - ref_loss) < 2e-2, f"loss {loss} vs eager {ref_loss}"
            times = []
            for i in range(5):
                torch.cuda.synchronize()
                t = time.time()
                hooks.logits.clear()
                total = lm_loss(model, x, y) + aux_coef * load_balancing_loss(
                    hooks.logits, ARCH["num_experts"], ARCH["num_experts_per_tok"], (y != -100).reshape(-1))
                total.backward()
                torch.cuda.synchronize()
                times.append(time.time() - t)
            model.zero_grad(set_to_none=True)
            bad = [n for n, p in model.named_parameters() if p.grad is not None]
            assert not bad
            results[name] = sorted(times[2:])[1]
            log(f"  experts '{name}': loss {loss:.5f} (eager {ref_loss:.5f}), fwd+bwd {results[name] * 1e3:.1f} ms")
        except Exception as exc:  # noqa: BLE001 - an implementation that fails is simply not used
            model.zero_grad(set_to_none=True)
            log(f"  experts '{name}' not usable: {type(exc).__name__}: {str(exc)[:300]}")
    assert "eager" in results, "the eager experts failed: nothing to train with"
    best = min(results, key=results.get)
    set_experts_impl(model, geo, best)
    log(f"  training with experts '{best}'")
    return best, results


# ---------------------------------------------------------------------------------------------------
# Training data stream
# ---------------------------------------------------------------------------------------------------

def doc_batches(docs, token_budget, seed, pad_id):
    """Whole documents, one per row, each starting at position 0 as a prompt does at inference (no packing:
    a packed window would show most problems after another one's text). Rows are right-padded (causal
    attention never sees the padding); targets are -100 where there is nothing to predict. Documents are
    grouped by length within seeded chunks so that a batch of about token_budget tokens holds little padding.
    Returns a list of (inputs [B, L], targets [B, L]) in a seeded order."""
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    batches = []
    chunk = 1024
    for c in range(0, len(order), chunk):
        part = sorted(order[c:c + chunk], key=lambda i: len(docs[i]))
        rows = []
        for i in part:
            width = -(-max([len(docs[j]) - 1 for j in rows + [i]]) // 8) * 8
            if rows and (len(rows) + 1) * width > token_budget:
                batches.append(rows)
                rows = []
            rows.append(i)
        if rows:
            batches.append(rows)
    rng.shuffle(batches)
    out = []
    for rows in batches:
        width = -(-max(len(docs[i]) - 1 for i in rows) // 8) * 8
        x = torch.full((len(rows), width), pad_id, dtype=torch.long)
        y = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, i in enumerate(rows):
            d = torch.tensor(docs[i], dtype=torch.long)
            x[r, :len(d) - 1] = d[:-1]
            y[r, :len(d) - 1] = d[1:]
        out.append((x, y))
    return out


def epoch_batches(docs_raw, docs_chat, epoch, seed, chat_fraction, token_budget, pad_id):
    """One epoch: every train problem once, raw or ChatML by a seeded coin, in doc_batches()."""
    rng = random.Random(seed * 1_000_003 + epoch)
    docs = [docs_chat[i] if rng.random() < chat_fraction else docs_raw[i] for i in range(len(docs_raw))]
    n_chat = sum(d is c for d, c in zip(docs, docs_chat))
    return doc_batches(docs, token_budget, seed * 1_000_003 + epoch + 1, pad_id), n_chat, sum(map(len, docs))


def lr_at(step, total, peak, warmup, min_frac):
    if step < warmup:
        return peak * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return peak * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, p))))


@torch.no_grad()
def eval_batches_loss(model, batches):
    """Mean cross-entropy per predicted token over doc_batches() output."""
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        total += lm_loss(model, x.cuda(), y.cuda(), reduction="sum").item()
        count += int((y != -100).sum())
    model.train()
    return total / max(1, count)


# ---------------------------------------------------------------------------------------------------
# Evaluation helpers (float32 on the checkpoint as saved)
# ---------------------------------------------------------------------------------------------------

@torch.no_grad()
def nll(model, seqs, score_from, pad_id, device, batch_size=32):
    """Sum of -log p over tokens seqs[i][score_from[i]:] given their prefix, and their count."""
    total, count = 0.0, 0
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b:b + batch_size]
        width = max(len(seqs[i]) for i in idx)
        x = torch.full((len(idx), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for r, i in enumerate(idx):
            x[r, :len(seqs[i])] = torch.tensor(seqs[i])
            mask[r, :len(seqs[i])] = 1
        logits = model(input_ids=x.to(device), attention_mask=mask.to(device), use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tok_nll = -logp.gather(-1, x[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)  # position t predicts t+1
        for r, i in enumerate(idx):
            s, n = score_from[i], len(seqs[i])
            assert 1 <= s <= n
            total += float(tok_nll[r, s - 1:n - 1].double().sum())
            count += n - s
    return total, count


def ppl_entry(total, count):
    return {"tokens": count, "mean_nll": total / count, "perplexity": math.exp(total / count)}


@torch.no_grad()
def greedy_sample(model, prompt_ids, max_new, eos_ids, pad_id):
    gc = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, eos_token_id=eos_ids,
                          pad_token_id=pad_id, bos_token_id=None, repetition_penalty=1.0)
    x = torch.tensor([prompt_ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), generation_config=gc)
    return out[0, len(prompt_ids):].tolist()


def routes_equal_prefix(a, b, n, tag):
    """Routes of the first n tokens from two forwards (prompt alone, prompt + generated) must agree."""
    worst = 0.0
    for ra, rb in zip(a, b):
        assert ra["layer"] == rb["layer"]
        for t in range(n):
            if ra["topk_ids"][t] != rb["topk_ids"][t]:
                assert min(ra["margin"][t], rb["margin"][t]) < 1e-5, \
                    f"[{tag}] layer {ra['layer']} token {t}: ids {ra['topk_ids'][t]} vs {rb['topk_ids'][t]}"
                log(f"  note: [{tag}] near-tie at layer {ra['layer']} token {t} differs between the two forwards")
                continue
            worst = max(worst, max(abs(p - q) for p, q in zip(ra["topk_weights"][t], rb["topk_weights"][t])))
    assert worst < 1e-5, f"[{tag}] prompt routes differ by {worst:.3e} between the two forwards"
    return worst


def golden_strings(test_rows, smoke):
    strings = list(json.load(open(os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                               "tokenizer_strings.json"), encoding="utf-8")))
    extra = ["$1,234.56", "3.5 + 4.25 = 7.75", "<<48/2=24>>24", "#### 72", "12:30 p.m.", "50% of 80 is 40.",
             "1/2 of 3/4", "x = (5 * 6) - 3", "Mr. O'Neil's dogs can't run.", "   leading spaces", "trailing\n\n",
             "line one\r\nline two", "Ünïcödé café", "日本語 123", "She paid $0.75 per 🍎.",
             "#### 1000000", "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|><|endoftext|>", "a<|im_end|>b"]
    gsm = [r["question"] for r in test_rows[:150]] + [r["answer"] for r in test_rows[:75]] + \
          [chat_text(r["question"], r["answer"]) for r in test_rows[150:155]]
    out = strings + extra + gsm
    return out[:30] if smoke else out


def normalised_entropy(counts):
    total = sum(counts)
    if total == 0:
        return 0.0
    h = -sum(c / total * math.log2(c / total) for c in counts if c > 0)
    return h / math.log2(len(counts))


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------

def export(out_dir, name, members):
    """members: {arcname: path}. Writes OUT/name.tgz, or name.tgz.part0, .part1, ... under 15 MiB each."""
    if not out_dir:
        return
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        for arc, path in members.items():
            tf.add(path, arcname=arc)
    data = buf.getvalue()
    for old in os.listdir(out_dir):
        if old == name + ".tgz" or old.startswith(name + ".tgz.part"):
            os.remove(os.path.join(out_dir, old))
    part = 15 * 1024 * 1024
    if len(data) <= part:
        with open(os.path.join(out_dir, name + ".tgz"), "wb") as f:
            f.write(data)
        n_parts = 1
    else:
        n_parts = 0
        for off in range(0, len(data), part):
            with open(os.path.join(out_dir, f"{name}.tgz.part{n_parts}"), "wb") as f:
                f.write(data[off:off + part])
            n_parts += 1
    log(f"exported {name}.tgz: {len(data)} bytes in {n_parts} file(s), sha256 {hashlib.sha256(data).hexdigest()}")


def write_json(path, obj, compact=False):
    with open(path, "w", encoding="utf-8") as f:
        if compact:
            f.write(json.dumps(obj, separators=(",", ":"), ensure_ascii=True, allow_nan=False))
        else:
            json.dump(obj, f, indent=1, ensure_ascii=True, allow_nan=False)
        f.write("\n")


def plot_loss(train_log, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        log(f"no matplotlib here ({exc}); draw the loss curve from train_log.json elsewhere")
        return False
    steps = [p["step"] for p in train_log["train"]]
    loss = [p["loss"] for p in train_log["train"]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot(steps, loss, lw=1.2, label="train (LM loss, mean over 10 steps)")
    vs = [p["step"] for p in train_log["val"]]
    vl = [p["loss"] for p in train_log["val"]]
    ax.plot(vs, vl, "o-", ms=3, lw=1.2, label="held-out train slice (150 problems)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(f"{MODEL_NAME}: training loss on GSM8K train")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    log(f"drew {path}")
    return True


# ---------------------------------------------------------------------------------------------------
# The pipeline
# ---------------------------------------------------------------------------------------------------

def run(args, smoke, carry):
    """One pipeline run. Data, tokenizer, training and saving stop the run when they fail; each later stage
    (reload checks, perplexity, samples, expert load, fixtures, report) is tried on its own, so one failure
    still lets the others write their outputs. Returns the names of the stages that failed."""
    tag = "smoke" if smoke else "full"
    work = os.path.join(args.work, "smoke") if smoke else args.work
    if os.path.isdir(work):
        shutil.rmtree(work)
    model_dir, fix_dir, rep_dir, tok_dir = (os.path.join(work, d) for d in ("model", "fixtures", "report", "tokenizer"))
    for d in (fix_dir, rep_dir, tok_dir):
        os.makedirs(d)
    export_dir = None if smoke else args.export
    log(f"===== {tag} run: work dir {work} =====")
    torch.cuda.empty_cache()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    failures = []

    def stage(name, fn):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - reported, and the remaining stages still run
            log(f"STAGE FAILED: {name}\n{traceback.format_exc()}")
            failures.append(name)
            return None

    # ---- data
    train_path, test_path = os.path.join(args.data, "train.jsonl"), os.path.join(args.data, "test.jsonl")
    train_rows, test_rows = load_jsonl(train_path), load_jsonl(test_path)
    log(f"data: {len(train_rows)} train problems (sha256 {sha256_file(train_path)[:16]}), "
        f"{len(test_rows)} test problems (sha256 {sha256_file(test_path)[:16]})")
    if (len(train_rows), len(test_rows)) != (7473, 1319):
        log("WARNING: GSM8K has 7473 train and 1319 test problems; these files differ")
    train_q = {r["question"] for r in train_rows}
    log(f"test questions that also appear in train: {sum(r['question'] in train_q for r in test_rows)}")
    val_rows, fit_rows = split_train(train_rows, args.seed)
    if smoke:
        fit_rows = fit_rows[:1200]

    # ---- tokenizer, learnt on the train split (the problems trained on and the held-out slice)
    tok_texts = [raw_text(r["question"], r["answer"]) for r in fit_rows + val_rows] + \
                [chat_text(r["question"], r["answer"]) for r in fit_rows + val_rows]
    tok, tok_json = train_tokenizer(tok_texts, VOCAB)
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    vocab_n = tok.get_vocab_size(with_added_tokens=True)
    log(f"tokenizer: {vocab_n} tokens, special ids {ids}, {len(json.loads(tok_json)['model']['merges'])} merges")
    assert vocab_n <= VOCAB and all(v is not None and 0 <= v < vocab_n for v in ids.values())
    if not smoke:
        assert vocab_n == VOCAB, f"tokenizer has {vocab_n} tokens, expected {VOCAB}"
    for t in tok_texts[:300] + tok_texts[-50:] + [r["question"] for r in test_rows[:100]]:
        enc = tok.encode(t, add_special_tokens=False)
        assert tok.decode(enc.ids, skip_special_tokens=False) == unicodedata.normalize("NFC", t), f"round trip: {t[:80]!r}"
    write_tokenizer_files(tok, tok_json, tok_dir, "Qwen2Tokenizer")
    hf_tok, tok_class = check_hf_tokenizer(tok_dir, tok, tok_texts[:200] + tok_texts[-50:] +
                                           [r["question"] for r in test_rows[:50]], [r["question"] for r in test_rows[:3]])
    if hf_tok is None:
        failures.append("transformers tokenizer check")
        tok_class = "Qwen2Tokenizer"
    enc0 = tok.encode(test_rows[0]["question"], add_special_tokens=False)
    log(f"  test question 0: {len(test_rows[0]['question'])} chars, {len(enc0.ids)} tokens: {enc0.tokens[:24]}")

    def encode_docs(rows, chat):
        texts = [chat_text(r["question"], r["answer"]) if chat else raw_text(r["question"], r["answer"]) for r in rows]
        return [e.ids + [ids[EOT]] for e in tok.encode_batch(texts, add_special_tokens=False)]

    fit_raw, fit_chat = encode_docs(fit_rows, False), encode_docs(fit_rows, True)
    val_raw = encode_docs(val_rows, False)
    lens = sorted(len(d) for d in fit_raw)
    log(f"train docs (raw form): {sum(lens):,} tokens, median {lens[len(lens) // 2]}, max {lens[-1]}; "
        f"the ChatML form adds {sum(map(len, fit_chat)) - sum(lens):,} tokens")
    val_batches = doc_batches(val_raw, args.batch_tokens, args.seed, ids[EOT])

    # ---- model
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = True  # training only; the evaluations below run in float32, TF32 off
    model, geo, case, n_params = build_model(args.seed, ids, args.aux_coef)
    model.to(device)
    model.train()
    hooks = RouterLogits(model, geo)
    E, K = ARCH["num_experts"], ARCH["num_experts_per_tok"]

    batches, n_chat0, ntok0 = epoch_batches(fit_raw, fit_chat, 0, args.seed, args.chat_fraction, args.batch_tokens,
                                            ids[EOT])
    steps_per_epoch = len(batches)
    assert steps_per_epoch >= 1
    n_real = sum(int((y != -100).sum()) for _, y in batches)
    n_slots = sum(y.numel() for _, y in batches)
    assert n_real == ntok0 - len(fit_raw), f"{n_real} targets for {ntok0} tokens in {len(fit_raw)} documents"
    log(f"epoch 0: {ntok0:,} tokens ({n_chat0} of {len(fit_raw)} problems in ChatML form) in {steps_per_epoch} batches "
        f"of up to {args.batch_tokens} token slots, {n_real / n_slots:.1%} of the slots real tokens")

    first = (batches[0][0].to(device), batches[0][1].to(device))
    if args.experts_impl != "auto":
        set_experts_impl(model, geo, args.experts_impl)
        carry["impl"], carry["impl_times"] = args.experts_impl, "given by --experts-impl"
        log(f"  experts '{args.experts_impl}' (--experts-impl)")
    elif carry.get("impl") is None:
        carry["impl"], carry["impl_times"] = pick_experts_impl(model, geo, first, hooks, args.aux_coef)
    else:
        set_experts_impl(model, geo, carry["impl"])
        log(f"  experts '{carry['impl']}' (chosen in the smoke run: {carry['impl_times']})")

    # ---- optimizer and schedule
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    try:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    if smoke:
        total_steps = 8
    elif args.steps == "auto":
        by_epochs = int(args.max_epochs * steps_per_epoch)
        step_time = carry.get("step_time")
        by_time = int(args.time_budget / step_time) if step_time else by_epochs
        total_steps = max(1, min(by_epochs, by_time))
        log(f"--steps auto: {args.max_epochs} epochs = {by_epochs} steps; {args.time_budget:.0f} s at "
            f"{(step_time or 0) * 1e3:.1f} ms/step = {by_time} steps -> --steps {total_steps}")
    else:
        total_steps = int(args.steps)
    eval_every = 4 if smoke else max(25, steps_per_epoch // 2)
    log(f"training: {total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs) of whole problems, peak lr {args.lr}, warmup "
        f"{args.warmup}, cosine to {args.min_lr_frac}x, AdamW(0.9, 0.95) wd {args.weight_decay}, grad clip 1.0, "
        f"aux coef {args.aux_coef}, bf16 autocast, val every {eval_every} steps")

    train_log = {"model": MODEL_NAME, "args": dict(vars(args)), "total_steps": total_steps,
                 "steps_per_epoch": steps_per_epoch, "token_slots_per_step": args.batch_tokens,
                 "device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                 "transformers": transformers.__version__, "experts_impl": carry["impl"],
                 "params": n_params, "train": [], "val": []}
    best = {"loss": float("inf"), "step": -1, "state": None}
    epoch, pos, tokens_seen = 0, 0, 0
    pending = []
    t_train = time.time()
    t_timing = None
    stopped_early = False
    for step in range(total_steps):
        if pos == len(batches):
            epoch += 1
            batches, _, _ = epoch_batches(fit_raw, fit_chat, epoch, args.seed, args.chat_fraction, args.batch_tokens,
                                          ids[EOT])
            pos = 0
        x, y = (t.to(device, non_blocking=True) for t in batches[pos])
        pos += 1
        valid = (y != -100).reshape(-1)
        tokens_seen += int(batches[pos - 1][1].ne(-100).sum())
        lr = lr_at(step, total_steps, args.lr, args.warmup, args.min_lr_frac)
        for g in opt.param_groups:
            g["lr"] = lr
        hooks.logits.clear()
        lm = lm_loss(model, x, y)
        aux = load_balancing_loss(hooks.logits, E, K, valid)
        (lm + args.aux_coef * aux).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pending.append(torch.stack([lm.detach(), aux.detach(), gnorm.detach().float()]))
        if smoke and step == 2:
            torch.cuda.synchronize()
            t_timing = time.time()
        if len(pending) == 10 or step == total_steps - 1:
            vals = torch.stack(pending).mean(0).tolist()
            n_avg = len(pending)
            pending = []
            assert all(math.isfinite(v) for v in vals), f"non-finite loss at step {step + 1}: {vals}"
            el = time.time() - t_train
            tok_s = tokens_seen / el
            train_log["train"].append({"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3), "lr": lr,
                                       "tokens": tokens_seen,
                                       "loss": round(vals[0], 5), "aux": round(vals[1], 5), "grad_norm": round(vals[2], 4),
                                       "n": n_avg, "elapsed_s": round(el, 2)})
            if (step + 1) % 50 == 0 or step == total_steps - 1 or smoke:
                log(f"step {step + 1}/{total_steps} epoch {(step + 1) / steps_per_epoch:.2f} loss {vals[0]:.4f} "
                    f"aux {vals[1]:.4f} gnorm {vals[2]:.3f} lr {lr:.2e} {tok_s / 1e3:.0f}k tok/s {el:.0f}s")
        if (step + 1) % eval_every == 0 or step == total_steps - 1:
            vl = eval_batches_loss(model, val_batches)
            train_log["val"].append({"step": step + 1, "epoch": round((step + 1) / steps_per_epoch, 3),
                                     "loss": round(vl, 5), "elapsed_s": round(time.time() - t_train, 2)})
            mark = ""
            if vl < best["loss"]:
                best = {"loss": vl, "step": step + 1,
                        "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
                mark = " (best)"
            log(f"  val loss {vl:.4f} at step {step + 1}{mark}")
            if export_dir and (step + 1) % (eval_every * 4) == 0:
                write_json(os.path.join(export_dir, "train_log_partial.json"), train_log)
        if not smoke and time.time() - t_train > args.time_budget * 1.25:
            stopped_early = True
            log(f"WARNING: time guard: stopping at step {step + 1} of {total_steps} (over 1.25x --time-budget)")
            break
    torch.cuda.synchronize()
    train_s = time.time() - t_train
    if smoke:
        carry["step_time"] = (time.time() - t_timing) / (total_steps - 3)
        log(f"smoke: {carry['step_time'] * 1e3:.1f} ms per training step (steps 4-{total_steps}, val evals included)")
    hooks.remove()
    last_train = train_log["train"][-1]["loss"]
    train_log.update({"train_seconds": round(train_s, 1), "stopped_early": stopped_early,
                      "best_val_step": best["step"], "best_val_loss": best["loss"], "final_train_loss": last_train})
    log(f"trained {train_s:.1f} s on {train_log['device']}; final train loss {last_train:.4f} (mean of the last "
        f"{train_log['train'][-1]['n']} steps); best val loss {best['loss']:.4f} at step {best['step']} of {total_steps}"
        f" -> the model saved is that step's")
    model.load_state_dict(best["state"])
    set_experts_impl(model, geo, "eager")
    if export_dir:
        write_json(os.path.join(export_dir, "train_log_partial.json"), train_log)

    # ---- save (bf16, per-expert hub names), then the tokenizer and generation config beside it
    model = model.to("cpu").to(torch.bfloat16)
    model.eval()
    orig = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref.save_checkpoint(model, geo, model_dir, MODEL_NAME)
    write_tokenizer_files(tok, tok_json, model_dir, tok_class)
    eos_ids = [ids[IM_END], ids[EOT]]
    write_json(os.path.join(model_dir, "generation_config.json"),
               {"bos_token_id": ids[EOT], "eos_token_id": eos_ids, "pad_token_id": ids[EOT], "do_sample": False,
                "transformers_version": transformers.__version__})
    cfg_path = os.path.join(model_dir, "config.json")
    with open(cfg_path) as f:
        cj = json.load(f)
    for key, want in (("vocab_size", VOCAB), ("hidden_size", HIDDEN), ("num_experts", E), ("num_experts_per_tok", K),
                      ("mlp_only_layers", ARCH["mlp_only_layers"]), ("tie_word_embeddings", True),
                      ("max_position_embeddings", MAX_POS), ("architectures", ["Qwen2MoeForCausalLM"])):
        assert cj.get(key) == want, f"config.json {key} = {cj.get(key)!r}, expected {want!r}"
    patched = {}
    for key, want in (("bos_token_id", ids[EOT]), ("eos_token_id", ids[IM_END]), ("pad_token_id", ids[EOT]),
                      ("router_aux_loss_coef", args.aux_coef)):
        if cj.get(key) != want:
            patched[key] = (cj.get(key), want)
            cj[key] = want
    if patched:
        log(f"  config.json as saved lacked {patched}: written in")
        with open(cfg_path, "w") as f:
            json.dump(cj, f, indent=2, sort_keys=True)
            f.write("\n")
    size = os.path.getsize(os.path.join(model_dir, "model.safetensors"))
    log(f"saved {model_dir}: {sorted(os.listdir(model_dir))}; model.safetensors {size:,} bytes, "
        f"sha256 {sha256_file(os.path.join(model_dir, 'model.safetensors'))}")
    assert size <= MAX_FILE_BYTES, f"model.safetensors is {size} bytes (> {MAX_FILE_BYTES})"
    export(export_dir, "model", {MODEL_NAME: model_dir})
    log("config.json: " + json.dumps(cj, sort_keys=True))

    del model
    failures += evaluate_checkpoint(model_dir, work, export_dir, smoke, tok, hf_tok, test_rows, val_rows,
                                    train_log=train_log, orig=orig)
    log(f"===== {tag} run done; failed stages: {failures or 'none'} =====")
    return failures


def evaluate_checkpoint(model_dir, work, export_dir, smoke, tok, hf_tok, test_rows, val_rows, train_log=None,
                        orig=None):
    """Everything after training, on the checkpoint as saved in model_dir: reload checks, held-out perplexity,
    greedy samples, expert load, the fixtures of tests/default_model_test.cpp, eval.json. Each stage runs on its
    own (a failure is reported and the others still run). orig: the bf16 state dict the file must equal, when
    known. Returns the names of the stages that failed."""
    fix_dir, rep_dir = os.path.join(work, "fixtures"), os.path.join(work, "report")
    for d in (fix_dir, rep_dir):
        os.makedirs(d, exist_ok=True)
    failures = []

    def stage(name, fn):
        try:
            return fn()
        except Exception:  # noqa: BLE001 - reported, and the remaining stages still run
            log(f"STAGE FAILED: {name}\n{traceback.format_exc()}")
            failures.append(name)
            return None

    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    eos_ids = [ids[IM_END], ids[EOT]]
    E, K = ARCH["num_experts"], ARCH["num_experts_per_tok"]
    device = torch.device("cuda")
    geo = ref.Geo(dict(name=MODEL_NAME, family="qwen2_moe", seed=0, rope_theta=ROPE_THETA, cfg=dict(ARCH)))
    hub32 = {k: v.float() for k, v in load_file(os.path.join(model_dir, "model.safetensors")).items()}
    ref.check_hub_keys(hub32, geo, MODEL_NAME)

    # ---- reload as the reference: float32, eager attention, eager experts, from the files on disk
    def reload():
        m, info = ref.reload_f32(model_dir, MODEL_NAME)
        ref.check_loading_info(info, geo, m, MODEL_NAME)
        ref.check_model_structure(m, geo, "reloaded")
        rsd = m.state_dict()
        if orig is not None:
            assert set(rsd) == set(orig), f"reloaded keys differ: {sorted(set(rsd) ^ set(orig))[:6]}"
            for k, v in rsd.items():
                assert torch.equal(v, orig[k].float()), f"reloaded {k} != saved bf16 tensor"
        log(f"reloaded {len(rsd)} tensors in float32{', equal to the bf16 model' if orig is not None else ''} "
            f"({type(m).__name__}, attention {m.config._attn_implementation}, experts "
            f"{getattr(m.config, '_experts_implementation', 'n/a')})")
        return m

    ref_model = stage("reload", reload)
    evals = {"device": torch.cuda.get_device_name(0), "transformers": transformers.__version__, "torch": torch.__version__,
             "model_safetensors_sha256": sha256_file(os.path.join(model_dir, "model.safetensors"))}

    # ---- held-out perplexity on the GSM8K test split (float32 on the GPU, TF32 off)
    def perplexity():
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")
        gpu_model = copy.deepcopy(ref_model).to(device)
        gpu_model.eval()
        rows = test_rows[:16] if smoke else test_rows
        full, ans_from, qs = [], [], []
        for r in rows:
            enc = tok.encode(raw_text(r["question"], r["answer"]), add_special_tokens=False)
            full.append(enc.ids + [ids[EOT]])
            boundary = len(r["question"])  # the separator; the answer's first token (" Janet") starts here
            ans_from.append(next(i for i, (s, _) in enumerate(enc.offsets) if s >= boundary))
            qs.append(tok.encode(r["question"], add_special_tokens=False).ids)
        vrows = val_rows[:16] if smoke else val_rows
        vdocs = [tok.encode(raw_text(r["question"], r["answer"]), add_special_tokens=False).ids + [ids[EOT]]
                 for r in vrows]
        res = {
            "test_question_and_answer": ppl_entry(*nll(gpu_model, full, [1] * len(full), ids[EOT], device)),
            "test_question_only": ppl_entry(*nll(gpu_model, qs, [1] * len(qs), ids[EOT], device)),
            "test_answer_given_question": ppl_entry(*nll(gpu_model, full, ans_from, ids[EOT], device)),
            "train_heldout_slice_question_and_answer": ppl_entry(*nll(gpu_model, vdocs, [1] * len(vdocs), ids[EOT],
                                                                      device)),
        }
        for k, v in res.items():
            log(f"perplexity {k}: {v['perplexity']:.3f} (mean NLL {v['mean_nll']:.4f} nats/token over {v['tokens']:,} tokens)")
        res["test_problems"] = len(rows)
        res["max_doc_tokens"] = max(map(len, full))
        log(f"  {len(rows)} test problems, longest {res['max_doc_tokens']} tokens")
        del gpu_model
        torch.cuda.empty_cache()
        return res

    evals["perplexity"] = stage("perplexity", perplexity)

    # ---- greedy samples (float32 on the CPU, the reloaded checkpoint)
    def samples():
        out = []
        specs = [("raw", i) for i in range(1 if smoke else 5)] + [("chat", i) for i in range(0 if smoke else 2)]
        for kind, i in specs:
            q = test_rows[i]["question"]
            text = q if kind == "raw" else chat_text(q)
            pids = tok.encode(text, add_special_tokens=False).ids
            new = greedy_sample(ref_model, pids, 16 if smoke else 160, eos_ids, ids[EOT])
            stop = "eos" if new and new[-1] in eos_ids else "length"
            out_text = tok.decode(new, skip_special_tokens=True)
            out.append({"kind": kind, "test_index": i, "prompt": text, "output": out_text, "output_ids": new,
                        "finish": stop, "reference_answer": test_rows[i]["answer"]})
            log(f"sample [{kind}, test question {i}] ({len(new)} tokens, {stop}):\n--- prompt ---\n{text}\n"
                f"--- greedy ---\n{out_text}\n--- GSM8K answer ---\n{test_rows[i]['answer']}\n------")
        return out

    evals["samples"] = stage("samples", samples)

    # ---- expert load on the first 25 test questions (prompt tokens only, transformers' top-k)
    def expert_load():
        counts = {l: [0] * E for l in geo.sparse}
        for r in test_rows[:3 if smoke else 25]:
            x = torch.tensor([tok.encode(r["question"], add_special_tokens=False).ids])
            with torch.no_grad():
                out = ref_model(input_ids=x, use_cache=False, output_router_logits=True)
            rl = [t for t in out.router_logits if t is not None]
            assert len(rl) == len(geo.sparse), f"{len(rl)} router_logits for {len(geo.sparse)} MoE layers"
            for l, t in zip(geo.sparse, rl):
                for row in torch.topk(t.reshape(-1, E).float(), K, dim=-1).indices.tolist():
                    for e in row:
                        counts[l][e] += 1
        log("expert load, first 25 test questions, prompt tokens only: normalised entropy per MoE layer: "
            + ", ".join(f"L{l} {normalised_entropy(c):.3f}" for l, c in counts.items()))
        return {str(l): {"counts": c, "normalised_entropy": round(normalised_entropy(c), 4)} for l, c in counts.items()}

    evals["expert_load_first25_test_prompt_tokens"] = stage("expert load", expert_load)

    # ---- fixture: greedy tokens and routes (CPU, float32, eager) through make_reference_fixtures' checks
    def reference_fixture():
        cap = ref.RouteCapture(ref_model, geo)
        prompts = []
        specs = [("raw", 0), ("chat", 3)] if smoke else [("raw", 0), ("raw", 1), ("raw", 2), ("chat", 3), ("chat", 4)]
        min_route, min_greedy = float("inf"), float("inf")
        try:
            for kind, i in specs:
                q = test_rows[i]["question"]
                messages = [{"role": "user", "content": q}]
                if kind == "chat":
                    text = chat_text(q)
                    if hf_tok is not None:
                        hf_text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                        assert hf_text == text, f"HF renders {hf_text!r}"
                else:
                    text = q
                pids = tok.encode(text, add_special_tokens=False).ids
                ids_t = torch.tensor([pids])
                ptag = f"{kind} test {i}"
                logits, routes, mrm, blk_err, _ = ref.compute_routes(ref_model, geo, cap, ids_t, hub32, ptag)
                last = logits[0, -1].float()
                gids, gmarg, kv_err = ref.greedy(ref_model, ids_t, last, ptag)
                seq = torch.tensor([pids + gids[:-1]])
                _, routes_all, mrm_all, _, _ = ref.compute_routes(ref_model, geo, cap, seq, hub32, ptag + " +generated")
                routes_equal_prefix(routes, routes_all, len(pids), ptag)
                n = len(pids)
                decode_routes = [{"layer": r["layer"], "topk_ids": r["topk_ids"][n:],
                                  "topk_weights": r["topk_weights"][n:], "margin": r["margin"][n:]} for r in routes_all]
                assert all(len(r["topk_ids"]) == FIXTURE_NEW_TOKENS - 1 for r in decode_routes)
                top_v, top_i = torch.topk(last, 32)
                entry = {"text": text, "chat": kind == "chat", "test_index": i, "prompt_ids": pids,
                         "last_logits_top": {"ids": top_i.tolist(), "values": [float(v) for v in top_v.tolist()]},
                         "last_logits_max_abs": float(last.abs().max()),
                         "greedy_ids": gids, "greedy_margins": ref.finite_list(gmarg, "greedy_margins"),
                         "greedy_text": tok.decode(gids, skip_special_tokens=False),
                         "routes": routes, "decode_routes": decode_routes}
                if kind == "chat":
                    entry["messages"] = messages
                prompts.append(entry)
                min_route = min(min_route, mrm, mrm_all)
                min_greedy = min(min_greedy, min(gmarg))
                log(f"fixture [{ptag}]: {n} prompt tokens, greedy {gids[:10]}..., min route margin "
                    f"{min(mrm, mrm_all):.3g}, min greedy margin {min(gmarg):.3g}, MoE block rel err {blk_err:.2e}, "
                    f"cached-vs-full {kv_err:.2e}")
        finally:
            cap.remove()
        write_json(os.path.join(fix_dir, "reference.json"), {
            "model": MODEL_NAME, "arch": "Qwen2MoeForCausalLM", "sparse_layers": geo.sparse,
            "sparse_rule": geo.sparse_rule, "num_experts": E, "top_k": K, "renormalize_topk": geo.renorm,
            "new_tokens": FIXTURE_NEW_TOKENS, "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "model_safetensors_sha256": sha256_file(os.path.join(model_dir, "model.safetensors")),
            "prompts": prompts}, compact=True)
        log(f"reference fixture: {len(prompts)} prompts, min route margin {min_route:.3g}, "
            f"min greedy margin {min_greedy:.3g}")

    stage("reference fixture", reference_fixture)

    def tokenizer_fixture():
        cases = []
        for s in golden_strings(test_rows, smoke):
            e = tok.encode(s, add_special_tokens=False).ids
            cases.append({"text": s, "ids": e, "decoded": tok.decode(e, skip_special_tokens=False),
                          "decoded_skip_special": tok.decode(e, skip_special_tokens=True)})
        write_json(os.path.join(fix_dir, "tokenizer_golden.json"),
                   {"generator": "tools/train_default_model.py", "tokenizers_version": tokenizers.__version__,
                    "tokenizer_sha256": sha256_file(os.path.join(model_dir, "tokenizer.json")), "cases": cases},
                   compact=True)
        log(f"tokenizer fixture: {len(cases)} strings")

    stage("tokenizer fixture", tokenizer_fixture)

    def chat_fixture():
        assert hf_tok is not None, "transformers' tokenizer did not load: no chat template fixture"
        q0, q1, q2 = (test_rows[i]["question"] for i in range(3))
        convs = [
            ([{"role": "user", "content": q0}], True),
            ([{"role": "user", "content": q0}], False),
            ([{"role": "system", "content": "You are a careful maths tutor."}, {"role": "user", "content": q1}], True),
            ([{"role": "user", "content": q2}, {"role": "assistant", "content": test_rows[2]["answer"]},
              {"role": "user", "content": "And in total, in cents?"}], True),
            ([{"role": "user", "content": "Hi"}], True),
        ]
        cases = []
        for msgs, gp in convs:
            text = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gp)
            assert isinstance(text, str), type(text)
            cases.append({"messages": msgs, "add_generation_prompt": gp, "text": text,
                          "ids": tok.encode(text, add_special_tokens=False).ids})
        write_json(os.path.join(fix_dir, "chat_template.json"),
                   {"generator": "tools/train_default_model.py", "transformers_version": transformers.__version__,
                    "tokenizer_class": type(hf_tok).__name__, "cases": cases})
        log(f"chat template fixture: {len(cases)} conversations rendered by {type(hf_tok).__name__}")

    stage("chat template fixture", chat_fixture)

    # ---- report
    def report():
        write_json(os.path.join(rep_dir, "eval.json"), evals)
        if train_log is not None:
            write_json(os.path.join(rep_dir, "train_log.json"), train_log)
            plot_loss(train_log, os.path.join(rep_dir, "loss_curve.png"))
        sizes = {f"{d}/{f}": os.path.getsize(os.path.join(work, d, f)) for d in ("fixtures", "report")
                 for f in sorted(os.listdir(os.path.join(work, d)))}
        log(f"outputs: {sizes}")

    stage("report", report)
    stage("export", lambda: export(export_dir, "results", {"fixtures": fix_dir, "report": rep_dir}))
    return failures


def main():
    ap = argparse.ArgumentParser(description="Train moescope's default model (see the header of this file).")
    ap.add_argument("--data", required=True, help="folder with GSM8K's train.jsonl and test.jsonl")
    ap.add_argument("--work", required=True, help="output folder (emptied first)")
    ap.add_argument("--export", default=None, help="pack outputs here as they are ready (e.g. $OUT)")
    ap.add_argument("--steps", default="auto", help="optimizer steps, or 'auto'")
    ap.add_argument("--max-epochs", type=float, default=16.0)
    ap.add_argument("--time-budget", type=float, default=240.0, help="seconds of training for --steps auto")
    ap.add_argument("--batch-tokens", type=int, default=16384, help="token slots per batch (padding included)")
    ap.add_argument("--experts-impl", default="auto", choices=["auto", "eager", "grouped_mm", "grouped_bf16"],
                    help="expert implementation for training (auto: the fastest that matches eager)")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--aux-coef", type=float, default=0.0003, help="router_aux_loss_coef")
    ap.add_argument("--chat-fraction", type=float, default=0.3, help="share of problems shown in ChatML form per epoch")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--smoke", action="store_true", help="only the few-step smoke run")
    ap.add_argument("--smoke-first", action="store_true", help="the smoke run, then the real run")
    ap.add_argument("--evaluate", default=None, metavar="MODEL_DIR",
                    help="no training: evaluate this checkpoint and write the fixtures and eval.json under --work")
    args = ap.parse_args()
    assert args.steps == "auto" or args.steps.isdigit(), "--steps is a number or 'auto'"
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    if args.export:
        os.makedirs(args.export, exist_ok=True)
    log(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"tokenizers {tokenizers.__version__}, GPU {torch.cuda.get_device_name(0)}")
    log("command: " + " ".join(sys.argv))
    if args.evaluate:
        # The evaluation and fixtures alone, on a checkpoint already made (e.g. models/moescope-tiny-gsm8k).
        log(f"===== evaluate {args.evaluate} =====")
        train_rows = load_jsonl(os.path.join(args.data, "train.jsonl"))
        test_rows = load_jsonl(os.path.join(args.data, "test.jsonl"))
        val_rows, _ = split_train(train_rows, args.seed)
        tok = Tokenizer.from_file(os.path.join(args.evaluate, "tokenizer.json"))
        try:
            hf_tok = AutoTokenizer.from_pretrained(args.evaluate)
        except Exception as exc:  # noqa: BLE001 - the chat fixture then fails, the rest still runs
            log(f"WARNING: transformers cannot load the tokenizer: {exc}")
            hf_tok = None
        if os.path.isdir(args.work):
            shutil.rmtree(args.work)
        os.makedirs(args.work)
        failed = evaluate_checkpoint(args.evaluate, args.work, args.export, False, tok, hf_tok, test_rows, val_rows)
        log(f"all done; failed stages: {failed or 'none'}")
        sys.exit(1 if failed else 0)
    carry = {}
    failed = []
    if args.smoke or args.smoke_first:
        failed = run(args, smoke=True, carry=carry)
        if failed and not args.smoke:
            log(f"smoke: stages {failed} failed; the real run goes on so that the trained model comes back")
    if not args.smoke:
        failed = run(args, smoke=False, carry=carry)
    log(f"all done; failed stages: {failed or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
