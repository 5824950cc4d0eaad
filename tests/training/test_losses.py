"""The loss group: every option trains, known closed forms at step 1, and `loss=` touches loss keys only."""

import itertools
import math

import pytest
from conftest import LAYOUT, tiny_overrides
from omegaconf import OmegaConf

from dpo_recipes import config, errors
from dpo_recipes.config import schema

LOSS_DIR = config.CONF_DIR / "loss"
LOSSES = sorted(p.stem for p in LOSS_DIR.glob("*.yaml"))


def loss_keys(option: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(LOSS_DIR / f"{option}.yaml"), resolve=True)


def test_every_trl_loss_type_has_an_option():
    assert schema.loss_types() <= set(LOSSES)
    for option in LOSSES:
        header = (LOSS_DIR / f"{option}.yaml").read_text().splitlines()
        assert header[0] == "# @package train" and header[1].startswith("# ")


@pytest.mark.parametrize("option", LOSSES)
def test_switching_loss_changes_loss_keys_and_nothing_else(option):
    base, _ = config.compose(["loss=sigmoid"])
    switched, _ = config.compose([f"loss={option}"])
    before, after = dict(base.train), dict(switched.train)
    owned = set(loss_keys("sigmoid")) | set(loss_keys(option))
    assert {k: v for k, v in before.items() if k not in owned} == {
        k: v for k, v in after.items() if k not in owned
    }
    assert {k: after[k] for k in loss_keys(option)} == loss_keys(option)
    assert list(after["loss_type"]) == loss_keys(option)["loss_type"]
    config.check(switched)


def test_label_smoothing_where_trl_ignores_it_is_refused():
    cfg, _ = config.compose(["+train.label_smoothing=0.1"])
    with pytest.raises(errors.ConfigError, match="use loss=robust"):
        config.check(cfg)


def test_a_loss_type_given_as_one_name_is_a_list_of_one(tmp_path):
    cfg, _ = config.compose(["loss=sigmoid", "train.loss_type=robust", "train.label_smoothing=0.1"])
    config.check(cfg)  # "robust" is not the letters r, o, b, u, s, t
    assert config.build(cfg, tmp_path).args.loss_type == ["robust"]


def test_a_loss_type_that_leaves_the_weights_of_another_is_refused_with_the_fix():
    cfg, _ = config.compose(["loss=rpo", "train.loss_type=robust"])
    with pytest.raises(
        errors.ConfigError, match=r"train.loss_weights: 2 weights for 1 loss \['robust'\]; .*loss=robust"
    ):
        config.check(cfg)


LN2 = math.log(2)
# Each TRL loss at policy == reference (every log-ratio 0), from the args: None where it has no closed form
# (sft is the model's own NLL).
AT_ZERO = {
    "sigmoid": lambda a: LN2,
    "sigmoid_norm": lambda a: LN2,
    "robust": lambda a: LN2,
    "aot": lambda a: LN2,
    "aot_unpaired": lambda a: LN2,
    "hinge": lambda a: 1.0,
    "ipo": lambda a: (1 / (2 * a.beta)) ** 2,
    "sppo_hard": lambda a: 2 * (0.5 / a.beta) ** 2,
    "nca_pair": lambda a: 2 * LN2,
    "bco_pair": lambda a: 2 * LN2,
    "apo_zero": lambda a: 1.0,
    "apo_down": lambda a: 1.0,
    "discopop": lambda a: 0.5 * LN2 + 0.5,
    "exo_pair": lambda a: -LN2 - 0.5 * math.log((1 - a.label_smoothing) * a.label_smoothing),
    "sft": lambda a: None,
}


