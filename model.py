"""A Llama / Mistral decoder written from scratch, with the residual stream exposed.

    from model import load, generate, hooks
    model, tok = load("models/SmolLM2-135M-Instruct", dtype="bf16")
    logits = model(ids)                       # (B, T, V)
    logits = model(ids, logits_to_keep=1)     # (B, 1, V): scoring needs only the last position

Parameter names are Hugging Face's, so a checkpoint loads with no renaming and `strict=True`. The math follows
`transformers`' LlamaForCausalLM / MistralForCausalLM op for op (same rotate_half rope, same RMSNorm casts), which
is what makes the logits equal theirs. This file knows nothing of data, steering or LoRA: those reach in through
hooks (this file) and by swapping nn.Linear modules (lora.py). Which kernels run fastest on a CPU, and the copy of
the weights in oneDNN's layout that the forward may multiply by instead, are cpu.py's.
"""
import json
import math
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from runtime.cpu import AMX, can_prepack, onednn_linear, packed_weight, prepacked, project

# Hook sites of every layer, in the order the residual stream passes them.
SITES = ("resid_pre", "attn_out", "resid_mid", "mlp_out", "resid_post")
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def as_dtype(d):
    if d is None or isinstance(d, torch.dtype):
        return d
    if d not in DTYPES:
        raise ValueError(f"unknown dtype {d!r}; use one of {sorted(DTYPES)}")
    return DTYPES[d]


# ----------------------------------------------------------------------------------------------------- config
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
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None      # None, {"rope_type": "linear", ...} or {"rope_type": "llama3", ...}
    tie_word_embeddings: bool
    sliding_window: int | None     # Mistral: a query sees only the last `sliding_window` positions
    max_position_embeddings: int
    torch_dtype: str | None = None

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "Config":
        """Read an HF config, refusing anything that would change the math in a way this file does not do."""
        mt = d.get("model_type")
        if mt not in ("llama", "mistral"):
            raise ValueError(f"{source}: unknown model_type {mt!r}; syco-lab implements 'llama' (Llama 1/2/3, "
                             "SmolLM2) and 'mistral' (Mistral, Zephyr)")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False), ("mlp_bias", False)):
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {ok!r})")
        # rope: classic configs have rope_theta + rope_scaling; transformers 5 writes rope_parameters.
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        theta = rope.pop("rope_theta", d.get("rope_theta", 10000.0))
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind not in ("default", "linear", "llama3"):
            raise ValueError(f"{source}: rope type {kind!r} is not supported (default, linear, llama3)")
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise ValueError(f"{source}: partial_rotary_factor is not supported")
        heads, kv = d["num_attention_heads"], d.get("num_key_value_heads") or d["num_attention_heads"]
        if heads % kv:
            raise ValueError(f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv}")
        # transformers' MistralConfig defaults sliding_window to 4096 when the key is absent; Llama has none.
        window = d.get("sliding_window", 4096) if mt == "mistral" else None
        return cls(model_type=mt, vocab_size=d["vocab_size"], hidden_size=d["hidden_size"],
                   intermediate_size=d["intermediate_size"], num_hidden_layers=d["num_hidden_layers"],
                   num_attention_heads=heads, num_key_value_heads=kv,
                   head_dim=d.get("head_dim") or d["hidden_size"] // heads, rms_norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=theta, rope_scaling=None if kind == "default" else {**rope, "rope_type": kind},
                   tie_word_embeddings=d.get("tie_word_embeddings", False), sliding_window=window,
                   max_position_embeddings=d.get("max_position_embeddings", 4096),
                   torch_dtype=d.get("torch_dtype") or d.get("dtype"))


def rope_inv_freq(cfg: Config) -> torch.Tensor:
    """(head_dim/2,) inverse frequencies, with Llama-3's or linear scaling where the config asks for it."""
    # Computed on the CPU even while the model is built on the meta device (meta math would import torch._dynamo).
    steps = torch.arange(0, cfg.head_dim, 2, dtype=torch.int64, device="cpu").float()
    inv = 1.0 / (cfg.rope_theta ** (steps / cfg.head_dim))
    s = cfg.rope_scaling
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
    return inv


