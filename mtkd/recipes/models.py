"""Tiny tokenizers and Llama-style models built locally, with no network (tests, bench, demo)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from mtkd.recipes.stdlib_corpus import stdlib_texts
from mtkd.store.schema import vocab_fingerprint

EOS_TOKEN = "<|endoftext|>"


def byte_level_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A GPT-2-style byte-level BPE trained on ``texts``, with ``<|endoftext|>`` as id 0.

    The vocabulary may come out smaller than ``vocab_size`` if the corpus is small.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def train_bpe_tokenizer(
    texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """:func:`byte_level_bpe` as a transformers tokenizer (``eos`` = bos = pad), saved to
    ``out_dir``: the directory loads offline with ``AutoTokenizer.from_pretrained(out_dir)``."""
    fast = PreTrainedTokenizerFast(
        tokenizer_object=byte_level_bpe(texts, vocab_size), eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN, pad_token=EOS_TOKEN,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def _tokenizer(tokenizer_or_dir: PreTrainedTokenizerBase | str | Path) -> PreTrainedTokenizerBase:
    if isinstance(tokenizer_or_dir, (str, Path)):
        return AutoTokenizer.from_pretrained(str(tokenizer_or_dir))
    return tokenizer_or_dir


def vocab_hash(tokenizer_or_dir: PreTrainedTokenizerBase | str | Path) -> str:
    """The store's hash of the vocabulary's id → token map (added tokens included)."""
    return vocab_fingerprint(_tokenizer(tokenizer_or_dir).get_vocab())


def llama_intermediate(hidden: int, multiple_of: int = 32) -> int:
    """Llama's MLP width rule: 8/3 × hidden, rounded up to a multiple of ``multiple_of``."""
    return multiple_of * -(-8 * hidden // (3 * multiple_of))


def init_llama(
    out_dir: str | Path,
    vocab_size: int,
    hidden: int,
    layers: int,
    heads: int,
    intermediate: int | None = None,
    max_position: int = 2048,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
    successor: bool = False,
) -> Path:
    """Save a randomly initialised ``LlamaForCausalLM`` (safetensors) plus tokenizer files.

    ``tokenizer``: saved next to the model; when None a byte-level BPE is trained on
    :func:`stdlib_texts`. The model's vocabulary is ``max(vocab_size, len(tokenizer))``.
    ``successor``: craft the weights so that the model's argmax after token ``x`` is
    ``(x + 1) mod V`` (p ≈ 0.99) — a model whose answer is known, for row-alignment tests.
    """
    if hidden % heads or hidden // heads < 32:
        raise ValueError(
            "head_dim = hidden/heads must be an integer >= 32 (vLLM CPU attention), "
            f"got hidden={hidden}, heads={heads}"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is None:
        tokenizer = train_bpe_tokenizer(stdlib_texts(), vocab_size)
    vocab = max(vocab_size, len(tokenizer))
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate or llama_intermediate(hidden),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_position,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    if successor:
        _make_successor(model, seed)
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    return out


@torch.no_grad()
def _make_successor(model: LlamaForCausalLM, seed: int, scale: float = 12.0) -> None:
    """Make ``argmax p(· | …, x) = (x + 1) mod V`` by a wide margin, with context still mattering.

    Embeddings are random directions of norm 4; the lm_head row of ``y`` is the direction of
    ``y − 1`` times ``scale``, so the logit of ``y`` is ``scale · cos(h, e_{y−1})``. Blocks keep
    their random weights, damped so they perturb ``h`` a little (attention stays exercised).
    """
    gen = torch.Generator().manual_seed(seed)
    vocab, hidden = model.model.embed_tokens.weight.shape
    unit = torch.randn(vocab, hidden, generator=gen)
    unit = unit / unit.norm(dim=1, keepdim=True)
    model.model.embed_tokens.weight.copy_(4.0 * unit)
    # The final RMSNorm scales h to norm sqrt(hidden).
    model.lm_head.weight.copy_(scale * torch.roll(unit, shifts=1, dims=0) / hidden**0.5)
    for layer in model.model.layers:
        layer.self_attn.o_proj.weight.mul_(0.25)
        layer.mlp.down_proj.weight.mul_(0.25)


def permute_vocabulary(model_dir: str | Path, perm: Sequence[int], out_dir: str | Path) -> Path:
    """Copy a local Llama (as :func:`init_llama` saves it) with its ids renumbered: id ``i`` of
    the source is id ``perm[i]`` of the copy — tokenizer, embedding and lm_head rows, special
    token ids — so the copy computes the same distributions in another id order (a teacher for
    vocabulary-map tests). ``perm``: a permutation of the model's vocabulary."""
    src, out = Path(model_dir), Path(out_dir)
    model = LlamaForCausalLM.from_pretrained(str(src)).eval()
    vocab = model.config.vocab_size
    p = torch.as_tensor(list(perm), dtype=torch.int64)
    if sorted(p.tolist()) != list(range(vocab)):
        raise ValueError(f"perm must be a permutation of range({vocab})")
    inv = torch.argsort(p)  # row j of the copy is row inv[j] of the source
    with torch.no_grad():
        for weight in (model.model.embed_tokens.weight, model.lm_head.weight):
            weight.copy_(weight[inv])
    for cfg in (model.config, model.generation_config):
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(getattr(cfg, name, None), int):
                setattr(cfg, name, int(p[getattr(cfg, name)]))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok = json.loads((src / "tokenizer.json").read_text(encoding="utf-8"))
    tok["model"]["vocab"] = {s: int(p[i]) for s, i in tok["model"]["vocab"].items()}
    for added in tok["added_tokens"]:
        added["id"] = int(p[added["id"]])
    for special in ((tok.get("post_processor") or {}).get("special_tokens") or {}).values():
        special["ids"] = [int(p[i]) for i in special["ids"]]
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False), encoding="utf-8")
    shutil.copyfile(src / "tokenizer_config.json", out / "tokenizer_config.json")
    return out
