"""Load the policy and the reference model the `reference:` option asks for.

| strategy    | policy                      | reference                                  |
| adapter     | base + new LoRA adapter     | the base with the adapter disabled (TRL)   |
| copy        | the model                   | a frozen copy from the same path           |
| path        | the model                   | a frozen model from `reference.path`       |
| precomputed | the model (or + LoRA)       | none held: log-probs computed before training |
| sft_adapter | base + the SFT adapter      | a frozen copy of the SFT adapter (TRL's "ref" adapter) |
"""

import inspect
import os
import sys
import time

import trl
import trl.trainer.utils as trl_utils
from datasets.fingerprint import Hasher
from omegaconf import DictConfig
from trl import DPOTrainer
from trl.trainer.utils import create_model_from_path

from dpo_recipes import config, hub, tokenize


def _init_kwargs(built: config.Built) -> dict:
    kwargs = dict(built.args.model_init_kwargs, trust_remote_code=built.args.trust_remote_code)
    if built.quantization is not None:
        kwargs["quantization_config"] = built.quantization
    if built.args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None  # each process holds its own replica
    return kwargs


def _frozen(path: str, built: config.Built):
    return create_model_from_path(path, **_init_kwargs(built)).eval().requires_grad_(False)


def load(built: config.Built, cfg: DictConfig):
    """Return (policy, reference, peft_config) for DPOTrainer; a policy given as a path is loaded by TRL."""
    strategy = config.reference_strategy(cfg)
    path = built.model.model_name_or_path
    if strategy == "sft_adapter":
        from peft import PeftModel

        base = create_model_from_path(path, **_init_kwargs(built))
        return PeftModel.from_pretrained(base, cfg.reference.path, is_trainable=True), None, None
    if strategy == "copy":
        return path, _frozen(path, built), built.peft
    if strategy == "path":
        with hub.fetching("reference model", cfg.reference.path, "reference.path"):
            return path, _frozen(cfg.reference.path, built), built.peft
    return path, None, built.peft  # adapter, precomputed: no reference model held


# Private TRL names the overrides below rely on, with the parameters TRL calls them with. They move
# between TRL minor versions (pyproject pins the one the tests ran on); where one is not as expected,
# the overrides step aside for TRL's own path, with one warning, instead of breaking the run.
RELIED_ON = [
    (DPOTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (DPOTrainer, "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    (trl_utils, "global_then_local_main_first", None),
]


def changed_in_trl() -> list[str]:
    return [
        f"{owner.__name__}.{name}"
        for owner, name, params in RELIED_ON
        if not hasattr(owner, name)
        or (params and list(inspect.signature(getattr(owner, name)).parameters) != params)
    ]


class Trainer(DPOTrainer):
    """TRL's DPOTrainer with a faster tokenization path giving the same ids (tokenize.py), a stable
    fingerprint on the tokenized data, so that later runs (a sweep's jobs) find it and any precomputed
    reference log-probs again, and a note of whether they did."""

    def __init__(self, *args, **kwargs):
        self.tokenize_log, self.trl_changed = {}, changed_in_trl()
        if self.trl_changed:
            print(
                f"warning: TRL {trl.__version__} changed {', '.join(sorted(self.trl_changed))}; "
                "its own data preparation runs instead of the faster path (same results, slower)",
                file=sys.stderr,
            )
        super().__init__(*args, **kwargs)

    def _prepare_dataset(self, *args, **kwargs):
        if self.trl_changed:
            return super()._prepare_dataset(*args, **kwargs)
        return self._prepare(*args, **kwargs)

    def _prepare(self, dataset, processing_class, args, dataset_name):
        start, path = time.perf_counter(), "trl"
        if tokenize.eligible(dataset, processing_class):
            with (
                trl_utils.global_then_local_main_first()
            ):  # as in TRL: the main process first, the others read its cache
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
        inputs = (dataset._fingerprint, Hasher.hash(processing_class), args.max_length, args.truncation_mode)
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
        return super()._precompute_ref_logps(*args, **kwargs)
