"""Composition and validation: every recipe builds, and bad config fails early with every problem named."""

import subprocess
import sys

import pytest
import torch
import yaml
from conftest import python_m
from hydra.errors import HydraException

from dpo_recipes import ROOT, config, validate
from dpo_recipes.config import schema
from dpo_recipes.errors import ConfigError

RECIPES = schema.recipes()


def test_recipes_are_found():
    assert {
        "tiny_lora_dpo",
        "tiny_full_dpo",
        "qwen7b_lora_dpo",
        "qwen7b_qlora_dpo",
        "qwen7b_full_dpo",
    } <= set(RECIPES)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_composes_and_builds_on_cpu(recipe, tmp_path):
    cfg, name = config.compose([f"recipes={recipe}", "hardware=cpu"])
    assert name == recipe
    if not cfg.model.use_peft and cfg.model.dtype == "bfloat16":  # hardware=cpu has no bf16 autocast
        with pytest.raises(ConfigError, match="no fp32 master weights.*hardware.master_weights=false"):
            config.build(cfg, tmp_path)
        cfg, _ = config.compose([f"recipes={recipe}", "hardware=cpu", "model.dtype=float32"])
    built = config.build(cfg, tmp_path)
    assert type(built.args) is schema.TASKS[cfg.task]
    assert built.task != "dpo" or built.args.loss_type == list(cfg.train.loss_type)
    assert built.args.use_cpu and not built.args.bf16
    assert (built.peft is not None) == bool(cfg.model.use_peft)
    assert (built.quantization is not None) == bool(cfg.model.get("load_in_4bit"))


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_header_gives_its_launch_command(recipe):
    header = (schema.RECIPES_DIR / f"{recipe}.yaml").read_text().split("defaults:")[0]
    assert "# @package _global_" in header
    verb = "iterate" if "\nrounds:" in (schema.RECIPES_DIR / f"{recipe}.yaml").read_text() else "train"
    assert f"make {verb} RECIPE={recipe}" in header or (recipe == "tiny_lora_dpo" and "make train" in header)


def test_qwen_lora_recipe_matches_the_reference_setup(tmp_path):
    cfg, _ = config.compose(["recipes=qwen7b_lora_dpo", "hardware=cpu"])
    built = config.build(cfg, tmp_path)
    assert built.model.model_name_or_path == "Qwen/Qwen2.5-7B"
    assert built.peft.r == 64 and built.peft.target_modules == "all-linear"
    args = built.args
    assert (args.beta, args.learning_rate, args.max_length, args.num_train_epochs) == (0.1, 5e-6, 2048, 2)
    assert args.loss_type == ["sigmoid"]
    gpu, _ = config.compose(["recipes=qwen7b_lora_dpo"])
    assert (gpu.train.per_device_train_batch_size, gpu.train.gradient_accumulation_steps) == (1, 16)
    assert gpu.train.bf16 is True


def test_unknown_keys_are_reported_together_with_suggestions():
    cfg, _ = config.compose(["train.bta=0.2", "train.lerning_rate=1e-5", "model.lora_rr=8"])
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    problems = err.value.problems
    assert len(problems) == 3
    text = str(err.value)
    assert "train.bta" in text and "did you mean 'beta'" in text
    assert "train.lerning_rate" in text and "'learning_rate'" in text
    assert "model.lora_rr" in text and "'lora_r'" in text


def test_any_trl_field_is_set_without_a_plus_whether_or_not_the_recipe_sets_it():
    cfg, _ = config.compose(["recipes=qwen7b_lora_dpo", "train.max_steps=2", "model.lora_dropout=0.1"])
    assert cfg.train.max_steps == 2 and cfg.model.lora_dropout == 0.1
    assert config.plain_keys(["train.beta=0.1,0.2", "+train.x=1", "hardware=cpu", "hydra.run.dir=d"]) == [
        "++train.beta=0.1,0.2",
        "+train.x=1",
        "hardware=cpu",
        "hydra.run.dir=d",
    ]


