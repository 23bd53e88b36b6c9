"""The trainer: objectives, exact resume after SIGKILL, DDP equivalence, a loadable student,
held-out bits per byte."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from tokenizers import Tokenizer
from typer.testing import CliRunner

from mtkd.cli import app
from mtkd.distill.train.config import TrainConfig
from mtkd.distill.train.loader import PackedLoader
from mtkd.distill.train.loop import train
from mtkd.distill.train.objective import LossSpec, batch_loss
from mtkd.distill.train.student import load_student, load_teacher, with_teacher_targets
from mtkd.store import StoreError, open_store

from .test_loader import write_targets, write_tokens

REPO = Path(__file__).resolve().parents[2]
STUDENT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def config(data: dict[str, str], out: Path, **kw: Any) -> TrainConfig:
    base: dict[str, Any] = dict(
        tokens=data["tokens"],
        targets=data["targets"],
        out=str(out),
        student=STUDENT,
        seq_len=64,
        batch_size=4,
        max_steps=12,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        eval_batches=2,
        eval_fraction=0.1,
        save_every=0,
        log_every=1,
        progress=False,
        threads=1,
        chunk_size=48,
        seed=3,
    )
    base.update(kw)
    if "eval_tokens" in kw:  # a held-out store instead of the split
        del base["eval_fraction"]
    if "warmup_steps" not in kw:  # no longer than the run
        base["warmup_steps"] = min(2, base["max_steps"])
    return TrainConfig.from_dict(base)


def metrics(out: Path, split: str = "train") -> list[dict[str, Any]]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def params(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "final" / "model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def write_config(cfg: TrainConfig, path: Path) -> Path:
    """``cfg`` as an ``mtkd train --config`` file: YAML keyed by TrainConfig field names."""
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    return path


def mtkd_train(cfg: Path) -> list[str]:
    """The arguments after ``python -m`` (or ``torchrun … -m``) that train from ``cfg``."""
    return ["mtkd", "train", "--config", str(cfg)]


def run_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def torchrun(cfg: Path, nproc: int = 2, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """``torchrun --nproc_per_node nproc -m mtkd train --config cfg`` on the CPU (gloo)."""
    exe = Path(sys.executable).with_name("torchrun")
    cmd = [str(exe), "--standalone", "--nproc_per_node", str(nproc)]
    proc = subprocess.run(
        [*cmd, "-m", *mtkd_train(cfg)],
        env=run_env(),
        capture_output=True,
        timeout=180,
    )
    assert proc.returncode == 0 or not check, proc.stderr.decode()[-3000:]
    return proc


# --------------------------------------------------------------------------------------------


def test_ce_run_learns_and_saves_a_loadable_student(data: dict[str, str], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "ce"
    res = train(config(data, out, objective="ce", targets=None, max_steps=25))
    losses = [r["loss"] for r in metrics(out)]
    assert len(losses) == 25 and np.mean(losses[-3:]) < losses[0] - 0.5
    assert res.steps == 25 and res.tokens > 0
    evals = metrics(out, "eval")
    assert evals[-1]["step"] == 25 and evals[-1]["eval_ce"] > 0 and "eval_kl" not in evals[-1]
    assert "eval_bpb" not in evals[-1]  # a tokens store without byte_end: no bits per byte
    assert "heldout_bpb" not in json.loads((out / "final_metrics.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(res.model_dir)
    tok = AutoTokenizer.from_pretrained(res.model_dir)
    ids = tok("def main(", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids.shape[1] + 5

    final = (out / "final_metrics.json").read_text()
    again = train(config(data, out, objective="ce", targets=None, max_steps=25))  # a requeue
    assert (out / "final_metrics.json").read_text() == final  # kept, not emptied
    assert again.steps == 25 and again.last_eval["eval_ce"] == evals[-1]["eval_ce"]
    assert len(metrics(out)) == 25
    with pytest.raises(ValueError, match="different options"):  # resume with other settings
        train(config(data, out, objective="ce", targets=None, max_steps=30, lr=1e-3))


def test_heldout_bits_per_byte_match_a_plain_forward(data: dict[str, str], tmp_path: Path) -> None:
    """Over a held-out store with ``byte_end``, ``mtkd train`` reports bits per byte beside
    nats per token (metrics.jsonl, final_metrics.json, its summary), equal to an independent
    count: Σ CE of a plain transformers forward over each window ÷ (ln 2 · the UTF-8 bytes of
    the windows' decoded text)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bpb"
    cfg = config(data, out, objective="ce", targets=None, max_steps=4,
                 eval_tokens=data["heldout"], eval_batches=None)
    shown = CliRunner().invoke(app, ["train", "--config",
                                     str(write_config(cfg, tmp_path / "cfg.yaml"))])
    assert shown.exit_code == 0, shown.output
    ev = metrics(out, "eval")[-1]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["heldout_bpb"] == ev["eval_bpb"] and final["heldout_ce"] == ev["eval_ce"]
    assert f"eval_bpb {ev['eval_bpb']:.4f}" in shown.output

    store = open_store(data["heldout"], "tokens")
    tok = Tokenizer.from_file(str(Path(store.attrs["tokenizer"]) / "tokenizer.json"))
    model = AutoModelForCausalLM.from_pretrained(out / "final", dtype=torch.float32).eval()
    rows = store.read(np.arange(store.num_sequences), ["token_ids"])
    nats, n_bytes, n_labels = 0.0, 0, 0
    with torch.no_grad():
        for ids in np.split(rows["token_ids"].astype(np.int64), rows.offsets[1:-1]):
            x = torch.from_numpy(ids)
            logits = model(x[None]).logits[0].double()
            nats += float(torch.nn.functional.cross_entropy(logits[:-1], x[1:], reduction="sum"))
            n_bytes += len(tok.decode(ids.tolist(), skip_special_tokens=True).encode("utf-8"))
            n_labels += len(ids) - 1
    assert ev["eval_ce"] == pytest.approx(nats / n_labels, rel=1e-5)
    assert ev["eval_bpb"] == pytest.approx(nats / (math.log(2) * n_bytes), rel=1e-5)


@pytest.mark.engine
def test_trained_student_generates_the_same_in_vllm(data: dict[str, str], tmp_path: Path) -> None:
    """The saved student loads in vLLM and its greedy continuation equals transformers'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import SamplingParams

    from mtkd.harvest.vllm_engine import VllmEngine

    res = train(config(data, tmp_path / "s", objective="ce", targets=None, max_steps=15))
    tok = AutoTokenizer.from_pretrained(res.model_dir)
    prompt = tok("import os\ndef main(", return_tensors="pt").input_ids
    model = AutoModelForCausalLM.from_pretrained(res.model_dir, dtype=torch.float32)
    want = model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :]
    engine = VllmEngine(res.model_dir, 1, dtype="float32", max_model_len=128, enforce_eager=True)
    try:
        params = SamplingParams(max_tokens=12, temperature=0.0, detokenize=False)
        got = engine.generate([prompt[0].numpy()], params)[0].outputs[0].token_ids
    finally:
        engine.close()
    assert len(got) > 0 and list(got) == want.tolist()[: len(got)]


def test_mix_and_multi_follow_the_same_path_for_forward_kl(
    data: dict[str, str], tmp_path: Path
) -> None:
    """For fkl and a linear mixture, L_multi − L_mix is the Jensen gap, a constant of the
    student: the two objectives log values that differ by it and train the same student."""
    outs = {}
    for objective in ("mix", "multi"):
        outs[objective] = tmp_path / objective
        train(config(data, outs[objective], objective=objective))
        rows = metrics(outs[objective])
        assert rows[-1]["loss"] < rows[0]["loss"]
        for r in rows:
            assert abs(r["l_multi"] - r["l_mix"] - r["jensen_gap"]) < 1e-4
        ev = metrics(outs[objective], "eval")[-1]
        assert abs(ev["eval_kl_multi"] - ev["eval_kl"]) > 0 and ev["eval_kl"] > 0
    a, b = metrics(outs["mix"]), metrics(outs["multi"])
    assert max(abs(x["l_mix"] - y["l_mix"]) for x, y in zip(a, b, strict=True)) < 1e-4
    # Adam magnifies rounding differences of near-zero gradients: compare gradients directly
    assert max_diff(params(outs["mix"]), params(outs["multi"])) < 1e-3
    tokens, targets = open_store(data["tokens"], "tokens"), open_store(data["targets"], "target")
    batch = next(
        PackedLoader(tokens, targets, seq_len=64, batch_size=4, teacher_blocks=True).stream()
    )
    model = load_student(STUDENT, 0, tokens)
    grads = []
    for objective in ("mix", "multi"):
        model.zero_grad()
        spec = LossSpec.from_config(config(data, outs[objective], objective=objective))
        batch_loss(model, batch, spec).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    scale = max(float(g.abs().max()) for g in grads[0].values())
    assert max_diff(*grads) < 1e-5 * scale


def test_online_teacher_gives_the_dense_kl(data: dict[str, str], tmp_path: Path) -> None:
    """With ``teacher`` the targets are the teacher's full softmax: the logged KD is the dense
    KL(p‖s) over the whole vocabulary, and training lowers it."""
    teacher_dir = train(
        config(data, tmp_path / "t", objective="ce", targets=None, max_steps=10)
    ).model_dir
    out = tmp_path / "s"
    train(config(data, out, objective="auto", targets=None, teacher=str(teacher_dir), max_steps=12))
    rows = metrics(out)
    assert rows[-1]["l_mix"] < 0.5 * rows[0]["l_mix"]

    tokens = open_store(data["tokens"], "tokens")
    batch = next(PackedLoader(tokens, None, seq_len=64, batch_size=4).stream())
    teacher = load_teacher(str(teacher_dir), torch.device("cpu"))
    student = load_student(STUDENT, 0, tokens)
    cfg = config(data, out, targets=None, teacher=str(teacher_dir), chunk_size=1024)
    spec = LossSpec.from_config(cfg)
    got = batch_loss(student, with_teacher_targets(batch, teacher), spec).kd
    with torch.no_grad():
        kw = {"input_ids": batch.input_ids, "position_ids": batch.position_ids, "use_cache": False}
        log_p = torch.log_softmax(teacher(**kw).logits.double(), -1)
        log_s = torch.log_softmax(student(**kw).logits.double(), -1)
    rows_kl = (log_p.exp() * (log_p - log_s)).sum(-1)
    want = rows_kl[batch.labels != -100].sum()
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="not both"):
        config(data, out, teacher=str(teacher_dir))


def test_resume_after_sigkill_is_exact(data: dict[str, str], tmp_path: Path) -> None:
    kw = dict(objective="multi", max_steps=60, alpha=0.2, loss="jsd_tail", temperature=1.5)
    straight = tmp_path / "straight"
    train(config(data, straight, **kw))

    killed = tmp_path / "killed"
    cfg = config(data, killed, save_every=5, keep_checkpoints=20, **kw)
    proc = subprocess.Popen(
        [sys.executable, "-m", *mtkd_train(write_config(cfg, tmp_path / "cfg.yaml"))],
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    first = killed / "checkpoints" / "step-00000005" / "state.pt"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert first.exists(), err.decode()[-2000:]
    assert not (killed / "final").exists()  # killed mid-run

    stale = killed / "checkpoints" / ".tmp-step-00000099-x"  # as a kill mid-write leaves it
    stale.mkdir()
    (stale / "state.pt").write_bytes(b"partial")
    res = train(cfg)
    assert res.resumed_from is not None and 5 <= res.resumed_from < 60
    assert not stale.exists()
    assert max_diff(params(straight), params(killed)) <= 1e-6
    a, b = metrics(straight), metrics(killed)
    assert [r["step"] for r in b] == list(range(1, 61))
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b, strict=True)) <= 1e-6


def test_ddp_two_ranks_match_one_process(data: dict[str, str], tmp_path: Path) -> None:
    """Global batch 4 three ways: one process; two accumulation steps of 2; two ranks of 2
    (held-out nats and bytes summed over the ranks give the same bits per byte)."""
    kw = dict(objective="mix", max_steps=8, alpha=0.3, eval_batches=None,
              eval_tokens=data["heldout"])
    single, accum = tmp_path / "single", tmp_path / "accum"
    train(config(data, single, batch_size=4, **kw))
    train(config(data, accum, batch_size=2, grad_accum=2, **kw))

    ddp = tmp_path / "ddp"
    run = torchrun(write_config(config(data, ddp, batch_size=2, **kw), tmp_path / "ddp.yaml"))
    assert b"broadcast_buffers" not in run.stderr  # torch's deprecation warning
    for other in (accum, ddp):
        a, b = metrics(single), metrics(other)
        assert len(a) == len(b) == 8
        for x, y in zip(a, b, strict=True):
            for key in ("loss", "l_mix", "l_multi", "ce", "jensen_gap"):
                assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
            assert x["tokens_seen"] == y["tokens_seen"]
        ea, eb = metrics(single, "eval")[-1], metrics(other, "eval")[-1]
        assert abs(ea["eval_ce"] - eb["eval_ce"]) < 1e-5
        assert abs(ea["eval_bpb"] - eb["eval_bpb"]) < 1e-5
        assert max_diff(params(single), params(other)) < 1e-5


def test_fsdp_two_ranks_match_one_process_and_resume(data: dict[str, str], tmp_path: Path) -> None:
    """Global batch 4 as one process, and as FSDP2 over two ranks × two accumulation steps of
    1 (each rank holds half of every parameter, gradient and Adam moment): the same losses,
    gradient norms (clipped on the shards) and model. The final student (tied embeddings, as
    small students often have) is a whole Hugging Face checkpoint, and a run killed after a
    checkpoint (mid logging window) resumes to it."""
    from transformers import AutoModelForCausalLM

    kw = dict(objective="mix", max_steps=8, alpha=0.3, eval_batches=None, grad_clip=0.5,
              log_every=2, student={**STUDENT, "tie_word_embeddings": True})
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    train(config(data, single, batch_size=4, **kw))
    cfg = config(data, sharded, batch_size=1, grad_accum=2, fsdp=True, save_every=3,
                 keep_checkpoints=5, **kw)
    torchrun(write_config(cfg, tmp_path / "fsdp.yaml"))
    a, b = metrics(single), metrics(sharded)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [2, 4, 6, 8]
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "l_mix", "l_multi", "ce", "jensen_gap", "grad_norm"):
            assert abs(x[key] - y[key]) < 1e-5, (key, x, y)
        assert x["tokens_seen"] == y["tokens_seen"]
    assert max(r["grad_norm"] for r in a) > 0.5  # clipping was active
    ea, eb = metrics(single, "eval")[-1], metrics(sharded, "eval")[-1]
    assert abs(ea["eval_ce"] - eb["eval_ce"]) < 1e-5
    # The ranks sum the same float32 gradients in another order (a reduce-scatter per
    # micro-batch, added up in the shards, against one batch of four): ~1e-7 relative. Adam
    # divides by √v, so near-zero gradients can turn that into a visible change of the update,
    # but each step moves a parameter by at most ≈ lr = 3e-3. Measured: 2–3e-6; the DDP
    # test's bound 1e-5.
    want = params(sharded)
    assert max_diff(params(single), want) < 1e-5
    model, info = AutoModelForCausalLM.from_pretrained(
        sharded / "final", dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert max_diff({k: model.state_dict()[k] for k in want}, want) == 0.0

    # Killed after the step-3 checkpoint: FSDP resumes from its full state, exactly.
    ckpts = sharded / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [f"step-0000000{i}" for i in (3, 6, 8)]
    state = torch.load(ckpts / "step-00000003" / "state.pt", weights_only=True)
    assert state["model"].keys() == model.state_dict().keys()  # unsharded, HF names
    for path in (ckpts / "step-00000006", ckpts / "step-00000008", sharded / "final"):
        shutil.rmtree(path)
    torchrun(write_config(cfg, tmp_path / "fsdp.yaml"))
    c = metrics(sharded)
    assert [r["step"] for r in c] == [2, 4, 6, 8]
    for x, y in zip(b, c, strict=True):
        assert {k: v for k, v in x.items() if k not in ("elapsed_s", "tokens_per_s")} == {
            k: v for k, v in y.items() if k not in ("elapsed_s", "tokens_per_s")
        }
    assert max_diff(params(sharded), want) <= 1e-6


def test_ranks_share_one_store_verification(data: dict[str, str], tmp_path: Path) -> None:
    """Rank 0 alone hashes the stores; a damaged file stops every rank (none waits forever)."""
    tokens = tmp_path / "tokens"
    shutil.copytree(data["tokens"], tokens)
    victim = max((p for p in (tokens / "parts").rglob("*") if p.is_file()), key=os.path.getsize)
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    cfg = config(data, tmp_path / "out", tokens=str(tokens), targets=None, objective="ce")
    proc = torchrun(write_config(cfg, tmp_path / "cfg.yaml"), check=False)
    err = proc.stderr.decode()
    assert proc.returncode != 0
    # only rank 0 hashes (and finds the damage); the other rank hears that it failed
    assert "checksum mismatch" in err, err
    assert "rank 0 failed to open it" in err, err


def test_bf16_autocast_runs(data: dict[str, str], tmp_path: Path) -> None:
    res = train(config(data, tmp_path / "bf16", bf16=True, max_steps=3, loss="rkl_tail"))
    assert res.steps == 3 and np.isfinite(res.last_log["loss"])


def test_refuses_a_student_with_a_smaller_vocabulary(data: dict[str, str], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        train(config(data, tmp_path / "v", student={**STUDENT, "vocab_size": 100}))


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="unknown train option"):
        TrainConfig.from_dict({"tokens": "t", "out": "o", "student": {}, "lr_max": 1})
    with pytest.raises(ValueError, match="needs a target store"):
        TrainConfig(tokens="t", out="o", student={}, objective="multi")
    cfg = TrainConfig.from_dict(
        {"tokens": "t", "out": "o", "student": "s", "max-steps": 5, "adam_betas": [0.9, 0.99]}
    )
    assert cfg.max_steps == 5 and cfg.resolved_objective == "ce"
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


def test_loss_spec_is_the_config_s_objective() -> None:
    """Training computes exactly the objective the options name; evaluation its fixed measure."""
    cfg = TrainConfig(tokens="t", out="o", student={}, targets="q", objective="mix",
                      loss="jsd_renorm", alpha=0.2, temperature=1.5, beta=0.3, chunk_size=7)
    assert LossSpec.from_config(cfg) == LossSpec("mix", "jsd_renorm", 0.2, 1.5, 0.3, 7, (), 1.0)
    safety = TrainConfig(tokens="t", out="o", student={}, chunk_size=7, suppress_ids=(3, 5),
                         suppress_weight=2.0)
    assert LossSpec.from_config(safety) == LossSpec("ce", "fkl_tail", 0.0, 1.0, 0.5, 7, (3, 5),
                                                    2.0)
    auto = TrainConfig(tokens="t", out="o", student={}, targets="q")
    assert LossSpec.from_config(auto).objective == "mix"
    assert LossSpec.held_out(False, 9) == LossSpec("ce", "fkl_tail", 0.0, 1.0, 0.5, 9, (), 0.0)


# ------------------------------------------------------------------------------- bad input


def cli_train(*args: object) -> tuple[int, str]:
    """``mtkd train ARGS`` in this process: (exit code, output); never a traceback."""
    result = CliRunner().invoke(app, ["train", *map(str, args)], env={"COLUMNS": "300"})
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        f"{result.exception!r} escaped: {result.output[-2000:]}")
    return result.exit_code, " ".join(result.output.split())


def test_a_run_directory_is_neither_a_store_nor_other_files(data: dict[str, str],
                                                            tmp_path: Path) -> None:
    """--out naming a store (--tokens and --out swapped), a directory of other files or a file
    is refused before anything is written there."""
    store = tmp_path / "tokens"
    shutil.copytree(data["tokens"], store)
    before = sorted(p.name for p in store.iterdir())
    with pytest.raises(ValueError, match=r"is an mtkd tokens store, not a run directory"):
        train(config(data, store, objective="ce", targets=None, max_steps=1))
    assert sorted(p.name for p in store.iterdir()) == before
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not a run directory \(it holds notes\.txt\)"):
        train(config(data, home, objective="ce", targets=None, max_steps=1))
    assert [p.name for p in home.iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    code, out = cli_train("--config", write_config(
        config(data, tmp_path / "file", objective="ce", targets=None), tmp_path / "c.yaml"))
    assert code == 1 and "is a file, not a run directory" in out


def test_student_config_mistakes_are_named(data: dict[str, str], tmp_path: Path) -> None:
    bad_type = tmp_path / "type.json"
    bad_type.write_text(json.dumps({**STUDENT, "vocab_size": "big"}))
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "broken.json").write_text('{"hidden_size": 64,')
    cases = {tmp_path / "missing.json": "no such file",
             tmp_path / "broken.json": "not valid JSON",
             tmp_path / "list.json": "must hold a JSON object of model config kwargs, got list",
             bad_type: "\"vocab_size\": \"big\""}
    for path, message in cases.items():
        code, out = cli_train("--tokens", data["tokens"], "--out", tmp_path / "run",
                              "--student-config", path, "--seq-len", 64, "--steps", 1)
        named = "error: student config {" if path == bad_type else f"error: --student-config {path}"
        assert code == 1 and named in out and message in out, out
        assert not (tmp_path / "run").exists()


def test_suppress_ids_are_token_ids_of_the_student(data: dict[str, str], tmp_path: Path) -> None:
    """Ids outside the vocabulary failed at the first step with an indexing traceback, after
    the run directory was written; 1.5 was taken as 1."""
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=r"suppress_ids \[99999\] are outside the student's "
                                         r"vocabulary of \d+ ids"):
        train(config(data, out, objective="ce", targets=None, suppress_ids=(3, 99999)))
    assert not out.exists()
    code, msg = cli_train("--tokens", data["tokens"], "--out", out, "--student", "s",
                          "--suppress-ids", "3,1.5")
    assert code == 2 and "--suppress-ids must be token ids (whole numbers ≥ 0)" in msg, msg


def test_the_final_student_replaces_a_partial_one_whole(data: dict[str, str],
                                                        tmp_path: Path) -> None:
    """``final/`` is written beside and renamed into place: a save killed half-way leaves no
    ``final/`` that looks complete, and what an earlier, interrupted save left is not kept."""
    from mtkd.distill.train.student import save_student

    model = load_student(STUDENT, 0, open_store(data["tokens"]))
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "final" / "model-00002-of-00002.safetensors").write_bytes(b"left by a killed save")
    (out / ".tmp-final-0123abcd").mkdir()  # a save killed before its rename
    final = save_student(model, out, open_store(data["tokens"]).attrs["tokenizer"])
    assert final == out / "final" and (final / "config.json").exists()
    assert not (final / "model-00002-of-00002.safetensors").exists()
    assert sorted(p.name for p in out.iterdir()) == ["final"]


def test_a_teacher_that_is_not_a_model_directory_is_named(data: dict[str, str],
                                                         tmp_path: Path) -> None:
    """--teacher naming no directory gave the hub's repo-id traceback."""
    student = tmp_path / "student.json"
    student.write_text(json.dumps(STUDENT))
    code, out = cli_train("--tokens", data["tokens"], "--out", tmp_path / "run",
                          "--student-config", student, "--seq-len", 64, "--steps", 1,
                          "--teacher", tmp_path / "nowhere")
    assert code == 1 and f"{tmp_path / 'nowhere'}: no config.json" in out, out
    assert not (tmp_path / "run").exists()


def test_a_tokens_store_with_nothing_to_train_on_writes_no_run(data: dict[str, str],
                                                               tmp_path: Path) -> None:
    """Refused at the first batch, after train_config.json and metrics.jsonl were written."""
    attrs = dict(open_store(data["tokens"]).attrs)
    empty = write_tokens(tmp_path / "empty", [np.array([1], np.int32)] * 3, attrs, parts=1)
    out = tmp_path / "run"
    with pytest.raises(StoreError, match=r"no sequences of ≥ 2 tokens to train on"):
        train(config(data, out, tokens=str(empty.root), targets=None, objective="ce"))
    assert not out.exists()


def test_a_non_forward_loss_on_sampled_targets_is_noted(data: dict[str, str], tmp_path: Path,
                                                         capfd: pytest.CaptureFixture[str]) -> None:
    """Sampled targets are unbiased for forward KL only: another loss trains towards the
    draws' empirical distribution, which the run says (it still trains)."""
    tokens = open_store(data["tokens"])
    sampled = tmp_path / "sampled"
    write_targets(sampled, tokens, int(tokens.attrs["vocab_size"]),
                  attrs={"config": {"source": "samples"}})
    for loss, noted in (("rkl_tail", True), ("fkl_tail", False)):
        train(config(data, tmp_path / loss, targets=str(sampled), loss=loss, max_steps=1))
        assert ("holds sampled targets" in capfd.readouterr().err) is noted
