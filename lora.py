"""LoRA swapped in place: low-rank adapters on the attention and MLP projections, for SFT and DPO.

    from lora import add_lora, lora_disabled, lora_parameters, merge, save_adapter, load_adapter
    add_lora(model, r=8, alpha=16)                  # wraps q,k,v,o,gate,up,down (those it has); freezes the rest
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-4)
    with lora_disabled(model):                      # DPO's reference: the same weights with adapters off
        ref = model(ids)
    save_adapter(model, "out/sft.safetensors", meta={"model": "SmolLM2-135M-Instruct"})

LoRA (Hu et al. 2021) learns W' = W + (alpha / r) B A, with A (r, in) and B (out, r), r << in, out. B starts at
zero, so at init the model is exactly the base. A wrapped projection keeps the base weight as its own `.weight`
(the same Parameter, no copy), so `model.layers.0.self_attn.q_proj.weight` keeps its state-dict key, and hooks,
steering and checkpoint code see the names they expect; the adapter adds `...q_proj.lora_A` / `...q_proj.lora_B`.
A base bias (Qwen2's q/k/v, attention_bias=true) is kept the same way, as `.bias`: y = x W^T + b + the update.
Every family has Llama's projection names inside the decoder; MPT has no gate_proj (its MLP is down(gelu(up(x)))).

Adapters are fp32 whatever the base dtype (as peft does): they are tiny, and Adam's small updates to bf16 values
would round away. The adapter path runs in fp32 and is added to the base output before one rounding to the base
dtype, so a bf16 model at init still gives bit-identical logits.

export_peft / import_peft write and read peft's adapter folders, under the checkpoint's module names: Phi-3's fused
qkv_proj / gate_up_proj and MPT's Wqkv / out_proj / up_proj / down_proj (model.checkpoint_keys, the map load() splits
by). A peft LoRA on a fused module, A (r, in) and B (rows of q|k|v, r), is the same A with each part's rows of B, so
it imports exactly, at rank r. Our per-part adapters export onto a fused module of k parts exactly as one LoRA of
rank k*r: A = the parts' A stacked, B = their B block-diagonal (a part not adapted: zero blocks), and alpha k*alpha
keeps the scale alpha/r; rank_pattern / alpha_pattern carry that k*r and k*alpha, and import_peft splits such blocks
back. Plain LoRA only: DoRA, rsLoRA, peft's own LoRA biases (lora_bias, bias="all") and other options that change
the math are refused, as are rank/alpha patterns that leave the parts with different ranks or scales.
"""
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lab.results import check_model_id, model_id, model_identity, write_atomic
from model import checkpoint_keys, read_safetensors

# target -> the sub-module of a block that holds it (HF names): layers[i].<parent>.<target>
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
NAME = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)")      # a wrapped module's name in the model
PEFT_PREFIX = "base_model.model."           # peft's key = PEFT_PREFIX + the checkpoint's module + ".lora_A.weight"
# peft options that change what a saved adapter computes: each must be empty/false for plain LoRA. (rank_pattern and
# alpha_pattern are read: fused modules need them, and import_peft checks the ranks and scales they give.)
PEFT_REFUSED = ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out",
                "modules_to_save", "layer_replication", "trainable_token_indices", "target_parameters", "use_qalora",
                "alora_invocation_tokens", "megatron_config", "use_bdlora", "arrow_config", "kasa_config",
                "velora_config", "monteclora_config")


