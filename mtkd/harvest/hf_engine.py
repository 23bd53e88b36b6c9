"""Reference teacher engine on Hugging Face transformers: full logits, exact extras.

Besides the contract's top-k rows it can return, because it sees the whole vocabulary:

* ``tempered_tail_logmass [R, nT]``: log of the exact mass of ``softmax(logits / T)`` outside the
  (temperature-1) top-k ids, for each configured temperature ``T``;
* random-sampling KD targets: ``num_samples`` draws per position from ``softmax(logits / T_s)``
  reduced to unique ids with counts and their temperature-1 log-probs, padded to width
  ``num_samples`` (id −1, count 0, log-prob −inf). Draws are seeded per sequence from ``seed``
  and the sequence's tokens, so they do not depend on batching or sharding.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from mtkd.harvest.draws import sequence_key, unique_counts
from mtkd.harvest.engine import check_k, check_sequences, concat_rows, rows_from_logprobs

#: Rows post-processed at a time hold at most this many vocabulary entries (float64 temporaries
#: of the tempered tails and sampling stay ≈ 256 MB even for a 150k vocabulary).
ROW_BLOCK_ELEMENTS = 1 << 25


def tempered_tail_logmass(
    logits: torch.Tensor, topk_ids: torch.Tensor, temperatures: Sequence[float]
) -> torch.Tensor:
    """``[R, nT]`` float32: log Σ_{i ∉ top-k} softmax(logits / T)_i, computed in float64."""
    x = logits.to(torch.float64)
    outside = torch.ones_like(x, dtype=torch.bool).scatter_(-1, topk_ids.to(torch.int64), False)
    cols = []
    for t in temperatures:
        lp = torch.log_softmax(x / t, dim=-1)
        cols.append(torch.logsumexp(lp.masked_fill(~outside, -torch.inf), dim=-1))
    return torch.stack(cols, dim=-1).to(torch.float32)


def sample_targets(
    logprobs: torch.Tensor, num_samples: int, temperature: float, generator: torch.Generator,
    exclude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``num_samples`` ids per row from ``softmax(logprobs / temperature)``.

    Returns unique ids int32, counts uint16 and temperature-1 log-probs float32, each
    ``[R, num_samples]``, ids ascending then padding (id −1, count 0, log-prob −inf).
    """
    probs = torch.softmax(logprobs.to(torch.float64) / temperature, dim=-1)
    if exclude is not None:  # the hybrid: draws from outside the top-k (renormalised)
        probs.scatter_(1, exclude.to(torch.int64), 0.0)
    draws = torch.multinomial(probs, num_samples, replacement=True, generator=generator)
    draws, _ = torch.sort(draws, dim=-1)
    return unique_counts(draws, logprobs.gather(-1, draws))


class HfReferenceEngine:
    """TeacherEngine on ``AutoModelForCausalLM`` (exact, slow; the reference for vLLM)."""

    name = "hf-reference"

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        k: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        temperatures: Sequence[float] = (),
        num_samples: int = 0,
        sample_temperature: float = 1.0,
        sample_rest: bool = False,
        seed: int = 0,
        batch_size: int = 4,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if any(not np.isfinite(t) or t <= 0 for t in (*temperatures, sample_temperature)):
            raise ValueError("temperatures must be positive and finite")
        if num_samples < 0 or num_samples > np.iinfo(np.uint16).max:
            raise ValueError(f"num_samples must be in [0, 65535], got {num_samples}")
        self.model = AutoModelForCausalLM.from_pretrained(
            str(Path(model_dir)), dtype=dtype, trust_remote_code=False
        ).to(device)
        self.model.eval()
        self.device = torch.device(device)
        self.vocab_size = int(self.model.config.vocab_size)
        self.k = check_k(k, self.vocab_size, self.name, "k must not exceed the vocabulary")
        self.temperatures = tuple(float(t) for t in temperatures)
        self.num_samples = int(num_samples)
        self.sample_temperature = float(sample_temperature)
        self.sample_rest = bool(sample_rest)  # draws from outside the top-k (the hybrid)
        self.seed = int(seed)
        self.batch_size = max(1, int(batch_size))

    @property
    def max_model_len(self) -> int | None:
        """The longest sequence the model takes (its positions), None if its config says none."""
        size = getattr(self.model.config, "max_position_embeddings", None)
        return int(size) if isinstance(size, int) else None

    @property
    def max_sequence_len(self) -> int | None:
        """The longest sequence :meth:`harvest` takes: the model's positions."""
        return self.max_model_len

    @torch.inference_mode()
    def logits(self, sequences: Sequence[np.ndarray]) -> Iterator[torch.Tensor]:
        """Float32 logits ``[L_i − 1, V]`` per sequence, batch by batch (right-padded; causal,
        so the padding never reaches a real row)."""
        for a in range(0, len(sequences), self.batch_size):
            batch = sequences[a : a + self.batch_size]
            width = max(len(s) for s in batch) - 1
            ids = torch.zeros((len(batch), width), dtype=torch.int64)
            mask = torch.zeros_like(ids)
            for i, s in enumerate(batch):
                ids[i, : len(s) - 1] = torch.from_numpy(s[:-1])
                mask[i, : len(s) - 1] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits.float()
            yield from (logits[i, : len(s) - 1] for i, s in enumerate(batch))

    def harvest(self, sequences: Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """Contract rows plus the optional extras configured at construction."""
        seqs = check_sequences(sequences, self.vocab_size)
        block = max(1, ROW_BLOCK_ELEMENTS // self.vocab_size)
        chunks = []
        for seq, logits in zip(seqs, self.logits(seqs), strict=True):
            targets = torch.from_numpy(seq[1:]).to(logits.device)
            gen = None
            if self.num_samples:
                gen = torch.Generator(device=logits.device)
                gen.manual_seed(sequence_key(self.seed, seq))
            for a in range(0, len(targets), block):
                chunks.append(self._rows(logits[a : a + block], targets[a : a + block], gen))
        return concat_rows(chunks)

    def _rows(
        self, logits: torch.Tensor, targets: torch.Tensor, gen: torch.Generator | None
    ) -> dict[str, np.ndarray]:
        lp = torch.log_softmax(logits, dim=-1)
        rows = rows_from_logprobs(lp, targets, self.k)
        if self.temperatures:
            top = torch.from_numpy(rows["topk_ids"]).to(lp.device)
            tails = tempered_tail_logmass(logits, top, self.temperatures)
            rows["tempered_tail_logmass"] = tails.cpu().numpy()
        if gen is not None:
            head = torch.from_numpy(rows["topk_ids"]).to(lp.device) if self.sample_rest else None
            ids, counts, slp = sample_targets(lp, self.num_samples, self.sample_temperature, gen,
                                              head)
            rows["sample_ids"] = ids.cpu().numpy()
            rows["sample_counts"] = counts.cpu().numpy().astype(np.uint16)
            rows["sample_logprobs"] = slp.cpu().numpy()
        return rows
