"""A decoder written from scratch, with the residual stream exposed: Llama, Mistral, Qwen2/2.5, Qwen3, Gemma-2,
Gemma-3, Phi-3 and MPT as one model with a few switches (Config).

    from model import load, generate, hooks
    model = load("models/SmolLM2-135M-Instruct", dtype="bf16")     # chat.load_tokenizer(folder) for its tokenizer
    logits = model(ids)                       # (B, T, V)
    logits = model(ids, logits_to_keep=1)     # (B, 1, V): scoring needs only the last position

Parameter names are Hugging Face's Llama names, so a checkpoint loads with `strict=True`; the families that fuse
projections or name them their own way (Phi-3, MPT) are split and renamed at load (checkpoint_keys). The math
follows `transformers`' modeling files op for op (same rotate_half rope, same norm casts), which is what makes the
logits equal theirs. This file is the math and imports nothing of the project: steering reaches in through hooks
(hooks() below), LoRA and speed by swapping modules from outside (lora.py, runtime/).
"""
import io
import json
import math
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# Hook sites of every layer, in the order the residual stream passes them: x (B, T, D).
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
# Sites inside a layer's attention and MLP (TransformerLens's hook_z, hook_pattern, mlp.hook_post): each head's output
# before o_proj, z (B, T, nh, hd); the attention probabilities, pattern (B, nh, T, S) over the S keys; the MLP's hidden
# activation after its gate, mlp_post (B, T, intermediate_size), what down_proj reads.
INNER_SITES = ("z", "pattern", "mlp_post")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def as_dtype(d):
    if d is None or isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of {sorted(DTYPES)}")
    return DTYPES[d]


# ----------------------------------------------------------------------------------------------------- config
FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mpt")
FULL, SLIDING = "full_attention", "sliding_attention"    # HF's layer_types


@dataclass
class Config:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float            # the eps of every norm (MPT's layer_norm_epsilon too)
    rope_theta: float
    rope_scaling: dict | None      # None, or {"rope_type": "linear" | "llama3" | "longrope", ...}
    tie_word_embeddings: bool
    sliding_window: int | None     # on "sliding_attention" layers a query sees only the last `sliding_window` positions
    max_position_embeddings: int
    torch_dtype: str | None = None
    # What the families change, as switches; the defaults are Llama's.
    layer_types: tuple = ()        # per layer FULL or SLIDING; () = every layer FULL
    qkv_bias: bool = False         # q, k, v projections have biases (Qwen2; attention_bias=true elsewhere)
    o_bias: bool = False           # o_proj has a bias (attention_bias=true)
    qk_norm: bool = False          # Qwen3, Gemma-3: each head's q and k are RMS-normed before rope
    norm: str = "rms"              # "rms"; "gemma": RMS in fp32 times (1 + w); "layer": LayerNorm without bias (MPT)
    hidden_act: str = "silu"       # the MLP's activation: silu, gelu_pytorch_tanh (Gemma), gelu (MPT)
    gated_mlp: bool = True         # down(act(gate(x)) * up(x)); False: down(act(up(x))) (MPT)
    embed_scale: bool = False      # Gemma: embeddings times sqrt(hidden_size), rounded to the model's dtype
    sandwich_norms: bool = False   # Gemma-2/3: each sub-layer's output is normed too, before it joins the stream
    attn_scale: float | None = None      # scores times this; None = head_dim ** -0.5
    attn_softcap: float | None = None    # Gemma-2: scores = cap * tanh(scores / cap)
    final_softcap: float | None = None   # Gemma-2: logits = cap * tanh(logits / cap)
    local_rope_theta: float | None = None  # Gemma-3: the rope base of sliding layers (no scaling there)
    alibi_bias_max: float | None = None    # MPT: ALiBi (a per-head bias linear in distance) instead of rope

    def sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Config":
        """Read an HF config, refusing by name anything that would change the math in a way this file does not do."""
        mt = d.get("model_type")
        if mt not in FAMILIES:
            raise ValueError(f"{source}: unknown model_type {mt!r}; syco-lab implements {', '.join(FAMILIES)}")
        if mt == "mpt":
            return cls.from_mpt(d, source)

        def refuse(key, ok, why=""):
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {ok!r}{why})")
        gemma = mt in ("gemma2", "gemma3_text")
        defaults = GEMMA_DEFAULTS[mt] if gemma else {}
        d = defaults | d
        act = d["hidden_activation"] if gemma else d.get("hidden_act", "silu")
        if act not in ("silu", "gelu_pytorch_tanh"):
            raise ValueError(f"{source}: hidden_act={act!r} is not supported (silu, gelu_pytorch_tanh)")
        refuse("mlp_bias", False)
        if d.get("use_bidirectional_attention"):
            raise ValueError(f"{source}: use_bidirectional_attention=true is not supported (a decoder attends causally)")
        if mt in ("qwen2", "qwen3"):
            refuse("use_sliding_window", False, ": Qwen's sliding window is off in every released model")
        refuse("partial_rotary_factor", 1.0)
        theta, scaling, local = _rope(d, mt, source)
        heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
        if heads % kv:
            raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        n = d["num_hidden_layers"]
        window = d.get("sliding_window")
        if mt == "mistral":
            window = d.get("sliding_window", 4096)   # transformers' MistralConfig default when the key is absent
        elif mt in ("llama", "qwen2", "qwen3"):
            window = None                            # llama has none; Qwen's is off (refused above if on)
        if gemma:   # sliding and full layers alternate: every 2nd (Gemma-2) or 6th (Gemma-3) layer is full
            every = 2 if mt == "gemma2" else d.get("sliding_window_pattern", 6)
            types = tuple(d.get("layer_types") or (SLIDING if (i + 1) % every else FULL for i in range(n)))
        else:
            types = (SLIDING if window is not None else FULL,) * n
        if len(types) != n or set(types) - {FULL, SLIDING}:
            raise ValueError(f"{source}: layer_types must be {n} of {FULL!r} / {SLIDING!r}, got {list(types)[:4]} ...")
        bias = d.get("attention_bias", False)
        return cls(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=n,
                   num_attention_heads=heads, num_key_value_heads=kv,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=theta, rope_scaling=scaling,
                   tie_word_embeddings=d.get("tie_word_embeddings", False), sliding_window=window,
                   max_position_embeddings=d.get("max_position_embeddings", 4096),
                   torch_dtype=d.get("torch_dtype") or d.get("dtype"), layer_types=types,
                   qkv_bias=bias or mt == "qwen2", o_bias=bias, qk_norm=mt in ("qwen3", "gemma3_text"),
                   norm="gemma" if gemma else "rms", hidden_act=act, embed_scale=gemma, sandwich_norms=gemma,
                   attn_scale=d["query_pre_attn_scalar"] ** -0.5 if gemma else None,
                   attn_softcap=d.get("attn_logit_softcapping") if gemma else None,
                   final_softcap=d.get("final_logit_softcapping") if gemma else None, local_rope_theta=local)

    @classmethod
    def from_mpt(cls, d: dict, source: str) -> "Config":
        """MPT's own config keys (d_model, n_heads, attn_config, ...) -> the same switches."""
        attn = d.get("attn_config") or {}
        for key, ok in (("alibi", True), ("clip_qkv", None), ("qk_ln", False), ("prefix_lm", False),
                        ("attn_uses_sequence_id", False), ("attn_type", "multihead_attention")):
            if attn.get(key, ok) != ok:
                raise ValueError(f"{source}: attn_config.{key}={attn[key]!r} is not supported (only {ok!r})")
        for key, ok in (("no_bias", True), ("logit_scale", None), ("norm_type", "low_precision_layernorm")):
            if d.get(key, ok) != ok and not (key == "norm_type" and d[key] == "layernorm"):
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {ok!r})")
        D, heads = d["d_model"], d["n_heads"]
        if D % heads:
            raise ValueError(f"{source}: d_model={D} is not a multiple of n_heads={heads}")
        scale = attn.get("softmax_scale")
        return cls(model_type="mpt", vocab_size=d["vocab_size"], hidden_size=D,
                   intermediate_size=int(d.get("expansion_ratio", 4) * D), num_hidden_layers=d["n_layers"],
                   num_attention_heads=heads, num_key_value_heads=heads, head_dim=D // heads,
                   rms_norm_eps=d.get("layer_norm_epsilon", 1e-5), rope_theta=0.0, rope_scaling=None,
                   tie_word_embeddings=True, sliding_window=None, max_position_embeddings=d.get("max_seq_len", 2048),
                   torch_dtype=d.get("torch_dtype") or d.get("dtype"), layer_types=(FULL,) * d["n_layers"],
                   norm="layer", hidden_act="gelu", gated_mlp=False, attn_scale=scale,
                   alibi_bias_max=float(attn.get("alibi_bias_max", 8)))


