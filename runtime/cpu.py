"""What runs fastest on this CPU, with the same math: the attention kernel for CPUs without AMX, and PackedLinear, an
nn.Linear whose product runs on a copy of its weight in oneDNN's blocked layout, swapped in from outside as
lora.LoRALinear is.

    pack(model)                     # --prepack: for the whole run (runtime.accelerate)
    with packed(model): ...         # for a `with`
    use_cpu_kernels(model)          # the attention kernel and generate's decode steps for this CPU

Nothing here changes what a forward computes, only which kernel sums each dot product: in bf16 that gives the same
bits where this CPU's kernels sum in the same order (packed_matches_plain says where). docs/speed.md has the
measurements behind each choice.
"""
import os
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Transformer, plain_attention, sdpa_attention

# Whether this CPU has AMX tiles (matrix units of recent Intel Xeons), through which SDPA's CPU kernel and
# oneDNN's large bf16 products multiply. Two choices follow from it:
# - attention: with AMX, SDPA is the faster kernel everywhere; without it (AVX512-BF16 alone), SDPA's bf16 path is
#   slow for one query and under torch.compile, and cpu_attention takes plain_attention there;
# - packed weights: with AMX, products of more than 32 rows keep the plain weights (see PackedLinear).
AMX = hasattr(torch.cpu, "_is_amx_tile_supported") and torch.cpu._is_amx_tile_supported()   # private: guarded


def cpu_attention(q, k, v, mask, scale=None, softcap=None):
    """The attention kernel of a CPU without AMX: plain_attention for a decode step (one query against the cache)
    and under torch.compile (where inductor fuses its scale, mask and softmax), SDPA for every other eager call, so
    that eager scoring runs transformers' kernel."""
    if q.shape[2] == 1 or torch.compiler.is_compiling():
        return plain_attention(q, k, v, mask, scale)
    return sdpa_attention(q, k, v, mask, scale)


# -------------------------------------------------------------------------- a copy of the weights in oneDNN's layout
def blocked(weight):
    """(out, in) weight -> the same matrix in oneDNN's blocked layout, laid out for one row at a time."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 1)


def onednn_linear(x, packed_weight):
    """x (..., in) @ a weight that blocked() made -> (..., out)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed_weight, None, "none", [], "")


