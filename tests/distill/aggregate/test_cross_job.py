"""The aggregate job with teachers of their own tokenizer (``attrs.tokenization == "own"``).

Stores are written directly (``own_tokens``): a student byte-level BPE of 300 tokens over a few
standard-library texts, teachers with random dense rows. (a) A teacher whose tokenizer is the
student's with permuted ids gives exactly the same target store as the same teacher in the
student's ids; (b) a finer (byte- and character-level) teacher gives distributions, and a case
computed by hand; (c) a same-tokenizer and a cross teacher mixed: rows the cross teacher does
not cover are the other teacher's alone, rows no teacher covers are one-hot, and the coverage
array and counts say so; ``--weights fit`` on the complete rows; (d) bad input refused before
anything is written; (e) random-sampling targets (``--source samples``) of a cross teacher: the
permuted twin gives its own estimate back, a partial teacher mixes and falls back as in (c).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

from mtkd.distill.aggregate.align import TokenSpans, align_rows
from mtkd.distill.aggregate.config import AggregateConfig
from mtkd.distill.aggregate.coverage import COVERAGE
from mtkd.distill.aggregate.cross import projection
from mtkd.distill.aggregate.job import TEACHER_ARRAYS, aggregate, teacher_rows
from mtkd.distill.aggregate.own_samples import as_head_rows, estimated_rows
from mtkd.distill.aggregate.sampled import SampledRows, fuse_samples
from mtkd.distill.aggregate.weights import fit_mixture_weights
from mtkd.store import StoreError, open_store
from mtkd.store.schema import CONTEXT_END, TARGET, TEACHER, TOKENS
from tests.distill.aggregate.own_tokens import (
    byte_teacher,
    bytewise,
    permuted,
    plain_bpe,
    random_logp,
    save_tokenizer,
    train_bpe,
    write_own_teacher,
    write_store_teacher,
    write_tokens,
)

K = 8
DRAWS = 16  # random-sampling targets per row beside each teacher's top-k
ARRAYS = ("ids", "probs", "tail_mass", "weights", "jensen_gap", "disagreement")


def corpus() -> list[str]:
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    texts = [t[:700] for t in stdlib_texts(max_files=40)]
    return [*texts[-6:], "naïve café — “quoted” ✓ 数据 end"]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The student tokenizer and tokens store, a same-tokenizer teacher, its permuted-ids twin
    (own tokenization) and a byte-level teacher."""
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    root = tmp_path_factory.mktemp("cross")
    student = train_bpe(list(stdlib_texts(max_files=20)), 300)
    student_dir = save_tokenizer(student, root / "student")
    tokens = write_tokens(root, student_dir, corpus(), max_len=40)
    size = student.get_vocab_size(with_added_tokens=True)
    perm = np.random.default_rng(1).permutation(size)
    perm_dir = save_tokenizer(permuted(student, perm), root / "permuted")

    def dense(part: int, n: int) -> np.ndarray:
        return random_logp(np.random.default_rng(100 + part), n, size)

    same = write_store_teacher(root, tokens, "same", K, lambda p, nxt: dense(p, len(nxt)),
                               num_samples=DRAWS)
    store = open_store(tokens, TOKENS)
    parts = {p: store.read_part(p) for p in range(store.num_parts)}

    def tokenise(p: int, s: int, text: bytes) -> tuple[list[int], list[int]]:
        b = parts[p]
        a, z = b.offsets[s], b.offsets[s + 1]
        return perm[b["token_ids"][a:z]].tolist(), [0, *b["byte_end"][a:z].tolist()]

    inverse = np.argsort(perm)
    twin = write_own_teacher(root, tokens, "twin", perm_dir, K, tokenise=tokenise,
                             rows=lambda p, nxt: dense(p, len(nxt))[:, inverse],
                             num_samples=DRAWS)
    byte_dir = save_tokenizer(byte_teacher(), root / "bytes", eos=None)
    byte = write_own_teacher(root, tokens, "byte", byte_dir, K, tokenise=bytewise(byte_teacher()),
                             seed=7, unreadable=[(0, 1)], num_samples=DRAWS)
    return {"root": root, "tokens": tokens, "same": same, "twin": twin, "byte": byte,
            "student": student_dir, "byte_dir": byte_dir, "perm": perm}


def config(teachers: list[Path], **kw: object) -> AggregateConfig:
    kw.setdefault("codec", "raw")  # exact target values (the coded default: test_job.py)
    return AggregateConfig(teachers=tuple(str(t) for t in teachers), **kw)  # type: ignore[arg-type]