class LoRALinear(nn.Module):
    """An nn.Linear plus a low-rank update: y = x W^T + b + scaling * (dropout(x) A^T) B^T (b: the base's, or none)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if r < 1:
            raise ValueError(f"LoRA rank r must be at least 1, got {r}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight                   # (out, in): the same Parameter, so the same key and memory
        self.weight.requires_grad_(False)
        # The base bias too (None where it has none); LoRA leaves it alone: merge folds B A into W only.
        self.register_parameter("bias", base.bias)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        self.r, self.alpha, self.scaling, self.dropout_p = r, alpha, alpha / r, dropout
        kw = dict(dtype=torch.float32, device=self.weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))    # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **kw))   # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))   # as nn.Linear and peft; the caller seeds torch
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()   # active only in model.train()
        self.merged = False     # True: W already holds W + scaling B A, so forward must not add it again
        self.disabled = False   # True: forward is the base projection alone

    def forward(self, x):                                                   # x (..., in) -> (..., out)
        if self.merged and self.disabled:
            raise RuntimeError("LoRA adapters merged into the weights cannot be disabled; unmerge(model) first")
        y = F.linear(x, self.weight, self.bias)                             # exactly the base projection
        if self.merged or self.disabled:
            return y
        h = F.linear(self.dropout(x.float()), self.lora_A)                   # (..., r), fp32
        return (y + F.linear(h, self.lora_B) * self.scaling).to(y.dtype)     # fp32 sum, one rounding

    @torch.no_grad()
    def set_merged(self, merged: bool):
        # W +/- scaling B A in fp32, then cast back: a bf16 W rounds, so unmerging it is exact only up to that
        # rounding. Merge for inference or export; train unmerged (merged, the adapters get no gradient).
        if merged != self.merged:
            delta = (self.lora_B @ self.lora_A) * self.scaling                # (out, in), fp32
            self.weight.copy_((self.weight.float() + (delta if merged else -delta)).to(self.weight.dtype))
            self.merged = merged

    def extra_repr(self):
        return (f"r={self.r}, alpha={self.alpha}, bias={self.bias is not None}, merged={self.merged}, "
                f"disabled={self.disabled}")


def lora_modules(model) -> dict:
    """{'model.layers.0.self_attn.q_proj': LoRALinear, ...} in model order."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model) -> list:
    """The trainable tensors (every lora_A and lora_B), e.g. for the optimizer."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def _slot(model, name: str, key: str):
    """'model.layers.0.self_attn.q_proj' -> (layers[0].self_attn, 'q_proj'); an error names `key`."""
    m = NAME.fullmatch(name)
    if not m or TARGETS.get(m[3]) != m[2] or int(m[1]) >= len(model.layers):
        raise ValueError(f"{key!r} is not a LoRA target of this model: targets are model.layers.<i>.self_attn."
                         f"{{q,k,v,o}}_proj and model.layers.<i>.mlp.{{gate,up,down}}_proj, i < {len(model.layers)}")
    owner = getattr(model.layers[int(m[1])], m[2])
    if not hasattr(owner, m[3]):
        raise ValueError(f"{key!r}: a {model.config.model_type} model has no {m[3]} (its projections: "
                         f"{_targets_of(model)})")
    return owner, m[3]


def _targets_of(model) -> list:
    """The projections this model's blocks have, of TARGETS (MPT: no gate_proj)."""
    block = model.layers[0]
    return [t for t, parent in TARGETS.items() if hasattr(getattr(block, parent), t)]


def _wrap(model, names, r, alpha, dropout) -> list:
    """Swap each named projection for a LoRALinear around it; freeze every other parameter of the model."""
    if lora_modules(model):
        raise ValueError(f"the model already has LoRA adapters on {len(lora_modules(model))} modules; "
                         "syco-lab keeps one adapter set per model")
    slots = [_slot(model, n, n) for n in names]     # all checked before any change: an error leaves the model as is
    for p in model.parameters():
        p.requires_grad_(False)
    for owner, attr in slots:
        lora = LoRALinear(getattr(owner, attr), r, alpha, dropout)
        setattr(owner, attr, lora.train(owner.training))    # a new module is in train mode: follow the model's
    return list(names)


