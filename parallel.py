"""
Data parallelism past one GPU's memory, for the stages that train whole blocks (train_reward.py --full-finetune):
under torchrun either a DDP replica per rank, or FSDP2 (torch's fully_shard) sharding every weight, gradient and AdamW
moment over the ranks; the checkpoint of sharded tensors (gathered whole into the one safetensors file a run writes
without FSDP, cut back into shards on --resume, so DDP and FSDP runs resume from each other); and an estimate of what
each needs per GPU, printed before the first step so a user sees which fits (docs/design.md §9).

    torchrun --nproc_per_node=8 train_reward.py --backbone sd35l --head drm --full-finetune --grad-ckpt --fsdp ...

Under FSDP each kept transformer block is one unit and the rest of the model (embedders, head) the root's: a unit's
weights are all-gathered for its forward and again for its backward, then freed; gradients are reduce-scattered, each
rank keeping the average of its shard (as DDP's all-reduce averages). On CUDA the gathered weights are bf16 and the
reduction float32; on CPUs (gloo, the tests) everything stays float32. Processes (torchrun, print0) are align.py's.
"""
import os

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def distribute(model, procs, fsdp=False, units=()):
    """The module the training loop calls: `model` itself in one process; under torchrun a DDP replica per rank, or
    with fsdp the model sharded in place, fully_shard on each of `units` and then on the root. Build the optimizer and
    the EMA after this call, from the parameters the model then holds (FSDP replaces them with their shards)."""
    if not procs.ddp:
        return model
    cuda = procs.device.startswith("cuda")
    if not fsdp:
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(model, device_ids=[torch.cuda.current_device()] if cuda else None)
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if cuda else MixedPrecisionPolicy()
    for unit in units:
        fully_shard(unit, mp_policy=mp)
    fully_shard(model, mp_policy=mp)
    register_fsdp_forward_method(model, "score")  # RewardModel.score gathers the weights as forward does
    return model


def gathered(tensors):
    """{name: tensor} with each FSDP shard (a DTensor) all-gathered whole, one at a time, and kept on rank 0's CPU (None
    on the other ranks): a collective, so every rank calls it. Other tensors come back as they are."""
    rank0 = int(os.environ.get("RANK", 0)) == 0
    out = {}
    for k, v in tensors.items():
        if isinstance(v, DTensor):
            v = v.detach().full_tensor()  # one full tensor on a GPU at a time
            v = v.cpu() if rank0 else None
        out[k] = v
    return out


def shard_like(full, ref):
    """A full tensor as `ref` holds it: ref's own part if ref is an FSDP shard (each rank cuts it from the full tensor it
    read: no communication), else the tensor itself."""
    if not isinstance(ref, DTensor):
        return full
    return distribute_tensor(full.to(ref.device, ref.dtype), ref.device_mesh, ref.placements, src_data_rank=None)


def memory_estimate(model, images, tokens, world=1, grad_ckpt=False, device="cuda"):
    """Rough bytes per process of training a RewardModel with AdamW and an EMA of what trains, on micro-batches of
    `images` images of `tokens` tokens (image + text), under DDP and under FSDP over `world` ranks
    -> {"DDP": {part: bytes}, "FSDP over N": {part: bytes}}.
    What trains is float32: its weights, gradients, AdamW's two moments and the EMA, 4 + 4 + 8 + 4 bytes a parameter;
    DDP adds 4 for its reduction buckets. Frozen weights are bf16 on CUDA (2 bytes), float32 elsewhere. FSDP holds
    1/world of all of these and, gathered at a time, the root's weights and two blocks (the running one and the next,
    prefetched). Activations: about 34 bytes per token and channel of a block at 16 bits (a transformer layer with
    fused attention, Korthikanti et al. 2022, "Reducing Activation Recomputation"; twice that in float32); activation
    checkpointing keeps each block's float32 input instead and recomputes one block at a time."""
    n_all = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = [sum(p.numel() for p in b.parameters()) for b in model.tap.blocks]
    low = 2 if str(device).startswith("cuda") else 4  # bytes of a frozen or gathered weight and of an activation
    state = dict(weights=4 * n_train + low * (n_all - n_train), gradients=4 * n_train, adamw=8 * n_train, ema=4 * n_train)
    block = 17 * low * images * tokens * model.tap.width  # one block's activations, all images
    run = max(model.tap.taps)  # the blocks that run (the forward stops after the deepest tap)
    act = run * 4 * images * tokens * model.tap.width + block if grad_ckpt else run * block
    ddp = state | dict(gradients=8 * n_train, activations=act)
    fsdp = {k: v / world for k, v in state.items()} | dict(gathered=low * (n_all - sum(blocks) + 2 * max(blocks)))
    return {"DDP": ddp, f"FSDP over {world}": fsdp | dict(activations=act)}


def describe_memory(estimate):
    """memory_estimate's dict -> one printed line per way of training, in GiB."""
    return "\n".join(f"memory per process, {name} (estimate): {sum(parts.values()) / 2**30:.2f} GiB = "
                     + " + ".join(f"{k} {v / 2**30:.2f}" for k, v in parts.items()) for name, parts in estimate.items())