def test_unknown_loss_type_is_rejected_before_training():
    cfg, _ = config.compose(["train.loss_type=[sigmoidd]"])
    with pytest.raises(ConfigError, match="unknown loss 'sigmoidd'; did you mean 'sigmoid'"):
        config.check(cfg)


def test_loss_names_come_from_trl():
    assert {"sigmoid", "ipo", "hinge", "sft"} <= schema.loss_types()


def test_output_dir_is_owned_by_the_run():
    cfg, _ = config.compose(["+train.output_dir=/tmp/elsewhere"])
    with pytest.raises(ConfigError, match="train.output_dir: set by the run"):
        config.check(cfg)


def test_missing_recipe_lists_the_available_ones():
    with pytest.raises(HydraException) as err:
        config.compose(["recipes=no_such_recipe"])
    for recipe in RECIPES:
        assert recipe in str(err.value)


def test_our_own_nodes_are_checked_all_at_once():
    cfg, _ = config.compose(
        [
            "+dataset.pth=data.jsonl",
            "dataset.max_samples=many",
            "+run.nme=x",
            "dataset.format=csv",
            "run.resume=nowhere",
        ]
    )
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    text = str(err.value)
    assert len(err.value.problems) == 5
    assert "dataset.pth: unknown dataset key (did you mean 'path'?)" in text
    assert "dataset.max_samples: expected int or null, got 'many'" in text
    assert "run.nme: unknown run key (did you mean 'name'?)" in text
    assert "dataset.format: unknown 'csv'" in text and "run.resume: 'nowhere'" in text


def test_wrong_types_in_trl_nodes_are_caught_before_trl_sees_them():
    cfg, _ = config.compose(["train.learning_rate=oops", "train.bf16=maybe", "model.lora_r=1.5"])
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    assert len(err.value.problems) == 3
    assert "train.learning_rate: expected float, got 'oops'" in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only message")
@pytest.mark.parametrize("hardware", sorted(p.stem for p in (ROOT / "conf" / "hardware").glob("*.yaml")))
def test_every_hardware_option_sets_the_data_processes(hardware, tmp_path):
    # engine=single: DeepSpeed and launcher checks are not what this test is about
    overrides = ["recipes=tiny_lora_dpo", f"hardware={hardware}", "hardware.engine=single"]
    cfg, _ = config.compose(overrides)
    built = config.build(cfg, tmp_path, machine=False)
    assert built.args.dataset_num_proc == cfg.train.dataset_num_proc >= 2


def test_gpu_recipe_on_cpu_names_the_override():
    cfg, _ = config.compose(["recipes=qwen7b_lora_dpo"])
    with pytest.raises(ConfigError, match="hardware=cpu"):
        config.check(cfg)


@pytest.mark.parametrize("key", ["do_train", "do_eval", "do_predict"])
def test_trainer_switches_it_ignores_are_refused(key):
    cfg, _ = config.compose([f"train.{key}=false"])
    with pytest.raises(ConfigError, match=f"train.{key}: the Trainer ignores it: every run trains"):
        config.check(cfg)


def run_cli(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT)


