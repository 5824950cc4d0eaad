"""FSDP2 sharding of the tiny Qwen on CPU processes (gloo), with the `fsdp` option's wrapping policy.

accelerate applies FSDP on GPUs only, so this drives torch's `fully_shard` directly: each decoder layer
the option's policy picks, then the root, as accelerate does. Each step takes the sigmoid DPO loss
against the starting model's log-probs over this rank's share of a fixed batch; rank 0 writes the
losses. Usage: python -m torch.distributed.run --nproc_per_node N tests/fsdp_cpu.py OUT.json
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM

from dpo_recipes import tiny

PAIRS, LENGTH, STEPS, BETA = 4, 24, 3, 0.1


def logps(model, ids: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=ids).logits[:, :-1]
    return torch.gather(logits.log_softmax(-1), 2, ids[:, 1:, None]).squeeze(-1).sum(-1)


def main(out: str, policy_classes: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(tiny.qwen_path(), dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if type(module).__name__ in policy_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    generator = torch.Generator().manual_seed(0)
    chosen, rejected = torch.randint(0, 151000, (2, PAIRS, LENGTH), generator=generator)
    share = slice(rank * PAIRS // world, (rank + 1) * PAIRS // world)
    chosen, rejected = chosen[share], rejected[share]
    with torch.no_grad():
        reference = logps(model, chosen) - logps(model, rejected)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        margin = logps(model, chosen) - logps(model, rejected) - reference
        loss = -F.logsigmoid(BETA * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    if rank == 0:
        shard = model.model.embed_tokens.weight
        rows = shard.to_local().shape[0] if hasattr(shard, "to_local") else shard.shape[0]
        result = {
            "losses": losses,
            "world": world,
            "embedding_rows_per_rank": rows,
            "root": type(model).__name__,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","))
