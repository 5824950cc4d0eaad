"""FSDP2 sharding of the tiny Qwen on CPU processes (gloo), with the `fsdp` option's wrapping policy.

accelerate applies FSDP on GPUs only, so this drives torch's `fully_shard` directly: each decoder layer
the option's policy picks, then the root, as accelerate does, after TRL's fused LM head is added and,
with LAYOUT `both`, after the Trainer's padding-free, shared-prompt forward is put in place, as the
Trainer does before accelerate shards. Each step takes the sigmoid DPO loss against the starting
model's log-probs over this rank's share of a fixed batch of pairs (TRL's batch: the chosen rows, then
the rejected ones, prompt and padding unlabelled); rank 0 writes the losses and every rank's starting
log-probs.
Usage: python -m torch.distributed.run --nproc_per_node N tests/config/fsdp_cpu.py OUT.json CLASSES LAYOUT
"""

import json
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

from dpo_recipes.sources import tiny
from dpo_recipes.training import segments

PAIRS, PROMPT, ANSWER, STEPS, BETA = 4, 8, 16, 3, 0.1


def batch(generator: torch.Generator) -> dict:
    """PAIRS pairs: a prompt of PROMPT tokens, then answers of 6 to ANSWER tokens, padded on the right."""
    prompts = torch.randint(0, 151000, (PAIRS, PROMPT), generator=generator)
    rows = []
    for _ in range(2):  # the chosen rows, then the rejected rows
        for i in range(PAIRS):
            length = int(torch.randint(6, ANSWER + 1, (), generator=generator))
            answer = torch.randint(0, 151000, (length,), generator=generator)
            rows.append(torch.cat([prompts[i], answer]))
    width = PROMPT + ANSWER
    ids = torch.stack([F.pad(r, (0, width - len(r))) for r in rows])
    real = torch.arange(width) < torch.tensor([len(r) for r in rows])[:, None]
    labels = ids.masked_fill(~real | (torch.arange(width) < PROMPT), -100)
    return {"input_ids": ids, "attention_mask": real.long(), "labels": labels}


def logps(model, inputs: dict) -> torch.Tensor:
    return model(**inputs, fused_lm_head=True).log_probs.sum(-1)


def main(out: str, policy_classes: list[str], layout: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = AutoModelForCausalLM.from_pretrained(tiny.qwen_path(), dtype=torch.float32)
    add_fused_lm_head(model)
    if layout == "both":
        model.config._attn_implementation = segments.SEGMENTED
        model.forward = segments.packed(model.forward, share=True, one_row=True)
    mesh = init_device_mesh("cpu", (world,))
    for module in model.modules():
        if type(module).__name__ in policy_classes:
            fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    inputs = batch(torch.Generator().manual_seed(0))
    share = torch.arange(rank * PAIRS // world, (rank + 1) * PAIRS // world)
    inputs = {k: v[torch.cat([share, share + PAIRS])] for k, v in inputs.items()}
    n = len(share)
    with torch.no_grad():
        first = logps(model, inputs)
        reference = first[:n] - first[n:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(STEPS):
        policy = logps(model, inputs)
        loss = -F.logsigmoid(BETA * (policy[:n] - policy[n:] - reference)).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    gathered = [torch.zeros_like(first) for _ in range(world)]
    dist.all_gather(gathered, first)
    if rank == 0:
        shard = model.model.embed_tokens.weight
        rows = shard.to_local().shape[0] if hasattr(shard, "to_local") else shard.shape[0]
        result = {
            "losses": losses,
            "first_logps": torch.cat(gathered).tolist(),
            "world": world,
            "embedding_rows_per_rank": rows,
            "root": type(model).__name__,
        }
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2].split(","), sys.argv[3])