def add_lora(model, targets=tuple(TARGETS), r=8, alpha=16, dropout=0.0, layers=None) -> list:
    """Wrap `targets` of `layers` (None = all) in place; returns the wrapped names. Seed with torch.manual_seed.

    The default, all seven (also when listed in full, as train.py's --targets does), means every projection the
    model has: MPT's six. A shorter list that names a projection the model lacks is an error naming it."""
    targets = [targets] if isinstance(targets, str) else list(dict.fromkeys(targets))
    bad = [t for t in targets if t not in TARGETS]
    if bad or not targets:
        raise ValueError(f"unknown LoRA target(s) {bad}; valid targets are {list(TARGETS)}")
    have = _targets_of(model)
    if set(targets) == set(TARGETS):
        targets = [t for t in targets if t in have]
    elif set(targets) - set(have):
        raise ValueError(f"LoRA target(s) {[t for t in targets if t not in have]}: a {model.config.model_type} model "
                         f"has no such projection; its targets are {have}")
    n = len(model.layers)
    layers = range(n) if layers is None else sorted(set(layers))
    if any(not 0 <= i < n for i in layers):
        raise ValueError(f"LoRA layers {list(layers)}: the model has layers 0..{n - 1}")
    return _wrap(model, [f"model.layers.{i}.{TARGETS[t]}.{t}" for i in layers for t in targets], r, alpha, dropout)


def adapter_config(model) -> dict:
    """{r, alpha, dropout, targets, layers} of the model's adapters."""
    mods = lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters (call add_lora or load_adapter first)")
    m = next(iter(mods.values()))
    parts = [NAME.fullmatch(n).groups() for n in mods]      # (layer, parent, target)
    return {"r": m.r, "alpha": m.alpha, "dropout": m.dropout_p,
            "targets": [t for t in TARGETS if any(p[2] == t for p in parts)],
            "layers": sorted({int(p[0]) for p in parts})}


@contextmanager
def lora_disabled(model):
    """Adapters off for the body of a `with` (the base model, no second copy); restored also if the body raises.
    Merged adapters cannot be taken out of the weights exactly in bf16, so a forward while merged raises."""
    mods = list(lora_modules(model).values())
    before = [m.disabled for m in mods]
    try:
        for m in mods:
            m.disabled = True
        yield model
    finally:
        for m, d in zip(mods, before):
            m.disabled = d


def merge(model, merged: bool = True):
    """Fold every adapter into its weight (forward then costs what the base costs); unmerge takes it back out."""
    for m in lora_modules(model).values():
        m.set_merged(merged)


def unmerge(model):
    merge(model, merged=False)


def lora_state_dict(model) -> dict:
    """Only the adapter tensors, under the model's keys: {'model.layers.0.self_attn.q_proj.lora_A': (r, in), ...}."""
    return {f"{n}.{k}": getattr(m, k).detach() for n, m in lora_modules(model).items() for k in ("lora_A", "lora_B")}


def _install(model, sd: dict, r, alpha, dropout, source: str):
    """Copy {our key: tensor} into the model's adapters, adding them first if it has none. Checks before any change."""
    mods = lora_modules(model)
    have = adapter_config(model) if mods else None
    if mods:
        for key, want in (("r", r), ("alpha", alpha)):
            if have[key] != want:
                raise ValueError(f"{source}: {key}={want}, but the model's adapters have {key}={have[key]}")
        if any(m.merged for m in mods.values()):
            raise RuntimeError("cannot load an adapter into merged weights; unmerge(model) first")
    # module -> a key to name it by in errors: the model's adapters if it has some, else the file's tensors
    names = {n: f"{n}.lora_A" for n in mods} or {k.rsplit(".", 1)[0]: k for k in sd}
    want = {}                                                               # our key -> expected shape
    for n, key in names.items():
        owner, attr = _slot(model, n, key)
        out_f, in_f = getattr(owner, attr).weight.shape
        want[f"{n}.lora_A"], want[f"{n}.lora_B"] = (r, in_f), (out_f, r)
    for k in sorted(set(want) | set(sd)):
        if k not in sd:
            raise ValueError(f"{source}: missing tensor {k!r}")
        if k not in want:
            raise ValueError(f"{source}: tensor {k!r} has no adapter in the model" + (
                f" (it adapts {have['targets']} in layers {have['layers']})" if have else ""))
        if tuple(sd[k].shape) != want[k]:
            raise ValueError(f"{source}: tensor {k!r} has shape {tuple(sd[k].shape)}, expected {want[k]} (r={r})")
    if not mods:
        _wrap(model, list(names), r, alpha, dropout)
    with torch.no_grad():
        for n, m in lora_modules(model).items():
            m.lora_A.copy_(sd[f"{n}.lora_A"])       # to fp32 and the model's device
            m.lora_B.copy_(sd[f"{n}.lora_B"])