# Values transformers' Gemma configs take when config.json leaves them out (a multimodal Gemma-3's text_config
# lists few keys).
GEMMA_DEFAULTS = {
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6, rope_theta=10000.0,
                   query_pre_attn_scalar=256, sliding_window=4096, max_position_embeddings=8192,
                   tie_word_embeddings=True, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   hidden_activation="gelu_pytorch_tanh"),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256, rms_norm_eps=1e-6,
                        rope_theta=1_000_000.0, rope_local_base_freq=10_000.0, query_pre_attn_scalar=256,
                        sliding_window=4096, max_position_embeddings=131072, tie_word_embeddings=True,
                        hidden_activation="gelu_pytorch_tanh"),
}


def _rope(d: dict, mt: str, source: str) -> tuple[float, dict | None, float | None]:
    """(rope_theta, rope_scaling or None, the local theta of Gemma-3's sliding layers or None) from either way
    configs write them: rope_theta + rope_scaling (classic), or rope_parameters (transformers 5; Gemma-3's keyed by
    layer type)."""
    rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
    local = None
    if FULL in rope or SLIDING in rope:
        local_rope = dict(rope.get(SLIDING) or {})
        if local_rope.get("rope_type", "default") != "default":
            raise ValueError(f"{source}: rope_parameters.{SLIDING} type {local_rope['rope_type']!r} is not supported")
        local = local_rope.get("rope_theta", d.get("rope_local_base_freq"))
        rope = dict(rope.get(FULL) or {})
    elif mt == "gemma3_text":
        local = d.get("rope_local_base_freq")
    theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
    kind = rope.get("rope_type", rope.get("type", "default"))
    kind = "longrope" if kind == "su" else kind          # Phi-3's early configs call longrope "su"
    if kind not in ("default", "linear", "llama3", "longrope"):
        raise ValueError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3, longrope)")
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError(f"{source}: partial_rotary_factor is not supported")
    if kind == "longrope":
        rope.setdefault("original_max_position_embeddings", d.get("original_max_position_embeddings"))
    return theta, None if kind == "default" else {**rope, "rope_type": kind}, local


