"""Worker of tests/test_distributed.py::test_swapped_model_under_fsdp2_and_ddp, run by
``torchrun --nproc_per_node 2`` (gloo, CPU): a swapped noisy ViT trained a few steps under DDP and
under FSDP2 (``fully_shard`` per block, then the model; also with gradient checkpointing), each
against the same model trained in one process on the global batch (computed here, in every process,
without communication).  Rank 0 writes ``{setup: {"loss": .., "grad": .., "param": .., ...}}`` (the
largest absolute differences) as JSON to the path in argv[1]; the test judges them.

``argv[2] == "cuda"``: the same with NCCL, one GPU per process (at least 2 GPUs) and the device's
default fused backend (Triton):
``torchrun --nproc_per_node 2 tests/_dist_worker.py out.json cuda``."""

import json
import sys

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

import noisynn_kernels as nk
from noisynn_kernels.ops import mix_add_layernorm as mal_op

STEPS, BATCH = 3, 8
NOISES = {"optimal-tokens": dict(kind="optimal", axis="tokens", layer=1),
          "shift-rows-attn_input": dict(kind="shift", axis="rows", alpha=0.3, position="attn_input")}


DEVICE = sys.argv[2] if len(sys.argv) > 2 else "cpu"
BACKEND = "reference" if DEVICE == "cpu" else None  # None: the device's default (Triton on CUDA)


def build(noise, ckpt=False, device="cpu"):
    torch.manual_seed(0)
    model = timm.create_model("noisy_vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=48,
                              num_heads=3, num_classes=5, noise=noise)
    nk.swap_fused_ops(model, backend=BACKEND)
    if ckpt:
        model.set_grad_checkpointing(True)
    return model.to(device).train()


def batches(device="cpu"):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 3, 32, 32, generator=g).to(device),
             torch.randint(0, 5, (BATCH,), generator=g).to(device)) for _ in range(STEPS)]


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def train(model, net, rows, world, device="cpu"):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for x, y in batches(device):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(net(x[rows]), y[rows])
        loss.backward()
        grads = {n: full(p.grad).detach().cpu().clone() for n, p in model.named_parameters()}
        opt.step()
        loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(loss)
            loss /= world
        losses.append(float(loss))
    params = {n: full(p).detach().cpu().clone() for n, p in model.named_parameters()}
    return losses, grads, params


def diff(a, b):
    la, ga, pa = a
    lb, gb, pb = b
    assert ga.keys() == gb.keys() and pa.keys() == pb.keys()
    return {"loss": max(abs(u - v) for u, v in zip(la, lb)),
            "grad": max((ga[n] - gb[n]).abs().max().item() for n in gb),
            "grad_scale": max(gb[n].abs().max().item() for n in gb),
            "param": max((pa[n] - pb[n]).abs().max().item() for n in pb),
            "losses": la}


def main(out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo" if DEVICE == "cpu" else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if DEVICE == "cuda":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    mesh = init_device_mesh(device.type, (world,))
    local = BATCH // world
    rows = slice(rank * local, (rank + 1) * local)
    calls = []
    for backend, real in list(mal_op.LAUNCHERS.items()):  # count the fused op's calls: the stack really runs
        mal_op.LAUNCHERS[backend] = lambda *a, real=real: calls.append(1) or real(*a)
    results = {}
    for name, noise in NOISES.items():
        plain = build(noise, device=device)
        single = train(plain, plain, slice(None), 1, device)
        for setup in ("ddp", "fsdp", "fsdp-checkpointing"):
            model = build(noise, ckpt=setup.endswith("checkpointing"), device=device)
            if setup == "ddp":
                net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            else:
                for blk in model.blocks:
                    fully_shard(blk, mesh=mesh)
                fully_shard(model, mesh=mesh)
                net = model
                assert isinstance(model.blocks[0].norm1.weight, DTensor), "the blocks are not sharded"
            calls.clear()
            got = train(model, net, rows, world, device)
            r = diff(got, single)
            r["fused_calls"] = len(calls)
            r["swapped"] = nk.is_swapped(model)
            results[f"{name}/{setup}"] = r
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