def save_adapter(model, path, meta: dict | None = None, tensors: dict | None = None) -> Path:
    """Adapter tensors (fp32) + metadata (r, alpha, dropout, targets, layers and `meta`) as one safetensors file.

    Values are JSON-encoded (safetensors metadata is str -> str), so load_adapter returns them as given: put the
    model's name or config hash in `meta` for provenance. Written to a temporary file, then renamed.
    tensors: lora_state_dict's tensors gathered whole where the model holds only shards of them (FSDP)."""
    from safetensors.torch import save
    cfg, meta = adapter_config(model), dict(meta or {})
    if set(meta) & {*cfg, "format", "base_model_sha256"}:
        raise ValueError(f"save_adapter: meta may not use the reserved keys "
                         f"{sorted(set(meta) & {*cfg, 'format', 'base_model_sha256'})}")
    if getattr(model, "name_or_path", None):      # the base model's identity, checked by load_adapter
        meta |= {"base_model": meta.get("base_model", model.name_or_path),
                 "base_model_sha256": model_id(model.name_or_path)}
    info = {"format": "pt", **{k: json.dumps(v) for k, v in {**cfg, **meta}.items()}}
    tensors = {k: v.float().contiguous().cpu() for k, v in (tensors or lora_state_dict(model)).items()}
    path = Path(path)
    write_atomic(path, save(tensors, metadata=info))
    return path


def load_adapter(model, path, cross_model: bool = False) -> dict:
    """Load a save_adapter file into the model (adding adapters if it has none); returns the file's metadata.
    An adapter trained on another base model (however alike in shape), or recording none, is refused unless
    cross_model (lab.results.check_model_id); the check's record is metadata["model_check"], for the results.
    A model built in memory (no name_or_path) has no identity to check."""
    sd, info = read_safetensors(path)
    if not {"r", "alpha"} <= set(info):
        raise ValueError(f"{path}: no r/alpha metadata, so not written by save_adapter (a peft folder? import_peft)")
    meta = {k: json.loads(v) for k, v in info.items() if k != "format"}
    if getattr(model, "name_or_path", None):
        made_from = {"model": meta.get("base_model"), "model_sha256": meta.get("base_model_sha256")}
        meta["model_check"] = check_model_id(path, "adapter", made_from, model_identity(model.name_or_path),
                                             cross_model)
    _install(model, sd, meta["r"], meta["alpha"], meta.get("dropout", 0.0), str(path))
    model.adapter_path = str(path)       # the model's identity now includes the adapter (steer.model_check)
    return meta


def _fused(model) -> dict:
    """{checkpoint module: the model's modules it holds, stacked by rows} for the projections a family fuses or
    renames (Phi-3's qkv_proj, MPT's Wqkv, out_proj, ...): peft names the transformers model's modules, which are
    the checkpoint's. From model.checkpoint_keys, the map load() splits by; every other projection keeps its name."""
    out = {}
    for key, parts in checkpoint_keys(model.config).items():
        names = tuple(p.removesuffix(".weight") for p in parts)
        if all(NAME.fullmatch(n) for n in names):           # projections only (not MPT's norms, embedding)
            out[key.removesuffix(".weight")] = names
    return out