def run(world: dict[str, Path], name: str, teachers: list[str], **kw: object) -> Path:
    out = world["root"] / "out" / name
    aggregate(world["tokens"], out, config([world[t] for t in teachers], **kw), progress=False)
    return out


def parts(path: Path) -> list[dict[str, np.ndarray]]:
    store = open_store(path, TARGET, verify="full")
    return [store.read_part(p).arrays for p in range(store.num_parts)]


def labels(world: dict[str, Path]) -> list[np.ndarray]:
    store = open_store(world["tokens"], TOKENS)
    return [np.delete(b["token_ids"], b.offsets[:-1]) for b in
            (store.read_part(p) for p in range(store.num_parts))]


# ------------------------------------------------------------------- (a) permuted vocabulary


@pytest.mark.parametrize("kw", [
    {},
    {"temperatures": (2.0, 1.0), "token": "entropy", "operator": "geometric",
     "teacher_blocks": True},
    {"weights": (0.7, 0.3), "label_entry": True, "context": "loss", "safety": 1,
     "tail_model": "zipf", "k_out": 12},
    {"operator": "power_mean", "alpha": 0.5, "token": "target", "imputation": "rank"},
])
def test_permuted_ids_give_the_same_targets_exactly(world, kw):
    """The student's tokenizer with permuted ids, as a teacher of its own tokenization: every
    array of the target store is the same-tokenizer one, bit for bit, beside it the coverage
    array says both teachers cover every row."""
    name = str(len(kw)) + "-".join(sorted(kw))
    plain = parts(run(world, f"plain{name}", ["same", "same"], **kw))
    cross = parts(run(world, f"cross{name}", ["twin", "same"], **kw))
    for a, b in zip(plain, cross, strict=True):
        assert b.keys() - a.keys() == {COVERAGE}
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
        assert (b[COVERAGE] == 0b11).all()


def test_same_tokenizer_stores_carry_no_coverage(world):
    got = open_store(run(world, "plain-only", ["same"]), TARGET)
    assert COVERAGE not in got.array_names and "covered_rows" not in got.part_stats(0)


# ------------------------------------------------------------------- (b) finer teachers


def test_character_teacher_by_hand(tmp_path):
    """Student {a, b, c, ab, EOS} reads "abab" as ab ab EOS; a character-level teacher {a, b,
    c} reads a b a b with rows after "a" (b .5, a .3, c .2), "ab" (a .6, b .3, c .1) and "aba"
    (b .7, a .2, c .1). Student row 0 (after "ab"): the teacher's row 1 with "ab" = a then b,
    .6 × .7 = .42, taken from a: ab .42, b .3, a .18, and c .1 (k = 3: the tail). Row 1 (after
    "abab", label EOS): the teacher has no row there: one-hot on EOS."""
    vocab = {"a": 0, "b": 1, "c": 2, "ab": 3, "<|endoftext|>": 4}
    student = save_tokenizer(plain_bpe(vocab, [("a", "b")], ["<|endoftext|>"]), tmp_path / "s")
    teacher = save_tokenizer(plain_bpe({"a": 0, "b": 1, "c": 2}, []), tmp_path / "t", eos=None)
    tokens = write_tokens(tmp_path, student, ["abab"], max_len=8, parts=1)
    assert open_store(tokens, TOKENS).read_part(0)["byte_end"].tolist() == [2, 4, 4]
    dense = np.log([[0.3, 0.5, 0.2], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1]])
    store = write_own_teacher(tmp_path, tokens, "chars", teacher, 3, rows=lambda p, n: dense)
    out = tmp_path / "out"
    summary = aggregate(tokens, out, config([store], k_out=4), progress=False)
    got = parts(out)[0]
    assert got["ids"].tolist() == [[3, 1, 0, -1], [4, -1, -1, -1]]
    np.testing.assert_allclose(got["probs"], [[0.42, 0.3, 0.18, 0], [1, 0, 0, 0]], rtol=1e-6)
    np.testing.assert_allclose(got["tail_mass"], [0.1, 0.0], atol=1e-6)
    assert got[COVERAGE].tolist() == [1, 0]
    assert got["weights"].tolist() == [[1.0], [0.0]]
    assert summary.diagnostics["coverage_fraction_0"] == 0.5
    assert summary.diagnostics["ce_only_fraction"] == 0.5
    assert summary.diagnostics["mean_weight_0"] == summary.diagnostics["n_eff"] == 1.0
    np.testing.assert_allclose(summary.diagnostics["tail_mass"], 0.1, atol=1e-6)  # its own row
    assert summary.diagnostics["aligned_shared_0"] == 1
    assert summary.diagnostics["aligned_fallback_0"] == 1


