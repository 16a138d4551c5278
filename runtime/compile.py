"""torch.compile for scoring and generation with fixed weights.

    fast = compile_for_inference(model)       # --compile: the first call of each shape compiles
"""
import torch

from model import Transformer


def compile_for_inference(model: Transformer):
    """torch.compile, and on the CPU with inductor's "freezing": the weights become constants of the graph, which
    inductor prepacks for oneDNN, so the weights must not change afterwards (no training, no in-place edits). The
    attention kernel is the one set on the model (runtime/cpu.py's cpu_attention writes attention out under
    compile on a CPU without AMX, for inductor to fuse). On a GPU, plain compile.

    Freezing is switched on around every call, not through torch.compile(options=...): dynamo reads the global
    flag when it traces (at a call, not here) to decide whether weights become graph constants, and with the
    option alone they stay graph inputs that inductor cannot prepack (the weight-pack pass then matches nothing).
    """
    compiled = torch.compile(model)
    if model.lm_head.weight.device.type != "cpu":
        return compiled
    from torch._inductor import config as inductor_config     # imported here: importing inductor takes a while
    call = compiled.forward

    def forward(*args, **kwargs):
        with inductor_config.patch(freezing=True):
            return call(*args, **kwargs)
    compiled.forward = forward
    return compiled
