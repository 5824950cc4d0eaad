"""TRL's DPOTrainer with only what it lacks: a faster tokenization path giving the same ids
(tokenize.py), a stable fingerprint on the tokenized data, so that later runs (a sweep's jobs) find
it and any precomputed reference log-probs again, with a note of whether they did, a CPU log-prob
head that scores only the positions that have a label, in tiles that fit the cache, padding-free
batches (`train.padding_free=true`: each micro-batch's sequences packed into one row), each pair's
prompt computed once (`train.share_prompt=true`), and a judge at evaluations (`judge.every`). TRL's
KTOTrainer takes the CPU head too (RecipeKTOTrainer)."""

import inspect
import os
import sys
import time
from contextlib import nullcontext

import torch
import trl
import trl.kernels.chunked_logprob as trl_chunked
import trl.trainer.utils as trl_utils
from datasets.fingerprint import Hasher
from trl import DPOTrainer, KTOTrainer, RewardTrainer, SFTTrainer
from trl.experimental.cpo import CPOTrainer
from trl.experimental.orpo import ORPOTrainer

from data_prep.unpaired import in_range, weights
from dpo_recipes.training import tokenize
from dpo_recipes.training.cpu_head import cpu_head
from dpo_recipes.training.segments import SEGMENTED, packed