def test_byte_teacher_targets_are_distributions(world):
    """A byte-level teacher (finer than the student everywhere): every row of the target is a
    distribution over distinct ids, its covered rows the aligned rows themselves (one teacher,
    linear, T = 1) and every student end-of-text row (after the last byte: no teacher row) or
    row of its unreadable sequence one-hot."""
    out = run(world, "byte", ["byte"], k_out=K)
    tokens = open_store(world["tokens"], TOKENS)
    teacher = open_store(world["byte"], TEACHER)
    proj = projection(str(world["student"].resolve()), str(world["byte_dir"].resolve()),
                      int(tokens.attrs["vocab_size"]))
    for p, (got, lab) in enumerate(zip(parts(out), labels(world), strict=True)):
        probs = got["probs"].astype(np.float64)
        assert (probs >= 0).all() and (got["tail_mass"] >= 0).all()
        np.testing.assert_allclose(probs.sum(axis=1) + got["tail_mass"], 1.0, atol=2e-6)
        assert all(len(set(r) - {-1}) == (r >= 0).sum() for r in got["ids"])
        b = tokens.read_part(p)
        student = TokenSpans(b["token_ids"], b["byte_end"], np.zeros(len(b.seq_ids)), b.offsets)
        rows = teacher_rows(teacher.read_part(p, list(TEACHER_ARRAYS)), teacher.attrs)
        tb = teacher.read_part(p, [CONTEXT_END, "next_id"])
        ends = student.span_ends()
        seqs = [(tb["next_id"][a:z], tb[CONTEXT_END][a:z], e)
                for a, z, e in zip(tb.offsets[:-1], tb.offsets[1:], ends, strict=True)]
        spans = TokenSpans.from_sequences(
            [[-1, *n] for n, _, _ in seqs], [[0, *c, e] for _, c, e in seqs])
        aligned = align_rows(student, spans, rows, proj, k_out=K)
        fallback = aligned.fallback
        assert fallback.any() and not fallback.all()
        assert (fallback == (got[COVERAGE] == 0)).all()
        covered = np.flatnonzero(~fallback)
        np.testing.assert_allclose(
            np.exp(aligned.rows.logprobs[covered].astype(np.float64)),
            got["probs"][covered], rtol=1e-5, atol=1e-7)
        one_hot = np.flatnonzero(fallback)
        assert (got["ids"][one_hot, 0] == lab[one_hot]).all()
        assert (got["probs"][one_hot, 0] == 1).all()
        eos = lab == int(tokens.attrs["eos_id"])
        assert fallback[eos].all()


# ------------------------------------------------------------------- (c) mixed teachers


def test_mixed_teachers_cover_and_fall_back(world):
    """A same-tokenizer teacher and the byte teacher at 0.4 / 0.6: rows the byte teacher does
    not cover are the other teacher's target alone (weights 1, 0); the rest the mixture; the
    coverage bits and counts match."""
    mixed = run(world, "mixed", ["same", "byte"], weights=(0.4, 0.6))
    alone = parts(run(world, "alone", ["same"]))
    store = open_store(mixed, TARGET)
    covered = 0
    for p, got in enumerate(parts(mixed)):
        bits = got[COVERAGE]
        assert set(np.unique(bits)) == {0b01, 0b11}
        gap = bits == 0b01
        for key in ("ids", "probs", "tail_mass"):
            np.testing.assert_array_equal(got[key][gap], alone[p][key][gap], err_msg=key)
        np.testing.assert_array_equal(got["weights"][gap], np.tile([1.0, 0.0], (gap.sum(), 1)))
        np.testing.assert_allclose(got["weights"][~gap], np.tile([0.4, 0.6], ((~gap).sum(), 1)))
        assert (got["disagreement"][gap] == 0).all()
        stats = store.part_stats(p)
        assert stats["covered_rows"] == [len(bits), int((~gap).sum())]
        assert stats["aligned_fallback"][1] == int(gap.sum()) and stats["ce_only_rows"] == 0
        covered += int((~gap).sum())
    summary = aggregate(world["tokens"], mixed, config([world["same"], world["byte"]],
                                                       weights=(0.4, 0.6)), progress=False)
    assert summary.parts_written == 0
    assert summary.diagnostics["coverage_fraction_0"] == 1.0
    np.testing.assert_allclose(summary.diagnostics["coverage_fraction_1"],
                               covered / summary.diagnostics["positions"])