def test_validate_builds_a_gpu_recipe_without_weights_and_leads_with_its_verdict(capsys):
    assert validate.main(["recipes=qwen7b_qlora_dpo"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "LoraConfig, BitsAndBytesConfig built; no weights loaded" in out[0]
    assert out[-1] == "the resolved config: add --show-config to print it"
    assert not any("model_name_or_path" in line for line in out)
    assert validate.main(["recipes=qwen7b_qlora_dpo", "--show-config"]) == 0
    out = capsys.readouterr().out.splitlines()
    verdict = out.index("the resolved config: below")
    assert verdict < 20 and any(line.startswith("predicted peak memory") for line in out[:verdict])
    assert "  model_name_or_path: Qwen/Qwen2.5-7B" in out[verdict:]


def test_validate_names_what_a_launch_here_would_refuse(capsys, monkeypatch, tmp_path):
    """A wandb-online recipe without a login validates (it plans for any machine) and says that
    `make train` here would refuse it, with the fixes."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert validate.main(["recipes=tiny_lora_dpo", "logger=wandb", "logger.mode=online"]) == 0
    out = capsys.readouterr().out.splitlines()
    refusal = out.index("a launch on this machine would refuse it:")
    assert "logger=wandb: not logged in; run `wandb login`" in out[refusal + 1]
    assert validate.main(["recipes=tiny_lora_dpo", "logger=wandb", "logger.mode=offline"]) == 0
    assert "a launch on this machine would refuse it:" not in capsys.readouterr().out


def test_cli_reports_config_errors_and_exits_nonzero(capsys):
    assert validate.main(["train.bta=1", "dataset.pth=x"]) == 2
    err = capsys.readouterr().err
    assert "did you mean 'beta'" in err and "did you mean 'path'" in err
    assert validate.main(["recipes=nope"]) == 2 and "tiny_lora_dpo" in capsys.readouterr().err
    out = run_cli("dpo_recipes.train", "train.bta=1", "train.lerning_rate=1e-5")  # the one real process
    assert out.returncode == 2 and "not in struct" not in out.stderr and "Traceback" not in out.stderr
    assert "did you mean 'beta'" in out.stderr and "did you mean 'learning_rate'" in out.stderr


def _train_keys(path) -> set[str]:
    node = yaml.safe_load(path.read_text()) or {}
    if path.parent.name == "loss":  # `# @package train`
        return set(node)
    return set(node.get("train") or {})


def test_one_key_one_home():
    """Loss keys live in loss/, precision and batch keys in hardware/, reference keys in reference/,
    report_to in logger/; recipes and the other groups set none of them, but a recipe of a method with
    no loss group (task: orpo, cpo, kto) sets its own beta and loss, and a KTO recipe its micro-batch
    (KTO needs 2 or more rows in each; hardware=gpu's is 1)."""
    conf = config.CONF_DIR
    loss_keys = set().union(*(_train_keys(p) for p in (conf / "loss").glob("*.yaml")))
    hardware_keys = set().union(*(_train_keys(p) for p in (conf / "hardware").glob("*.yaml")))
    reference_keys = set().union(*(_train_keys(p) for p in (conf / "reference").glob("*.yaml")))
    reference_keys |= set().union(*(_train_keys(p) for p in (conf / "logger").glob("*.yaml")))
    assert "beta" in loss_keys and "per_device_train_batch_size" in hardware_keys
    assert "precompute_ref_log_probs" in reference_keys
    assert not loss_keys & hardware_keys and not reference_keys & (loss_keys | hardware_keys)
    hardware_keys |= reference_keys
    others = [
        *schema.RECIPES_DIR.glob("*.yaml"),
        *(conf / "model").glob("*.yaml"),
        *(conf / "dataset").glob("*.yaml"),
    ]
    for path in [*others, conf / "train.yaml"]:
        task = yaml.safe_load(path.read_text()).get("task")
        misplaced = _train_keys(path) & (
            hardware_keys if task in ("orpo", "cpo", "kto") else loss_keys | hardware_keys
        )
        if task == "kto":
            misplaced -= {"per_device_train_batch_size", "gradient_accumulation_steps"}
        assert not misplaced, f"{path.name} sets {sorted(misplaced)}, which belong to loss/ or hardware/"


def test_runs_go_to_outputs_recipe_stamp_shared_by_all_processes(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    monkeypatch.setenv("DPO_RUN_STAMP", "2026-01-02_03-04-05")
    with initialize_config_dir(str(config.CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["recipes=tiny_full_dpo"], return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    assert cfg.hydra.run.dir == "outputs/tiny_full_dpo/2026-01-02_03-04-05"
    assert cfg.hydra.sweep.dir == "multirun/tiny_full_dpo/2026-01-02_03-04-05"
    assert "outputs/" in (ROOT / ".gitignore").read_text()
    assert "export DPO_RUN_STAMP" in (ROOT / "Makefile").read_text()


@pytest.mark.parametrize(
    "overrides, fetched, fix",
    [
        (
            ["recipes=qwen7b_lora_dpo", "hardware=cpu", "logger=none"],
            "tokenizer of the model 'Qwen/Qwen2.5-7B'",
            "`hf download Qwen/Qwen2.5-7B` (then it is found in the cache, also offline), or set model.model_name_or_path",
        ),
        (
            ["dataset.path=HuggingFaceH4/nope", "dataset.eval_path=null"],
            "dataset 'HuggingFaceH4/nope'",
            "`hf download HuggingFaceH4/nope --repo-type dataset` (then it is found in the cache, also offline), or set dataset.path",
        ),
    ],
)
def test_what_the_hub_cannot_give_is_named_with_its_fixes(overrides, fetched, fix, tmp_path, monkeypatch):
    import huggingface_hub.constants

    # No network here either way; offline mode (HF_HUB_OFFLINE=1, read at import) answers at once.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    out = python_m("dpo_recipes.train", *overrides, f"hydra.run.dir={tmp_path}")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert f"error: cannot fetch the {fetched} from the Hugging Face Hub" in out.stderr and fix in out.stderr


def test_a_local_path_that_does_not_exist_is_named_before_anything_loads():
    cfg, _ = config.compose(["model.model_name_or_path=/no/such/model", "dataset.eval_path=../nope.jsonl"])
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    assert "model.model_name_or_path: /no/such/model is neither a local folder or file nor a hub id" in str(
        err.value
    )
    assert "dataset.eval_path: ../nope.jsonl is neither" in str(err.value)
    cfg, _ = config.compose(
        ["dataset.path=mydata.jsonl", "dataset.eval_path=null", "dataset.messages={speaker:x}"]
    )
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    assert "dataset.path: mydata.jsonl is neither" in str(err.value)  # a data file's name: meant to be local
    assert "dataset.messages.speaker: unknown; the keys are content_key, role_key, roles, text_key" in str(
        err.value
    )


def test_sources_are_checked_like_the_rest(tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("")
    bad = f"+dataset.sources=[{{path:{mine},fraktion:0.5}},{{format:trl}},{{path:{mine},fraction:2}}]"
    cfg, _ = config.compose([bad])
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    problems = "\n".join(err.value.problems)
    assert "dataset: set path (one source) or sources (a mix), not both" in problems
    assert (
        "dataset.sources[0].fraktion: unknown dataset.sources[0] key (did you mean 'fraction'?)" in problems
    )
    assert "dataset.sources[1]: a source is a mapping with at least a path" in problems
    assert "dataset.sources[2].fraction: a share of the source's rows, in (0, 1]" in problems
    assert "dataset.eval_path: " in problems and "belongs to dataset=toy, not to dataset.sources" in problems


def test_new_data_never_keeps_another_datasets_eval_file(tmp_path):
    mine = tmp_path / "mine.jsonl"
    mine.write_text("")
    cfg, _ = config.compose([f"dataset.path={mine}"])
    with pytest.raises(ConfigError) as err:
        config.check(cfg)
    assert "dataset.eval_path: " in str(err.value) and "belongs to dataset=toy, not to dataset.path=" in str(
        err.value
    )
    assert "dataset.eval_path=null dataset.eval_size=0.1" in str(err.value)
    for fix in ([f"dataset.eval_path={mine}"], ["dataset.eval_path=null", "dataset.eval_size=0.1"]):
        config.check(config.compose([f"dataset.path={mine}", *fix])[0])
    config.check(config.compose(["dataset=real_alpaca"])[0])  # an option's own eval source stays
