"""Inputs that would otherwise train silently wrong: every rule on a hand-built view, and each case a
user meets (plain-text data, a template the tokenizer lacks, a system column, a secret, a pinned revision,
no length limit, a mix, make's `$`) refused with the fix or handled right, through the entry point."""

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import python_m, run, tiny_overrides
from datasets import Dataset
from tokenizers import Tokenizer, pre_tokenizers, processors, trainers
from tokenizers import models as token_models
from transformers import AutoTokenizer, GenerationConfig, PreTrainedTokenizerFast, TrainingArguments

from data_prep import __main__ as prep
from dpo_recipes import ROOT, config, errors, launch, train, validate
from dpo_recipes.after import export, sweep, trained
from dpo_recipes.config import machine, reference, rules, views
from dpo_recipes.config.schema import OURS, DatasetSchema
from dpo_recipes.rundir import launching
from dpo_recipes.sources import tiny
from dpo_recipes.training import chat, data, segments

TOY = str(ROOT / "data" / "toy" / "train.jsonl")
TOKEN = "hf_" + "a1B2" * 9  # the shape of a Hugging Face token, not one


def view(train=None, model=None, choices=None, task="dpo", **ours) -> views.View:
    """A View built by hand, as views.read() gives one for a composed config."""
    nodes = {"train": train or {}, "model": model or {}} | {name: ours.get(name, {}) for name in OURS}
    typed = {name: cls(**nodes[name]) for name, cls in OURS.items() if name != "sweep_report"}
    return views.View(nodes, task, **typed, choices=choices or {}, shipped={}, raw=nodes)


# rule -> a view that breaks it, and the words of its problem
CASES = {
    "template": (dict(model={"chat_template": "no_such"}), "model.chat_template: 'no_such' is neither"),
    "data_source": (dict(dataset={}), "dataset.path: missing"),
    "mix": (
        dict(dataset={"sources": [{"path": TOY}], "max_samples": 5}),
        "dataset.max_samples: a mix reads it from each source; set dataset.sources[i].max_samples",
    ),
    "eval_data": (dict(dataset={"path": TOY, "eval_path": TOY, "eval_split": "test"}), "not both"),
    "secrets": (dict(train={"model_init_kwargs": {"token": TOKEN}}), "train.model_init_kwargs.token: holds"),
    "scale": (
        dict(train={"use_cpu": True}, hardware={"engine": "fsdp"}, choices={"hardware": "fsdp"}),
        "hardware=fsdp shards on GPUs only",
    ),
    "precision": (
        dict(model={"dtype": "bfloat16"}),
        "full fine-tuning with bfloat16 weights and no fp32 master",
    ),
    "run": (dict(run={"resume": "/no/checkpoint"}), "run.resume: '/no/checkpoint' is not auto"),
    "losses": (dict(train={"loss_type": ["sigmoidd"]}), "did you mean 'sigmoid'?"),
    "beta": (dict(train={"beta": -0.1}), "train.beta: -0.1 leaves the preference out of the loss"),
    "reference": (dict(reference={"strategy": "path"}), "reference.path: reference=path needs"),
    "local_paths": (dict(dataset={"path": "./no/such.jsonl"}), "dataset.path: ./no/such.jsonl is neither"),
    "lora_targets": (dict(model={"use_peft": True, "lora_target_modules": ["lm_head"]}), "lm_head: TRL's"),
    "padding_free": (
        dict(train={"padding_free": True}, model={"attn_implementation": "paged|sdpa"}),
        "train.padding_free: attention 'paged|sdpa' would let packed sequences attend",
    ),
    "share_prompt": (
        dict(train={"share_prompt": True}, model={"attn_implementation": "flash_attention_2"}),
        "train.share_prompt: attention 'flash_attention_2' cannot take the mask",
    ),
    "flex_on_cpu": (
        dict(model={"attn_implementation": "flex_attention"}, hardware={"device": "cpu"}),
        "flex attention has no backward pass on CPU",
    ),
    "judge": (dict(judge={"kind": "pairwise"}), "judge.path: judge.kind=pairwise needs"),
    "task": (dict(task="reward", choices={"loss": "sigmoid"}), "loss=sigmoid: task=reward trains a reward"),
    "unpaired": (dict(task="kto", dataset={"path": TOY}), "task=kto learns from unpaired rows"),
    "memory": (dict(hardware={"memory_gb": 0}), "hardware.memory_gb: 0 is no card's memory"),
    "deepspeed": (dict(hardware={"engine": "deepspeed"}, choices={"hardware": "zero3"}), "needs DeepSpeed"),
    "gpu": (dict(train={"bf16": True}), "add the override hardware=cpu"),
    "processes": (dict(hardware={"engine": "ddp"}, choices={"hardware": "ddp"}), "HARDWARE=ddp NPROC="),
    "wandb_login": (dict(logger={"name": "wandb"}), "logger=wandb: not logged in"),
}


