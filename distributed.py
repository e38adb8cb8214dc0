"""Processes under torchrun, and what they must agree on at every step (train.py).

    torchrun --nproc_per_node 4 train.py ...      # NCCL on GPUs, gloo on CPU
"""
import datetime
import os

import torch
import torch.distributed as dist


def setup_distributed(device_flag):
    """torchrun sets RANK/WORLD_SIZE/LOCAL_RANK: NCCL on GPUs, gloo on CPU. Returns (rank, world, device)."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    cuda = torch.cuda.is_available() and device_flag != "cpu"
    if world == 1:
        return 0, 1, torch.device(device_flag or ("cuda" if cuda else "cpu"))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank(), world, torch.device(f"cuda:{local_rank}" if cuda else "cpu")


def agree_on_step(loss, stop_signum, world):
    """(is the loss finite on every rank, the stop signal any rank has received or None), in one all-reduce: every
    rank must skip a batch or stop together, or DDP's next all-reduce would wait forever for the missing one."""
    flags = torch.tensor([0.0 if torch.isfinite(loss.detach()) else 1.0, float(stop_signum or 0)])
    flags = flags.to(loss.device)
    if world > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    flags = flags.tolist()
    return flags[0] == 0, int(flags[1]) or None


def rank0_value(value, world, device):
    """Rank 0's integer on every rank (e.g. the epochs --minutes planned from rank 0's clock): ranks that each
    planned from their own clock could disagree, and the one that stops first would leave the others waiting."""
    if world == 1:
        return value
    box = torch.tensor([int(value)], device=device)
    dist.broadcast(box, src=0)
    return int(box.item())