# ------------------------------------------------------------------------------------------------------ layers
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(dim)), eps

    def forward(self, x):
        # Normalize in fp32, cast back, then scale: the same order as transformers, so bf16 rounds the same way.
        # (F.rms_norm would be one kernel instead of five on a GPU, but its fused sum rounds differently there.)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope(x, cos, sin):
    """transformers' x * cos + rotate_half(x) * sin, with rotate_half(x) = cat(-x2, x1). Here sin arrives with its
    first half negated, so cat(x2, x1) * sin gives the same products bit for bit in one kernel fewer."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((x2, x1), dim=-1) * sin


def plain_attention(q, k, v, mask):
    """Attention as two matrix products and a softmax: q (B, nh, T, hd), k/v (B, nkv, S, hd) -> (B, nh, T, hd).
    mask: None, "causal" or bool (B, 1, T, S). The query heads of a group share their key head (no repeat of k/v).
    Scores and softmax in fp32, the probabilities rounded to the model's dtype for the product with v: the
    precision of SDPA's CPU kernel (tested against it).

    A CPU without AMX uses it where SDPA's kernels are slow there: a decode step (one query against a bf16 cache:
    SDPA is 3-5x slower), and under torch.compile at every length, where inductor fuses the scale, mask and softmax
    into one pass between the two products (16x128 in bf16, SmolLM2, an AMD EPYC: SDPA's flash kernel was 16% of the
    compiled forward, and the compiled forward goes from about 1.13x to 1.3x transformers).
    """
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, nkv, nh // nkv * T, hd).float()               # (B, nkv, g*T, hd): g heads share a kv head
    s = (qg @ k.float().transpose(-1, -2) * hd ** -0.5).view(B, nkv, nh // nkv, T, S)
    if isinstance(mask, str):                                        # "causal": query i sees keys up to S - T + i
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    elif mask is not None:
        mask = mask[:, :, None]                                      # (B, 1, 1, T, S), against (B, nkv, g, T, S)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = s.softmax(-1).to(v.dtype).view(B, nkv, nh // nkv * T, S)      # rounded as SDPA's CPU kernel rounds it
    return (p @ v).view(B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.packed_qkv = self.packed_o = None     # oneDNN-layout copies of the weights, see cpu.pack()

    def forward(self, x, cos, sin, mask, cache, rows=None):
        """rows: None, or the positions (T',) whose outputs are wanted (compiled scoring: see Transformer.forward).
        Attention still runs at all T (one block's worth is little, and fewer queries round differently); o_proj
        runs at T' only."""
        B, T, _ = x.shape                                               # x: (B, T, D); cos, sin: (B, 1, T, hd)
        q, k, v = project(x, self.packed_qkv, self.q_proj, self.k_proj, self.v_proj)
        q = q.view(B, T, self.nh, self.hd).transpose(1, 2)              # (B, nh, T, hd)
        k = k.view(B, T, self.nkv, self.hd).transpose(1, 2)             # (B, nkv, T, hd)
        v = v.view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                       # (B, nkv, S, hd): past and new keys
        # mask is None (every key visible), "causal" (square, no padding) or a bool tensor (B, 1, T, S).
        # A decode step (one new token) on a CPU without AMX, or any step under torch.compile there: see cpu.AMX.
        if not x.is_cuda and not AMX and (T == 1 or torch.compiler.is_compiling()):
            y = plain_attention(q, k, v, mask)
        else:
            causal, gqa = isinstance(mask, str), self.nkv != self.nh
            if gqa and x.is_cuda and isinstance(mask, torch.Tensor):
                # CUDA's fused kernels that take a mask do not take enable_gqa: SDPA would fall back to its math
                # path (~0.5 ms of host time per call). Repeating the key heads keeps the fused kernel.
                k, v = k.repeat_interleave(self.nh // self.nkv, 1), v.repeat_interleave(self.nh // self.nkv, 1)
                gqa = False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                               enable_gqa=gqa)
        if rows is not None:
            y = y[:, :, rows]                                           # (B, nh, T', hd)
        return project(y.transpose(1, 2).reshape(B, y.shape[2], self.nh * self.hd), self.packed_o, self.o_proj)[0]


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.packed_gate_up = self.packed_down = None     # see Attention

    def forward(self, x):
        g, u = project(x, self.packed_gate_up, self.gate_proj, self.up_proj)
        return project(F.silu(g) * u, self.packed_down, self.down_proj)[0]       # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.self_attn, self.mlp = Attention(cfg, layer), MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hooks = {site: [] for site in SITES}    # site -> [fn(x, pos) -> Tensor | None]; see hooks() below

    def hook(self, site, x, pos):
        for fn in self.hooks[site]:
            out = fn(x, pos)
            x = x if out is None else out
        return x

    def forward(self, x, pos, cos, sin, mask, cache, rows=None):
        """rows: None, or the positions (T',) to go on with (the last block of a compiled scoring forward)."""
        x = self.hook("resid_pre", x, pos)
        a = self.hook("attn_out", self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, rows), pos)
        if rows is not None:
            x = x[:, rows]                                              # (B, T', D)
        x = self.hook("resid_mid", x + a, pos)
        m = self.hook("mlp_out", self.mlp(self.post_attention_layernorm(x)), pos)
        return self.hook("resid_post", x + m, pos)


class Transformer(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()    # the HF "model." prefix of every weight name
        # _weight skips nn.Embedding's random init: weights come from a checkpoint, and normal_ on the meta
        # device would import torch._dynamo (about 1 s and 70 MB) for nothing.
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                               _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if not cfg.tie_word_embeddings:   # tied: the output matrix is the embedding, no lm_head.weight key
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.packed_head = None     # see Attention

    @property
    def layers(self):
        return self.model.layers

    @property
    def hooked(self) -> bool:
        """Whether any hook is installed (a hook may read host state, or expect one call per batch of rows)."""
        return any(fns for block in self.model.layers for fns in block.hooks.values())

    @property
    def output_weight(self):
        """(V, D) vocab projection: lm_head's, or the embeddings when tied."""
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0,
                return_hidden=False):
        """input_ids (B, T); attention_mask (B, T), 0 at left padding; position_ids (B, T), derived if None.

        With a KVCache the new tokens are appended after what it holds, each row continuing its own positions.
        logits_to_keep: 0 = every position; k > 0 = the last k; a tensor of positions (T',) or per row (B, T').
        Returns logits (B, T', V) in the model's dtype, or with return_hidden the final-normed hidden states
        (B, T', D) that the logits are `output_weight` times (a loss over a large vocab can take them in chunks).
        """
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
            s0 = cache.append(key_pos, padded)                  # first slot written (a (1,) tensor if static)
            key_pos = cache.key_pos if cache.static else cache.key_pos[:, : s0 + T]
        mask = self._mask(position_ids, key_pos, s0, cache.has_pad or cache.static if cache is not None else padded)

        freqs = position_ids[..., None].float() * self.inv_freq                  # (B, T, hd/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                         # (B, 1, T, hd)
        x = self.model.embed_tokens(input_ids)                                   # (B, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        sin = torch.cat((-sin[..., : sin.shape[-1] // 2], sin[..., sin.shape[-1] // 2:]), -1)   # see rope()
        # Under torch.compile only the kept positions go on after the last block's attention: its output
        # projection, MLP and residual run at those rows alone (~3.5% of a 30-layer forward on an AMD EPYC, ~0 on
        # Intel AMX). Not in eager mode: a product of fewer rows may take another kernel, which sums in another
        # order (Intel AMX: 1 bf16 step off for o_proj at 1 row against 50), and eager is transformers' forward
        # op for op, so that its logits are theirs bit for bit on any machine (transformers runs the whole last
        # block too). A compiled forward rounds differently anyway (fused kernels). Not with hooks (they see every
        # position), nor for per-row positions. k: what is still to be cut after the blocks.
        k, rows = logits_to_keep, None
        if torch.compiler.is_compiling() and not self.hooked:
            if isinstance(k, torch.Tensor) and k.dim() == 1:
                k, rows = 0, k % T                                        # (T',) non-negative
            elif isinstance(k, int) and 0 < k < T:
                k, rows = 0, torch.arange(T - k, T, device=dev)
        last = self.model.layers[-1]
        for block in self.model.layers:
            x = block(x, position_ids, cos, sin, mask, cache, rows if block is last else None)
        if cache is not None:
            # next position per row = one past its last real token (a chunk of pure padding moves nothing)
            cache.advance(T, torch.maximum(cache.next_pos, position_ids.masked_fill(~valid, -1).amax(-1) + 1))

        # The final norm and the vocab projection are per position: cut first, so unneeded logits cost nothing.
        if isinstance(k, torch.Tensor):
            x = x[:, k] if k.dim() == 1 else x.gather(1, k[..., None].expand(-1, -1, x.shape[-1]))
        elif k:
            x = x[:, -k:]
        x = self.model.norm(x)
        if return_hidden:
            return x
        P = packed_weight(self.packed_head, x)
        return F.linear(x, self.output_weight) if P is None else onednn_linear(x, P)

    def _mask(self, q_pos, key_pos, s0, has_pad):
        """Which keys each query may see: None (all), "causal" (square, no padding), or bool (B, 1, T, S)."""
        T, S, W = q_pos.shape[1], key_pos.shape[1], self.config.sliding_window
        window = W is not None and S > W      # a window longer than what is held never cuts anything
        if not has_pad and not window:
            if T == 1:
                return None
            if T == S:
                return "causal"
        q_slot = (s0 + torch.arange(T, device=q_pos.device))[:, None]       # (T, 1): cache slot of each query
        k_slot = torch.arange(S, device=q_pos.device)[None]                 # (1, S)
        ok = (k_slot <= q_slot) & (key_pos[:, None, :] >= 0)                 # (B, T, S)
        if window:   # as transformers: key visible iff q_pos - k_pos < sliding_window
            ok = ok & (q_pos[:, :, None] - key_pos[:, None, :] < W)
        # A padding query sees only itself, so no softmax row is empty (which would give NaN, also in gradients).
        ok = ok | (k_slot == q_slot)
        return ok[:, None]


class KVCache:
    """Preallocated keys and values for every layer: a decode step writes one slot, nothing is concatenated.

    Slots are shared by the batch (slot j is the j-th token fed); key_pos holds each slot's position per row,
    -1 for left padding, so rows of different lengths keep exact positions.
    Static (make_static): the fill level lives on the device and attention reads every slot, unfilled ones masked,
    so a decode step has fixed shapes and no host value, and one captured CUDA graph replays at any length.
    """

    def __init__(self, cfg: Config, batch: int, max_len: int, dtype=torch.float32, device="cpu"):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.key_pos = torch.full((batch, max_len), -1, dtype=torch.long, device=device)
        self.next_pos = torch.zeros(batch, dtype=torch.long, device=device)
        self.len, self.has_pad, self.static = 0, False, False

    def make_static(self):
        self.static, self.slot = True, torch.tensor([self.len], device=self.k.device)   # (1,): next slot

    def append(self, key_pos, padded: bool) -> int:
        T = key_pos.shape[1]
        if self.static:        # no capacity check: that would read the device; generate sizes the cache
            self.slots = self.slot + torch.arange(T, device=self.k.device)   # (T,): this forward's slots
            self.key_pos.index_copy_(1, self.slots, key_pos)
            return self.slot
        if self.len + T > self.k.shape[3]:
            raise ValueError(f"KVCache full: holds {self.len} of {self.k.shape[3]} slots, {T} more asked")
        self.key_pos[:, self.len: self.len + T] = key_pos
        self.has_pad = self.has_pad or padded
        return self.len

    def update(self, layer: int, k, v):
        T = k.shape[2]
        if self.static:
            self.k[layer].index_copy_(2, self.slots, k)
            self.v[layer].index_copy_(2, self.slots, v)
            return self.k[layer], self.v[layer]
        self.k[layer, :, :, self.len: self.len + T] = k
        self.v[layer, :, :, self.len: self.len + T] = v
        return self.k[layer, :, :, : self.len + T], self.v[layer, :, :, : self.len + T]

    def advance(self, T: int, next_pos):
        if self.static:        # in place: a captured graph reads and writes these very tensors
            self.slot += T
            self.next_pos.copy_(next_pos)
        else:
            self.len += T
            self.next_pos = next_pos

    def fork(self, rows, extra: int) -> "KVCache":
        """A cache whose row r continues row rows[r] of this one, with room for `extra` more tokens.

        Scoring several continuations of one prefix (the options of a question) reads the prefix once.
        """
        L, _, H, _, D = self.k.shape
        new = KVCache.__new__(KVCache)
        new.k = self.k.new_zeros(L, len(rows), H, self.len + extra, D)
        new.v = torch.zeros_like(new.k)
        new.k[:, :, :, : self.len] = self.k[:, rows, :, : self.len]
        new.v[:, :, :, : self.len] = self.v[:, rows, :, : self.len]
        new.key_pos = self.key_pos.new_full((len(rows), self.len + extra), -1)
        new.key_pos[:, : self.len] = self.key_pos[rows, : self.len]
        new.next_pos, new.len, new.has_pad, new.static = self.next_pos[rows], self.len, self.has_pad, False
        return new


@contextmanager
def hooks(model: Transformer, specs):
    """Install hooks for the body of a `with`; remove exactly those afterwards, also if the body raises.

    specs: iterable of (layer, site, fn), site in SITES; fn(x (B, T, D), pos (B, T)) returns a replacement
    for x or None. pos holds absolute positions, so "only generated tokens" stays exact under a cache.
    """
    added = []   # (hook list, fn) pairs, so we remove what we added and nothing else
    try:
        for layer, site, fn in specs:
            if site not in SITES:
                raise ValueError(f"unknown hook site {site!r}; sites are {SITES}")
            model.layers[layer].hooks[site].append(fn)
            added.append((model.layers[layer].hooks[site], fn))
        yield model
    finally:
        for lst, fn in reversed(added):
            for i in range(len(lst) - 1, -1, -1):   # by identity: the same fn may be installed twice
                if lst[i] is fn:
                    del lst[i]
                    break


# ----------------------------------------------------------------------------------------------------- loading
ST_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
             "BOOL": torch.bool}
