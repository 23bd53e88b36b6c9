"""The harvest stage's options: the only home of their defaults, help texts and bounds."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mtkd.config import changed_options, check_bounds, option
from mtkd.store.format import Codec
from mtkd.store.q64_grid import COARSE, FINE
from mtkd.store.schema import OWN_TOKENS, STORE_TOKENS, check_logprob_dtype
from mtkd.store.topk_codec import FLOOR_CODINGS, Q64R, Q64V2, TAIL_STEPS

#: Largest top-k a teacher store holds, whatever the engine: the vLLM engine sets vLLM's
#: ``max_logprobs`` to k and serves at most this many log-probs per position.
MAX_K = 256
_WHY_MAX_K = f"the vLLM engine serves at most {MAX_K} log-probs per position"
AUTO = "auto"
TOKENIZATIONS = (AUTO, STORE_TOKENS, OWN_TOKENS)
TAIL_NATS = tuple(step * COARSE / FINE for step in TAIL_STEPS)  #: 1/16 (q64's) … 1 nat
#: ``--logprob-dtype auto``: q64r for vocabularies of this many ids or more (real teachers
#: have 32,000–262,144), where it stores ≈ 30% less than q64v2; q64v2 below (the small
#: vocabularies of tests and of the demo's own teachers), whose reads are 3-4x faster
LARGE_VOCAB = 16_384
STREAM_ROWS = 2048  #: q64r's rows per stream unless --stream-rows says otherwise
ID_TABLE_TOKENS = 1 << 20  #: tokens counted (whole parts, the first) for --id-table
#: How far above 0 an engine's log-prob may round (bfloat16 / float16 log-softmax) before the
#: harvest refuses it as invalid
LOGPROB_SLACK = 1e-3
ENGINES = ("vllm", "hf")
#: vLLM's prompt log-probs: ours where tested, else the public API (``vllm_engine``)
FAST_PATHS = ("auto", "fast", "public")


@dataclass(frozen=True)
class HarvestConfig:
    """What a teacher store holds and how the engine runs; every worker must agree on it."""

    k: int = option(64, "Top-k log-probs kept per position.", min=1, max=MAX_K, why=_WHY_MAX_K)
    engine: Literal["vllm", "hf"] = option(
        "vllm", "vllm (fast) or hf (reference, full vocabulary)."
    )
    dtype: str = option("bfloat16", "Engine dtype: bfloat16, float16, float32.")
    temperatures: tuple[float, ...] = option(
        (), "Store exact tempered tail masses at this temperature (hf engine)."
    )
    num_samples: int = option(
        0,
        "Random-sampling KD draws per position from the teacher's full softmax (both engines; "
        "vllm: made in its worker, reproducible per (seed, sequence, position)).",
        min=0,
        max=65535,
    )
    sample_temperature: float = option(1.0, "Temperature of the distribution the draws follow.")
    sample_rest: bool = option(
        False,
        "Draw from outside each position's top-k only: the hybrid target (the exact top-k head "
        "plus draws from the rest, weighted by the tail mass; unbiased, lower variance).",
    )
    seed: int = option(0, "Seed of the draws.", min=-(2**63), max=2**63 - 1,
                       why="the draws' hash key is a signed 64-bit integer")
    logprob_dtype: str = option(
        AUTO,
        f"Stored top-k coding. auto: q64r for a vocabulary of >= {LARGE_VOCAB:,} ids, q64v2 "
        "below (a resumed store keeps its own coding, with its --tail-nats and --stream-rows "
        "unless given). q64v2: compact, |error| <= 1/128 nat "
        "where p >= 1e-3, the sampled columns coded too (docs/FORMAT.md). q64v3: q64v2's "
        "values, ids coded against an earlier row of the sequence with the same top-1 id. "
        "q64r: q64v3's values range-coded, one stream per --stream-rows rows, the draws, the "
        "actual token's log-prob and the tail coded against the top-k within the same bound: "
        "the smallest, 3-4x slower to read (on a 49,152-id teacher 99 bytes per position "
        "against q64v2's 144, 90.5 with --tail-nats 0.25; 64 draws 15 bytes against 53). "
        "q64 (an older default), or a float dtype (float16, float32) with int32 ids.",
    )
    tail_nats: float = option(
        TAIL_NATS[0],
        "q64r: the grid of the tail (log-probs below log 1e-3) in nats, one of "
        f"{', '.join(f'{t:g}' for t in TAIL_NATS)}: coarser is smaller (|error| <= half a "
        "step there); the bound where p >= 1e-3 stays 1/128 nat.",
    )
    stream_rows: int = option(
        STREAM_ROWS,
        "q64r: code consecutive sequences as one stream until it holds N rows, so that short "
        "windows share what the coder learns (a read decodes a whole stream; 0: a stream per "
        "sequence).",
        min=0,
    )
    id_table: int = option(
        0,
        "q64v2/q64v3/q64r: renumber top-k ids through a table of the N ids the teacher reads "
        f"most often (counted over the first parts, at least {ID_TABLE_TOKENS:,} tokens), so "
        "that they store as smaller gaps (0: no table; docs/FORMAT.md, \"Id table\").",
        min=0,
    )
    codec: Codec = option("zstd", "Array codec: zstd (compact) or raw.")
    batch_tokens: int = option(65536, "Tokens per engine call.", min=1)
    fast_path: str = option("auto", "auto | fast (keep vLLM's tensors) | public (the public API).")
    #: keyword arguments of the engine (vLLM: tensor_parallel_size, max_model_len, ...)
    engine_args: dict[str, Any] = field(default_factory=dict)
    vocab_map: str | None = option(
        None,
        "auto | FILE: harvest a teacher whose tokenizer differs from the tokens store's "
        "through a vocabulary map. auto pairs tokens with identical strings (byte-level "
        "BPE; added/special tokens by content); FILE is JSON "
        '{"store_to_teacher": {"<store id>": <teacher id>, ...}}. Inputs are translated '
        "to teacher ids (a sequence holding a store id with no teacher counterpart "
        "refuses the harvest); teacher ids with no store counterpart leave the top-k and "
        "their mass joins the tail, the engine being asked for up to k extra entries to "
        "keep k ids (docs/FORMAT.md, teacher attrs.vocab_map; mtkd/harvest/vocab_map.py).",
    )
    tokenization: Literal["auto", "store", "own"] = option(
        AUTO,
        "auto | store | own: what the teacher reads. store: the tokens store's token ids (the "
        "teacher shares its tokenizer, or --vocab-map maps it); own: each window's text "
        "tokenised by the teacher's own tokenizer (its BOS convention), rows in teacher ids "
        "with the byte where each row's context ends (docs/FORMAT.md); auto: store when the "
        "teacher's vocabulary is the tokens store's or --vocab-map is given, else own.",
    )

    def resolved(self, vocab_size: int, begun: Mapping[str, Any] | None = None
                 ) -> HarvestConfig:
        """This config with ``logprob_dtype`` auto made concrete for a store of ``vocab_size``
        ids. ``begun``: the coding options of the store being resumed (``logprob_dtype``, and
        for q64r ``tail_nats`` and ``stream_rows``), which auto keeps, each option left at its
        default taking the store's; without one, :data:`LARGE_VOCAB`'s rule."""
        if self.logprob_dtype != AUTO:
            return self
        begun = dict(begun or {})
        resuming = bool(begun)
        coding = begun.pop("logprob_dtype", None) or (Q64R if vocab_size >= LARGE_VOCAB
                                                       else Q64V2)
        given = changed_options(self)
        kept = {name: value for name, value in begun.items() if name not in given}
        try:  # the options checked against the coding chosen
            return dataclasses.replace(self, logprob_dtype=coding, **kept)
        except ValueError as e:
            why = "the store being resumed has it" if resuming else f"{vocab_size:,} ids"
            raise ValueError(f"{e}; auto chose {coding} ({why})") from None

    @property
    def q64r_stream_rows(self) -> int:
        """Rows per q64r stream as the store records it (0 for the other codings)."""
        return self.stream_rows if self.logprob_dtype == Q64R else 0

    @property
    def tail_step(self) -> int:
        """The tail grid in q64's coarse steps (``topk_codec.TAIL_STEPS``)."""
        return TAIL_STEPS[TAIL_NATS.index(self.tail_nats)]

    def __post_init__(self) -> None:
        check_bounds(self)
        given = changed_options(self)
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.fast_path not in FAST_PATHS:
            raise ValueError(f"fast_path must be one of {', '.join(FAST_PATHS)}, got "
                             f"{self.fast_path!r}")
        vllm_only = sorted({"fast_path"} & given | set(self.engine_args))
        if self.engine == "hf" and vllm_only:
            flags = ", ".join("--" + name.replace("_", "-") for name in vllm_only)
            raise ValueError(f"{flags} configure vLLM, and --engine hf runs the reference "
                             "engine: drop them")
        if self.tokenization not in TOKENIZATIONS:
            raise ValueError(f"tokenization must be one of {', '.join(TOKENIZATIONS)}, "
                             f"got {self.tokenization!r}")
        if self.tokenization == OWN_TOKENS and self.vocab_map is not None:
            raise ValueError("--tokenization own and --vocab-map exclude each other: a "
                             "vocabulary map harvests the tokens store's ids")
        if self.logprob_dtype != AUTO:
            check_logprob_dtype(self.logprob_dtype)
        if self.id_table and self.logprob_dtype not in (*FLOOR_CODINGS, AUTO):
            raise ValueError(f"--id-table needs --logprob-dtype {' or '.join(FLOOR_CODINGS)} "
                             f"(the codings that renumber ids), not {self.logprob_dtype!r}")
        if self.tail_nats not in TAIL_NATS:
            raise ValueError(f"--tail-nats must be one of {', '.join(map(str, TAIL_NATS))}, "
                             f"got {self.tail_nats}")
        if "tail_nats" in given and self.logprob_dtype not in (Q64R, AUTO):
            raise ValueError(f"--tail-nats needs --logprob-dtype {Q64R}")
        if "stream_rows" in given and self.logprob_dtype not in (Q64R, AUTO):
            raise ValueError(f"--stream-rows needs --logprob-dtype {Q64R}")
        if any(not np.isfinite(t) or t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive and finite, got {self.temperatures}")
        if self.temperatures and self.engine != "hf":
            raise ValueError("exact tempered tails need --engine hf (the reference engine "
                             "returns the full vocabulary)")
        if self.sample_rest and not self.num_samples:
            raise ValueError("--sample-rest needs --num-samples N")
        if self.sample_rest and self.sample_temperature != 1.0:
            raise ValueError("--sample-rest draws the untempered rest (the head is exact at "
                             "T = 1): leave --sample-temperature at 1")
        if not np.isfinite(self.sample_temperature) or self.sample_temperature <= 0:
            raise ValueError(f"sample_temperature must be positive and finite, got "
                             f"{self.sample_temperature}")
        if "sample_temperature" in given and not self.num_samples:  # else silently unused
            raise ValueError(f"--sample-temperature {self.sample_temperature:g} needs "
                             "--num-samples N (it is the temperature of the draws)")
        if "seed" in given and not self.num_samples:  # else silently unused
            raise ValueError(f"--seed {self.seed} needs --num-samples N (it seeds the draws; "
                             "the top-k log-probs are exact, unseeded)")
        if (self.temperatures or self.num_samples) and self.vocab_map is not None:
            raise ValueError(
                "exact tempered tails and sampled targets are not supported with "
                "--vocab-map (they would have to be re-split between the two "
                "vocabularies)"
            )