def closed_form(args) -> float | None:
    """The weighted sum of each loss's value at zero log-ratios; None if one has none, or WPO weighs them."""
    values = [AT_ZERO[loss](args) for loss in args.loss_type]
    if None in values or args.use_weighting:
        return None
    return sum(w * v for w, v in zip(args.loss_weights or [1.0] * len(values), values, strict=True))


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One loaded tiny model, its frozen copy as the reference, and one tokenized train and eval set,
    shared by every loss option (the full fine-tuning recipe, 2 steps)."""
    import copy

    from transformers import AutoModelForCausalLM

    from dpo_recipes.sources import tiny
    from dpo_recipes.training import chat, data
    from dpo_recipes.training.trainer import RecipeTrainer

    out = tmp_path_factory.mktemp("losses")
    built = config.build(config.compose(tiny_overrides("tiny_full_dpo", *LAYOUT["padded"]))[0], out)
    tokenizer = chat.tokenizer(built)
    train_set, eval_set, _ = data.load(built.dataset, built.args.seed)
    policy = AutoModelForCausalLM.from_pretrained(tiny.path(), dtype="float32")
    first = RecipeTrainer(
        model=policy,
        ref_model=copy.deepcopy(policy),
        args=built.args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=tokenizer,
    )
    return out, first


def trainer_for(option: str, shared):
    """A trainer of `option` on a copy of the shared model and the shared tokenized data."""
    import copy

    from dpo_recipes.training.trainer import RecipeTrainer

    out, first = shared
    args = config.build(
        config.compose(tiny_overrides("tiny_full_dpo", f"loss={option}", *LAYOUT["padded"]))[0], out / option
    ).args
    return RecipeTrainer(
        model=copy.deepcopy(first.model),
        ref_model=first.ref_model,
        args=args,
        train_dataset=first.train_dataset,
        eval_dataset=first.eval_dataset,
        processing_class=first.processing_class,
    )


@pytest.mark.slow
@pytest.mark.parametrize("option", LOSSES)
def test_every_loss_has_its_closed_form_before_training_and_trains_finite(option, shared):
    """evaluate() before any step (policy == reference) gives the loss's closed form (to 1e-5, relative);
    two steps keep it finite."""
    trainer = trainer_for(option, shared)
    assert trainer.args.loss_type == loss_keys(option)["loss_type"]
    expected = closed_form(trainer.args)
    if expected is not None:
        assert trainer.evaluate()["eval_loss"] == pytest.approx(expected, rel=1e-5)
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert trainer.state.global_step == 2 and losses and all(math.isfinite(x) for x in losses)


def test_every_trl_loss_has_a_closed_form_entry():
    assert set(AT_ZERO) == schema.loss_types()


@pytest.mark.parametrize("epsilon", [0.1, 0.2, 0.35])
def test_cdpo_is_the_label_smoothed_sigmoid_at_any_label_smoothing(epsilon, tmp_path):
    """TRL's robust loss (as dpo_trainer.py writes it) and sigmoid, weighted as loss=cdpo builds them, equal
    -(1-e) log s(bh) - e log s(-bh) at margins -3, 0 and 2 (to 1e-6)."""
    import torch
    import torch.nn.functional as F

    cfg, _ = config.compose(["loss=cdpo", f"train.label_smoothing={epsilon}"])
    args = config.build(cfg, tmp_path).args
    assert args.loss_type == ["robust", "sigmoid"] and args.label_smoothing == epsilon
    x = torch.tensor([-3.0, 0.0, 2.0])
    robust = (-(1 - epsilon) * F.logsigmoid(x) + epsilon * F.logsigmoid(-x)) / (1 - 2 * epsilon)
    combined = args.loss_weights[0] * robust + args.loss_weights[1] * -F.logsigmoid(x)
    closed = -(1 - epsilon) * F.logsigmoid(x) - epsilon * F.logsigmoid(-x)
    assert torch.allclose(combined, closed, atol=1e-6)


def test_cdpo_weights_that_do_not_match_its_label_smoothing_are_refused():
    cfg, _ = config.compose(["loss=cdpo", "train.label_smoothing=0.2", "train.loss_weights=[-0.8,1.8]"])
    with pytest.raises(errors.ConfigError, match=r"not cDPO at label_smoothing 0.2 .*leave loss_weights out"):
        config.check(cfg)


@pytest.mark.slow
@pytest.mark.parametrize("option", LOSSES)
def test_each_layout_gives_each_losss_first_step(option, shared, monkeypatch):
    """One micro-batch through TRL's own loss code, padded and in each layout of trainer.packed (on the
    policy and the reference: padding-free, the prompt shared, both; under sdpa's mask and by segment):
    the loss, every metric TRL records and every gradient within 1e-5 (relative)."""
    from test_packing import LAYOUTS

    from dpo_recipes.training.segments import SEGMENTED, packed

    trainer = trainer_for(option, shared)
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))

    def step() -> tuple:
        trainer._metrics["train"].clear()
        trainer.model.zero_grad()
        with trainer._head():
            loss = trainer.compute_loss(trainer.model, batch)
            loss.backward()
        grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
        return loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()}, grads

    padded = step()
    forwards = {model: model.forward for model in (trainer.model, trainer.ref_model)}
    for attention, (layout, how) in itertools.product(["sdpa", SEGMENTED], LAYOUTS.items()):
        for model, forward in forwards.items():
            monkeypatch.setattr(model.config, "_attn_implementation", attention)
            monkeypatch.setattr(model, "forward", packed(forward, **how))
        ours = step()
        layout = (attention, layout)
        assert ours[0] == pytest.approx(padded[0], rel=1e-5, abs=1e-6), layout
        assert set(ours[1]) == set(padded[1]) and ours[1]
        for key, value in padded[1].items():
            if key == "num_tokens":  # a running count, read from the attention mask before any forward
                continue
            assert ours[1][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (layout, key)
        for name, grad in padded[2].items():
            assert (ours[2][name] - grad).norm() <= 1e-5 * grad.norm() + 1e-9, (layout, name)
