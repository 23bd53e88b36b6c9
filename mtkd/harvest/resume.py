"""A harvest resumed into a store it began: the coding options that store was begun with, kept
by ``--logprob-dtype auto`` and compared with what the harvest asks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mtkd.harvest.config import TAIL_NATS, HarvestConfig
from mtkd.store import StoreError
from mtkd.store.format import HEADER_FILE, read_json
from mtkd.store.schema import TOPK_LOGPROBS
from mtkd.store.topk_codec import (
    CODING_ATTR,
    Q64R,
    SAMPLE_CODING_ATTR,
    TAIL_STEPS,
    codes_scalars,
    ranked,
    stream_rows,
    tail_step,
)


def begun_header(out: str | os.PathLike[str]) -> dict[str, Any]:
    """The header of the store begun at ``out`` (a harvest being resumed); empty if none (or
    one the writer will refuse, saying why)."""
    try:
        header = read_json(Path(out) / HEADER_FILE)
    except (OSError, StoreError):
        return {}
    return header if isinstance(header, dict) else {}


def begun_coding(header: dict[str, Any]) -> str | None:
    """The top-k coding (or float dtype) of a begun store's ``header`` (:func:`begun_header`),
    None if none: what ``--logprob-dtype auto`` keeps when a harvest resumes."""
    attrs, arrays = header.get("attrs"), header.get("arrays")
    if isinstance(attrs, dict) and isinstance(attrs.get(CODING_ATTR), str):
        return attrs[CODING_ATTR]
    spec = arrays.get(TOPK_LOGPROBS) if isinstance(arrays, dict) else None
    dtype = spec.get("dtype") if isinstance(spec, dict) else None
    return dtype if isinstance(dtype, str) else None


def begun_options(header: dict[str, Any]) -> dict[str, Any]:
    """How a begun store's top-k is coded, as :class:`HarvestConfig` fields (empty if there
    is no such store): ``logprob_dtype``, and for q64r ``tail_nats`` and ``stream_rows``."""
    coding = begun_coding(header)
    if coding is None:
        return {}
    if coding != Q64R:
        return {"logprob_dtype": coding}
    attrs = header["attrs"]
    return {"logprob_dtype": coding, "tail_nats": TAIL_NATS[TAIL_STEPS.index(tail_step(attrs))],
            "stream_rows": stream_rows(attrs)}


def check_resumed_coding(config: HarvestConfig, begun: dict[str, Any],
                         out: str | os.PathLike[str]) -> None:
    """Refuse, naming both, a harvest into a begun store (``begun``: :func:`begun_options`)
    whose coding options differ from the store's (the coding alone, if that differs)."""
    differ = [name for name, value in begun.items() if getattr(config, name) != value]
    if not differ:
        return
    if "logprob_dtype" in differ:
        differ = ["logprob_dtype"]
    store = _flags({name: begun[name] for name in differ})
    asked = _flags({name: getattr(config, name) for name in differ})
    raise ValueError(f"{out} was begun with {store}; this harvest asks {asked}: resume with "
                     "the store's options (--logprob-dtype auto keeps them) or harvest into a "
                     "new --out")


def _flags(options: dict[str, Any]) -> str:
    """Config fields as the command-line flags that set them."""
    return " ".join(f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float)
                    else f"--{name.replace('_', '-')} {value}" for name, value in options.items())


def q64r_choices(header: dict[str, Any]) -> dict[str, bool]:
    """How q64r numbers seen ids (by count) and codes the draws and the actual token's
    log-prob and tail (against the top-k) here: as mtkd does now, unless a q64r store started
    before any of them is being resumed (no flag chooses them, so the store's own choice
    holds; ``header``: :func:`begun_header`'s). ``teacher_header``'s keywords."""
    attrs = header.get("attrs")
    if not isinstance(attrs, dict) or attrs.get(CODING_ATTR) != Q64R:
        return {"rank_ids": True, "stream_samples": True, "code_scalars": True}
    return {"rank_ids": ranked(attrs), "stream_samples": SAMPLE_CODING_ATTR in attrs,
            "code_scalars": codes_scalars(attrs)}