class PackedLinear(nn.Module):
    """A bias-free nn.Linear that multiplies by a oneDNN-blocked copy of its weight while the copy still stands for
    the weight, else by the weight itself: the same dot products, summed by another kernel.

    oneDNN reads its blocked layout faster than the plain one when it multiplies a few rows, as a decode step does
    (docs/speed.md). The weight stays the same Parameter under the same name (state_dict keys do not change).
    The copy is not used while gradients are recorded (it has none), under torch.compile, or once the weight has
    been replaced, moved (.to(): new storage) or edited in place (a steering ablation, a LoRA merge, an optimizer
    step: each moves the tensor's version). An edit through `.data` keeps the version: unpack before one. With AMX,
    a product of more than 32 rows also takes the weight itself: the plain layout's kernels are as fast there (bf16:
    AMX's) or faster (fp32), and round as transformers' do.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, None     # (out, in): the same Parameter; bias-free
        self.__dict__["plain"] = linear                  # what unpack() puts back (not a submodule: no new keys)
        with torch.no_grad():
            self.packed_weight = blocked(self.weight)
        self.stamp = (self.weight._version, self.weight.data_ptr())

    def forward(self, x):
        if torch.is_grad_enabled() or torch.compiler.is_compiling() \
                or (self.weight._version, self.weight.data_ptr()) != self.stamp \
                or AMX and x.numel() > 32 * x.shape[-1]:
            return F.linear(x, self.weight)
        return onednn_linear(x, self.packed_weight)


def linears(model: Transformer) -> list[tuple[nn.Module, str]]:
    """(parent, name) of every projection pack() may swap: the seven of each block and the vocab projection."""
    slots = [(model, "lm_head")]
    for block in model.layers:
        slots += [(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
        slots += [(block.mlp, n) for n in ("gate_proj", "up_proj", "down_proj") if n in block.mlp._modules]
    return slots


def packable(model) -> bool:
    """Whether pack() can pack this model: a Transformer (not a compiled wrapper) on a CPU with oneDNN, in fp32, or
    in bf16 where oneDNN has bf16 kernels for this CPU."""
    if not isinstance(model, Transformer) or not torch.backends.mkldnn.is_available():
        return False
    w = model.lm_head.weight
    try:       # private ops: another torch version may lack them
        torch.ops.mkldnn._reorder_linear_weight, torch.ops.mkldnn._linear_pointwise
        bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):
        return False
    return w.device.type == "cpu" and (w.dtype == torch.float32 or w.dtype == torch.bfloat16 and bf16)


def pack(model: Transformer) -> bool:
    """Swap every plain projection (an nn.Linear without module hooks, not already wrapped) for a PackedLinear,
    until unpack(model). Returns whether it packed anything (see packable). Costs one more copy of the weights."""
    if not packable(model):
        return False
    swapped = False
    for parent, name in linears(model):
        m = parent._modules[name]
        if type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks:
            parent._modules[name] = PackedLinear(m)
            swapped = True
    return swapped


def unpack(model: Transformer):
    """Put the plain nn.Linear back wherever a PackedLinear stands (module hooks added since go with it)."""
    for parent, name in linears(model):
        m = parent._modules[name]
        if isinstance(m, PackedLinear):
            parent._modules[name] = m.plain


def is_packed(model: Transformer) -> bool:
    return any(isinstance(parent._modules[name], PackedLinear) for parent, name in linears(model))


@contextmanager
def packed(model: Transformer):
    """pack(model) for the body of a `with`, unpacked afterwards, also if the body raises. Inside a packed model
    (an outer `with`, or a script's --prepack) it changes nothing."""
    mine = not is_packed(model) and pack(model)
    try:
        yield model
    finally:
        if mine:
            unpack(model)


MATCHES = {}    # (weight shapes, rows, dtype) -> packed_matches_plain's verdict on this CPU


def packed_matches_plain(model: Transformer, rows: int) -> bool:
    """Whether PackedLinear's products give this CPU's plain products bit for bit on `rows` rows (each output is the
    same dot product, but two kernels may sum it in different orders). oneDNN picks its kernel by the shapes, the
    layout and the CPU, not the values, so one product per weight shape with random rows tells, once per process."""
    weights = {tuple(w.shape): w for w in (getattr(p, n).weight for p, n in linears(model)[:8])}   # head + block 0
    key = (tuple(weights), rows, model.lm_head.weight.dtype)
    if key not in MATCHES:
        g = torch.Generator().manual_seed(0)

        def same(w):
            x = torch.randn(rows, w.shape[1], generator=g).to(w.dtype)
            return torch.equal(onednn_linear(x, blocked(w)), F.linear(x, w))
        with torch.no_grad():
            MATCHES[key] = all(same(w) for w in weights.values())
    return MATCHES[key]


def packs_exactly(model: Transformer, rows: int) -> bool:
    """Whether generate's decode steps of `rows` rows are packed: a bf16 model whose packed products equal the plain
    ones bit for bit at that many rows (so the tokens are the same), when free memory holds the copy twice over (a
    copy that pushed the machine into swap would cost more than it saves)."""
    if not packable(model) or model.lm_head.weight.dtype != torch.bfloat16:
        return False
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")     # not every OS has these
    except (ValueError, OSError, AttributeError):
        return False
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    return free > 2 * weights and packed_matches_plain(model, rows)


@contextmanager
def packed_decoder(model: Transformer, cache, kept: bool, new_tokens: int):
    """generate's decode steps on a CPU: the model's own step, with the weights packed for the loop where that gives
    the same bits (packs_exactly) and at least 16 new tokens are asked for (packing costs a few decode steps). The
    prompt was read before, with the weights as they are."""
    rows = cache.k.shape[1]
    with packed(model) if new_tokens >= 16 and packs_exactly(model, rows) else nullcontext():
        with Transformer.decoder(model, cache, kept, new_tokens) as step:
            yield step


def use_cpu_kernels(model: Transformer):
    """Set this CPU's attention kernel on every layer that uses SDPA (cpu_attention without AMX; SDPA, the model's
    own, with it) and generate's decode steps (packed_decoder)."""
    if not AMX:
        for block in model.layers:
            if block.self_attn.attend is sdpa_attention:      # not where the model needs plain_attention's math
                block.self_attn.attend = cpu_attention
    model.decoder = lambda cache, kept, new_tokens: packed_decoder(model, cache, kept, new_tokens)