@pytest.fixture
def bare_machine(monkeypatch, tmp_path):
    """One CPU process, no GPU, no DeepSpeed, no wandb login: what the MACHINE rules read, fixed."""
    monkeypatch.setattr(machine.torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(machine.torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(machine.importlib.util, "find_spec", lambda name: None)
    for name in ("WORLD_SIZE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))


def test_every_rule_has_a_case():
    assert set(CASES) == set(rules.RULES) | set(machine.MACHINE)


@pytest.mark.parametrize("name", CASES)
def test_each_rule_on_a_hand_built_view(name, bare_machine):
    broken, words = CASES[name]
    rule = {**rules.RULES, **machine.MACHINE}[name]
    assert any(words in p for p in rule(view(**broken))), rule(view(**broken))
    assert rule(view(dataset={"path": TOY})) == []
    assert any(words in p for p in rules.problems(view(**broken)))


def test_a_clean_view_has_no_problems(bare_machine):
    assert rules.problems(view(dataset={"path": TOY})) == []


# Secrets: by name and shape at any depth; TRL's own fields that merely say "token" are not secrets.
@pytest.mark.parametrize(
    "override,where",
    [
        (f"train.model_init_kwargs.token={TOKEN}", "train.model_init_kwargs.token"),
        ("train.hub_token=${oc.env:HOME}", "train.hub_token"),  # a name says it, whatever the value
        ("logger.project=sk-" + "x" * 24, "logger.project"),  # a value says it, whatever the name
        (f"dataset.sources=[{{path: {TOY}, token: abc}}]", "dataset.sources[0].token"),
    ],
)
def test_a_secret_anywhere_in_the_config_is_refused_without_echoing_it(override, where):
    with pytest.raises(errors.ConfigError) as err:
        config.check(
            config.compose([override, "dataset.path=null"] if "sources" in override else [override])[0]
        )
    assert f"{where}: holds a secret" in str(err.value) and "put it in the environment" in str(err.value)
    assert TOKEN not in str(err.value) and "x" * 24 not in str(err.value)


def test_trl_fields_named_like_tokens_are_not_secrets():
    fields = ["train.pad_token='<|pad|>'", "train.include_num_input_tokens_seen=all"]
    fields += [
        "train.average_tokens_across_devices=true",
        "model.model_revision=" + "0123456789abcdef" * 2 + "01234567",
    ]
    config.check(config.compose(fields)[0])


def test_a_secret_on_the_command_line_stops_the_run_before_anything_is_written(tmp_path):
    out = python_m(
        "dpo_recipes.train", f"train.model_init_kwargs.token={TOKEN}", f"hydra.run.dir={tmp_path / 'r'}"
    )
    assert out.returncode == 2 and "train.model_init_kwargs.token: holds a secret" in out.stderr
    assert TOKEN not in out.stderr + out.stdout and not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    "name,words",
    [
        ("outputs/tiny_lora_dpo/e50", "is a run dir; make train takes its name: RUN=e50"),
        (str(ROOT / "outputs" / "x"), "is a path; RUN names a dir under outputs/<recipe>/"),
        ("../x", "is a path"),
    ],
)
def test_a_run_dir_or_path_given_as_run_is_refused_naming_the_name(name, words, tmp_path, monkeypatch):
    """`make train RUN=outputs/<recipe>/<name>` (the form make samples takes) would start a new run
    nested in that one instead of resuming it."""
    monkeypatch.chdir(tmp_path)
    out = python_m("dpo_recipes.train", f"run.name={name}")
    assert out.returncode == 2 and words in out.stderr, out.stderr
    # no run dir, no record, no empty folder: but outputs/<recipe>/, which Hydra made for a `..` to climb out of
    assert not [p for p in tmp_path.rglob("*") if p.is_file() or ".." not in name]
    assert config.check(config.compose(["run.name=sweeps/a"])[0]).run.name == "sweeps/a"  # a folder of runs


# Plain text, templates, system columns.
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def markerless_tokenizer(target: Path) -> Path:
    """A base model's tokenizer as Llama 2 has one: byte-level BPE with <s> before every text and </s>,
    no chat markers, no chat template."""
    backend = Tokenizer(token_models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [line for line in Path(TOY).read_text().splitlines()[:200]]
    backend.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<unk>", "<s>", "</s>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    ).save_pretrained(target)
    return target


def test_chatml_on_a_tokenizer_without_its_markers_is_refused_before_weights_load(tmp_path):
    base = markerless_tokenizer(
        tmp_path / "base"
    )  # a tokenizer and no weights: refused before any are needed
    cfg, recipe = config.compose(
        [f"model.model_name_or_path={base}", "model.chat_template=chatml", "dataset.max_samples=8"]
    )
    with pytest.raises(errors.ConfigError, match=r"'<\|im_start\|>' \(\d+ pieces\).*dataset.style=standard"):
        train.run(cfg, tmp_path / "run", recipe)


def test_a_template_ending_turns_with_another_token_than_eos_makes_it_eos(tmp_path):
    built = config.build(config.compose(["hardware=cpu"])[0], tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny.path())
    tokenizer.eos_token = "<|endoftext|>"  # as Qwen2.5's base tokenizer has it, under the ChatML template
    rows = Dataset.from_list([{"prompt": [{"role": "user", "content": "Hi"}]}])
    notes = chat.check_template(tokenizer, rows, built)
    assert tokenizer.eos_token == "<|im_end|>" and notes == [
        "EOS set to '<|im_end|>' (was '<|endoftext|>'): the template ends each turn with it"
    ]
    assert (
        chat.check_template(tokenizer, Dataset.from_list([{"prompt": "User: Hi\n\nAssistant:"}]), built) == []
    )
    end, own = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    assert chat.stops(tokenizer, GenerationConfig(eos_token_id=own)) == sorted([end, own])  # samples, export


@pytest.mark.slow
def test_a_full_run_and_its_export_stop_at_the_eos_the_template_set(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny.path(), base)
    settings = json.loads((base / "tokenizer_config.json").read_text())
    (base / "tokenizer_config.json").write_text(json.dumps({**settings, "eos_token": "<|endoftext|>"}))
    end, own = AutoTokenizer.from_pretrained(base).convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])
    GenerationConfig(eos_token_id=own).save_pretrained(base)  # a base model that stops at <|endoftext|>
    run(tmp_path, tiny_overrides("tiny_full_dpo", f"model.model_name_or_path={base}"))
    assert AutoTokenizer.from_pretrained(tmp_path / "run").eos_token == "<|im_end|>"
    assert export.main([str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    for folder in ("run", "export"):
        saved = GenerationConfig.from_pretrained(tmp_path / folder).eos_token_id
        assert end in (saved if isinstance(saved, list) else [saved]), folder


def test_plain_text_rows_stay_plain_text_and_mixed_styles_are_refused(tmp_path):
    plain = write_jsonl(
        tmp_path / "plain.jsonl", [{"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}] * 2
    )
    rows, _, report = data.load(DatasetSchema(path=str(plain)))
    assert (
        rows[0] == {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}
        and report["train"]["style"] == "standard"
    )
    wrapped, _, _ = data.load(DatasetSchema(path=str(plain), style="conversational"))
    assert wrapped[0]["prompt"] == [{"role": "user", "content": "Say hi."}]
    with pytest.raises(errors.DataError, match="different styles.*dataset.style=conversational"):
        data.load(DatasetSchema(sources=[{"path": str(plain)}, {"path": TOY, "max_samples": 4}]))


@pytest.mark.slow
def test_plain_text_data_on_a_base_tokenizer_trains_on_trls_standard_ids(tmp_path):
    """BOS + prompt + answer + EOS, as TRL's standard path gives them: no chat template is asked for."""
    base = tmp_path / "base"
    shutil.copytree(tiny.path(), base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    bos = "<|endoftext|>"
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tokenizer.convert_tokens_to_ids(bos))]
    )
    tokenizer.bos_token, tokenizer.chat_template = bos, None
    for name in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json"):
        (base / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(base)
    plain = tmp_path / "plain.jsonl"
    assert prep.main(["trl", TOY, str(plain), "--style", "standard"]) == 0
    trainer, _ = run(
        tmp_path,
        tiny_overrides(
            "tiny_lora_dpo",
            f"model.model_name_or_path={base}",
            f"dataset.path={plain}",
            "dataset.eval_path=null",
        ),
    )
    loaded, row = AutoTokenizer.from_pretrained(base), json.loads(plain.read_text().splitlines()[0])
    assert loaded.chat_template is None and loaded("x")["input_ids"][0] == loaded.bos_token_id
    first = trainer.train_dataset[0]
    assert first["prompt_ids"] == loaded(row["prompt"])["input_ids"]
    assert (
        first["prompt_ids"] + first["chosen_ids"]
        == loaded(row["prompt"] + row["chosen"] + loaded.eos_token)["input_ids"]
    )
    assert first["prompt_ids"][0] == loaded.bos_token_id and first["chosen_ids"][-1] == loaded.eos_token_id


def test_sharegpts_system_column_opens_the_prompt(tmp_path):
    turn = [{"from": "human", "value": "Hi"}]
    answers = {"chosen": {"from": "gpt", "value": "Hi."}, "rejected": {"from": "gpt", "value": "Go away."}}
    rows = [
        {"system": "Be terse.", "conversations": turn, **answers},
        {"system": "Be loud.", "conversations": [{"from": "system", "value": "Be terse."}, *turn], **answers},
    ]
    source = tmp_path / "sharegpt.json"
    source.write_text(json.dumps(rows))
    assert prep.main(["sharegpt", str(source), str(tmp_path / "out.jsonl")]) == 0
    kept = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kept[0]["prompt"] == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
    ]
    report = json.loads((tmp_path / "out.jsonl.report.json").read_text())
    assert report["dropped"] == {"prompt_mismatch": 1}  # a system column and another system turn


def test_any_system_column_maps_with_columns(tmp_path):
    rows = [{"sys": "Be terse.", "prompt": "Hi", "chosen": "Hi.", "rejected": "Go away."}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    assert prep.main(["trl", str(source), str(tmp_path / "out.jsonl"), "--columns", "system=sys"]) == 0
    kept = json.loads((tmp_path / "out.jsonl").read_text())
    assert kept["prompt"][0] == {"role": "system", "content": "Be terse."}


# Mixes, and conversion on the main process first.
def test_a_mix_refuses_the_one_source_keys_it_would_ignore():
    cfg, _ = config.compose(
        ["dataset.path=null", f"dataset.sources=[{{path: {TOY}}}]", "dataset.max_samples=8"]
    )
    with pytest.raises(errors.ConfigError, match=r"dataset.max_samples: a mix reads it from each source"):
        config.check(cfg)


def test_the_data_converts_on_the_main_process_first(tmp_path, monkeypatch):
    seen = []

    @contextlib.contextmanager
    def first(self, local=True, desc="work"):
        seen.append(desc)
        yield
        seen.append("others")

    def load(*args, **kwargs):
        seen.append("load")
        raise RuntimeError("stop before training")

    monkeypatch.setattr(TrainingArguments, "main_process_first", first)
    monkeypatch.setattr(data, "load", load)
    monkeypatch.setattr(chat, "tokenizer", lambda built: None)
    cfg, recipe = config.compose([])
    with pytest.raises(RuntimeError, match="stop before training"):
        train.run(cfg, tmp_path / "run", recipe)
    assert seen == ["converting the data", "load"]


def test_eval_size_holds_out_prompts_with_all_their_pairs_and_otherwise_splits_as_datasets_does():
    from datasets import Dataset

    prompts = [
        [{"role": "user", "content": f"question {i // 3}"}] for i in range(60)
    ]  # 20 prompts, 3 pairs each
    rows = Dataset.from_dict(
        {"prompt": prompts, "chosen": [f"a{i}" for i in range(60)], "rejected": ["b"] * 60}
    )
    train_set, held = data.split_by_prompt(rows, 0.2, 42)
    seen = [{json.dumps(p) for p in part["prompt"]} for part in (train_set, held)]
    assert not seen[0] & seen[1] and len(seen[1]) == 4 and len(held) == 12
    assert sorted([*train_set["chosen"], *held["chosen"]]) == sorted(rows["chosen"])  # every row, once
    distinct = rows.select(range(0, 60, 3))  # one pair a prompt: datasets' own split, row for row
    ours, theirs = data.split_by_prompt(distinct, 0.2, 42), distinct.train_test_split(test_size=0.2, seed=42)
    assert [list(part["chosen"]) for part in ours] == [list(theirs[s]["chosen"]) for s in ("train", "test")]


def test_an_eval_cap_below_the_held_out_rows_says_what_becomes_of_the_rest(capsys):
    """dataset.eval_size holds rows out of training; max_eval_samples evaluates some of them: the rest
    are neither trained on nor evaluated, and the eval line says so with both counts."""
    overrides = ["dataset=real_ultrafeedback", "dataset.max_samples=40", "dataset.max_eval_samples=3"]
    cfg, _ = config.compose(overrides)
    train_set, evaluation, reports = data.load(DatasetSchema(**cfg.dataset))
    assert (len(train_set), len(evaluation), reports["eval"]["held_out"]) == (36, 3, 4)
    said = r"3 of the 4 rows held out of \S+ \(dataset.max_eval_samples=3\); 1 set aside, neither trained on"
    assert re.search(said, capsys.readouterr().out)


# Revisions and load flags after training; runs that lack a key.
def test_a_path_reference_loads_at_its_own_revision_not_the_policys(tmp_path, monkeypatch):
    got = {}
    monkeypatch.setattr(
        "trl.trainer.utils.create_model_from_path", lambda path, **kw: got.update(path=path, **kw)
    )
    for extra, revision in (([], None), (["reference.revision=v2"], "v2")):
        cfg, _ = config.compose(
            [
                "model=tiny_llama_full",
                "model.model_revision=v1",
                "reference=path",
                "reference.path=org/ref",
                *extra,
            ]
        )
        with contextlib.suppress(AttributeError):  # the stand-in returns no model
            reference.load(config.build(cfg, tmp_path))
        assert (got["path"], got["revision"], got["use_safetensors"]) == ("org/ref", revision, True)


def fake_run(tmp_path, **model) -> trained.Run:
    config_ = {
        "model": {"model_name_or_path": str(tiny.path()), **model},
        "train": {},
        "dataset": {"path": TOY},
    }
    summary = {
        "recipe": "r",
        "status": "finished",
        "config": config_,
        "reference": {"strategy": "copy", "path": None},
    }
    return trained.Run(tmp_path, summary, tmp_path)


def test_a_run_without_dtype_beta_or_seed_exports_and_samples_with_trls_defaults(tmp_path):
    run_ = fake_run(tmp_path)
    assert (run_.dtype, run_.beta, run_.seed) == ("auto", 0.1, 42)
    assert "beta 0.1" in export.card(run_, "copied")


@pytest.mark.slow
def test_samples_of_a_quantized_run_score_against_the_base_quantized_as_trained(tmp_path):
    from bitsandbytes.nn import Linear4bit

    run_ = fake_run(tmp_path, load_in_4bit=True, bnb_4bit_quant_type="nf4", dtype="float32")
    assert any(isinstance(m, Linear4bit) for m in trained.base(run_, as_trained=True).modules())
    assert not any(isinstance(m, Linear4bit) for m in trained.base(run_).modules())  # export merges in full


def hub_cache(root: Path) -> Path:
    """A Hub cache holding `local/tiny` at two revisions: main (the tiny Llama) and v1 (its weights moved)."""
    import torch
    from transformers import AutoModelForCausalLM

    repo = root / "models--local--tiny"
    for ref, commit in (("main", "a" * 40), ("v1", "b" * 40)):
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
        shutil.copytree(tiny.path(), repo / "snapshots" / commit)
    moved = AutoModelForCausalLM.from_pretrained(repo / "snapshots" / ("b" * 40))
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in moved.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    moved.save_pretrained(repo / "snapshots" / ("b" * 40))
    return repo / "snapshots"


@pytest.mark.e2e
def test_a_run_pinned_to_a_revision_exports_against_that_revision(tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    snapshots = hub_cache(tmp_path / "hub")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    overrides = tiny_overrides(
        "tiny_lora_dpo", "model.model_name_or_path=local/tiny", "model.model_revision=v1"
    )
    for cmd in (
        ["dpo_recipes.train", *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        ["dpo_recipes.after.export", str(tmp_path / "run")],
    ):
        out = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, cwd=ROOT, env=env)
        assert out.returncode == 0, out.stderr[-3000:]
    exported = load_file(tmp_path / "run" / "export" / "model.safetensors")
    for commit, same in (("b" * 40, True), ("a" * 40, False)):
        base = AutoModelForCausalLM.from_pretrained(snapshots / commit)
        merged = PeftModel.from_pretrained(base, tmp_path / "run").merge_and_unload().state_dict()
        assert all(torch.equal(exported[k], merged[k]) for k in exported) == same


@pytest.mark.slow
def test_no_length_limit_trains(tmp_path):
    trainer, _ = run(tmp_path, tiny_overrides("tiny_lora_dpo", "train.max_length=null"))
    assert trainer.args.max_length is None and trainer.state.global_step == 2


# Sweeps, make, launch, README.
def test_the_heat_map_shows_only_finished_jobs_and_marks_the_rest():
    rows = [
        {"overrides": {"beta": b, "learning_rate": lr}, "status": s, "final_loss": v}
        for b, lr, s, v in [
            (0.1, 1e-3, "ok", 0.5),
            (0.2, 1e-3, "interrupted", 0.1),
            (0.1, 2e-3, "failed", None),
            (0.2, 2e-3, "ok", 0.4),
        ]
    ]
    (_, xs), (_, ys), values, marks = sweep._grid(rows, "loss")
    assert values[0][0] == 0.5 and values[1][1] == 0.4 and marks == {(0, 1): "interrupted", (1, 0): "failed"}
    assert values[0][1] != values[0][1]  # NaN: the interrupted job's last value is not a result


@pytest.mark.e2e
def test_make_passes_hydra_interpolations_and_quoted_values_intact():
    args = "ARGS=logger.project=${oc.env:DPO_PROBE} 'train.run_name=a b' --show-config"
    out = subprocess.run(
        ["make", "validate", args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "DPO_PROBE": "probe"},
    )
    assert out.returncode == 0, out.stderr
    assert "project: probe" in out.stdout and "run_name: a b" in out.stdout


@pytest.mark.e2e
def test_make_quotes_its_paths(tmp_path):
    source = tmp_path / "my data" / "in.json"
    source.parent.mkdir()
    shutil.copy(ROOT / "tests" / "fixtures" / "sharegpt.json", source)
    target = tmp_path / "out dir" / "prefs.jsonl"
    out = subprocess.run(
        ["make", "prep", "FORMAT=sharegpt", f"IN={source}", f"OUT={target}"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0 and target.exists(), out.stderr


def test_deepspeed_json_is_found_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cmd = launch.command(["hardware=zero3"], 2)
    path = Path(cmd[cmd.index("--deepspeed_config_file") + 1])
    assert path.is_absolute() and path.is_file() and path.name == "ds_zero3.json"


def test_the_docs_name_the_file_that_overrides_trls_private_methods():
    lines = [
        line for line in (ROOT / "docs" / "performance.md").read_text().splitlines() if "private" in line
    ]
    named = {name for line in lines for name in re.findall(r"dpo_recipes/([\w/]+)\.py", line)}
    assert named and all("RELIED_ON" in (ROOT / "dpo_recipes" / f"{n}.py").read_text() for n in named)


def test_a_sweep_into_an_earlier_sweeps_dir_with_other_overrides_is_refused(tmp_path):
    task = ["++dataset.max_samples=64", "++train.beta=0.1,0.2", "+sweep=tiny_beta_lr"]
    (tmp_path / "multirun.yaml").write_text(json.dumps({"hydra": {"overrides": {"task": task}}}))
    again = [*task, f"hydra.sweep.dir={tmp_path}", "++run.resume=auto"]
    assert launching.sweep_changes(again) is None  # the same sweep, resumed
    other = [*task, "++dataset.max_samples=32", f"hydra.sweep.dir={tmp_path}"]
    assert "dataset.max_samples: 64 -> 32" in launching.sweep_changes(other)
    assert launching.sweep_changes([*other, "++run.allow_changes=true"]) is None
    assert (
        launching.sweep_changes([*task, "model=tiny_llama_full", f"hydra.sweep.dir={tmp_path / 'new'}"])
        is None
    )


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["task=rewards"], "task: 'rewards' is none of dpo, reward, sft"),
        (["loss=ipo"], "train.loss_type: not a RewardConfig field"),
        (["loss=ipo"], "loss=ipo: task=reward trains a reward model"),
        (["model=tiny_llama_lora"], "model.lora_task_type: a LoRA reward model needs SEQ_CLS"),
        (
            ["judge=tiny", "judge.every=10"],
            "judge.every: judges a DPO policy against its reference; with task=reward",
        ),
        (["reference=copy"], "reference=copy: task=reward trains a reward model"),
        (["train.beta=0.1"], "train.beta: not a RewardConfig field"),
    ],
)
def test_a_reward_model_recipe_reads_train_as_rewardconfig_and_refuses_dpo_options(
    overrides, words, tmp_path
):
    built = config.build(config.compose(["recipes=tiny_reward_model"])[0], tmp_path)
    assert (
        built.task == "reward"
        and type(built.args).__name__ == "RewardConfig"
        and built.args.learning_rate == 3e-4
    )
    with pytest.raises(errors.ConfigError) as err:
        config.check(config.compose(["recipes=tiny_reward_model", *overrides])[0])
    assert words in str(err.value), err.value


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["judge.every=15"], "judge.every=15: a multiple of train.eval_steps=10"),
        (["judge.every=50", "judge=none"], "judge.every: judging while training needs a judge"),
        (["judge.every=50", "train.eval_strategy=no"], "judge.every: judging happens at evaluations"),
        (["judge.every=50", "hardware=fsdp"], "hardware=fsdp shards the weights"),
        (["judge.every=50", "judge.prompts=0"], "judge.prompts, judge.max_new_tokens: counts"),
    ],
)
def test_judging_while_training_needs_a_judge_evaluations_on_its_steps_and_whole_weights(overrides, words):
    config.check(config.compose(["judge.every=50"])[0])  # the tiny recipe: eval every 10 steps
    with pytest.raises(errors.ConfigError) as err:
        config.check(config.compose(overrides)[0])
    assert words in str(err.value), err.value