def rope_inv_freq(cfg: Config, theta: float = None, scaling: dict = None, long: bool = False) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies, scaled as `scaling` asks (linear, Llama-3's, or longrope's short or long
    factors). theta, scaling: the config's unless given (Gemma-3's sliding layers: their own base, no scaling)."""
    theta, s = (cfg.rope_theta, cfg.rope_scaling) if theta is None else (theta, scaling)
    # Computed on the CPU even while the model is built on the meta device (meta math would import torch._dynamo).
    steps = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (theta ** (steps / cfg.head_dim))
    if s and s["rope_type"] == "linear":
        inv = inv / s["factor"]
    elif s and s["rope_type"] == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s.get("original_max_position_embeddings", cfg.max_position_embeddings)
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / hi) * ~(wavelen > old / lo)
        inv = torch.where(medium, smoothed, scaled)
    elif s and s["rope_type"] == "longrope":
        # Each frequency slowed by its own factor: the short set within the trained length, the long one beyond.
        factors = torch.tensor(s["long_factor" if long else "short_factor"], dtype=torch.float32, device="cpu")
        inv = 1.0 / (factors * theta ** (steps / cfg.head_dim))
    return inv


def rope_attention_factor(cfg: Config) -> float:
    """longrope scales cos and sin by sqrt(1 + ln(factor) / ln(trained length)): attention sharpens as it stretches."""
    s = cfg.rope_scaling
    if not s or s["rope_type"] != "longrope":
        return 1.0
    old = s["original_max_position_embeddings"]
    factor = s.get("factor") or cfg.max_position_embeddings / old
    if s.get("attention_factor") is not None:
        return s["attention_factor"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(old))


# ------------------------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, plus_one: bool = False):
        super().__init__()
        # Gemma stores w - 1: its norm scales by (1 + w), so its weights start at 0 (and load as stored).
        self.weight, self.eps, self.plus_one = nn.Parameter(torch.ones(dim)), eps, plus_one

    def forward(self, x):
        # Normalize in fp32. Llama casts back, then scales; Gemma scales in fp32, then casts: each as transformers
        # does, so bf16 rounds the same way.
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.plus_one:
            return (h * (1.0 + self.weight.float())).to(x.dtype)
        return self.weight * h.to(x.dtype)


def norm(cfg: Config, dim: int) -> nn.Module:
    if cfg.norm == "layer":   # MPT: mean and variance, no bias
        return nn.LayerNorm(dim, eps=cfg.rms_norm_eps, bias=False)
    return RMSNorm(dim, cfg.rms_norm_eps, plus_one=cfg.norm == "gemma")


ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": partial(F.gelu, approximate="tanh")}


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + hd/2]) by its position's angle: HF's rotate_half layout of the pairs."""
    return x * cos + rotate_half(x) * sin


def alibi_slopes(n_heads: int, bias_max: float) -> torch.Tensor:
    """(n_heads,) ALiBi slopes as MPT makes them: 2^(-bias_max * h / n) for h = 1..n, n the next power of two,
    interleaved (odd then even) when the head count is not one."""
    n = 2 ** math.ceil(math.log2(n_heads))
    slopes = 1.0 / torch.pow(2, torch.arange(1, n + 1, dtype=torch.int64, device="cpu").float() * (bias_max / n))
    return slopes if n == n_heads else torch.cat([slopes[1::2], slopes[::2]])[:n_heads]


def sdpa_attention(q, k, v, mask, scale=None, softcap=None):
    """q (B, nh, T, hd), k/v (B, nkv, S, hd) -> (B, nh, T, hd) through PyTorch's fused kernel.
    mask: None (every key visible), "causal" (square, no padding), bool (B, 1, T, S) with True = visible, or float
    (B, nh, T, S) added to the scores (ALiBi; -inf = hidden). scale: None = hd ** -0.5. SDPA cannot cap scores."""
    if softcap is not None:
        raise ValueError("sdpa_attention cannot soft-cap scores: use plain_attention")
    causal = isinstance(mask, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                          scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def plain_attention(q, k, v, mask, scale=None, softcap=None, on_pattern=None):
    """The same attention written out: two matrix products and a softmax, the readable reference of sdpa_attention
    (tested against it), what Gemma-2 needs (softcap: scores = cap * tanh(scores / cap)), and what runtime/ runs
    where SDPA's kernel is slow. The query heads of a group share their key head (no copy of k/v). Scores and softmax
    in fp32; the probabilities rounded to the model's dtype for the product with v, as SDPA's CPU kernel rounds.
    on_pattern: p (B, nh, T, S) -> p, the probabilities each query puts on each key (the pattern hook site)."""
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, nkv, nh // nkv * T, hd).float()               # (B, nkv, g*T, hd): g heads share a kv head
    s = (qg @ k.float().transpose(-1, -2) * (hd ** -0.5 if scale is None else scale)).view(B, nkv, nh // nkv, T, S)
    if softcap is not None:
        s = torch.tanh(s / softcap) * softcap
    if isinstance(mask, str):                                        # "causal": query i sees keys up to S - T + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    elif mask is not None:                                           # against s: (B, nkv, g, T, S)
        mask = mask[:, :, None] if mask.shape[1] == 1 else mask.view(B, nkv, nh // nkv, T, S)
    if mask is not None and mask.dtype == torch.bool:
        s = s.masked_fill(~mask, float("-inf"))
    elif mask is not None:                                           # ALiBi's bias, -inf where hidden
        s = s + mask
    p = s.softmax(-1).to(v.dtype)                                    # (B, nkv, g, T, S)
    if on_pattern is not None:                                       # head h = kv head h // g, as q was grouped
        p = on_pattern(p.reshape(B, nh, T, S)).reshape(B, nkv, nh // nkv, T, S)
    return (p.reshape(B, nkv, nh // nkv * T, S) @ v).view(B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm, self.k_norm = norm(cfg, self.hd), norm(cfg, self.hd)
        self.qk_norm, self.scale, self.softcap = cfg.qk_norm, cfg.attn_scale, cfg.attn_softcap
        # (q, k, v, mask, scale, softcap) -> y; runtime/ swaps SDPA for the kernel that is fastest per machine.
        # SDPA caps no scores and would add ALiBi's bias in the model's dtype: those take plain_attention (fp32).
        plain = self.softcap is not None or cfg.alibi_bias_max is not None
        self.attend = plain_attention if plain else sdpa_attention

    def forward(self, x, cos, sin, mask, cache, hook=None):
        """hook(site, t) -> t: the block's hooks at z and pattern (Block.forward passes them; None = none)."""
        B, T, _ = x.shape                                               # x: (B, T, D); cos, sin: (B, 1, T, hd)
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        if self.qk_norm:                                                # each head's vector normed on its own
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)                     # (B, nh, T, hd), (B, nkv, T, hd)
        if cos is not None:                                             # None: ALiBi, in the mask
            q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                       # (B, nkv, S, hd): past and new keys
        if hook is not None and hook.wants("pattern"):    # the probabilities are asked for: the written-out math
            y = plain_attention(q, k, v, mask, self.scale, self.softcap, partial(hook, "pattern"))
        else:
            y = self.attend(q, k, v, mask, self.scale, self.softcap)    # (B, nh, T, hd)
        z = y.transpose(1, 2)                                           # (B, T, nh, hd): each head's output
        if hook is not None:
            z = hook("z", z)
        return self.o_proj(z.reshape(B, T, self.nh * self.hd))          # the sum over heads of each head's W_O z


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        if cfg.gated_mlp:
            self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act, self.gated = ACTIVATIONS[cfg.hidden_act], cfg.gated_mlp

    def forward(self, x, hook=None):
        """hook(site, t) -> t: the block's hooks at mlp_post (None = none)."""
        if self.gated:                                                   # SwiGLU (GeGLU with Gemma's gelu)
            h = self.act(self.gate_proj(x)) * self.up_proj(x)            # (B, T, intermediate)
        else:
            h = self.act(self.up_proj(x))
        if hook is not None:
            h = hook("mlp_post", h)
        return self.down_proj(h)


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg, layer), MLP(cfg)
        self.input_layernorm = norm(cfg, cfg.hidden_size)
        self.post_attention_layernorm = norm(cfg, cfg.hidden_size)  # Llama: the MLP's input; Gemma: attention's output
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = norm(cfg, cfg.hidden_size)
            self.post_feedforward_layernorm = norm(cfg, cfg.hidden_size)
        self.sandwich = cfg.sandwich_norms
        self.hooks = {site: [] for site in SITES + INNER_SITES}    # site -> [fn(x, pos) -> Tensor | None]; hooks()

    def hook(self, site, x, pos):
        for fn in self.hooks[site]:
            out = fn(x, pos)
            x = x if out is None else out
        return x

    def forward(self, x, pos, cos, sin, mask, cache):
        # Attention and the MLP get this block's hooks at their inner sites only when one is installed: with none,
        # the forward is the same ops as without sites.
        inner = InnerHooks(self, pos) if any(self.hooks[s] for s in INNER_SITES) else None
        x = self.hook("resid_pre", x, pos)
        a = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, inner)
        if self.sandwich:                       # Gemma: what attention adds to the stream is normed first
            a = self.post_attention_layernorm(a)
        a = self.hook("attn_out", a, pos)
        x = self.hook("resid_mid", x + a, pos)
        if self.sandwich:
            m = self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), inner))
        else:
            m = self.mlp(self.post_attention_layernorm(x), inner)
        m = self.hook("mlp_out", m, pos)
        return self.hook("resid_post", x + m, pos)


