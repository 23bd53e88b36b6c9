"""How big the demo is: the model shapes, the three teachers and the two demo sizes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelShape:
    """A small Llama: its depth, width and attention heads."""

    layers: int
    hidden: int
    heads: int

    def config(self, vocab_size: int, max_len: int) -> dict[str, Any]:
        """The Hugging Face config of this shape (what ``mtkd train --student-config`` reads)."""
        return {"model_type": "llama", "vocab_size": vocab_size, "hidden_size": self.hidden,
                "intermediate_size": 4 * self.hidden, "num_hidden_layers": self.layers,
                "num_attention_heads": self.heads, "num_key_value_heads": self.heads,
                "max_position_embeddings": 2 * max_len, "tie_word_embeddings": False}


@dataclass(frozen=True)
class Teacher:
    """One teacher: its shape, the seeded share of the corpus it sees, and whether it is the
    safety teacher (trained to give the unsafe tokens low probability)."""

    name: str
    shape: ModelShape
    data_fraction: float
    seed: int
    temperature: float
    safety: bool = False


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: ``small`` is the default run, ``tiny`` the CI smoke run."""

    vocab_size: int
    seq_len: int
    heldout_every: int  # one file in this many is held out
    teacher_steps: int
    teacher_batch: int
    student_tokens: int  # the student's (deliberately small) training budget, in corpus tokens
    student_steps: int
    student_batch: int
    heldout_tokens: int
    max_files: int | None
    teachers: tuple[Teacher, ...]
    student: ModelShape = ModelShape(2, 128, 4)
    #: held-out evaluations of each student, the last at its end (the report's curves; each
    #: costs a student ≈ 1.6 s of its ≈ 45 s on 2 cores)
    student_evals: int = 2
    k: int = 64
    lr: float = 2e-3
    #: the cross teacher's own byte-level BPE (same corpus, another vocabulary size)
    cross_vocab_size: int = 3072
    #: bfloat16 autocast for every model the demo trains, where bf16 matmuls are native
    #: (float32 master weights; elsewhere the demo trains in float32)
    bf16: bool = True


TEACHERS = (  # one cost, different shapes and data: each sees its own seeded 70% of the corpus
    Teacher("t0-narrow", ModelShape(2, 256, 4), 0.7, 1, 1.0),
    Teacher("t1-wide", ModelShape(2, 320, 5), 0.7, 2, 1.0),
    Teacher("t2-safety", ModelShape(2, 256, 4), 0.7, 3, 1.0, safety=True),
)

SIZES = {
    "small": DemoSize(vocab_size=2048, seq_len=256, heldout_every=12, teacher_steps=150,
                      teacher_batch=8, student_tokens=80_000, student_steps=200,
                      student_batch=8, heldout_tokens=60_000, max_files=None, teachers=TEACHERS),
    "tiny": DemoSize(vocab_size=512, seq_len=128, heldout_every=10, teacher_steps=30,
                     teacher_batch=4, student_tokens=20_000, student_steps=30, student_batch=4,
                     heldout_tokens=8_000, max_files=80, k=16, cross_vocab_size=768,
                     teachers=tuple(Teacher(t.name, ModelShape(1, 64, 2), t.data_fraction, t.seed,
                                            t.temperature, t.safety) for t in TEACHERS),
                     student=ModelShape(1, 64, 2)),
}
