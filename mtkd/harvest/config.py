"""The harvest stage's options: the only home of their defaults and bounds."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from mtkd.store.core import Codec
from mtkd.store.schema import check_logprob_dtype
from mtkd.store.topk_codec import Q64

EngineKind = Literal["vllm", "hf"]


@dataclass(frozen=True)
class HarvestConfig:
    """What a teacher store holds and how the engine runs; every worker must agree on it."""

    k: int = 64
    engine: EngineKind = "vllm"
    dtype: str = "bfloat16"
    temperatures: tuple[float, ...] = ()
    num_samples: int = 0
    #: ``q64``: the compact top-k coding (|error| ≤ 1/128 nat for p ≥ 1e-3, docs/FORMAT.md);
    #: a float dtype (``float16``, ``float32``): int32 ids and log-probs of that dtype
    logprob_dtype: str = Q64
    codec: Codec = "zstd"
    batch_tokens: int = 65536
    fast_path: str = "auto"
    engine_args: dict[str, Any] = field(default_factory=dict)
    #: ``auto`` or a JSON file: harvest a teacher whose tokenizer differs from the tokens
    #: store's through a vocabulary map (mtkd/harvest/vocab_map.py); None: the same tokenizer
    vocab_map: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 4096:
            raise ValueError(f"k must be in [1, 4096], got {self.k}")
        check_logprob_dtype(self.logprob_dtype)
        if any(not np.isfinite(t) or t <= 0 for t in self.temperatures):
            raise ValueError(f"temperatures must be positive and finite, got {self.temperatures}")
        if (self.temperatures or self.num_samples) and self.engine != "hf":
            raise ValueError("exact tempered tails and sampled targets need --engine hf "
                             "(the reference engine sees the full vocabulary)")
        if (self.temperatures or self.num_samples) and self.vocab_map is not None:
            raise ValueError("exact tempered tails and sampled targets are not supported with "
                             "--vocab-map (they would have to be re-split between the two "
                             "vocabularies)")