class InnerHooks:
    """A block's hooks at the sites inside attention and the MLP, with the positions bound: hook(site, t) -> t."""

    def __init__(self, block: Block, pos):
        self.block, self.pos = block, pos

    def wants(self, site) -> bool:
        return bool(self.block.hooks[site])

    def __call__(self, site, t):
        return self.block.hook(site, t, self.pos)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()    # the HF "model." prefix of every weight name
        # _weight skips nn.Embedding's random init: weights come from a checkpoint, and normal_ on the meta
        # device would import torch._dynamo for nothing.
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                               _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = norm(cfg, cfg.hidden_size)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:   # the output matrix is the embedding (the checkpoint has no lm_head.weight)
            self.lm_head.weight = self.model.embed_tokens.weight
        # Constants, made on the CPU (load() moves them): rope's frequencies (longrope: a short and a long set;
        # Gemma-3: its sliding layers' own), the embedding scale, ALiBi's slopes.
        self.rope_factor = rope_attention_factor(cfg)      # longrope's scale of cos and sin; 1.0 otherwise
        if cfg.alibi_bias_max is None:
            self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "longrope":
            self.register_buffer("long_inv_freq", rope_inv_freq(cfg, long=True), persistent=False)
        if cfg.local_rope_theta is not None:
            self.register_buffer("local_inv_freq", rope_inv_freq(cfg, cfg.local_rope_theta), persistent=False)
        if cfg.embed_scale:
            self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5, device="cpu"), persistent=False)
        if cfg.alibi_bias_max is not None:
            self.register_buffer("alibi_slopes", alibi_slopes(cfg.num_attention_heads, cfg.alibi_bias_max),
                                 persistent=False)

    @property
    def layers(self):
        return self.model.layers

    @property
    def hooked(self) -> bool:
        """Whether any hook is installed (a hook may read host state, or expect one call per batch of rows)."""
        return any(fns for block in self.model.layers for fns in block.hooks.values())

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0,
                return_hidden=False, begin=None):
        """input_ids (B, T); attention_mask (B, T), 0 at left padding; position_ids (B, T), derived if None.
        begin: (layer, x) starts at that layer with x (B, T, D) as its resid_pre instead of the embeddings of
        input_ids, which still give the positions; the layers before it do not run (patch.py: a patch at a layer
        leaves everything before it as it was).

        With a KVCache the new tokens are appended after what it holds, each row continuing its own positions.
        logits_to_keep: 0 = every position; k > 0 = the last k; a tensor of positions (T',) or per row (B, T').
        Returns logits (B, T', V) in the model's dtype, or with return_hidden the final-normed hidden states
        (B, T', D) that the logits are self.logits() of (a loss over a large vocab can take them in chunks).
        """
        cfg = self.config
        B, T = input_ids.shape
        dev = input_ids.device
        # Padding is looked for only when a mask is given (bool() syncs, and would break torch.compile's graph).
        padded = attention_mask is not None and not bool(attention_mask.all())
        valid = attention_mask.bool() if padded else torch.ones(B, T, dtype=torch.bool, device=dev)
        if position_ids is None:
            start = cache.next_pos[:, None] if cache is not None else 0
            position_ids = start + (valid.cumsum(-1) - 1).clamp(min=0)
        key_pos = position_ids.masked_fill(~valid, -1)           # (B, T): -1 marks padding
        s0 = 0
        if cache is not None:
            s0, key_pos = cache.append(key_pos, padded)         # first slot written; (B, S) positions of all keys
        has_pad = cache.has_pad if cache is not None else padded
        masks = {sliding: self._mask(position_ids, key_pos, s0, has_pad, cfg.sliding_window if sliding else None)
                 for sliding in {cfg.sliding(i) for i in range(cfg.num_hidden_layers)}}   # a layer's kind -> its mask

        first, x = begin if begin is not None else (0, self.model.embed_tokens(input_ids))    # x (B, T, D)
        if cfg.embed_scale and begin is None:                                    # Gemma: times sqrt(D), in x's dtype
            x = x * self.embed_scale.to(x.dtype)
        ropes = self._ropes(position_ids, x.dtype)                               # a layer's kind -> (cos, sin)
        for i, block in enumerate(self.model.layers):
            if i < first:
                continue
            cos, sin = ropes[cfg.sliding(i)]
            x = block(x, position_ids, cos, sin, masks[cfg.sliding(i)], cache)
        if cache is not None:
            # next position per row = one past its last real token (a chunk of pure padding moves nothing)
            cache.advance(T, torch.maximum(cache.next_pos, position_ids.masked_fill(~valid, -1).amax(-1) + 1))

        # The final norm and the vocab projection are per position: cut first, so unneeded logits cost nothing.
        k = logits_to_keep
        if isinstance(k, torch.Tensor):
            x = x[:, k] if k.dim() == 1 else x.gather(1, k[..., None].expand(-1, -1, x.shape[-1]))
        elif k:
            x = x[:, -k:]
        x = self.model.norm(x)
        return x if return_hidden else self.logits(x)                            # (B, T', D) or (B, T', V)

    def logits(self, h):
        """Final-normed hidden states (..., D) -> logits (..., V); Gemma-2 caps them: cap * tanh(logits / cap)."""
        z = self.lm_head(h)
        cap = self.config.final_softcap
        return z if cap is None else torch.tanh(z / cap) * cap

    def _ropes(self, position_ids, dtype) -> dict:
        """{sliding: (cos, sin)}, each (B, 1, T, hd): one pair for every layer, or Gemma-3's sliding layers' own;
        (None, None) with ALiBi, which has no rope."""
        cfg = self.config
        if cfg.alibi_bias_max is not None:
            return {False: (None, None), True: (None, None)}
        inv_freq = self.inv_freq
        if cfg.rope_scaling and cfg.rope_scaling["rope_type"] == "longrope":    # long factors past the trained length
            trained = cfg.rope_scaling["original_max_position_embeddings"]
            inv_freq = torch.where(position_ids.max() + 1 > trained, self.long_inv_freq, self.inv_freq)
        full = self._cos_sin(inv_freq, position_ids, dtype)
        local = full if cfg.local_rope_theta is None else self._cos_sin(self.local_inv_freq, position_ids, dtype)
        return {False: full, True: local}

    def _cos_sin(self, inv_freq, position_ids, dtype):
        freqs = position_ids[..., None].float() * inv_freq                       # (B, T, hd/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                         # (B, 1, T, hd)
        cos, sin = emb.cos(), emb.sin()
        if self.rope_factor != 1.0:
            cos, sin = cos * self.rope_factor, sin * self.rope_factor
        return cos.to(dtype), sin.to(dtype)

    def _mask(self, q_pos, key_pos, s0, has_pad, window):
        """Which keys each query may see: None (all), "causal" (square, no padding), or bool (B, 1, T, S); with ALiBi
        the scores' bias (B, nh, T, S), -inf where hidden."""
        T, S = q_pos.shape[1], key_pos.shape[1]
        if window is not None and S <= window:      # a window longer than what is held cuts nothing
            window = None
        alibi = self.config.alibi_bias_max is not None
        if not has_pad and not window and not alibi:
            if T == 1:
                return None
            if T == S:
                return "causal"
        q_slot = (s0 + torch.arange(T, device=q_pos.device))[:, None]       # (T, 1): cache slot of each query
        k_slot = torch.arange(S, device=q_pos.device)[None]                 # (1, S)
        ok = (k_slot <= q_slot) & (key_pos[:, None, :] >= 0)                 # (B, T, S)
        if window:   # as transformers: key visible iff q_pos - k_pos < sliding_window
            ok = ok & (q_pos[:, :, None] - key_pos[:, None, :] < window)
        # A padding query sees only itself, so no softmax row is empty (which would give NaN, also in gradients).
        ok = ok | (k_slot == q_slot)
        if not alibi:
            return ok[:, None]
        # ALiBi: each head h adds slope_h * (k_pos - q_pos) to a score, a penalty growing with distance.
        dist = (key_pos[:, None, :] - q_pos[:, :, None]).float()             # (B, T, S), <= 0 where visible
        bias = self.alibi_slopes[:, None, None] * dist[:, None]              # (B, nh, T, S)
        return bias.masked_fill(~ok[:, None], float("-inf"))

    @contextmanager
    def decoder(self, cache, kept: bool, new_tokens: int):
        """generate's decode step for the body of a `with`: (next ids (B,), live rows (B, 1) or None) -> logits
        (B, V), one token per row read into `cache`. runtime/ swaps in a faster step with the same math per machine
        (model.decoder = ...): one that multiplies by packed weights on a CPU, or replays a CUDA graph on a GPU."""
        yield lambda nxt, live: self(nxt[:, None], attention_mask=live, cache=cache, logits_to_keep=1)[:, -1]