def test_adaptive_weights_with_a_partial_teacher(world):
    """Token, context and safety weights with a teacher missing on some rows: it weighs 0
    there, the rows still sum to 1, no NaN anywhere."""
    out = run(world, "adaptive", ["byte", "same"], token="target", context="loss",
              safety=0, eps=0.05, temperatures=(2.0, 1.0), operator="geometric",
              teacher_blocks=True, label_entry=False)
    for got in parts(out):
        for key, value in got.items():
            assert np.isfinite(value).all(), key
        w = got["weights"]
        np.testing.assert_allclose(w.sum(axis=1), 1.0, atol=1e-6)
        gap = got[COVERAGE] == 0b10
        assert (w[gap, 0] == 0).all() and (w[~gap, 0] >= 0.05 - 1e-6).all()
        assert (got["teacher0_ids"][gap] == -1).all()
        assert (got["teacher0_tail_mass"][gap] == 1).all()


def test_fit_weights_use_the_complete_rows(world):
    """--weights fit: the cross teacher's aligned log-probs of the student's tokens, rows
    where it has none left out for both teachers."""
    out = run(world, "fit", ["same", "byte"], fit_weights=True)
    fitted = open_store(out, TARGET).attrs["config"]["weights"]
    lp, bits = [], []
    mixed = parts(run(world, "fit-ref", ["same", "byte"]))
    same = open_store(world["same"], TEACHER)
    for p, got in enumerate(mixed):
        bits.append(got[COVERAGE])
        lp.append(same.read_part(p, ["target_logprob"])["target_logprob"])
    target = np.concatenate(lp).astype(np.float64)
    from mtkd.distill.aggregate.job import target_logprobs

    stores = [open_store(world[name], TEACHER) for name in ("same", "byte")]
    both = target_logprobs(stores, open_store(world["tokens"], TOKENS))
    np.testing.assert_array_equal(both[:, 0], target)
    complete = np.isfinite(both[:, 1])
    assert (complete == (np.concatenate(bits) == 0b11)).all()
    np.testing.assert_allclose(fitted, fit_mixture_weights(both[complete]), rtol=1e-12)


def test_rows_no_teacher_covers_are_one_hot(world):
    out = run(world, "bytes-only", ["byte"], label_entry=True)
    for got, lab in zip(parts(out), labels(world), strict=True):
        none = got[COVERAGE] == 0
        assert none.any()
        assert (got["ids"][none, 0] == lab[none]).all() and (got["ids"][none, 1:] == -1).all()
        assert (got["probs"][none, 0] == 1).all() and (got["tail_mass"][none] == 0).all()
        assert (got["weights"][none] == 0).all()


# ------------------------------------------------------------------- (d) bad input


def refused(world: dict[str, Path], teachers: list[Path], match: str,
            tokens: Path | None = None, **kw: object) -> None:
    out = world["root"] / "refused"
    with pytest.raises(StoreError, match=match):
        aggregate(tokens or world["tokens"], out, config(teachers, **kw), progress=False)
    assert not out.exists()  # nothing written, not even the header


def test_refuses_a_teacher_over_another_tokens_store(world, tmp_path):
    other = write_tokens(tmp_path, world["student"], corpus()[:3], max_len=40)
    stranger = write_own_teacher(tmp_path, other, "stranger", world["byte_dir"], K,
                                 tokenise=bytewise(byte_teacher()))
    refused(world, [world["same"], stranger], "different tokens store")


def test_refuses_offsets_that_do_not_cover_the_text(world, tmp_path):
    def beyond(part: int, arrays: dict[str, np.ndarray]) -> None:
        if part == 1:
            arrays[CONTEXT_END][5] += 10_000

    def shifted(part: int, arrays: dict[str, np.ndarray]) -> None:
        if part == 1:
            arrays[CONTEXT_END][5] -= 1

    tokenise = bytewise(byte_teacher())
    far = write_own_teacher(tmp_path, world["tokens"], "far", world["byte_dir"], K,
                            tokenise=tokenise, edit=beyond)
    refused(world, [world["same"], far], "part 1, sequence 0.*do not cover this text")
    off = write_own_teacher(tmp_path, world["tokens"], "off", world["byte_dir"], K,
                            tokenise=tokenise, edit=shifted)
    refused(world, [off], "part 1 against the tokens store.*do not match")


