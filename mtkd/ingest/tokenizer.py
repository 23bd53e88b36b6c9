"""Loading a tokenizer (or finding a model) the way transformers does, as a fast tokenizer.

``--tokenizer`` and ``--model`` accept what transformers accepts: a local directory (or a
``tokenizer.json`` file), or a Hugging Face hub id, resolved to its snapshot in the Hugging Face
cache (downloaded there first unless ``HF_HUB_OFFLINE`` is set). A directory with a
``tokenizer.json`` is read with ``tokenizers`` directly (what mtkd always did); one without
(e.g. a SentencePiece ``tokenizer.model``) through ``AutoTokenizer``, whose fast backend is used.
Either way the truncation and padding a saved tokenizer carries are turned off: documents are
always read whole.

A tokenizer's **prefix** is what its convention puts before a text: the BOS that its
post-processor adds (``tokenizer_config.json``'s ``add_bos_token`` overrides it when set).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from mtkd.ingest.corpus import CorpusError
from mtkd.store.schema import vocab_fingerprint

#: What a hub id looks like: ``name`` or ``owner/name`` (letters, digits, ``-_.``).
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")
#: The files of a tokenizer (glob patterns): what a trained student's ``final/`` copies from
#: its tokens store's tokenizer, and, with the model's ``config.json`` that AutoTokenizer may
#: read, what is fetched for a hub id given as ``--tokenizer``.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "*.model", "*.tiktoken", "chat_template*")
#: The files of a model fetched for a hub id given as ``--model`` (safetensors weights).
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja")
_TRUE = {"1", "on", "yes", "true"}


class TokenizerError(CorpusError, ValueError):
    """A tokenizer or model that cannot be found or loaded as asked."""


@dataclass(frozen=True)
class LoadedTokenizer:
    """A fast tokenizer, where it was loaded from and its special-token conventions."""

    tokenizer: Tokenizer
    path: Path  # absolute local directory (or tokenizer.json file)
    eos_id: int | None
    prefix_ids: tuple[int, ...]  # put before a text by its convention (BOS), zero bytes each

    @property
    def vocab_hash(self) -> str:
        return vocab_fingerprint(self.tokenizer.get_vocab(with_added_tokens=True))


def hub_offline() -> bool:
    """Whether Hugging Face downloads are off (``HF_HUB_OFFLINE`` or ``TRANSFORMERS_OFFLINE``)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE
               for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def resolve_pretrained(spec: str | os.PathLike[str], what: str,
                       patterns: Sequence[str] | None = None) -> Path:
    """``spec`` as an absolute local path: itself if it exists, else the snapshot of the hub
    id it names in the Hugging Face cache (only ``patterns`` fetched; nothing fetched when
    offline)."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.resolve()
    name = str(spec)
    if not _HUB_ID.fullmatch(name) or ".." in name:
        raise TokenizerError(f"{what} {name}: no such file or directory")
    from huggingface_hub import snapshot_download

    offline = hub_offline()
    try:
        return Path(snapshot_download(name, allow_patterns=list(patterns) if patterns else None,
                                      local_files_only=offline)).resolve()
    except Exception as e:  # the hub client raises many types, all "not there"
        why = ("it is not in the Hugging Face cache and HF_HUB_OFFLINE is set" if offline
               else f"the Hugging Face hub did not give it ({type(e).__name__}: {e})")
        raise TokenizerError(f"{what} {name}: no such local path, and {why}") from None


def load_pretrained_tokenizer(spec: str | os.PathLike[str]) -> LoadedTokenizer:
    """The fast tokenizer of a tokenizer or model directory, a ``tokenizer.json``, or a hub id."""
    path = resolve_pretrained(spec, "tokenizer", (*TOKENIZER_FILES, "config.json"))
    file = path / "tokenizer.json" if path.is_dir() else path
    config = _tokenizer_config(file.parent)
    if file.exists():
        tokenizer = _from_file(file)
        eos_id = _token_id(tokenizer, config.get("eos_token"))
    else:
        tokenizer, eos_id = _from_transformers(path)
    whole_documents(tokenizer)
    bos_id = _token_id(tokenizer, config.get("bos_token"))
    return LoadedTokenizer(tokenizer, path, eos_id,
                           _prefix(tokenizer, config.get("add_bos_token"), bos_id))


def load_tokenizer(spec: str | os.PathLike[str]) -> tuple[Tokenizer, int | None]:
    """A fast tokenizer (see :func:`load_pretrained_tokenizer`) and its end-of-sequence id."""
    loaded = load_pretrained_tokenizer(spec)
    return loaded.tokenizer, loaded.eos_id


def whole_documents(tokenizer: Tokenizer) -> None:
    """Turn off the truncation and padding a saved tokenizer may carry (many tokenizer.json
    files do): tokenize cuts whole documents into windows itself, and a truncated document (or
    one padded with pad ids) would be stored as if it were the text."""
    tokenizer.no_truncation()
    tokenizer.no_padding()


def _from_file(file: Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own exception types
        raise TokenizerError(f"{file}: cannot load the tokenizer ({e})") from None


def _from_transformers(path: Path) -> tuple[Tokenizer, int | None]:
    """The fast backend and EOS id of what ``AutoTokenizer`` loads from a local directory."""
    if not path.is_dir():
        raise TokenizerError(f"{path}: not a tokenizer.json file or a tokenizer directory")
    try:
        from transformers import AutoTokenizer

        tok: Any = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises many types here
        raise TokenizerError(f"{path}: no tokenizer.json, and transformers' AutoTokenizer cannot "
                             f"load a tokenizer from it ({type(e).__name__}: {e})") from None
    backend = getattr(tok, "backend_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TokenizerError(f"{path}: AutoTokenizer loads a {type(tok).__name__}, which is "
                             "not a fast tokenizer (no tokenizers backend)")
    return backend, tok.eos_token_id


def _tokenizer_config(directory: Path) -> dict[str, Any]:
    path = directory / "tokenizer_config.json"
    if not path.exists():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{path}: cannot read it ({e})") from None
    return config if isinstance(config, dict) else {}


def _token_id(tokenizer: Tokenizer, token: Any) -> int | None:
    """The id of a token named in ``tokenizer_config.json`` (a string or ``{"content": …}``)."""
    if isinstance(token, dict):
        token = token.get("content")
    return tokenizer.token_to_id(token) if isinstance(token, str) else None


def _prefix(tokenizer: Tokenizer, add_bos: Any, bos_id: int | None) -> tuple[int, ...]:
    """The ids the post-processor puts before a text (found by encoding a probe both ways),
    unless the config's ``add_bos_token`` says otherwise."""
    if add_bos is False:
        return ()
    probe = "a"
    bare = tokenizer.encode(probe, add_special_tokens=False).ids
    full = tokenizer.encode(probe, add_special_tokens=True).ids
    found: tuple[int, ...] = ()
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            found = tuple(full[:i])
            break
    if add_bos is True and not found and bos_id is not None:
        found = (bos_id,)
    return found