class KVCache:
    """Preallocated keys and values for every layer: a decode step writes one slot, nothing is concatenated.

    Slots are shared by the batch (slot j is the j-th token fed); key_pos holds each slot's position per row,
    -1 for left padding, so rows of different lengths keep exact positions.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len, self.has_pad = 0, False

    def append(self, key_pos, padded: bool) -> tuple[int, torch.Tensor]:
        """Room for T more tokens at key positions key_pos (B, T) -> (their first slot, key positions of every slot
        attention reads: (B, len + T))."""
        T = key_pos.shape[1]
        if self.len + T > self.k.shape[3]:
            raise ValueError(f"KVCache full: holds {self.len} of {self.k.shape[3]} slots, {T} more asked")
        self.key_pos[:, self.len: self.len + T] = key_pos
        self.has_pad = self.has_pad or padded
        return self.len, self.key_pos[:, : self.len + T]

    def update(self, layer: int, k, v):
        T = k.shape[2]
        self.k[layer, :, :, self.len: self.len + T] = k
        self.v[layer, :, :, self.len: self.len + T] = v
        return self.k[layer, :, :, : self.len + T], self.v[layer, :, :, : self.len + T]

    def advance(self, T: int, next_pos):
        self.len += T
        self.next_pos = next_pos

    def rewind(self, keep: list[int]):
        """Forget each row r's tokens at positions keep[r] and after: their slots become padding (masked), and the
        row's next token goes to position keep[r]. A second turn whose text re-encodes differently from the tokens
        the first turn generated continues from where the two agree."""
        keep = torch.tensor(keep, dtype=torch.long, device=self.key_pos.device)
        self.key_pos.masked_fill_(self.key_pos >= keep[:, None], -1)
        self.next_pos, self.has_pad = keep, True

    def fork(self, rows, extra: int, length: int | None = None) -> "KVCache":
        """A cache whose row r continues row rows[r] of this one, with room for `extra` more tokens; length: keep only
        the first `length` slots (default: all it holds), as if the cache had read no further.

        Scoring several continuations of one prefix (the options of a question) reads the prefix once.
        """
        L, _, H, _, D = self.k.shape
        n = self.len if length is None else length
        new = KVCache.__new__(KVCache)
        new.k = self.k.new_zeros(L, len(rows), H, n + extra, D)
        new.v = torch.zeros_like(new.k)
        new.k[:, :, :, : n] = self.k[:, rows, :, : n]
        new.v[:, :, :, : n] = self.v[:, rows, :, : n]
        new.key_pos = self.key_pos.new_full((len(rows), n + extra), -1)
        new.key_pos[:, : n] = self.key_pos[rows, : n]
        if length is None:
            new.next_pos = self.next_pos[rows]
        else:   # one past each row's last position kept (padding is -1)
            new.next_pos = new.key_pos[:, : n].amax(-1) + 1 if n else self.next_pos.new_zeros(len(rows))
        new.len, new.has_pad = n, self.has_pad
        return new


@contextmanager
def hooks(model: Transformer, specs):
    """Install hooks for the body of a `with`; remove exactly those afterwards, also if the body raises.

    specs: iterable of (layer, site, fn), site in SITES or INNER_SITES; fn(x, pos (B, T)) returns a replacement
    for x or None: x is (B, T, D) at SITES, (B, T, nh, hd) at z, (B, nh, T, S) at pattern, (B, T, intermediate)
    at mlp_post. pos holds absolute positions, so "only generated tokens" stays exact under a cache.
    A pattern hook makes that layer's attention the written-out plain_attention, whose probabilities exist.
    """
    added = []   # (hook list, fn) pairs, so we remove what we added and nothing else
    try:
        for layer, site, fn in specs:
            if site not in SITES + INNER_SITES:
                raise ValueError(f"unknown hook site {site!r}; sites are {SITES + INNER_SITES}")
            if not -len(model.layers) <= layer < len(model.layers):
                raise ValueError(f"hook at layer {layer}: the model has {len(model.layers)} layers "
                                 f"(0..{len(model.layers) - 1})")
            model.layers[layer].hooks[site].append(fn)
            added.append((model.layers[layer].hooks[site], fn))
        yield model
    finally:
        for lst, fn in reversed(added):
            for i in range(len(lst) - 1, -1, -1):   # by identity: the same fn may be installed twice
                if lst[i] is fn:
                    del lst[i]
                    break


@contextmanager
def unhooked(model: Transformer):
    """No hook runs in the body of a `with`: every installed hook is set aside and put back afterwards, in its
    order, also if the body raises. A judge that is the model under test reads its prompts this way while a
    steering or ablation sweep has its hooks installed."""
    saved = [(lst, list(lst)) for block in model.layers for lst in block.hooks.values() if lst]
    try:
        for lst, _ in saved:
            lst.clear()
        yield model
    finally:
        for lst, fns in saved:
            lst[:0] = fns     # ahead of anything the body left installed (hooks() removes what it adds)


# ----------------------------------------------------------------------------------------------------- loading
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
PICKLES = ("*.bin", "*.pth", "*.pt", "*.ckpt")


def read_safetensors(source, dtype=None, device="cpu", name=None) -> tuple[dict, dict]:
    """A .safetensors file (a path, or its bytes) -> ({name: tensor}, {metadata key: str}), read tensor by tensor
    with plain reads (no mmap), so memory holds one copy. The project's one safetensors reader.

    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__":
    {str: str}}, then the raw bytes. name: what errors call the source (default: the path, or "<bytes>").
    """
    if isinstance(source, (bytes, bytearray)):
        f, size, path = io.BytesIO(source), len(source), name or "<bytes>"
    else:
        f, size, path = open(source, "rb"), Path(source).stat().st_size, name or Path(source)
    out = {}
    with f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8 and (head.startswith(b"PK\x03\x04") or head[0] == 0x80 and 2 <= head[1] <= 5):
            raise ValueError(f"{path}: a pickle (torch.save's zip or a bare pickle), not safetensors: pickles can run "
                             "code when loaded and are refused (a model's pickle weights convert with python -m "
                             "lab.prepare --convert=true)")
        if n > size - 8:
            raise ValueError(f"{path}: truncated or not safetensors (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{path}: the safetensors header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        for key, info in header.items():
            if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
                raise ValueError(f"{path}: header entry {key!r} is not {{dtype, shape, data_offsets}}: {info!r}")
            if info["dtype"] not in ST_DTYPES:
                raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
            if end - start != t.numel() * t.element_size():
                raise ValueError(f"{path}: tensor {key!r}: {end - start} bytes for shape {info['shape']}")
            if 8 + n + end > size:
                raise ValueError(f"{path}: truncated: tensor {key!r} ends at byte {8 + n + end}, file has {size}")
            if t.numel():
                f.seek(8 + n + start)
                f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[key] = t.to(device)
    return out, meta


def read_weights(folder: Path, dtype=None, device="cpu") -> tuple[dict, dict]:
    """All tensors of a checkpoint folder (one file or a sharded index) -> ({name: tensor}, {name: file})."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        weight_map = None
    if not files:
        pickles = [p.name for pat in PICKLES for p in folder.glob(pat)]
        if pickles:
            raise ValueError(f"{folder}: only pickle checkpoints ({', '.join(pickles)}); syco-lab refuses them because "
                             "unpickling can run arbitrary code. Convert them once, reading tensors only: "
                             f"python -m lab.prepare --model={folder} --convert=true")
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    sd, source = {}, {}
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{index}: names shard {name}, which is missing from {folder}")
        for key, t in read_safetensors(folder / name, dtype, device)[0].items():
            if weight_map is not None and weight_map.get(key) != name:
                raise ValueError(f"{folder / name}: tensor {key!r} is not listed for this file in {index.name}")
            sd[key], source[key] = t, name
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(sd))
        if lost:
            raise ValueError(f"{index}: lists {lost[:5]} but those shards do not contain them")
    return sd, source


