"""The standard library corpus: one listing of its files for the demo, the tests and the bench."""

from __future__ import annotations

from mtkd.recipes.stdlib_corpus import stdlib_files, stdlib_root, stdlib_texts


def test_files_are_sorted_and_leave_out_tests_and_third_party_packages() -> None:
    root = stdlib_root()
    files = stdlib_files()
    assert files == sorted(files) and len(files) > 100
    for path in files:
        parts = path.relative_to(root).parts
        assert path.suffix == ".py"
        assert "site-packages" not in parts and not any(p.startswith("test") for p in parts)
    assert stdlib_files(7) == files[:7]


def test_top_level_files_are_those_of_the_root_only() -> None:
    top = stdlib_files(top_level=True)
    assert top and all(p.parent == stdlib_root() for p in top)
    assert set(top) <= set(stdlib_files())


def test_texts_stop_at_max_chars() -> None:
    texts = list(stdlib_texts(max_files=12, max_chars=60_000))
    assert sum(map(len, texts)) == 60_000
    first = stdlib_files(1, top_level=True)[0]
    assert texts[0] == first.read_text(encoding="utf-8", errors="replace")[:60_000]
    assert len(list(stdlib_texts(max_files=3))) == 3
