"""The stage configs: the one home of each option's default, help text and bounds."""

from __future__ import annotations

import dataclasses

import pytest
import typer

from mtkd.cli import app
from mtkd.distill.aggregate.config import AggregateConfig
from mtkd.distill.train.config import TrainConfig
from mtkd.harvest.config import MAX_K, HarvestConfig
from mtkd.ingest.config import TokenizeConfig

#: Fields given by an option of the command's own (parsed from another form) or not at all.
NOT_FROM_FIELDS = {
    HarvestConfig: {"engine_args"},  # --tensor-parallel-size, --max-model-len, ...
    AggregateConfig: {"teachers", "weights", "fit_weights", "temperatures", "task_weights"},
    TrainConfig: {"student", "suppress_ids"},  # --student/--student-config, --suppress-ids 1,2
}
STAGES = {"tokenize": TokenizeConfig, "harvest": HarvestConfig, "aggregate": AggregateConfig,
          "train": TrainConfig}


@pytest.mark.parametrize("command", sorted(STAGES))
def test_every_field_is_an_option_with_help(command: str) -> None:
    cls = STAGES[command]
    params = {p.name: p for p in typer.main.get_command(app).commands[command].params}
    for field in dataclasses.fields(cls):
        if field.name in NOT_FROM_FIELDS.get(cls, ()):
            continue
        assert field.metadata.get("help"), f"{cls.__name__}.{field.name} has no help text"
        assert params[field.name].help.startswith(field.metadata["help"].rstrip("."))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: TokenizeConfig(max_len=1), "max_len must be ≥ 2, got 1"),
    (lambda: TokenizeConfig(max_len=8, overlap=8), r"overlap must be in \[0, max_len\)"),
    (lambda: HarvestConfig(k=0), rf"k must be in \[1, {MAX_K}\]"),
    (lambda: HarvestConfig(k=MAX_K + 1), "vLLM engine serves at most"),
    (lambda: HarvestConfig(batch_tokens=0), "batch_tokens must be ≥ 1"),
    (lambda: AggregateConfig(("a",), k_out=0), "k_out must be ≥ 1, got 0"),
    (lambda: AggregateConfig(("a", "b"), eps=0.1), "eps 0.1 bounds adaptive weights"),
    (lambda: AggregateConfig(("a", "b"), safety_floor=0.2), "give --safety too"),
    (lambda: TrainConfig(tokens="t", out="o", student={}, seq_len=1), "seq_len must be ≥ 2"),
    (lambda: TrainConfig(tokens="t", out="o", student={}, max_tokens=0), "max_tokens must be ≥ 1"),
    (lambda: TrainConfig(tokens="t", out="o", student={}, warmup_steps=-1), "warmup_steps"),
])
def test_bounds(make: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make()  # type: ignore[operator]


#: Train options that took nonsense silently (a negative period acted as its absolute value, a
#: min_lr_ratio of 5 raised the learning rate fivefold) or refused it only at the first step,
#: after the run directory was written.
TRAIN_NONSENSE = [
    ({"alpha": 2.0}, r"alpha must be in \[0, 1\], got 2.0"),
    ({"temperature": 0.0}, r"temperature must be > 0"),
    ({"temperature": float("inf")}, r"temperature must be > 0 and finite"),
    ({"beta": 1.0}, r"beta must be in \(0, 1\)"),
    ({"lr": -1.0}, r"lr must be ≥ 0"),
    ({"min_lr_ratio": 5.0}, r"min_lr_ratio must be in \[0, 1\]"),
    ({"weight_decay": -0.1}, r"weight_decay must be ≥ 0"),
    ({"grad_clip": -1.0}, r"grad_clip must be ≥ 0"),
    ({"eval_every": -5}, r"eval_every must be ≥ 0"),
    ({"save_every": -1}, r"save_every must be ≥ 0"),
    ({"eval_batches": 0}, r"eval_batches must be ≥ 1"),
    ({"keep_checkpoints": -1}, r"keep_checkpoints must be ≥ 0"),
    ({"threads": 0}, r"threads must be ≥ 1"),
    ({"suppress_weight": -1.0}, r"suppress_weight must be ≥ 0"),
    ({"adam_betas": (1.5, 0.9)}, r"adam_betas must each be in \[0, 1\)"),
    ({"suppress_ids": (3, -1)}, r"suppress_ids must be token ids ≥ 0"),
    ({"lr": float("inf")}, r"lr must be a finite number ≥ 0, got inf"),
    ({"weight_decay": float("inf")}, r"weight_decay must be a finite number ≥ 0"),
    ({"prefetch": 0}, r"prefetch must be ≥ 1"),
    ({"warmup_steps": 1000, "max_steps": 5}, r"--warmup-steps 1000 exceeds --max-steps 5"),
]

#: Options a run would ignore, and silently did (its metrics identical to the digit).
TRAIN_UNUSED = [
    ({"alpha": 0.5}, r"--alpha shapes the KD term, and this run trains on cross-entropy only"),
    ({"temperature": 3.0, "loss": "rkl_tail"}, r"--loss, --temperature shape the KD term"),
    ({"targets": "q", "beta": 0.2}, r"--beta weighs the JSD; --loss fkl_tail does not use it"),
    ({"suppress_weight": 7.0}, r"--suppress-weight needs --suppress-ids"),
    ({"eval_tokens": "h", "eval_fraction": 0.2}, r"with --heldout it is unused"),
    ({"targets": "q", "suppress_ids": (3,)}, r"--suppress-ids applies to the ce objective"),
]


@pytest.mark.parametrize(("fields", "message"), TRAIN_NONSENSE + TRAIN_UNUSED)
def test_train_refuses_nonsense_when_built(fields: dict, message: str) -> None:
    """Refused by the config itself: before any store is opened or file written."""
    with pytest.raises(ValueError, match=message):
        TrainConfig(tokens="t", out="o", student={}, **fields)


def test_the_vllm_engine_keeps_the_config_bound() -> None:
    from mtkd.harvest import vllm_engine

    assert vllm_engine.MAX_K is MAX_K


@pytest.mark.parametrize(("steps", "warmup"), [(1000, 100), (50, 5), (9, 1), (1, 1)])
def test_warmup_defaults_to_a_tenth_of_the_steps(steps: int, warmup: int) -> None:
    cfg = TrainConfig(tokens="t", out="o", student="s", max_steps=steps)
    assert cfg.warmup == warmup and cfg.warmup_steps is None  # derived: a resume may add steps
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    assert TrainConfig(tokens="t", out="o", student="s", max_steps=steps,
                       warmup_steps=0).warmup == 0


def test_auto_coding_follows_the_vocabulary_and_a_begun_store() -> None:
    """``--logprob-dtype auto`` (the default): q64r from LARGE_VOCAB ids (real teachers),
    q64v2 below, and a resumed store's own coding whatever the vocabulary; a named coding
    stays; a q64r-only option that auto cannot honour is refused, naming why."""
    from mtkd.harvest.config import LARGE_VOCAB

    auto = HarvestConfig()
    assert auto.logprob_dtype == "auto"
    assert auto.resolved(LARGE_VOCAB).logprob_dtype == "q64r"
    assert auto.resolved(LARGE_VOCAB - 1).logprob_dtype == "q64v2"
    assert auto.resolved(262_144, {"logprob_dtype": "q64v2"}).logprob_dtype == "q64v2"
    assert auto.resolved(2_048, {"logprob_dtype": "float16"}).logprob_dtype == "float16"
    begun = {"logprob_dtype": "q64r", "tail_nats": 0.25, "stream_rows": 512}
    kept = auto.resolved(2_048, begun)  # the store's own options, where none is asked
    assert (kept.logprob_dtype, kept.tail_step, kept.stream_rows) == ("q64r", 4, 512)
    asked = HarvestConfig(stream_rows=64).resolved(2_048, begun)  # asked stays asked
    assert (asked.tail_step, asked.stream_rows) == (4, 64)
    assert HarvestConfig(logprob_dtype="q64v3").resolved(262_144).logprob_dtype == "q64v3"
    coarse = HarvestConfig(tail_nats=0.25)  # allowed while auto may choose q64r
    assert coarse.resolved(49_152).tail_step == 4
    with pytest.raises(ValueError, match=r"--tail-nats needs --logprob-dtype q64r; auto chose "
                                         r"q64v2 \(2,048 ids\)"):
        coarse.resolved(2_048)
    with pytest.raises(ValueError, match=r"auto chose q64v2 \(the store being resumed has it\)"):
        coarse.resolved(49_152, {"logprob_dtype": "q64v2"})
    assert HarvestConfig(id_table=16).resolved(2_048).logprob_dtype == "q64v2"
    with pytest.raises(ValueError, match=r"--stream-rows needs --logprob-dtype q64r; auto "
                                         r"chose q64v2 \(2,048 ids\)"):
        HarvestConfig(stream_rows=100).resolved(2_048)
    with pytest.raises(ValueError, match="--stream-rows needs --logprob-dtype q64r"):
        HarvestConfig(logprob_dtype="q64v2", stream_rows=100)


def test_options_in_use_are_taken() -> None:
    """The same options where the run uses them."""
    TrainConfig(tokens="t", out="o", student={}, targets="q", alpha=0.5, temperature=3.0,
                loss="jsd_tail", beta=0.2)
    TrainConfig(tokens="t", out="o", student={}, suppress_ids=(3,), suppress_weight=7.0)
    TrainConfig(tokens="t", out="o", student={}, eval_fraction=0.2)
