"""Where a command writes: ``check_out`` checks ``--out`` (and a database directory) before
any work."""

from __future__ import annotations

from pathlib import Path


def check_out(out: Path, db: Path | None = None) -> None:
    """Before any compute: ``out`` (and ``db``) must be, or be creatable as, directories
    optbrain can write (nothing is created here)."""
    import tempfile

    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is an existing file; pass a directory")
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise ValueError(f"--out {out} cannot be created: {base} is a file")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as e:
        raise ValueError(f"--out {out} is not writable ({base}: {e.strerror or e})") from None
    if db is not None:
        from ..budget.database import check_database_dir

        check_database_dir(db)