def test_sliding_window_layers_are_counted_from_the_models_config():
    from transformers import AutoConfig, Gemma2Config, MistralConfig, Qwen2Config

    from dpo_recipes.training.segments import sliding_layers

    assert sliding_layers(MistralConfig(sliding_window=4, num_hidden_layers=3)) == 3
    assert sliding_layers(MistralConfig(sliding_window=None, num_hidden_layers=3)) == 0
    assert sliding_layers(Gemma2Config(num_hidden_layers=4)) == 2  # local and global layers alternate
    qwen2 = Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, num_hidden_layers=3)
    assert sliding_layers(qwen2) == 2
    assert sliding_layers(AutoConfig.from_pretrained(ROOT / "assets/model_configs/Qwen--Qwen2.5-7B")) == 0


def test_the_packed_layouts_are_refused_for_a_sliding_window_model_before_weights_load(tmp_path):
    """The layouts attend causally over each whole sequence: a model whose layers attend within a
    window would train on other log-probs than the padded batch's. Refused before any weight loads (the
    model here is its config and tokenizer alone), naming the fix; padded batches go on."""
    from transformers import AutoTokenizer, MistralConfig

    model = tmp_path / "mistral"
    MistralConfig(
        sliding_window=4, num_hidden_layers=2, hidden_size=64, intermediate_size=128
    ).save_pretrained(model)
    AutoTokenizer.from_pretrained(tiny.path()).save_pretrained(model)
    cfg, recipe = config.compose(["recipes=tiny_lora_dpo", f"model.model_name_or_path={model}"])  # both on
    with pytest.raises(errors.ConfigError) as refused:
        train.run(cfg, tmp_path / "run", recipe)
    message = str(refused.value)
    assert (
        "train.padding_free and train.share_prompt: 2 of the model's layers attend within a sliding"
        in message
    )
    assert "set train.padding_free=false train.share_prompt=false" in message
    assert not (tmp_path / "run").exists()
    assert validate.main(["recipes=tiny_lora_dpo", f"model.model_name_or_path={model}"]) == 2
    padded = ["recipes=tiny_lora_dpo", "++train.padding_free=false", "++train.share_prompt=false"]
    cfg, _ = config.compose([*padded, f"model.model_name_or_path={model}"])
    assert segments.refused(config.build(cfg, tmp_path)) is None
