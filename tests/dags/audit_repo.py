"""A small git repository of this project's own source files with two weeks of history (for the
weekly code audit's tests): week 1 adds three files, week 2 edits one, deletes one and adds one."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from pathlib import Path

from tests.dags.conftest import REPO_ROOT

WEEK_1 = dt.date(2026, 11, 9)  # Mondays: the audit's partitions
WEEK_2 = dt.date(2026, 11, 16)
PKG = "plugins/anthropic_batch"
UNCHANGED, EDITED, DELETED, ADDED = (
    f"{PKG}/{n}" for n in ("status.py", "links.py", "cancel.py", "partition.py")
)
EDIT = (
    "\n\ndef _unused_helper(values):\n    return sum(values) / len(values)  # empty list: ZeroDivisionError\n"
)


def _git(repo: Path, *args: str, when: dt.datetime | None = None) -> None:
    env = {**os.environ}
    if when is not None:
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = when.isoformat()
    subprocess.run(
        ["git", "-C", str(repo), "-c", "user.name=audit", "-c", "user.email=audit@example.com", *args],
        check=True, capture_output=True, env=env,
    )  # fmt: skip


def _copy(repo: Path, path: str) -> None:
    (repo / path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO_ROOT / path, repo / path)


def make_audit_repo(repo: Path) -> Path:
    """Create the repository at ``repo``: one commit in each week (Tuesday noon UTC)."""
    repo.mkdir(parents=True)
    _git(repo, "init", "-q", "-b", "main")
    for path in (UNCHANGED, EDITED, DELETED):
        _copy(repo, path)
    (repo / "README.md").write_text("not audited\n")
    (repo / PKG / "empty.py").write_text("\n")  # nothing to audit: left out
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "week 1", when=dt.datetime(2026, 11, 10, 12, tzinfo=dt.UTC))
    with (repo / EDITED).open("a", encoding="utf-8") as handle:
        handle.write(EDIT)
    (repo / DELETED).unlink()
    _copy(repo, ADDED)
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "week 2", when=dt.datetime(2026, 11, 17, 12, tzinfo=dt.UTC))
    return repo
