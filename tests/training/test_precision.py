"""Updates that land: full fine-tuning keeps fp32 master weights, pure low precision is refused unless
asked for, every run measures its lost updates, and each Qwen recipe's smoke line, at the recipe's own
precision (bf16 autocast on CPU), moves as many weights as the same line in fp32."""

import csv
import json

import pytest
import torch
import transformers

from dpo_recipes import config, train
from dpo_recipes.config import precision, schema
from dpo_recipes.errors import ConfigError
from dpo_recipes.training import health, updates

# 2 steps from the first, no warm-up: the learning rate the recipe ships with from step 1
STEPS = 2
FIRST = [
    f"train.max_steps={STEPS}",
    "train.warmup_steps=0",
    "train.logging_steps=1",
    "train.eval_strategy=no",
]
FP32 = ["model.dtype=float32", "train.bf16=false"]
PURE_BF16 = ["train.bf16=false", "hardware.master_weights=false"]


def smoke(recipe: str, *extra: str) -> list[str]:
    return [
        f"recipes={recipe}",
        "+smoke=tiny_qwen",
        *FIRST,
        "dataset.max_samples=8",
        "train.disable_tqdm=true",
        *(["train.per_device_train_batch_size=2"] if "kto" in recipe else []),  # as its header's smoke line
        *extra,
    ]


def test_pure_low_precision_full_fine_tuning_is_refused_naming_its_fixes(tmp_path):
    cfg, _ = config.compose(smoke("qwen7b_full_dpo", "train.bf16=false"))
    with pytest.raises(ConfigError) as refused:
        config.build(cfg, tmp_path)
    for fix in ("train.bf16=true", "model.dtype=float32", "hardware=zero3", "hardware.master_weights=false"):
        assert fix in str(refused.value)
    cfg, _ = config.compose(smoke("qwen7b_full_dpo", *PURE_BF16))  # asked for knowingly
    assert config.build(cfg, tmp_path).args.model_init_kwargs["dtype"] == "bfloat16"


@pytest.mark.parametrize(
    "recipe, hardware, stored",
    [
        ("qwen7b_full_dpo", [], "bfloat16"),  # ZeRO-3: DeepSpeed's own fp32 masters
        ("qwen7b_full_dpo", ["hardware=fsdp"], "bfloat16"),  # accelerate's upcast
        ("qwen7b_full_dpo", ["hardware=gpu"], "float32"),  # one GPU: the weights are their own masters
        ("qwen7b_full_dpo", ["hardware=ddp"], "float32"),
        ("qwen7b_full_dpo", ["+smoke=tiny_qwen"], "float32"),  # one CPU process, bf16 autocast
        ("qwen7b_lora_dpo", ["hardware=gpu"], "bfloat16"),  # PEFT keeps the adapters in fp32
    ],
)
def test_each_engine_keeps_fp32_masters_its_own_way(recipe, hardware, stored, tmp_path):
    cfg, _ = config.compose([f"recipes={recipe}", *hardware])
    built = config.build(cfg, tmp_path, machine=False)
    assert built.args.model_init_kwargs["dtype"] == stored
    assert (precision.note(built) is not None) == (stored == "float32")


def test_a_lost_update_is_a_non_zero_gradient_that_left_the_weight_as_it_was():
    before = torch.tensor([0.02, 0.02, 0.02, 0.5], dtype=torch.bfloat16)
    grads = torch.tensor([1.0, 0.0, 1.0, 1.0])
    after = before.clone()
    after[2] -= 1e-2  # moved; element 1 had no gradient
    assert updates.lost_share(before, grads, after) == (3, 2)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Smoke runs of STEPS steps, once each, with the number of trainable elements each changed (read
    around transformers' Trainer.train, RewardTrainer's too)."""
    done, real = {}, transformers.Trainer.train

    def counted(self, *args, **kwargs):
        weights = lambda: {n: p for n, p in self.model.named_parameters() if p.requires_grad}  # noqa: E731
        before = {n: p.detach().float().clone() for n, p in weights().items()}
        out = real(self, *args, **kwargs)
        self.changed = sum(int((p.detach().float() != before[n]).sum()) for n, p in weights().items())
        return out

    def get(recipe, *extra):
        key = (recipe, *extra)
        if key not in done:
            run_dir = tmp_path_factory.mktemp(recipe) / "run"
            cfg, name = config.compose(smoke(recipe, *extra))
            with pytest.MonkeyPatch.context() as patch:
                patch.setattr(transformers.Trainer, "train", counted)
                done[key] = train.run(cfg, run_dir, name), run_dir
        return done[key]

    return get


def lost(run_dir) -> list[float]:
    with (run_dir / "dpo_metrics" / "training_metrics.csv").open() as f:
        return [float(row["updates/lost"]) for row in csv.DictReader(f) if row.get("updates/lost")]


def flags(run_dir) -> list[str]:
    summary = json.loads((run_dir / "dpo_metrics" / "summary.json").read_text())
    return [flag["flag"] for flag in summary["health"]]


@pytest.mark.slow
def test_pure_bf16_full_fine_tuning_reports_its_lost_updates_and_masters_lose_none(runs):
    trainer, pure = runs("qwen7b_full_dpo", *PURE_BF16)
    assert next(trainer.model.parameters()).dtype == torch.bfloat16
    assert len(lost(pure)) == STEPS and sum(lost(pure)) / STEPS > 0.5  # measured: 0.90 at step 1
    assert "lost_updates" in flags(pure)
    trainer, masters = runs("qwen7b_full_dpo")
    assert next(trainer.model.parameters()).dtype == torch.float32 and trainer.args.bf16
    assert lost(masters)[0] < 0.01 and sum(lost(masters)) / STEPS < health.LOST / 2
    assert "lost_updates" not in flags(masters)


def training_paths() -> list[str]:
    """One Qwen recipe for each way its smoke line trains (the trainer, the model's load, the engine, the
    train keys but the epochs, which STEPS steps never reach): qwen7b_lora_rounds trains as qwen7b_lora_dpo."""
    chosen = {}
    for recipe in (r for r in schema.recipes() if r.startswith("qwen7b") and not r.endswith("_sft")):
        cfg, _ = config.compose(smoke(recipe))
        train_keys = {k: v for k, v in cfg.train.items() if k != "num_train_epochs"}
        chosen.setdefault(repr([cfg.task, cfg.model, cfg.hardware, train_keys]), recipe)
    return list(chosen.values())


@pytest.mark.slow
@pytest.mark.parametrize("recipe", training_paths())
def test_every_qwen_smoke_line_at_its_precision_moves_as_many_weights_as_fp32(recipe, runs):
    shipped, _ = runs(recipe)
    full, _ = runs(recipe, *FP32)
    assert shipped.args.bf16 and not full.args.bf16
    assert shipped.changed >= 0.9 * full.changed > 0, (shipped.changed, full.changed)


@pytest.mark.slow
def test_lora_adapters_train_in_fp32_over_a_bf16_base(runs):
    trainer, _ = runs("qwen7b_lora_dpo")
    dtypes = {(p.requires_grad, p.dtype) for p in trainer.model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