def _pattern(patterns: dict, key: str, default):
    """peft's rank_pattern / alpha_pattern lookup (peft.utils.other.get_pattern_key): the first pattern that matches
    the module's full name from a dot boundary to its end."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def export_peft(model, folder, base_model_name_or_path: str = "", tensors: dict | None = None) -> Path:
    """Write a peft LoRA folder (adapter_model.safetensors + adapter_config.json) that PeftModel.from_pretrained
    loads onto the transformers model of the same checkpoint. tensors: as save_adapter's.

    A fused module of k parts (Phi-3's qkv_proj: q, k, v) gets one LoRA of rank k*r and alpha k*alpha: A = the parts'
    A stacked, B = their B block-diagonal, so B A holds each part's B_i A_i in its rows and nothing else, and the
    scale alpha/r is kept; rank_pattern / alpha_pattern say so. A part not adapted gets zero blocks. Exact."""
    from safetensors.torch import save
    cfg, mods, folder = adapter_config(model), lora_modules(model), Path(folder)
    if len(mods) != len(cfg["targets"]) * len(cfg["layers"]):
        raise ValueError("the adapted modules are not every target in every adapted layer, which peft's "
                         "target_modules + layers_to_transform cannot express")
    sd = tensors or lora_state_dict(model)
    r, alpha = cfg["r"], cfg["alpha"]
    fused = _fused(model)
    home = {part: name for name, parts in fused.items() for part in parts}      # our module -> checkpoint module
    out, rank_pattern, alpha_pattern, leaves = {}, {}, {}, {}
    for name in dict.fromkeys(home.get(n, n) for n in mods):                      # checkpoint modules, model order
        parts = fused.get(name, (name,))
        A = [sd.get(f"{p}.lora_A") for p in parts]
        B = [sd.get(f"{p}.lora_B") for p in parts]
        like = next(a for a in A if a is not None)
        for i, p in enumerate(parts):                                             # not adapted: zero blocks
            if A[i] is None:
                owner, attr = _slot(model, p, p)
                A[i], B[i] = like.new_zeros(like.shape), like.new_zeros(getattr(owner, attr).weight.shape[0], r)
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = torch.cat(A).float().contiguous().cpu()          # (k r, in)
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = torch.block_diag(*B).float().contiguous().cpu()  # (rows, k r)
        leaf = name.rsplit(".", 1)[1]
        leaves[leaf] = None
        if len(parts) > 1:
            rank_pattern[leaf], alpha_pattern[leaf] = len(parts) * r, len(parts) * alpha
    every_layer = cfg["layers"] == list(range(len(model.layers)))
    # peft reads a module's layer index after layers_pattern: "layers" (model.layers.3...), MPT's "blocks"
    layers_pattern = re.search(r"(\w+)\.\d+\.", name)[1]
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path or None,
              "r": r, "lora_alpha": alpha, "lora_dropout": cfg["dropout"],
              "target_modules": list(leaves), "layers_to_transform": None if every_layer else cfg["layers"],
              "layers_pattern": None if every_layer else layers_pattern, "bias": "none", "lora_bias": False,
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern, "modules_to_save": None,
              "inference_mode": True}
    write_atomic(folder / "adapter_model.safetensors", save(out, metadata={"format": "pt"}))
    write_atomic(folder / "adapter_config.json", json.dumps(config, indent=2).encode())
    return folder


def import_peft(model, folder) -> dict:
    """Install a peft LoRA folder into the model; returns its adapter_config.json. The adapted modules are read from
    the tensor names, so target_modules (list or regex) and layers_to_transform are honoured whatever their form.

    A fused module's LoRA gives each part the same A and its rows of B (exact, same rank). One that export_peft
    wrote (rank k*r and alpha k*alpha by the patterns, B block-diagonal) is split back into its blocks, rank r each;
    a block whose A is zero was a part not adapted and is left out. syco-lab keeps one r and alpha per adapter set:
    patterns that leave modules with different ranks or alphas are refused."""
    folder = Path(folder)
    if not (folder / "adapter_model.safetensors").exists():     # an adapter_model.bin is a pickle: refused
        raise FileNotFoundError(f"{folder}: no adapter_model.safetensors (pickle adapter_model.bin is refused)")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    src = str(folder / "adapter_config.json")
    if cfg.get("peft_type") != "LORA":
        raise ValueError(f"{src}: peft_type={cfg.get('peft_type')!r}; only 'LORA' is supported")
    bad = [f"{k}={cfg[k]!r}" for k in PEFT_REFUSED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        bad.append(f"bias={cfg['bias']!r}")
    if cfg.get("init_lora_weights", True) not in (True, False, "gaussian"):     # PiSSA, OLoRA, LoftQ, ... may
        bad.append(f"init_lora_weights={cfg['init_lora_weights']!r}")       # have changed the base weights
    if bad:
        raise ValueError(f"{src}: {', '.join(bad)} changes the LoRA math; only plain LoRA can be imported")
    file = folder / "adapter_model.safetensors"
    found = {}                                                              # checkpoint module -> {A, B}
    for k, t in read_safetensors(file)[0].items():
        m = re.fullmatch(re.escape(PEFT_PREFIX) + r"(.+)\.lora_([AB])\.weight", k)
        if not m:
            raise ValueError(f"{file}: unexpected tensor {k!r} (plain LoRA has only "
                             f"{PEFT_PREFIX}<module>.lora_A.weight and .lora_B.weight)")
        found.setdefault(m[1], {})[m[2]] = t
    r0, alpha0, fused = cfg["r"], cfg["lora_alpha"], _fused(model)
    parted = {p: name for name, parts in fused.items() for p in parts}
    sd, scale = {}, {}                                          # our key -> tensor; our module -> (r, alpha)
    for name, t in found.items():
        if set(t) != {"A", "B"}:
            raise ValueError(f"{file}: {PEFT_PREFIX}{name} has lora_{''.join(t)}.weight only; LoRA needs A and B")
        if name in parted:
            raise ValueError(f"{file}: {PEFT_PREFIX}{name}: a {model.config.model_type} checkpoint has no such module "
                             f"(the checkpoint holds it in {parted[name]})")
        A, B = t["A"], t["B"]
        r, alpha = _pattern(cfg.get("rank_pattern"), name, r0), _pattern(cfg.get("alpha_pattern"), name, alpha0)
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != r or B.shape[1] != r:
            raise ValueError(f"{file}: {PEFT_PREFIX}{name}: lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)} "
                             f"are not rank r={r} as {src} gives it")
        parts = fused.get(name, (name,))
        k, rows = len(parts), [getattr(*_slot(model, p, f"{PEFT_PREFIX}{name}")).weight.shape[0] for p in parts]
        if B.shape[0] != sum(rows):
            raise ValueError(f"{file}: {PEFT_PREFIX}{name}.lora_B.weight has {B.shape[0]} rows, the model's "
                             f"{' + '.join(p.rsplit('.', 1)[1] for p in parts)} have {' + '.join(map(str, rows))}")
        Bs = B.split(rows)
        # export_peft's block structure: part i uses only A's rows and B's columns i*r0 .. (i+1)*r0
        blocks = k > 1 and (r, alpha) == (k * r0, k * alpha0) and all(
            not torch.cat([b[:, :i * r0], b[:, (i + 1) * r0:]], 1).any() for i, b in enumerate(Bs))
        for i, (p, b) in enumerate(zip(parts, Bs)):
            if blocks:
                a, b = A[i * r0:(i + 1) * r0], b[:, i * r0:(i + 1) * r0]
                if not a.any():         # A is never zero once initialised: a zero block is a part not adapted
                    continue
                scale[p] = (r0, alpha0)
            else:
                a, scale[p] = A, (r, alpha)
            sd[f"{p}.lora_A"], sd[f"{p}.lora_B"] = a, b
    if not sd:
        raise ValueError(f"{file}: no LoRA tensors")
    first = next(iter(scale))
    odd = next((p for p in scale if scale[p] != scale[first]), None)
    if odd:
        raise ValueError(f"{src}: rank_pattern / alpha_pattern give {first} r={scale[first][0]}, alpha="
                         f"{scale[first][1]} but {odd} r={scale[odd][0]}, alpha={scale[odd][1]}; syco-lab keeps one "
                         "r and alpha per adapter set")
    r, alpha = scale[first]
    _install(model, sd, r, alpha, cfg.get("lora_dropout", 0.0), str(folder))
    return cfg
