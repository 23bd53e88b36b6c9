"""What ``--tokenizer`` (and ``--model``) accept: a tokenizer.json directory or file, a
SentencePiece-only directory (through AutoTokenizer), a hub id in the Hugging Face cache (offline
here: nothing is downloaded), and each tokenizer's BOS convention."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer

from mtkd.ingest.job import TokenizeConfig, tokenize_corpus
from mtkd.ingest.token_bytes import token_bytes
from mtkd.ingest.tokenizer import TokenizerError, load_pretrained_tokenizer, resolve_pretrained
from mtkd.store import open_store

from .test_window_text import check_windows, corpus

DOCS = ["the cat sat on the mat", "def f(x):\n    return x + 1", "naïve café, 日本語 text"]


@pytest.fixture
def tmp_path(memory_tmp_path: Path) -> Path:
    return memory_tmp_path


@pytest.fixture(scope="module")
def sentencepiece_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding only a SentencePiece ``tokenizer.model``: BPE with byte fallback and
    no normalization, as LLM tokenizers are trained (Llama's)."""
    spm = pytest.importorskip("sentencepiece")
    out = tmp_path_factory.mktemp("sp-only")
    lines = [line for line in Path(json.__file__).read_text().splitlines() if line.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines * 2), model_prefix=str(out / "sp"), vocab_size=400,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, normalization_rule_name="identity", remove_extra_whitespaces=False,
        minloglevel=2)
    (out / "sp.model").rename(out / "tokenizer.model")
    (out / "sp.vocab").unlink()
    return out


@pytest.mark.parametrize("config", [None, {"tokenizer_class": "LlamaTokenizer"}])
def test_sentencepiece_only_directory_is_tokenized(sentencepiece_dir: Path, tmp_path: Path,
                                                   config: dict | None) -> None:
    """No tokenizer.json: AutoTokenizer loads it; the store holds its fast backend's ids (and
    its EOS, when the directory names one), and the windows' texts and offsets are exact."""
    tok_dir = tmp_path / "tok-dir"
    shutil.copytree(sentencepiece_dir, tok_dir)
    if config is not None:
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(config))
    assert not (tok_dir / "tokenizer.json").exists()
    summary = tokenize_corpus([corpus(tmp_path / "c", DOCS)], tok_dir, tmp_path / "tok",
                              TokenizeConfig(max_len=5), progress=False)
    assert summary.complete and summary.documents == len(DOCS)
    reference = AutoTokenizer.from_pretrained(str(tok_dir))
    backend = reference.backend_tokenizer
    store = open_store(tmp_path / "tok")
    assert store.attrs["eos_id"] == reference.eos_token_id
    eos = [] if reference.eos_token_id is None else [reference.eos_token_id]
    ids = store.read_part(0)["token_ids"].tolist()
    assert ids == [i for d in DOCS for i in backend.encode(d, add_special_tokens=False).ids + eos]
    check_windows(tmp_path / "tok", backend, DOCS, dummy_prefix=True)
    assert store.attrs["tokenizer"] == str(tok_dir.resolve())


def test_tokenizer_json_file_and_directory_load_the_same(tokenizer_dir: Path) -> None:
    a = load_pretrained_tokenizer(tokenizer_dir)
    b = load_pretrained_tokenizer(tokenizer_dir / "tokenizer.json")
    assert a.vocab_hash == b.vocab_hash and a.eos_id == b.eos_id is not None
    assert a.path == tokenizer_dir.resolve() and a.prefix_ids == ()


def fake_hub_cache(root: Path, repo: str, files: Path) -> Path:
    """A Hugging Face cache holding one snapshot of ``repo`` (what a download leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = root / f"models--{repo.replace('/', '--')}"
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(files, snapshot)
    return snapshot


def test_hub_id_from_the_cache_offline(tokenizer_dir: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = fake_hub_cache(cache, "acme/tiny-tok", tokenizer_dir)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_pretrained("acme/tiny-tok", "tokenizer") == snapshot.resolve()
    tokenize_corpus([corpus(tmp_path / "c", DOCS)], "acme/tiny-tok", tmp_path / "tok",
                    TokenizeConfig(max_len=8), progress=False)
    attrs = open_store(tmp_path / "tok").attrs
    assert attrs["tokenizer"] == str(snapshot.resolve())
    assert attrs["tokenizer_hash"] == load_pretrained_tokenizer(tokenizer_dir).vocab_hash
    with pytest.raises(TokenizerError, match="not in the Hugging Face cache and HF_HUB_OFFLINE"):
        load_pretrained_tokenizer("acme/missing")
    with pytest.raises(TokenizerError, match="no such file or directory"):
        load_pretrained_tokenizer(tmp_path / "nowhere")


def test_bos_convention_from_post_processor_and_config(tokenizer_dir: Path,
                                                       tmp_path: Path) -> None:
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    tok.add_special_tokens(["<s>"])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[
        ("<s>", bos)])
    with_bos = tmp_path / "with-bos"
    with_bos.mkdir()
    tok.save(str(with_bos / "tokenizer.json"))
    loaded = load_pretrained_tokenizer(with_bos)
    assert loaded.prefix_ids == (bos,) and token_bytes(loaded.tokenizer)[bos] is None
    # the config's add_bos_token overrides the post-processor, either way
    (with_bos / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": False}))
    assert load_pretrained_tokenizer(with_bos).prefix_ids == ()
    plain = tmp_path / "plain"
    shutil.copytree(tokenizer_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps(config | {"add_bos_token": True}))
    assert load_pretrained_tokenizer(plain).prefix_ids == (eos,)  # its bos_token is its EOS
    assert np.array_equal(load_pretrained_tokenizer(tokenizer_dir).prefix_ids, ())


def test_saved_truncation_and_padding_are_turned_off(tokenizer_dir: Path, tmp_path: Path) -> None:
    """The review's case: a tokenizer.json saved with truncation at 16 and padding cut every
    document to 16 tokens, or filled the store with pad ids; documents are now read whole."""
    saved = tmp_path / "saved"
    shutil.copytree(tokenizer_dir, saved)
    tok = Tokenizer.from_file(str(saved / "tokenizer.json"))
    tok.enable_truncation(16)
    tok.enable_padding(pad_id=0, pad_token="<|endoftext|>", length=40)
    tok.save(str(saved / "tokenizer.json"))
    loaded = load_pretrained_tokenizer(saved)
    assert loaded.tokenizer.truncation is None and loaded.tokenizer.padding is None
    docs = ["def f(x):\n    return x + 1\n" * 8, "short", *DOCS]
    reference = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    eos = reference.token_to_id("<|endoftext|>")
    want = [i for d in docs for i in [*reference.encode(d, add_special_tokens=False).ids, eos]]
    for name, offsets in (("bytes", True), ("plain", False)):
        tokenize_corpus([corpus(tmp_path / "c", docs)], saved, tmp_path / name,
                        TokenizeConfig(max_len=512, byte_offsets=offsets), progress=False)
        assert open_store(tmp_path / name).read_part(0)["token_ids"].tolist() == want