# Private TRL names the overrides below rely on, with the parameters TRL calls them with. They move
# between TRL minor versions (pyproject pins the one the tests ran on); where one is not as expected,
# the overrides step aside for TRL's own path, with one warning, instead of breaking the run.
RELIED_ON = [
    (DPOTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (DPOTrainer, "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    (DPOTrainer, "_load_optimizer_and_scheduler", ["self", "checkpoint"]),
    (trl_utils, "global_then_local_main_first", None),
    (trl_utils, "_use_triton", ["device"]),
    (trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", None),
    (trl_chunked, "TOKEN_CHUNK_SIZE", None),
    (trl_utils, "FusedCausalLMOutput", None),  # its fields: PER_TOKEN, read and written by packed()
]


def changed_in_trl() -> list[str]:
    return [
        f"{owner.__name__}.{name}"
        for owner, name, params in RELIED_ON
        if not hasattr(owner, name)
        or (params and list(inspect.signature(getattr(owner, name)).parameters) != params)
    ]


class CPUHead:
    """A trainer whose forward and backward run under the CPU head while on CPU (cpu_head.py); TRL's own
    head elsewhere (on CUDA it already scores only labels)."""

    def _head(self):
        if "trl_changed" not in self.__dict__:
            self.trl_changed = changed_in_trl()
        return cpu_head() if self.args.device.type == "cpu" and not self.trl_changed else nullcontext()

    def training_step(self, *args, **kwargs):  # the forward and the backward
        with self._head():
            return super().training_step(*args, **kwargs)

    def prediction_step(self, *args, **kwargs):
        with self._head():
            return super().prediction_step(*args, **kwargs)


class RecipeTrainer(CPUHead, DPOTrainer):
    """See the module's docstring."""

    def __init__(self, *args, judging=None, **kwargs):
        self.tokenize_log, self.trl_changed, self.judging = {}, changed_in_trl(), judging
        if self.trl_changed:
            print(
                f"warning: TRL {trl.__version__} changed {', '.join(sorted(self.trl_changed))}; "
                "its own data preparation, log-prob head and padded batches run instead of the faster "
                "paths (same results, slower)",
                file=sys.stderr,
            )
        config = kwargs.get("args")  # the project passes it by name
        packing = bool(getattr(config, "padding_free", False)) and not self.trl_changed
        if packing:  # TRL turns its own padding_free off for DPO, with a warning; packing here does it
            config.padding_free = False
        super().__init__(*args, **kwargs)
        self.packing = packing
        if packing and getattr(self.model.config, "_attn_implementation", None) == "eager":
            print(
                "note: train.padding_free under eager attention: a packed row's mask covers all of its "
                "tokens, so attention costs more than padding saves (docs/performance.md, padding-free batches); sdpa, "
                "flash_attention_2/3 and flex_attention attend within each sequence",
                file=sys.stderr,
            )
        self.share_prompt = bool(getattr(config, "share_prompt", False)) and not self.trl_changed
        for model in (self.model, self.ref_model) if packing or self.share_prompt else ():
            if model is not None:
                model = getattr(model, "module", model)  # a reference DeepSpeed already wrapped
                base = model.get_base_model() if hasattr(model, "get_base_model") else model
                if base.config._attn_implementation == "sdpa":
                    base.config._attn_implementation = SEGMENTED
                base.forward = packed(base.forward, share=self.share_prompt, one_row=packing)

    def train(self, *args, **kwargs):
        if self.judging is not None and self.is_world_process_zero():  # the first process judges
            self.judging.start(self)  # before a resumed run's checkpoint loads: the policy is the reference
        return super().train(*args, **kwargs)

    def log(self, logs: dict, *args, **kwargs):
        """An evaluation's metrics (`logs` is the dict evaluate() returns) gain the judge's at its steps.
        Unless train.metric_for_best_model names another metric, the best judged step is the state's
        best, so the checkpoint saved there survives save_total_limit."""
        step = self.state.global_step
        if self.judging is not None and "eval_loss" in logs and self.judging.due(step):
            # The first process judges; every process takes its numbers, so that all agree on the best
            # step: saving a checkpoint waits on every process, and reads the best step on each
            judged = [self.judging(self) if self.is_world_process_zero() else None]
            if self.args.world_size > 1:
                torch.distributed.broadcast_object_list(judged, src=0)
            logs.update(judged[0])
            won, state = logs["eval_judge/win_rate"], self.state
            if self.args.metric_for_best_model is None and (
                state.best_metric is None or won > state.best_metric
            ):
                state.best_metric, state.best_global_step = won, step
        return super().log(logs, *args, **kwargs)

    def _load_optimizer_and_scheduler(self, checkpoint):
        """A resumed run's optimizer and schedule as its checkpoint left them, with the hyperparameters
        this launch gives (an allowed change, run.allow_changes): the checkpoint would bring back its own
        peak learning rate, betas, eps and weight decay. The schedule goes on at the same step from the new
        peak."""
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None or self.trl_changed:
            return
        _, given = type(self).get_optimizer_cls_and_kwargs(self.args, self.model)
        given = {k: v for k, v in given.items() if k in ("betas", "eps", "weight_decay")}
        for group in self.optimizer.param_groups:
            group.update({k: v for k, v in given.items() if k != "weight_decay" or group.get(k)})
            group["initial_lr"] = self.args.learning_rate
        scheduler = self.lr_scheduler
        if hasattr(scheduler, "base_lrs") and hasattr(scheduler, "lr_lambdas"):  # LambdaLR: HF's schedules
            scheduler.base_lrs = [self.args.learning_rate] * len(scheduler.base_lrs)
            for group, rule in zip(self.optimizer.param_groups, scheduler.lr_lambdas, strict=True):
                group["lr"] = self.args.learning_rate * rule(scheduler.last_epoch)
            scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _prepare_dataset(self, *args, **kwargs):
        if self.trl_changed:
            return super()._prepare_dataset(*args, **kwargs)
        return self._prepare(*args, **kwargs)

    def _prepare(self, dataset, processing_class, args, dataset_name):
        start, path = time.perf_counter(), "trl"
        if tokenize.eligible(dataset, processing_class):
            # As in TRL: the main process tokenizes first, the others then read its cache.
            with trl_utils.global_then_local_main_first():
                prepared = tokenize.prepare(
                    dataset,
                    processing_class,
                    args.max_length,
                    args.truncation_mode,
                    args.dataset_num_proc,
                    dataset_name,
                )
            path = "fast"
        else:
            prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        # Seconds spent and the tokenized table's file: a later run that reuses the tokens names the same file.
        self.tokenize_log[dataset_name] = {
            "seconds": round(time.perf_counter() - start, 3),
            "path": path,
            "cache_file": prepared.cache_files[0]["filename"] if prepared.cache_files else None,
        }
        # TRL's length filter hashes the whole DPOConfig, output_dir included, so every run would give
        # the same tokens a new fingerprint. Key them on what they depend on instead.
        # ld_alpha and precision shape the reference log-probs cached under this fingerprint too.
        inputs = (
            dataset._fingerprint,
            tokenize.identity(processing_class),
            args.max_length,
            args.truncation_mode,
        )
        prepared._fingerprint = Hasher.hash(
            (*inputs, args.ld_alpha, args.bf16, args.fp16, trl.__version__, tokenize.CODE)
        )
        return prepared

    def _precompute_ref_logps(self, *args, **kwargs):
        if self.trl_changed:
            return super()._precompute_ref_logps(*args, **kwargs)
        dataset, name = args[0], args[1]
        # TRL caches them next to the tokenized data under this fingerprint (see its _precompute_ref_logps).
        fingerprint = Hasher.hash((dataset._fingerprint, self._precompute_model_hash))
        hit = os.path.exists(dataset._get_cache_file_path(fingerprint))
        self.__dict__.setdefault("ref_logps_cache", {})[name] = "hit" if hit else "computed"
        with self._head():
            return super()._precompute_ref_logps(*args, **kwargs)


class RecipeKTOTrainer(CPUHead, KTOTrainer):
    """TRL's KTOTrainer with the CPU head: the same log-probs, scored at the labelled positions only."""


# The trainers of the tasks with a reference model (config/reference.py's strategies): DPO's, and TRL's
# KTOTrainer; TRL's own trainers for the others (config/schema.py TASKS), none with a reference
REFERENCED = {"dpo": RecipeTrainer, "kto": RecipeKTOTrainer}
OTHERS = {"reward": RewardTrainer, "sft": SFTTrainer, "orpo": ORPOTrainer, "cpo": CPOTrainer}


def balanced(built, train_set, report: dict) -> None:
    """task=kto: the desirable and undesirable loss weights for the training rows' balance
    (data_prep.unpaired.weights) where the recipe leaves both at 1, else the recipe's, with a warning
    when they miss the rule; said in the data report (kto_balance) and on the console."""
    if built.task != "kto":
        return
    args, balance = built.args, weights(train_set["label"])
    given = (args.desirable_weight, args.undesirable_weight)
    if given != (1.0, 1.0):
        balance.update(desirable_weight=given[0], undesirable_weight=given[1], set_by="the recipe")
    else:
        args.desirable_weight, args.undesirable_weight = (
            balance["desirable_weight"],
            balance["undesirable_weight"],
        )
        balance["set_by"] = "the data's balance"
    report["kto_balance"] = balance
    print(
        f"KTO weights: desirable {balance['desirable_weight']:.3g}, undesirable {balance['undesirable_weight']:.3g} "
        f"for {balance['desirable']} desirable and {balance['undesirable']} undesirable rows ({balance['set_by']})"
    )
    if not in_range(balance):
        print(
            "warning: desirable_weight x desirable rows / (undesirable_weight x undesirable rows) is outside "
            "[1, 4/3], the KTO paper's range: leave both weights at 1 to have them set from the data",
            file=sys.stderr,
        )
