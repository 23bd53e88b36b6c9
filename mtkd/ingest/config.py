"""The tokenize stage's options: the only home of their defaults and bounds."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TokenizeConfig:
    max_len: int = 2048
    overlap: int = 0
    text_field: str = "text"
    task_field: str | None = None
    task: str = ""
    pattern: str = "*"
    exclude: tuple[str, ...] = ()
    strict: bool = False
    add_eos: bool = True

    def __post_init__(self) -> None:
        if self.max_len < 2:
            raise ValueError(f"max_len must be at least 2, got {self.max_len}")
        if not 0 <= self.overlap < self.max_len:
            raise ValueError(f"overlap must be in [0, max_len), got {self.overlap}")