def test_refuses_a_cross_teacher_without_offsets(world, tmp_path):
    bare = write_own_teacher(tmp_path, world["tokens"], "bare", world["byte_dir"], K,
                             tokenise=bytewise(byte_teacher()), drop=[CONTEXT_END])
    refused(world, [bare], "lacks.*context_end")


def test_refuses_a_tokens_store_without_byte_offsets(world, tmp_path):
    old = write_tokens(tmp_path, world["student"], corpus()[:3], max_len=40, offsets=False)
    store = write_own_teacher(tmp_path, old, "t", world["byte_dir"], K,
                              tokenise=bytewise(byte_teacher()))
    refused(world, [store], "no byte_end.*re-tokenize", tokens=old)


def test_refuses_a_changed_tokenizer_and_unsupported_settings(world, tmp_path):
    moved = write_own_teacher(tmp_path, world["tokens"], "moved", world["byte_dir"], K,
                              tokenise=bytewise(byte_teacher()),
                              attrs={"teacher_tokenizer": str(world["student"].resolve())})
    refused(world, [moved], "not the one")
    hot = write_own_teacher(tmp_path, world["tokens"], "hot", world["byte_dir"], K,
                            tokenise=bytewise(byte_teacher()), num_samples=DRAWS,
                            attrs={"sample_temperature": 1.5})
    refused(world, [hot], "sampling temperature", source="samples")
    refused(world, [world["byte"], world["same"]], "exact", tail_model="exact",
            temperatures=(2.0, 1.0))


# ------------------------------------------------------------------- (e) sampled targets


def dense_targets(got: dict[str, np.ndarray], vocab: int) -> np.ndarray:
    """A target part's rows as dense ``[N, V+1]`` probabilities, the tail last."""
    out = np.zeros((len(got["ids"]), vocab + 1))
    rows = np.repeat(np.arange(len(got["ids"])), got["ids"].shape[1])
    keep = got["ids"].reshape(-1) >= 0
    np.add.at(out, (rows[keep], got["ids"].reshape(-1)[keep]),
              got["probs"].reshape(-1)[keep].astype(np.float64))
    out[:, -1] = got["tail_mass"]
    return out


def test_sampled_twin_gives_its_estimate_in_student_ids(world):
    """--source samples with the permuted-ids twin alone (the alignment is the identity): each
    row is the twin's estimate from its draws (the actual token exact, the rest shared by the
    draws' counts) read in the student's ids, every row covered."""
    out = run(world, "twin-s", ["twin"], source="samples", k_out=2 * DRAWS)
    twin = open_store(world["twin"], TEACHER)
    inverse = np.argsort(world["perm"])
    vocab = int(open_store(world["tokens"], TOKENS).attrs["vocab_size"])
    for p, got in enumerate(parts(out)):
        b = twin.read_part(p, ["sample_ids", "sample_counts", "next_id", "target_logprob"])
        drawn = np.where(b["sample_ids"] >= 0, inverse[np.maximum(b["sample_ids"], 0)], -1)
        est = estimated_rows(SampledRows(drawn, b["sample_counts"], DRAWS),
                             inverse[b["next_id"]], b["target_logprob"].astype(np.float64))
        want = fuse_samples([as_head_rows(est, DRAWS)], np.ones(1), 2 * DRAWS, vocab)
        np.testing.assert_allclose(dense_targets(got, vocab), dense_targets(want, vocab),
                                   atol=2e-7)
        assert (got[COVERAGE] == 1).all()
        label = labels(world)[p]
        np.testing.assert_allclose(got["probs"][got["ids"] == label[:, None]],
                                   np.exp(b["target_logprob"]), rtol=1e-6)


def test_sampled_mixture_with_a_partial_teacher(world):
    """Sampled targets of a same-tokenizer teacher and the byte teacher at 0.4 / 0.6: rows the
    byte teacher does not cover are the first teacher's sampled target alone, the others a
    distribution of both; the byte teacher alone leaves them one-hot."""
    mixed = parts(run(world, "mixed-s", ["same", "byte"], source="samples", weights=(0.4, 0.6)))
    alone = parts(run(world, "alone-s", ["same"], source="samples"))
    only = parts(run(world, "byte-s", ["byte"], source="samples"))
    for got, one, byte, lab in zip(mixed, alone, only, labels(world), strict=True):
        gap = got[COVERAGE] == 0b01
        assert gap.any() and not gap.all() and set(np.unique(got[COVERAGE])) == {0b01, 0b11}
        for key in ("ids", "probs", "tail_mass"):
            np.testing.assert_array_equal(got[key][gap], one[key][gap], err_msg=key)
        np.testing.assert_allclose(got["weights"][~gap], np.tile([0.4, 0.6], ((~gap).sum(), 1)))
        np.testing.assert_allclose(got["probs"].sum(axis=1) + got["tail_mass"], 1.0, atol=2e-6)
        none = byte[COVERAGE] == 0
        assert (none == gap).all()
        assert (byte["ids"][none, 0] == lab[none]).all() and (byte["probs"][none, 0] == 1).all()


