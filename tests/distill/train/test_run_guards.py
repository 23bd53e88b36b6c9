"""What keeps a run honest: a diverged run stops, a run killed at its very end still reports,
a resume takes the same stores however they are spelt and refuses another rank count, and a
checkpoint or store of another tokenizer is refused."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from mtkd.distill.train.checkpoint import STATE_FILE, checkpoint_dirs
from mtkd.distill.train.loop import DivergedError, train
from mtkd.distill.train.student import load_student
from mtkd.store import open_store

from .test_loader import write_tokens
from .test_loop import STUDENT, config, metrics


def test_a_diverging_run_stops_with_an_error(data: dict[str, str], tmp_path: Path) -> None:
    """An absurd learning rate gave NaN losses, exit 0 and a final/ that looked complete."""
    out = tmp_path / "nan"
    with pytest.raises(DivergedError, match=r"the gradient norm is (nan|inf).*Lower --lr"):
        train(config(data, out, objective="ce", targets=None, lr=1e6, grad_clip=0.0))
    assert not (out / "final_metrics.json").exists() and not (out / "final").exists()
    assert all(np.isfinite(r["loss"]) for r in metrics(out))  # nothing of the bad step logged


def test_a_run_killed_before_its_final_metrics_rebuilds_them(data: dict[str, str],
                                                            tmp_path: Path) -> None:
    """Killed between its last checkpoint and final_metrics.json, a rerun wrote empty metrics
    and the run counted as done for ever; now it reports what the run measured."""
    out = tmp_path / "end"
    cfg = config(data, out, objective="ce", targets=None, max_steps=6,
                 eval_tokens=data["heldout"], eval_batches=None)
    train(cfg)
    want = json.loads((out / "final_metrics.json").read_text())
    (out / "final_metrics.json").unlink()
    shutil.rmtree(out / "final")
    again = train(cfg)
    got = json.loads((out / "final_metrics.json").read_text())
    for key in ("heldout_ce", "heldout_bpb", "steps", "tokens"):
        assert got[key] == want[key], key
    assert got["train"] == want["train"] and again.resumed_from == 6
    assert (out / "final" / "model.safetensors").exists()
    # the held-out figures are measured again when the log lacks them
    (out / "final_metrics.json").unlink()
    kept = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["split"] == "train"]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    train(cfg)
    assert json.loads((out / "final_metrics.json").read_text())["heldout_ce"] == pytest.approx(
        want["heldout_ce"], rel=1e-6)


def test_resume_from_elsewhere_and_with_more_steps(data: dict[str, str], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The same stores spelt from another working directory, the run directory moved, more
    steps with the derived warmup: all resume (each was refused as "different options")."""
    shutil.copytree(Path(data["tokens"]), tmp_path / "tokens")
    shutil.copytree(Path(data["targets"]), tmp_path / "targets")
    monkeypatch.chdir(tmp_path)
    kw = dict(tokens="tokens", targets="targets", warmup_steps=None, save_every=3)
    train(config(data, Path("run"), max_steps=6, **kw))
    shutil.move(tmp_path / "run", tmp_path / "moved")
    monkeypatch.chdir(tmp_path.parent)
    spelt = dict(kw, tokens=str(tmp_path / "tokens"), targets=f"{tmp_path.name}/targets")
    res = train(config(data, tmp_path / "moved", max_steps=9, **spelt))
    assert res.resumed_from == 6 and res.steps == 9
    assert [r["step"] for r in metrics(tmp_path / "moved")] == list(range(1, 10))
    with pytest.raises(ValueError, match=r"different options \['lr'\]"):  # still compared
        train(config(data, tmp_path / "moved", max_steps=12, lr=1e-3, **spelt))


def test_resume_on_another_number_of_ranks_is_refused(data: dict[str, str],
                                                      tmp_path: Path) -> None:
    """Each rank's loader position is its own share of the data: resumed on another rank count
    the run repeated data silently."""
    out = tmp_path / "ranks"
    train(config(data, out, max_steps=4, save_every=2))
    ckpt = checkpoint_dirs(out)[-1] / STATE_FILE
    state = torch.load(ckpt, weights_only=True)
    assert state["world_size"] == 1
    state["world_size"] = 2  # as if written by two ranks
    torch.save(state, ckpt)
    with pytest.raises(ValueError, match="written by 2 ranks and this run has 1"):
        train(config(data, out, max_steps=6, save_every=2))


def other_tokenizer(root: Path) -> Path:
    """A word-level tokenizer (not the tests' BPE) saved as a tokenizer directory."""
    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(["def main(): return other words"],
                            trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    root.mkdir(parents=True)
    tok.save(str(root / "tokenizer.json"))
    return root


def test_a_checkpoint_or_store_of_another_tokenizer_is_refused(
        data: dict[str, str], tokenizer_dir: Path, tmp_path: Path) -> None:
    """A student checkpoint, an online teacher or a held-out store of another tokenizer were
    taken (the same vocabulary size sufficed), and final/ shipped the store's tokenizer with
    weights trained for another."""
    from mtkd.ingest.tokenizer import load_pretrained_tokenizer

    ours = load_pretrained_tokenizer(tokenizer_dir).vocab_hash
    store = open_store(data["tokens"], "tokens")
    rows = store.read(np.arange(8), ["token_ids"])
    seqs = np.split(rows["token_ids"], rows.offsets[1:-1])
    attrs = {"tokenizer": str(tokenizer_dir), "vocab_size": store.attrs["vocab_size"],
             "eos_id": store.attrs["eos_id"]}
    tokens = write_tokens(tmp_path / "tokens", seqs, {**attrs, "tokenizer_hash": ours}, parts=1)
    other = other_tokenizer(tmp_path / "other-tok")
    theirs = load_pretrained_tokenizer(other).vocab_hash
    heldout = write_tokens(tmp_path / "heldout", seqs, {**attrs, "tokenizer_hash": theirs},
                           parts=1)
    model = load_student(STUDENT, 0, tokens)
    model.save_pretrained(tmp_path / "ckpt")
    shutil.copy(other / "tokenizer.json", tmp_path / "ckpt")
    base = dict(tokens=str(tokens.root), targets=None, objective="ce", max_steps=2)
    for kw, said in ((dict(student=str(tmp_path / "ckpt")), "the student"),
                     (dict(teacher=str(tmp_path / "ckpt"), objective="mix"), "the teacher")):
        out = tmp_path / said.replace(" ", "-")
        with pytest.raises(ValueError, match=f"{said} .* has its own tokenizer .*{theirs}"):
            train(config(data, out, **{**base, **kw}))
        assert not out.exists()
    with pytest.raises(ValueError, match=f"was cut with another tokenizer .*{theirs}"):
        train(config(data, tmp_path / "h", eval_tokens=str(heldout.root), **base))
    os.remove(tmp_path / "ckpt" / "tokenizer.json")  # a checkpoint without one: taken as is
    res = train(config(data, tmp_path / "ok", student=str(tmp_path / "ckpt"), **base))
    assert res.steps == 2
