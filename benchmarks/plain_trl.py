"""The default tiny recipe written as a plain TRL script, with identical settings: the baseline that
`make bench` compares `make train` against. Usage: python benchmarks/plain_trl.py OUTPUT_DIR"""

import sys

from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

from dpo_recipes import ROOT, tiny


def main(output_dir: str) -> None:
    model = str(tiny.path())
    data = {"train": str(ROOT / "data/toy/train.jsonl"), "eval": str(ROOT / "data/toy/eval.jsonl")}
    dataset = load_dataset("json", data_files=data)
    args = DPOConfig(
        output_dir=output_dir,
        model_init_kwargs={"dtype": "float32"},
        use_cpu=True,
        dataset_num_proc=2,
        bf16=False,
        activation_checkpointing=False,
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=1e-3,
        max_steps=150,
        max_length=256,
        loss_type=["sigmoid"],
        beta=0.1,
        logging_steps=5,
        logging_first_step=True,
        eval_strategy="steps",
        eval_steps=10,
        save_strategy="steps",
        save_steps=50,
        save_total_limit=2,
        seed=42,
        report_to="none",
        disable_tqdm=True,
    )
    peft = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset["train"],
        eval_dataset=dataset["eval"],
        processing_class=AutoTokenizer.from_pretrained(model),
        peft_config=peft,
    )
    trainer.train()
    trainer.save_model(output_dir)


if __name__ == "__main__":
    main(sys.argv[1])