PICKLES = ("*.bin", "*.pth", "*.pt", "*.ckpt")


def read_safetensors(path, dtype=None, device="cpu") -> dict:
    """Read a .safetensors file tensor by tensor with plain reads (no mmap), so memory holds one copy.

    Format: 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}, raw bytes.
    """
    path = Path(path)
    size = path.stat().st_size
    out = {}
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (only {size} bytes)")
        n = struct.unpack("<Q", head)[0]
        if n > size - 8:
            raise ValueError(f"{path}: truncated or not safetensors (header of {n} bytes in a {size}-byte file)")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: unreadable safetensors header ({e})") from None
        header.pop("__metadata__", None)
        for name, info in header.items():
            if info["dtype"] not in ST_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            start, end = info["data_offsets"]
            t = torch.empty(info["shape"], dtype=ST_DTYPES[info["dtype"]])
            if end - start != t.numel() * t.element_size():
                raise ValueError(f"{path}: tensor {name!r}: {end - start} bytes for shape {info['shape']}")
            if 8 + n + end > size:
                raise ValueError(f"{path}: truncated: tensor {name!r} ends at byte {8 + n + end}, file has {size}")
            if t.numel():
                f.seek(8 + n + start)
                f.readinto(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[name] = t.to(device)
    return out


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
                             "unpickling can run arbitrary code. Convert them to safetensors with a tool you trust, "
                             "or download the model's safetensors files (python prepare.py --model=ORG/NAME).")
        raise FileNotFoundError(f"{folder}: no *.safetensors weights found")
    sd, source = {}, {}
    for name in files:
        if not (folder / name).exists():
            raise FileNotFoundError(f"{index}: names shard {name}, which is missing from {folder}")
        for key, t in read_safetensors(folder / name, dtype, device).items():
            if weight_map is not None and weight_map.get(key) != name:
                raise ValueError(f"{folder / name}: tensor {key!r} is not listed for this file in {index.name}")
            sd[key], source[key] = t, name
    if weight_map is not None:
        lost = sorted(set(weight_map) - set(sd))
        if lost:
            raise ValueError(f"{index}: lists {lost[:5]} but those shards do not contain them")
    return sd, source


