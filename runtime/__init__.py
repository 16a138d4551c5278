"""How a loaded model runs fastest on this machine, with the same math: applied from outside, by setting the
attention kernel and decode step on the model and by swapping modules, the way lora.py swaps in LoRALinear.
model.py knows none of it."""


def accelerate(model, prepack: bool = True, compile: bool = False):
    """The model set up for its device: the attention kernel and generate's decode steps of this machine
    (runtime/cpu.py, runtime/gpu.py), then either compiled with frozen weights (compile; returns the compiled
    wrapper, through which the model's attributes still reach) or, on a CPU, its projections packed for oneDNN
    for the whole run (prepack)."""
    from runtime import cpu, gpu
    from runtime.compile import compile_for_inference
    device = model.lm_head.weight.device.type
    if device == "cuda":
        gpu.use_gpu_kernels(model)
    elif device == "cpu":
        cpu.use_cpu_kernels(model)
    if compile:
        return compile_for_inference(model)
    if prepack and device == "cpu":
        cpu.pack(model)
    return model
