"""TRL's DPOTrainer with only what it lacks: a faster tokenization path giving the same ids
(tokenize.py), and a stable fingerprint on the tokenized data, so that later runs (a sweep's jobs) find
it and any precomputed reference log-probs again, with a note of whether they did."""

import inspect
import os
import sys
import time

import trl
import trl.trainer.utils as trl_utils
from datasets.fingerprint import Hasher
from trl import DPOTrainer

from dpo_recipes import tokenize

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
    """See the module's docstring."""

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
