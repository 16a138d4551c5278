"""What runs fastest on a GPU, with the same math: SDPA's fused kernel under a padding mask with grouped-query
attention, and decode steps replayed as one CUDA graph over a static KV cache.

    use_gpu_kernels(model)          # runtime.accelerate does this for a model on a GPU
"""
from contextlib import contextmanager

import torch

from model import KVCache, Transformer, sdpa_attention


def gpu_attention(q, k, v, mask, scale=None, softcap=None):
    """SDPA, with the key heads repeated when a bool mask meets grouped-query attention: CUDA's fused kernels that
    take a mask do not take enable_gqa, and SDPA would fall back to its unfused math path, slow on the host."""
    if isinstance(mask, torch.Tensor) and k.shape[1] != q.shape[1]:
        g = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    return sdpa_attention(q, k, v, mask, scale)


class StaticKVCache(KVCache):
    """A KVCache whose fill level lives on the device: attention reads every slot (unfilled ones masked), so a decode
    step has fixed shapes and reads no host value, and one captured CUDA graph replays at any length. Made from a
    filled KVCache (the prompt is read eagerly), sharing its tensors."""

    def __init__(self, cache: KVCache):
        self.k, self.v, self.key_pos, self.next_pos = cache.k, cache.v, cache.key_pos, cache.next_pos
        self.len, self.has_pad = cache.len, True            # True: unfilled slots are masked like padding
        self.slot = torch.tensor([cache.len], device=cache.k.device)    # (1,): the next slot

    def append(self, key_pos, padded: bool):
        # No capacity check: that would read the device; generate sizes the cache.
        self.slots = self.slot + torch.arange(key_pos.shape[1], device=self.k.device)   # (T,): this forward's slots
        self.key_pos.index_copy_(1, self.slots, key_pos)
        return self.slot, self.key_pos

    def update(self, layer: int, k, v):
        self.k[layer].index_copy_(2, self.slots, k)
        self.v[layer].index_copy_(2, self.slots, v)
        return self.k[layer], self.v[layer]

    def advance(self, T: int, next_pos):
        self.slot += T                       # in place: a captured graph reads and writes these very tensors
        self.next_pos.copy_(next_pos)


def graphed_step(model: Transformer, cache: KVCache):
    """A decode step (B,) ids, None -> (B, V) logits that, from its second call on, replays a captured CUDA graph.

    Eager PyTorch launches each of a step's many small kernels from Python, which can take longer than the GPU needs
    to read the weights; a graph launches them all at once. The first call runs eagerly on a side
    stream (warming cuBLAS up, as capture requires), then captures the step on static buffers.
    """
    static = StaticKVCache(cache)
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
            logits = model(nxt[:, None], cache=static, logits_to_keep=1)[:, -1]
        torch.cuda.current_stream().wait_stream(side)
        tok, graph = nxt[:, None].clone(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):        # records, runs nothing: the cache is where the eager step left it
            out = model(tok, cache=static, logits_to_keep=1)[:, -1]
        return logits
    return step


@contextmanager
def graphed_decoder(model: Transformer, cache, kept: bool, new_tokens: int):
    """generate's decode steps on a GPU: a CUDA graph, except where one cannot stand in for the steps (a kept cache,
    whose rows are masked step by step; training mode; hooks, which may read host state) or is not worth capturing."""
    if kept or model.training or model.hooked or new_tokens <= 2:
        with Transformer.decoder(model, cache, kept, new_tokens) as step:
            yield step
    else:
        yield graphed_step(model, cache)


def use_gpu_kernels(model: Transformer):
    """Set the GPU's attention kernel on every layer and generate's decode steps (graphed_decoder)."""
    for block in model.layers:
        if block.self_attn.attend is sdpa_attention:          # not where the model needs plain_attention's math
            block.self_attn.attend = gpu_attention
    model.decoder = lambda cache, kept, new_tokens: graphed_decoder(model, cache, kept, new_tokens)