# ------------------------------------------------------------------- through the commands


def test_end_to_end_through_the_commands(tmp_path, tokenizer_dir):
    """``mtkd tokenize`` → ``mtkd harvest`` of a tiny Llama and of its copy with permuted ids
    (``--tokenization auto`` picks own: another vocabulary) → ``mtkd aggregate`` of both: the
    permuted teacher covers every row but the end-of-text ones (it reads the text without EOS),
    where the other teacher alone gives the target; elsewhere the mixture is the one of the
    teacher with itself, up to float32 rounding and the q64 coding."""
    import json

    from typer.testing import CliRunner

    from mtkd.cli import app
    from mtkd.recipes.models import init_llama, permute_vocabulary
    from mtkd.recipes.stdlib_corpus import stdlib_texts

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    size = tok.get_vocab_size(with_added_tokens=True)
    base = init_llama(tmp_path / "base", size, 64, 1, 2, max_position=256,
                      tokenizer=AutoTokenizer.from_pretrained(str(tokenizer_dir)))
    permute_vocabulary(base, np.random.default_rng(0).permutation(size), tmp_path / "perm")
    docs = [t[:300] for t in stdlib_texts(max_files=60)][-5:]
    (tmp_path / "corpus.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))

    def mtkd(*args: object) -> str:
        result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    tokens = tmp_path / "tokens"
    mtkd("tokenize", tmp_path / "corpus.jsonl", "--tokenizer", tokenizer_dir, "--out", tokens,
         "--max-len", 64)
    for name, model in (("same", base), ("own", tmp_path / "perm")):
        mtkd("harvest", tokens, "--model", model, "--engine", "hf", "--dtype", "float32",
             "--out", tmp_path / name, "--k", 8)
    assert open_store(tmp_path / "own", TEACHER).attrs["tokenization"] == "own"
    printed = mtkd("aggregate", tmp_path / "same", tmp_path / "own", "--tokens", tokens,
                   "--out", tmp_path / "mixed")
    mtkd("aggregate", tmp_path / "same", "--tokens", tokens, "--out", tmp_path / "alone")
    mtkd("aggregate", tmp_path / "same", tmp_path / "same", "--tokens", tokens,
         "--out", tmp_path / "twice")
    eos = int(open_store(tokens, TOKENS).attrs["eos_id"])
    part = open_store(tokens, TOKENS).read_part(0)
    label = np.delete(part["token_ids"], part.offsets[:-1])
    mixed, alone, twice = (parts(tmp_path / n)[0] for n in ("mixed", "alone", "twice"))
    gap = mixed[COVERAGE] == 0b01
    assert (gap == (label == eos)).all() and gap.any()
    assert ((mixed[COVERAGE] == 0b11) | gap).all()
    for key in ("ids", "probs", "tail_mass"):
        np.testing.assert_array_equal(mixed[key][gap], alone[key][gap])
    vocab = size + 1
    dense = [np.zeros((len(t["ids"]), vocab)) for t in (mixed, twice)]
    for d, t in zip(dense, (mixed, twice), strict=True):
        rows = np.repeat(np.arange(len(t["ids"])), t["ids"].shape[1])
        keep = t["ids"].reshape(-1) >= 0
        d[rows[keep], t["ids"].reshape(-1)[keep]] = t["probs"].reshape(-1)[keep]
    np.testing.assert_allclose(dense[0][~gap], dense[1][~gap], atol=0.02)
    assert f"coverage 1.000 {1 - gap.mean():.3f}" in printed


def test_processes_do_not_change_a_cross_store(world):
    kw = {"weights": (0.4, 0.6), "token": "entropy"}
    one = run(world, "p1", ["same", "byte"], **kw)
    out = world["root"] / "out" / "p2"
    aggregate(world["tokens"], out, config([world["same"], world["byte"]], **kw), processes=2,
              progress=False)
    assert open_store(one).manifest["checksum"] == open_store(out).manifest["checksum"]
