"""The models of a run: the student (loaded or built, checked, saved) and an online teacher."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from mtkd.distill.train.loader import PackedBatch
from mtkd.distill.train.targets import SparseTargets
from mtkd.ingest.tokenizer import TOKENIZER_FILES, TokenizerError, load_pretrained_tokenizer
from mtkd.store import Store

FINAL_TMP = ".tmp-final-"  # prefix of a final/ being written


def load_student(spec: str | dict[str, Any], seed: int, tokens: Store) -> PreTrainedModel:
    """A local checkpoint, or a fresh model from config kwargs initialised with ``seed``.

    Config kwargs default ``model_type`` to llama and take ``vocab_size`` and the eos id from
    the tokens store when absent.
    """
    torch.manual_seed(seed)
    if isinstance(spec, dict):
        kwargs = dict(spec)
        model_type = kwargs.pop("model_type", "llama")
        kwargs.setdefault("vocab_size", tokens.attrs.get("vocab_size"))
        eos = tokens.attrs.get("eos_id")
        if eos is not None:
            for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
                kwargs.setdefault(key, eos)
        try:
            config = AutoConfig.for_model(model_type, **kwargs)
            model = AutoModelForCausalLM.from_config(config)
        except Exception as e:  # transformers' checks raise many types (hub dataclass errors)
            raise ValueError(f"student config {_short(spec)}: {e}") from e
    else:
        _check_model_dir(spec)
        model = AutoModelForCausalLM.from_pretrained(spec, dtype=torch.float32)
    for attr in ("final_logit_softcapping", "logit_scale"):
        if getattr(model.config, attr, None) not in (None, 1.0):
            raise ValueError(f"student config sets {attr}; the chunked losses assume plain "
                             "logits = hidden @ lm_head.weight.T")
    return model


def _check_model_dir(path: str) -> None:
    """Refuse a path that is no local model directory (else the hub reads it as a repo id)."""
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"{path}: no config.json (a local Hugging Face model dir)")


def _short(spec: dict[str, Any], width: int = 200) -> str:
    """A student config as JSON, cut to ``width`` characters for a message."""
    text = json.dumps(spec, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def student_vocab(model: PreTrainedModel) -> int:
    """Ids the student can both embed and predict."""
    return min(model.get_output_embeddings().weight.shape[0],
               model.get_input_embeddings().weight.shape[0])


def check_vocab(vocab: int, stores: list[Store | None]) -> None:
    """Refuse a student vocabulary smaller than any store's."""
    for store in stores:
        need = store.attrs.get("vocab_size") if store is not None else None
        if need is not None and vocab < int(need):
            raise ValueError(f"the student's vocabulary has {vocab} entries but {store.root} "
                             f"uses {need}; build the student with vocab_size ≥ {need}")


def check_same_tokenizer(model_dir: str, tokens: Store, role: str) -> None:
    """Refuse a student or teacher checkpoint whose own tokenizer is not the tokens store's:
    its ids would name other tokens (and ``final/`` would ship the store's tokenizer with
    weights trained for another). A checkpoint without a tokenizer is taken as it is."""
    if not any(any(Path(model_dir).glob(pattern)) for pattern in TOKENIZER_FILES):
        return
    try:
        got = load_pretrained_tokenizer(model_dir).vocab_hash
    except TokenizerError:
        return
    want = tokens.attrs.get("tokenizer_hash")
    if want is not None and got != want:
        raise ValueError(
            f"{role} {model_dir} has its own tokenizer (vocabulary hash {got}), not the one "
            f"{tokens.root} was cut with ({want}): its token ids mean other tokens. Train a "
            "student of that tokenizer on a tokens store cut with it (mtkd tokenize "
            "--tokenizer ...), or start from --student-config")


def check_same_tokens(stores: list[Store | None], tokens: Store) -> None:
    """Refuse a held-out store cut with another tokenizer than the training tokens: its
    figures would score the student on ids it never saw as those tokens."""
    want = tokens.attrs.get("tokenizer_hash")
    for store in stores:
        got = store.attrs.get("tokenizer_hash") if store is not None else None
        if got is not None and want is not None and got != want:
            raise ValueError(f"{store.root} was cut with another tokenizer (vocabulary hash "
                             f"{got}) than {tokens.root} ({want}); give a held-out store "
                             "tokenised like the training one")


def save_student(model: PreTrainedModel, out: Path, tokenizer_dir: str | None,
                 state_dict: dict[str, Tensor] | None = None) -> Path:
    """save_pretrained into ``out/final`` plus the tokens store's tokenizer files.

    Written into a temp directory renamed into place, so a save killed half-way leaves no
    ``final/`` that looks complete (temp copies of killed saves are removed here).
    ``state_dict``: the full weights (under FSDP, gathered by :func:`training_state`);
    default ``model.state_dict()``.
    """
    final = out / "final"
    for stale in out.glob(f"{FINAL_TMP}*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out / f"{FINAL_TMP}{uuid.uuid4().hex}"
    model.save_pretrained(str(tmp), state_dict=state_dict, safe_serialization=True)
    src = Path(tokenizer_dir) if tokenizer_dir else None
    if src is None or not src.is_dir():
        warnings.warn(f"tokenizer dir {tokenizer_dir!r} not found; {final} has no tokenizer",
                      stacklevel=2)
    else:
        for pattern in TOKENIZER_FILES:
            for f in src.glob(pattern):
                if f.is_file():
                    shutil.copy2(f, tmp / f.name)
    if final.exists():  # an earlier save (a rerun, or one killed half-way)
        shutil.rmtree(final)
    os.rename(tmp, final)
    return final


def load_teacher(path: str, device: torch.device) -> PreTrainedModel:
    """A frozen local teacher for online full-vocabulary targets."""
    _check_model_dir(path)
    teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device)
    return teacher.eval().requires_grad_(False)


def with_teacher_targets(batch: PackedBatch, teacher: PreTrainedModel) -> PackedBatch:
    """``batch`` with the teacher's full softmax as targets (support = the whole vocabulary).

    The dense baseline that sparse top-k targets are compared with; it holds [B,T,V] ids and
    probabilities, so it is meant for small vocabularies.
    """
    with torch.no_grad():
        logits = teacher(input_ids=batch.input_ids, position_ids=batch.position_ids,
                         use_cache=False).logits
        probs = torch.softmax(logits.float(), dim=-1)
    ids = torch.arange(probs.shape[-1], device=probs.device).expand(probs.shape)
    tail = probs.new_zeros(probs.shape[:-1])
    return dataclasses.replace(batch, targets=SparseTargets(ids, probs, tail))

