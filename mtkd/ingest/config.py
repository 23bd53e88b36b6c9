"""The tokenize stage's options: the only home of their defaults, help texts and bounds."""

from __future__ import annotations

from dataclasses import dataclass

from mtkd.config import check_bounds, option


@dataclass(frozen=True)
class TokenizeConfig:
    """How a corpus is cut into token windows; every worker of one tokens store must agree."""

    max_len: int = option(2048, "Tokens per sequence window.", min=2)
    overlap: int = option(0, "Tokens shared by adjacent windows (less than max_len).", min=0)
    text_field: str = option("text", "jsonl/parquet field holding the text.")
    task_field: str | None = option(None, "Field holding a task tag.")
    task: str = option("", "Task tag for documents without one.")
    pattern: str = option("*", "File-name glob inside directories.")
    exclude: tuple[str, ...] = option((), "Skip directory entries matching this glob.")
    strict: bool = option(False, "Refuse the corpus at the first bad document.")
    add_eos: bool = option(True, "End every document with the tokenizer's EOS token.")
    byte_offsets: bool = option(
        True,
        "Keep each window's text and where each token ends in it (meta text/byte_start, array "
        "byte_end): what a teacher with another tokenizer reads. Refused for a tokenizer whose "
        "tokens do not spell the text (a normalizer, WordPiece): --no-byte-offsets then.",
    )

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.overlap >= self.max_len:
            raise ValueError(f"overlap must be in [0, max_len), got {self.overlap}")
