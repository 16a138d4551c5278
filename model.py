"""A Llama / Mistral decoder written from scratch, with the residual stream exposed.

    from model import load, generate, hooks
    model = load("models/SmolLM2-135M-Instruct", dtype="bf16")     # chat.load_tokenizer(folder) for its tokenizer
    logits = model(ids)                       # (B, T, V)
    logits = model(ids, logits_to_keep=1)     # (B, 1, V): scoring needs only the last position

Parameter names are Hugging Face's, so a checkpoint loads with no renaming and `strict=True`. The math follows
`transformers`' LlamaForCausalLM / MistralForCausalLM op for op (same rotate_half rope, same RMSNorm casts), which
is what makes the logits equal theirs. This file is the math and imports nothing of the project: steering reaches
in through hooks (hooks() below), LoRA and speed by swapping modules from outside (lora.py, runtime/).
"""
import io
import json
import math
import struct
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

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
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope(x, cos, sin):
    """Rotate each pair (x[i], x[i + hd/2]) by its position's angle: HF's rotate_half layout of the pairs."""
    return x * cos + rotate_half(x) * sin


def sdpa_attention(q, k, v, mask):
    """q (B, nh, T, hd), k/v (B, nkv, S, hd) -> (B, nh, T, hd) through PyTorch's fused kernel.
    mask: None (every key visible), "causal" (square, no padding) or bool (B, 1, T, S), True = visible."""
    causal = isinstance(mask, str)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal else mask, is_causal=causal,
                                          enable_gqa=k.shape[1] != q.shape[1])


def plain_attention(q, k, v, mask):
    """The same attention written out: two matrix products and a softmax, the readable reference of sdpa_attention
    (tested against it), and what runtime/ runs where SDPA's kernel is slow. The query heads of a group share their
    key head (no copy of k/v). Scores and softmax in fp32; the probabilities rounded to the model's dtype for the
    product with v, which is how SDPA's CPU kernel rounds them."""
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
    p = s.softmax(-1).to(v.dtype).view(B, nkv, nh // nkv * T, S)      # (B, nkv, g*T, S)
    return (p @ v).view(B, nh, T, hd)


class Attention(nn.Module):
    def __init__(self, cfg: Config, layer: int):
        super().__init__()
        self.layer, self.nh, self.nkv, self.hd = layer, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.nh * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.nkv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.nh * self.hd, cfg.hidden_size, bias=False)
        self.attend = sdpa_attention      # (q, k, v, mask) -> y; runtime/ sets the kernel that is fastest per machine

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape                                               # x: (B, T, D); cos, sin: (B, 1, T, hd)
        q = self.q_proj(x).view(B, T, self.nh, self.hd).transpose(1, 2)     # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)    # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)                       # (B, nkv, S, hd): past and new keys
        y = self.attend(q, k, v, mask)                                  # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))     # SwiGLU


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

    def forward(self, x, pos, cos, sin, mask, cache):
        x = self.hook("resid_pre", x, pos)
        a = self.hook("attn_out", self.self_attn(self.input_layernorm(x), cos, sin, mask, cache), pos)
        x = self.hook("resid_mid", x + a, pos)
        m = self.hook("mlp_out", self.mlp(self.post_attention_layernorm(x)), pos)
        return self.hook("resid_post", x + m, pos)


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
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:   # the output matrix is the embedding (the checkpoint has no lm_head.weight)
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    @property
    def layers(self):
        return self.model.layers

    @property
    def hooked(self) -> bool:
        """Whether any hook is installed (a hook may read host state, or expect one call per batch of rows)."""
        return any(fns for block in self.model.layers for fns in block.hooks.values())

    def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, logits_to_keep=0,
                return_hidden=False):
        """input_ids (B, T); attention_mask (B, T), 0 at left padding; position_ids (B, T), derived if None.

        With a KVCache the new tokens are appended after what it holds, each row continuing its own positions.
        logits_to_keep: 0 = every position; k > 0 = the last k; a tensor of positions (T',) or per row (B, T').
        Returns logits (B, T', V) in the model's dtype, or with return_hidden the final-normed hidden states
        (B, T', D) that the logits are lm_head of (a loss over a large vocab can take them in chunks).
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
            s0, key_pos = cache.append(key_pos, padded)         # first slot written; (B, S) positions of all keys
        mask = self._mask(position_ids, key_pos, s0, cache.has_pad if cache is not None else padded)

        freqs = position_ids[..., None].float() * self.inv_freq                  # (B, T, hd/2), fp32
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]                         # (B, 1, T, hd)
        x = self.model.embed_tokens(input_ids)                                   # (B, T, D)
        cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
        for block in self.model.layers:
            x = block(x, position_ids, cos, sin, mask, cache)
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
        return x if return_hidden else self.lm_head(x)                          # (B, T', D) or (B, T', V)

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
        new.next_pos, new.len, new.has_pad = self.next_pos[rows], self.len, self.has_pad
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
                             "unpickling can run arbitrary code. Convert them to safetensors with a tool you trust, "
                             "or download the model's safetensors files (python -m lab.prepare --model=ORG/NAME).")
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


def load(path, dtype=None, device="cpu") -> "Transformer":
    """Load an HF-layout folder -> Transformer (chat.load_tokenizer reads its tokenizer).
    dtype: None = the checkpoint's own, or 'bf16'/'fp32'/..

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
                                "run `python -m lab.prepare` or `python -m lab.prepare --model=ORG/NAME`)")
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
    tied = {"lm_head.weight"} if cfg.tie_word_embeddings else set()     # the embedding, not a key of its own
    want = {k: v.shape for k, v in model.state_dict().items() if k not in tied}
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
    model.inv_freq = model.inv_freq.to(device)     # made on the CPU in __init__, not read from the checkpoint
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
