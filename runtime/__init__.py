"""How a loaded model runs fastest on this machine, with the same math: applied from outside, by swapping modules
and setting the attention kernel on the model, the way lora.py swaps in LoRALinear. model.py knows none of it."""


def accelerate(model, prepack: bool = True, compile: bool = False):
    """The model, set up for this machine: its attention kernel and decode steps (runtime/cpu.py, runtime/gpu.py),
    and either compiled with frozen weights (compile) or, on a CPU, its projections packed for oneDNN (prepack).
    Returns the model, or its compiled wrapper."""
    from runtime import cpu
    from runtime.compile import compile_for_inference
    if compile:
        return compile_for_inference(model)
    if prepack:
        cpu.pack(model)
    return model
