"""Updates that land, measured: `UpdateProbe` logs `updates/lost` at every optimizer step, the share of
sampled trained elements whose gradient is non-zero and whose stored value did not change (bf16 weights
without fp32 masters lose most of a small learning rate's steps; config/precision.py). Steps taken at a
learning rate of 0 are not sampled."""

import torch
from transformers import TrainerCallback


def lost_share(before: torch.Tensor, grads: torch.Tensor, after: torch.Tensor) -> tuple[int, int]:
    """(updated, lost): elements with a non-zero gradient, and those of them whose stored value did not
    change. With AdamW a non-zero gradient is a non-zero update at any positive learning rate."""
    moving = grads != 0
    return int(moving.sum()), int((moving & (after == before)).sum())


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) weight's own shard; a plain tensor as it is."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


class UpdateProbe(TrainerCallback):
    """At every optimizer step, `SAMPLE` trainable elements (fixed at the first step, spread over the
    weights) read before and after: the share of those with a non-zero gradient whose stored value did
    not change, logged as `updates/lost` with the step's metrics. DeepSpeed holds the gradients in its
    own partitions (and its fp32 masters): nothing is sampled there."""

    SAMPLE = 4096
    METRIC = "updates/lost"

    def __init__(self, trainer):
        self.trainer, self.picked, self.before = trainer, None, None

    def _pick(self, model) -> list:
        params = [p for p in model.parameters() if p.requires_grad and _local(p).numel()]
        generator = torch.Generator().manual_seed(0)
        each = max(1, self.SAMPLE // max(1, len(params)))
        return [
            (p, torch.randint(_local(p).numel(), (min(each, _local(p).numel()),), generator=generator))
            for p in params
        ]

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if not any(group["lr"] for group in self.trainer.optimizer.param_groups):
            self.before = None  # a step at learning rate 0 (a warm-up's first) moves nothing by design
            return
        if self.picked is None:
            self.picked = self._pick(model)
        sampled = [(p, i) for p, i in self.picked if p.grad is not None]
        self.before = [
            (p, i, _local(p).detach().flatten()[i].clone(), _local(p.grad).detach().flatten()[i].clone())
            for p, i in sampled
        ]

    def on_optimizer_step(self, args, state, control, **kwargs):
        if not self.before:
            return
        updated = lost = 0
        for p, i, old, grad in self.before:
            u, n = lost_share(old, grad, _local(p).detach().flatten()[i])
            updated, lost = updated + u, lost + n
        self.before = None
        if updated:
            self.trainer._metrics["train"][self.METRIC].append(lost / updated)
