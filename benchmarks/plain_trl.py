"""A recipe's settings written as a plain TRL script: the baseline `make bench` and `make bench-gpu`
compare `make train` against.

    python benchmarks/plain_trl.py OUTPUT_DIR                       # tiny_lora_dpo, as `make train`
    python benchmarks/plain_trl.py OUTPUT_DIR --recipe qwen7b_lora_dpo --model DIR --train FILE \
        --max-steps 8 [--accumulation 16] [--micro-batch 1]
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from dpo_recipes import ROOT
from dpo_recipes.sources import tiny

ON_GPU = torch.cuda.is_available()
# Each recipe's DPOConfig and LoRA settings, as its YAML files compose them.
RECIPES = {
    "tiny_lora_dpo": dict(
        train=dict(
            use_cpu=True,
            dataset_num_proc=2,
            bf16=False,
            activation_checkpointing=False,
            per_device_train_batch_size=8,
            per_device_eval_batch_size=16,
            loss_type=["sigmoid", "sft"],  # loss=rpo
            loss_weights=[1.0, 1.0],
            beta=1.0,
            learning_rate=5e-3,
            max_steps=150,
            max_length=256,
            logging_steps=5,
            eval_strategy="steps",
            eval_steps=10,
            save_strategy="steps",
            save_steps=50,
            save_total_limit=2,
            disable_tqdm=True,
            model_init_kwargs={"dtype": "float32"},
        ),
        lora=dict(r=16, lora_alpha=32, lora_dropout=0.0),
    ),
    "qwen7b_lora_dpo": dict(  # the recipe on the `gpu` hardware option (`cpu` where there is no GPU)
        train=dict(
            use_cpu=not ON_GPU,
            dataset_num_proc=8 if ON_GPU else 2,
            bf16=ON_GPU,
            activation_checkpointing=ON_GPU,
            per_device_train_batch_size=1,
            gradient_accumulation_steps=16,
            loss_type=["sigmoid"],
            beta=0.1,
            learning_rate=5e-6,
            lr_scheduler_type="cosine",
            warmup_steps=0.1,
            max_length=2048,
            logging_steps=1,
            eval_strategy="no",
            save_strategy="no",
            disable_tqdm=True,
            model_init_kwargs={"dtype": "bfloat16", "attn_implementation": "sdpa"},
        ),
        lora=dict(r=64, lora_alpha=128, lora_dropout=0.05),
    ),
}


def main(output_dir: str, recipe: str, model: str | None, train: str | None, eval_file: str | None, **extra):
    settings = RECIPES[recipe]
    data = {"train": train or str(ROOT / "data/toy/train.jsonl")}
    if recipe == "tiny_lora_dpo":
        data["eval"] = eval_file or str(ROOT / "data/toy/eval.jsonl")
    dataset = load_dataset("json", data_files=data)
    model = model or str(tiny.path())
    args = DPOConfig(
        output_dir=output_dir,
        logging_first_step=True,
        seed=42,
        report_to="none",
        **{**settings["train"], **{k: v for k, v in extra.items() if v is not None}},
    )
    peft = LoraConfig(target_modules="all-linear", task_type="CAUSAL_LM", **settings["lora"])
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        eval_dataset=dataset.get("eval"),
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=peft,
    )
    trainer.train()
    if args.save_strategy != "no":
        trainer.save_model(output_dir)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("output_dir")
    parser.add_argument("--recipe", default="tiny_lora_dpo", choices=RECIPES)
    parser.add_argument("--model")
    parser.add_argument("--train")
    parser.add_argument("--eval", dest="eval_file")
    parser.add_argument("--max-steps", dest="max_steps", type=int)
    parser.add_argument("--accumulation", dest="gradient_accumulation_steps", type=int)
    parser.add_argument("--micro-batch", dest="per_device_train_batch_size", type=int)
    main(**vars(parser.parse_args()))