def checkpoint_keys(cfg: Config) -> dict[str, tuple[str, ...]]:
    """{checkpoint key: the decoder's keys it holds, stacked by rows} for each key a family names its own way:
    Phi-3's fused qkv_proj and gate_up_proj, MPT's names and fused Wqkv. load() splits them; lora.py's peft export
    fuses them back. Every other key is the decoder's own (Llama's names)."""
    out = {}
    qkv = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        if cfg.model_type == "phi3":
            out[p + "self_attn.qkv_proj.weight"] = tuple(p + k for k in qkv)
            out[p + "mlp.gate_up_proj.weight"] = (p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight")
        elif cfg.model_type == "mpt":
            b = f"transformer.blocks.{i}."
            out |= {b + "norm_1.weight": (p + "input_layernorm.weight",), b + "attn.Wqkv.weight": tuple(p + k for k in qkv),
                    b + "attn.out_proj.weight": (p + "self_attn.o_proj.weight",),
                    b + "norm_2.weight": (p + "post_attention_layernorm.weight",),
                    b + "ffn.up_proj.weight": (p + "mlp.up_proj.weight",),
                    b + "ffn.down_proj.weight": (p + "mlp.down_proj.weight",)}
    if cfg.model_type == "mpt":
        out |= {"transformer.wte.weight": ("model.embed_tokens.weight",), "transformer.norm_f.weight": ("model.norm.weight",)}
    return out


# A multimodal Gemma-3 (model_type "gemma3") holds its text model under a prefix; the rest (vision tower, projector)
# is not read. Older checkpoints write language_model.model., transformers 5 model.language_model.
TEXT_PREFIXES = {"language_model.model.": "model.", "model.language_model.": "model.", "language_model.lm_head.": "lm_head."}


def read_config(folder: Path) -> tuple[Config, bool]:
    """config.json -> (Config, whether the checkpoint is a multimodal Gemma-3 whose text part is what loads)."""
    path = folder / "config.json"
    d = json.loads(path.read_text())
    if d.get("model_type") != "gemma3":
        return Config.from_dict(d, str(path)), False
    text = d.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{path}: a multimodal gemma3 config without a text_config: no text model to load")
    text = {"torch_dtype": d.get("torch_dtype") or d.get("dtype"), **text, "model_type": "gemma3_text"}
    return Config.from_dict(text, f"{path} (text_config)"), True


def move_constants(model: Transformer, device):
    """Move the buffers __init__ made on the CPU (rope's frequencies, the embedding scale, ALiBi's slopes) to
    `device`: they are computed, not read from a checkpoint, so assign=True loading leaves them where they were."""
    for name, buf in list(model.named_buffers()):
        model.register_buffer(name, buf.to(device), persistent=False)


def load(path, dtype=None, device="cpu") -> "Transformer":
    """Load an HF-layout folder -> Transformer (chat.load_tokenizer reads its tokenizer).
    dtype: None = the checkpoint's own, or 'bf16'/'fp32'/..

    The model is built on the meta device (no memory) and the read tensors become its parameters
    (assign=True), so peak memory is about one copy of the weights. Every tensor of the checkpoint is used and
    none is missing (a multimodal Gemma-3: every tensor of its text part).
    """
    folder = Path(path)
    if folder.is_file():
        if folder.suffix in (".bin", ".pth", ".pt", ".ckpt"):
            raise ValueError(f"{folder}: pickle checkpoints are refused (loading one can run arbitrary code); "
                             "use safetensors")
        folder = folder.parent
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder; "
                                "run `python -m lab.prepare` or `python -m lab.prepare --model=ORG/NAME`)")
    cfg, multimodal = read_config(folder)
    dtype = as_dtype(dtype) or as_dtype({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        cfg.torch_dtype, "fp32"))
    sd, source = read_weights(folder, dtype, device)
    with torch.device("meta"):
        model = Transformer(cfg)
    want = {k: v.shape for k, v in model.state_dict().items()}
    if multimodal:
        text = {k: new + k[len(old):] for k in sd for old, new in TEXT_PREFIXES.items() if k.startswith(old)}
        if "model.embed_tokens.weight" not in text.values():
            raise ValueError(f"{folder}: a multimodal gemma3 checkpoint without a text part (no "
                             f"{' or '.join(p + 'embed_tokens.weight' for p in TEXT_PREFIXES if p.endswith('model.'))})")
        sd, source = {text[k]: sd[k] for k in text}, {text[k]: source[k] for k in text}
    for key, parts in checkpoint_keys(cfg).items():   # fused or renamed: split the rows among the decoder's keys
        if key in sd:
            t, file = sd.pop(key), source.pop(key)
            sizes = [want[p][0] for p in parts]
            if tuple(t.shape) != (sum(sizes), *want[parts[0]][1:]):
                raise ValueError(f"{folder / file}: tensor {key!r} has shape {tuple(t.shape)}, config.json implies "
                                 f"{(sum(sizes), *want[parts[0]][1:])} ({' + '.join(p.split('.')[-2] for p in parts)})")
            for p, piece in zip(parts, t.split(sizes)):
                sd[p], source[p] = piece.clone() if len(parts) > 1 else piece, file
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        # Some tied checkpoints still carry the (identical) output matrix; anything else is a real conflict.
        if not torch.equal(sd["lm_head.weight"], sd.get("model.embed_tokens.weight")):
            raise ValueError(f"{folder}: tie_word_embeddings=true but lm_head.weight differs from the embeddings")
        del sd["lm_head.weight"]
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()     # the embedding, not a key of its own
    want = {k: shape for k, shape in want.items() if k not in tied}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing:
        raise ValueError(f"{folder}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ValueError(f"{folder / source[extra[0]]}: unexpected tensor(s) {extra[:5]} for a {cfg.model_type} model")
    for k, shape in want.items():
        if sd[k].shape != shape:
            raise ValueError(f"{folder / source[k]}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                             f"config.json implies {tuple(shape)}")
    model.load_state_dict(sd | {k: sd["model.embed_tokens.weight"] for k in tied}, strict=True, assign=True)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight             # one Parameter again, as built
    move_constants(model, device)
    model.name_or_path = str(folder)
    model.eval()   # as transformers' from_pretrained: no dropout (train.py switches to .train())
    return model


# -------------------------------------------------------------------------------------------------- generation
def sample(logits, temperature: float, top_p: float, generator):
    """logits (B, V) -> next ids (B,). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        # Keep the smallest set of tokens whose mass reaches top_p (the first token always survives).
        p, idx = probs.sort(-1, descending=True)
        p = p.masked_fill(p.cumsum(-1) - p > top_p, 0.0)
        return idx.gather(-1, torch.multinomial(p, 1, generator=generator)).squeeze(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def pad_left(seqs: list[list[int]], device="cpu", pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention_mask), both (N, T), left-padded so every row ends at the last column.
    Built as lists and copied once: one tensor per row would be a host-to-device copy per row on a GPU."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (T - len(s)) + list(s) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[0] * (T - len(s)) + [1] * len(s) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


def pad_right(seqs: list[list[int]], device="cpu", pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention_mask), both (N, T), right-padded: continuations read from a KV cache, and
    training batches, where every row starts at the first column."""
    T = max(len(s) for s in seqs)
    ids = torch.tensor([list(s) + [pad_id] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], dtype=torch.long, device=device)
    return ids, mask


@torch.no_grad()    # never differentiable; outside no_grad the kept KV cache would hold every step's autograd graph
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_ids=(), stop_strings=(), decode=None, pad_id: int = 0,
             use_cache: bool = True, cache: KVCache | None = None, look_every: int = 0) -> list[list[int]]:
    """Continue a batch of token-id prompts; returns each row's new ids, cut after a stop id / stop string.

    Prompts are left-padded so every row's next token is at the same column; positions are per row.
    stop_strings need `decode` (ids -> str), e.g. tok.decode. Given a `cache` (KVCache with B rows and room for
    the prompts and new tokens), the prompts are appended to what it holds, and it keeps the whole exchange:
    a second turn continues from it without re-reading the first (finished rows write masked padding).
    look_every: steps between looks at the tokens for stops (0 = 8 on a GPU, else 1; always 1 with a cache).
    Decode steps run through model.decoder, which runtime/ may set to a faster step with the same math.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    dev = model.model.embed_tokens.weight.device
    ids, mask = pad_left(prompts, dev, pad_id)
    B, T = ids.shape
    g = torch.Generator(device=dev).manual_seed(seed)
    out = [[] for _ in range(B)]
    done = [False] * B
    keep = cache is not None      # the caller's cache: feed it the last tokens too, for a next turn
    if use_cache and cache is None:
        cache = KVCache(model.config, B, T + max_new_tokens, model.model.embed_tokens.weight.dtype, dev)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]        # the prompts, at once
    with model.decoder(cache, keep, max_new_tokens) if use_cache else nullcontext() as step_fn:
        # Reading tokens back to the host waits for the device. On a GPU that wait would idle it while Python queues
        # the next step, so without a kept cache (whose finished rows must be masked from the very next step) the
        # tokens are looked at every 8 steps: rows are independent, and what a row makes after its stop is dropped.
        every = 1 if keep else look_every or (8 if dev.type == "cuda" else 1)
        stops, pending = set(stop_ids), []
        for step in range(max_new_tokens):
            nxt = sample(logits, temperature, top_p, g)                        # (B,)
            real = [not d for d in done]      # rows already done produce padding from here on
            pending.append(nxt)
            last = step == max_new_tokens - 1
            if len(pending) == every or last:
                for i, row in enumerate(torch.stack(pending, 1).tolist()):     # (B, steps) since the last look
                    for t in row:
                        if done[i]:
                            break
                        out[i].append(t)
                        done[i] = t in stops or bool(stop_strings) and any(s in decode(out[i]) for s in stop_strings)
                pending, last = [], last or all(done)
            if last and not keep:
                break
            # Padding tokens are masked: they change nothing, and a kept cache holds only the real exchange.
            live = None if all(real) or not keep else torch.tensor([[r] for r in real], dtype=torch.long, device=dev)
            if use_cache:
                logits = step_fn(nxt, live)
            else:   # recompute everything: slow, kept as the reference the cache is tested against
                ids = torch.cat([ids, nxt[:, None]], 1)
                mask = torch.cat([mask, torch.ones_like(mask[:, :1]) if live is None else live], 1)
                logits = model(ids, attention_mask=mask, logits_to_keep=1)[:, -1]
            if last:
                break
        return out
