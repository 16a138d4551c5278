"""Several processes, one result: the little of torch.distributed the scripts use, launched by torchrun.

    torchrun --standalone --nproc_per_node 4 -- evaluate.py --task=mmlu ...    # items shared by 4 processes, one JSON
    torchrun --standalone --nproc_per_node 4 -- train.py --dist=fsdp ...       # LoRA SFT/DPO, DDP or FSDP

(`--` ends torchrun's own options: without it, it would take the scripts' --n= or --run= for abbreviations of them.)

torchrun starts the processes and tells each its RANK, WORLD_SIZE and LOCAL_RANK. Without them there is one
process and everything here is a no-op (shard keeps every item, gather returns what it is given, wrap returns the
model), so the scripts run the same code either way. Rank 0 owns OUT: it alone reads and writes checkpoints and
results, prints and draws progress bars; the other ranks read only the inputs (model, data).
"""
import datetime
import os
import sys

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun as one of several processes (a single one is simply one process)."""
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device="cpu", timeout: float = 600.0):
    """Join the process group torchrun set up: nccl between GPUs, gloo between CPUs. A collective that waits more
    than `timeout` seconds (another rank died or is stuck) raises instead of hanging. Idempotent."""
    if not launched() or dist.is_initialized():
        return
    cuda = torch.device(device).type == "cuda"
    if cuda:      # one card per process: a plain "cuda" then means this rank's own card everywhere
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout),
                            device_id=torch.device("cuda", torch.cuda.current_device()) if cuda else None)
    if rank() != 0:   # every rank would print the same lines: keep rank 0's. Errors go to stderr, and still show.
        sys.stdout = open(os.devnull, "w")


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def cleanup():
    """Leave the process group at the end of a run. The barrier first: a rank that closes its connections while
    another still completes its last collective can abort that one ("terminate called without an active exception",
    seen here about one run in eight)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _collective(what: str, fn, *args):
    """fn(*args), with an error that says what a failed collective usually means."""
    try:
        return fn(*args)
    except RuntimeError as e:     # gloo's timeouts and lost peers: RuntimeError; nccl's: DistError, a subclass
        raise RuntimeError(f"rank {rank()} of {world()}: {what} failed: another rank died, failed or is stuck (a "
                           f"wait longer than --dist_timeout seconds ends the run); look for its own error above. "
                           f"[{type(e).__name__}: {str(e).strip().splitlines()[0]}]") from e


# ------------------------------------------------------------------------------------------- sharing the items
def shard(items: list) -> list:
    """This rank's share of the items: items[rank::world], by position, so gather() can put them back in order."""
    return items[rank()::world()]


def gather(mine: list, everyone: bool = False) -> list | None:
    """The inverse of shard: every rank's `mine` (one value per item of its shard, in order) -> one value per item,
    in the items' order, on rank 0 (None on the others) or, with everyone=True, on every rank."""
    if world() == 1:
        return list(mine)
    parts = [None] * world()
    if everyone:
        _collective("all_gather_object", dist.all_gather_object, parts, mine)
    else:
        _collective("gather_object", dist.gather_object, mine, parts if is_main() else None, 0)
        if not is_main():
            return None
    out = [None] * sum(len(p) for p in parts)
    for r, p in enumerate(parts):
        out[r::world()] = p
    return out


def broadcast(obj):
    """Rank 0's `obj` on every rank (what the others pass is ignored)."""
    if world() == 1:
        return obj
    box = [obj]
    _collective("broadcast_object_list", dist.broadcast_object_list, box, 0)
    return box[0]


def all_sum(values: list[float]) -> list[float]:
    """The sum over the ranks of each number, on every rank (in float64: token counts stay exact)."""
    if world() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    _collective("all_reduce", dist.all_reduce, t)
    return t.tolist()


def barrier():
    if world() > 1:
        _collective("barrier", dist.barrier)


# ------------------------------------------------------------------------------------------- sharing the model
def wrap(model, how: str):
    """The model as the ranks share it in training. ddp: a whole copy on every rank, gradients averaged after each
    backward (DistributedDataParallel; only parameters that train are synchronized). fsdp: every rank keeps 1/world
    of each block's parameters, gathered for the block's forward and backward only (FSDP2's fully_shard per block,
    then the root, in place), for a model too big for one card; load it on the CPU, fully_shard moves each shard to
    this rank's device. One process: the model itself."""
    if world() == 1:
        return model
    device = model.model.embed_tokens.weight.device
    if how == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        # no buffer syncs before each forward: the only buffer (rope's inv_freq) is a constant
        return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                       forward_sync_buffers=False)
    if how == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cuda" if dist.get_backend() == "nccl" else "cpu", (world(),))
        for block in model.layers:
            fully_shard(block, mesh=mesh)
        return fully_shard(model, mesh=mesh)     # the root: embeddings, final norm, lm_head
    raise ValueError(f"--dist={how!r}: ddp or fsdp")


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (a DTensor; gathering it is a collective: every rank calls), or t itself."""
    if world() == 1:              # (no DTensor then; importing its module costs a second)
        return t
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(whole: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """`whole` cut like ref: this rank's shard when ref is an FSDP DTensor (every rank holds the same `whole`, so no
    communication), else `whole` itself."""
    if world() == 1:
        return whole
    from torch.distributed.tensor import DTensor, distribute_tensor
    if not isinstance(ref, DTensor):
        return whole
    return distribute_tensor(whole.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)
