"""The Qwen recipes as they ship, on the tiny Qwen (Qwen2.5's real tokenizer, template and vocabulary):
`make train RECIPE=<qwen recipe> ARGS="+smoke=tiny_qwen train.max_steps=4"`."""

import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from dpo_recipes import config, train
from dpo_recipes.config import schema
from dpo_recipes.sources import tiny

# The DPO and reward-model recipes, which start from ln 2 (SFT, ORPO and SimPO: test_sft.py, test_methods.py)
QWEN_RECIPES = [
    r
    for r in schema.recipes()
    if r.startswith("qwen7b") and config.compose([f"recipes={r}"])[0].task in ("dpo", "reward")
]
PROJECTIONS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
# What the smoke may change: the weights, the device and the processes, one pair a step, the data and
# logger; never the precision (train.bf16 / fp16, model.dtype).
SWAPPED = {
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "gradient_accumulation_steps",
    "report_to",
    "use_cpu",
    "dataset_num_proc",
    "activation_checkpointing",
}


def smoke(recipe: str, *extra: str) -> list[str]:
    """The documented line, as `make train` passes it, plus a short dataset to keep the test quick."""
    line = [f"recipes={recipe}", "+smoke=tiny_qwen", "train.max_steps=4"]
    return [*line, "dataset.max_samples=12", "dataset.max_eval_samples=2", "train.disable_tqdm=true", *extra]


@pytest.mark.parametrize("recipe", QWEN_RECIPES)
def test_the_smoke_keeps_everything_the_recipe_ships_but_weights_hardware_and_data(recipe):
    shipped, _ = config.compose([f"recipes={recipe}"])
    smoked, _ = config.compose([f"recipes={recipe}", "+smoke=tiny_qwen"])
    assert smoked.train.bf16 == shipped.train.bf16 is True and smoked.model.dtype == shipped.model.dtype
    assert smoked.model.model_name_or_path == str(tiny.qwen_path())
    for key, value in shipped.model.items():
        if key != "model_name_or_path":
            assert smoked.model[key] == value, key
    for key, value in shipped.train.items():
        if key not in SWAPPED:
            assert smoked.train[key] == value, key
    assert smoked.hardware.device == "cpu" and smoked.hardware.engine == "single" and smoked.train.use_cpu
    assert smoked.dataset.format == "ultrafeedback"
    assert (
        config.compose(["recipes=qwen7b_lora_dpo"])[0].dataset.path == "HuggingFaceH4/ultrafeedback_binarized"
    )


@pytest.mark.parametrize("recipe", QWEN_RECIPES)
def test_every_qwen_recipe_header_gives_its_smoke_line(recipe):
    text = (schema.RECIPES_DIR / f"{recipe}.yaml").read_text()
    assert f'make train RECIPE={recipe} ARGS="+smoke=tiny_qwen train.max_steps=4"' in text


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Each Qwen recipe trained once through the smoke line, on first use."""
    done = {}

    def get(recipe):
        if recipe not in done:
            run_dir = tmp_path_factory.mktemp(recipe) / "run"
            cfg, name = config.compose(smoke(recipe))
            done[recipe] = train.run(cfg, run_dir, name), run_dir
        return done[recipe]

    return get


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", QWEN_RECIPES)
def test_every_qwen_recipe_trains_four_steps_from_ln2(recipe, runs):
    trainer, run_dir = runs(recipe)
    assert trainer.state.global_step == 4
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert all(math.isfinite(x) for x in losses)
    assert losses[0] == pytest.approx(math.log(2), abs=0.01)  # policy == reference at step 1
    summary = json.loads((run_dir / "dpo_metrics" / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["tokens_per_second"] > 0
    assert summary["device"].startswith("CPU")
    report = json.loads((run_dir / "dpo_metrics" / "data_report.json").read_text())
    assert report["train"]["template_system_prompt"].startswith("You are Qwen, created by Alibaba Cloud.")
    if recipe == "qwen7b_qlora_dpo":  # bitsandbytes quantises to NF4 on this CPU too
        kinds = {type(m).__name__ for m in trainer.model.modules()}
        assert "Linear4bit" in kinds
    if recipe == "qwen7b_full_dpo":
        assert trainer.ref_model is not None and trainer.ref_model is not trainer.model


@pytest.mark.e2e
@pytest.mark.parametrize("recipe", [r for r in QWEN_RECIPES if "full" not in r])
def test_the_saved_adapter_covers_qwens_seven_projections_and_changes_its_logits(recipe, runs):
    _, run_dir = runs(recipe)
    targets = json.loads((run_dir / "adapter_config.json").read_text())["target_modules"]
    names = {t.rsplit(".", 1)[-1] for t in targets}
    assert names == PROJECTIONS and "lm_head" not in names
    ids = torch.tensor([[151644, 8948, 198, 2610, 525, 1207, 16948, 11, 3465]])
    base = AutoModelForCausalLM.from_pretrained(tiny.qwen_path(), dtype=torch.float32)
    with torch.no_grad():
        before = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(run_dir))
        after = tuned(input_ids=ids).logits
    assert set(tuned.peft_config) == {"default"}
    assert (after - before).abs().max() > 0