def load(path, dtype=None, device="cpu") -> "Transformer":
    """Load an HF-layout folder -> Transformer (chat.load_tokenizer reads its tokenizer). dtype: None = the checkpoint's own, or 'bf16'/'fp32'/..

    The model is built on the meta device (no memory) and the read tensors become its parameters
    (assign=True), so peak memory is about one copy of the weights.
    """
    folder = Path(path)
    if folder.is_file():
        if folder.suffix in (".bin", ".pth", ".pt", ".ckpt"):
            raise ValueError(f"{folder}: pickle checkpoints are refused (loading one can run arbitrary code); "
                             "use safetensors")
        folder = folder.parent
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder}: no config.json (expected a Hugging Face model folder; "
                                "run `python prepare.py` or `python prepare.py --model=ORG/NAME`)")
    cfg = Config.from_dict(json.loads((folder / "config.json").read_text()), str(folder / "config.json"))
    dtype = as_dtype(dtype) or as_dtype({"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(
        cfg.torch_dtype, "fp32"))
    sd, source = read_weights(folder, dtype, device)
    with torch.device("meta"):
        model = Transformer(cfg)
    if cfg.tie_word_embeddings and "lm_head.weight" in sd:
        # Some tied checkpoints still carry the (identical) output matrix; anything else is a real conflict.
        if not torch.equal(sd["lm_head.weight"], sd.get("model.embed_tokens.weight")):
            raise ValueError(f"{folder}: tie_word_embeddings=true but lm_head.weight differs from the embeddings")
        del sd["lm_head.weight"]
    want = {k: v.shape for k, v in model.state_dict().items()}
    missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
    if missing:
        raise ValueError(f"{folder}: missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        raise ValueError(f"{folder / source[extra[0]]}: unexpected tensor(s) {extra[:5]} for a {cfg.model_type} model")
    for k, shape in want.items():
        if sd[k].shape != shape:
            raise ValueError(f"{folder / source[k]}: tensor {k!r} has shape {tuple(sd[k].shape)}, "
                             f"config.json implies {tuple(shape)}")
    model.load_state_dict(sd, strict=True, assign=True)
    model.inv_freq = model.inv_freq.to(device)     # made on the CPU in __init__, not read from the checkpoint
    model.name_or_path = str(folder)
    model.eval()   # as transformers' from_pretrained: no dropout, and generate may replay CUDA graphs (train.py: .train())
    return model


# -------------------------------------------------------------------------------------------------- generation
def compile_for_inference(model: Transformer):
    """torch.compile for scoring and generation with fixed weights. On the CPU with inductor's "freezing": the
    weights become constants of the graph, which inductor prepacks for oneDNN, and without AMX attention is written
    out (see plain_attention); the last block goes on at the kept positions only (see forward). So the weights must
    not change afterwards (no training, no in-place edits). On a GPU, plain
    compile: that is what was measured there (1.36x transformers on a 7B model).

    Freezing is switched on around every call, not through torch.compile(options=...): dynamo reads the global
    flag when it traces (at a call, not here) to decide whether weights become graph constants, and with the
    option alone they stay graph inputs that inductor cannot prepack (the weight-pack pass then matches nothing).
    """
    compiled = torch.compile(model)
    if model.output_weight.device.type != "cpu":
        return compiled
    from torch._inductor import config as inductor_config     # imported here: importing inductor takes ~1 s
    call = compiled.forward

    def forward(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return call(*args, **kwargs)
    compiled.forward = forward
    return compiled


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


def graphed_decode(model: Transformer, cache: KVCache):
    """A decode step (B,) ids, None -> (B, V) logits that, from its second call on, replays a captured CUDA graph.

    Eager PyTorch launches each of a 7B model's ~1,500 small kernels per token from Python, which takes longer than
    the GPU needs to read the weights; a graph launches them all at once. The first call runs eagerly on a side
    stream (warming cuBLAS up, as capture requires), then captures the step on static buffers.
    """
    cache.make_static()
    graph, tok, out = None, None, None

    @torch.no_grad()
    def step(nxt, live=None):               # live: always None here (no kept cache, nothing masked)
        nonlocal graph, tok, out
        if graph is not None:
            tok.copy_(nxt[:, None])
            graph.replay()
            return out                       # overwritten by the next replay: sample from it first
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = model(nxt[:, None], cache=cache, logits_to_keep=1)[:, -1]
        torch.cuda.current_stream().wait_stream(side)
        tok, graph = nxt[:, None].clone(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):        # records, runs nothing: the cache is where the eager step left it
            out = model(tok, cache=cache, logits_to_keep=1)[:, -1]
        return logits
    return step


@torch.no_grad()    # never differentiable; outside no_grad the kept KV cache would hold every step's autograd graph
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_ids=(), stop_strings=(), decode=None, pad_id: int = 0,
             use_cache: bool = True, cache: KVCache | None = None, look_every: int = 0,
             cuda_graph: bool = True, prepack: bool | None = None) -> list[list[int]]:
    """Continue a batch of token-id prompts; returns each row's new ids, cut after a stop id / stop string.

    Prompts are left-padded so every row's next token is at the same column; positions are per row.
    stop_strings need `decode` (ids -> str), e.g. tok.decode. Given a `cache` (KVCache with B rows and room for
    the prompts and new tokens), the prompts are appended to what it holds, and it keeps the whole exchange:
    a second turn continues from it without re-reading the first (finished rows write masked padding).
    look_every: steps between looks at the tokens for stops (0 = 8 on a GPU, else 1; always 1 with a cache).
    cuda_graph: on a GPU, replay decode steps as a CUDA graph (not with a kept cache, hooks, or in training mode).
    prepack: decode steps multiply by a copy of the weights in oneDNN's layout (see cpu.pack; CPU only), ~1.3-1.5x
    faster. None = when cpu.can_prepack (bf16 on an x86 CPU with free memory for the copy, whose packed products give
    the same bits at B rows, so the same tokens) and at least 16 new tokens are asked for: packing costs about as
    much as 3-4 decode steps. The prompts are read with the weights as they are (a prompt's many rows gain little
    from the layout, and may take a kernel that rounds differently). A packed model stays packed.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    if prepack is None:
        prepack = use_cache and max_new_tokens >= 16 and can_prepack(model, len(prompts))
    dev = model.model.embed_tokens.weight.device
    ids, mask = pad_left(prompts, dev, pad_id)
    B, T = ids.shape
    g = torch.Generator(device=dev).manual_seed(seed)
    out = [[] for _ in range(B)]
    done = [False] * B
    keep = cache is not None      # the caller's cache: feed it the last tokens too, for a next turn
    if use_cache and cache is None:
        cache = KVCache(model.config, B, T + max_new_tokens, model.model.embed_tokens.weight.dtype, dev)
    logits = model(ids, attention_mask=mask, cache=cache, logits_to_keep=1)[:, -1]
    with prepacked(model) if prepack else nullcontext():
        if cuda_graph and use_cache and not keep and dev.type == "cuda" and not model.training and not model.hooked \
                and max_new_tokens > 2:
            step_fn = graphed_decode(model, cache)
        else:
            step_fn = lambda nxt, live: model(nxt[:, None], attention_mask=live, cache=cache, logits_to_keep=1)[:, -1]
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
