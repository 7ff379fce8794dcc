"""The weekly code audit's input: this repository's source files as of the end of a week."""

from __future__ import annotations

import json
import math

from demo.generate_data import code_files_path, code_week_files, write_code_files

from tests.dags.audit_repo import ADDED, DELETED, EDIT, EDITED, UNCHANGED, WEEK_1, WEEK_2, make_audit_repo
from tests.dags.conftest import REPO_ROOT


def test_a_week_is_the_tree_at_its_end_with_that_weeks_changes_first(tmp_path):
    repo = make_audit_repo(tmp_path / "repo")
    week_1 = code_week_files(WEEK_1, repo)
    assert [r["path"] for r in week_1] == sorted([UNCHANGED, EDITED, DELETED])  # README, empty file left out
    assert all(r["changed_this_week"] for r in week_1)

    week_2 = code_week_files(WEEK_2, repo)
    # Changed that week first (by path), then the unchanged files; the deleted one is gone.
    assert [(r["path"], r["changed_this_week"]) for r in week_2] == [
        (EDITED, True), (ADDED, True), (UNCHANGED, False),
    ]  # fmt: skip
    by_path = {r["path"]: r for r in week_2}
    assert by_path[EDITED]["text"].endswith(EDIT)  # the file as it was at the end of the week
    assert by_path[UNCHANGED]["text"] == (REPO_ROOT / UNCHANGED).read_text(encoding="utf-8")
    assert by_path[EDITED]["n_lines"] == len(by_path[EDITED]["text"].splitlines())
    assert len({r["revision"] for r in week_2}) == 1 and week_2[0]["revision"] != week_1[0]["revision"]

    assert code_week_files(WEEK_2, repo) == week_2  # deterministic
    assert code_week_files(WEEK_1.replace(day=2), repo) == []  # before the history starts
    assert [r["path"] for r in code_week_files(WEEK_2, repo, max_files=2)] == [EDITED, ADDED]


def test_without_git_the_working_tree_is_used(tmp_path):
    tree = tmp_path / "export"
    (tree / "plugins" / "pkg").mkdir(parents=True)
    (tree / "plugins" / "top.py").write_text("x = 1\n")
    (tree / "plugins" / "pkg" / "b.py").write_text("y = 2\nz = 3\n")
    (tree / "plugins" / "pkg" / "__pycache__").mkdir()
    (tree / "plugins" / "pkg" / "__pycache__" / "b.py").write_text("junk\n")
    (tree / "other.py").write_text("not matched\n")
    rows = code_week_files(WEEK_1, tree)
    assert [(r["path"], r["n_lines"], r["revision"], r["changed_this_week"]) for r in rows] == [
        ("plugins/pkg/b.py", 2, "worktree", None),
        ("plugins/top.py", 1, "worktree", None),
    ]


def test_written_table_is_the_pipelines_source(tmp_path):
    repo = make_audit_repo(tmp_path / "repo")
    path = write_code_files(f"file://{tmp_path / 'data'}", WEEK_2, repo_dir=repo)
    assert path == code_files_path(tmp_path / "data", WEEK_2)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert rows == code_week_files(WEEK_2, repo)
    assert set(rows[0]) >= {"path", "text", "n_lines"}  # what prompts/code_audit.j2 uses


def test_the_rubric_is_long_enough_to_be_cached_for_the_audit_model():
    from anthropic_batch.pipeline_config import INCLUDE_DIR, PIPELINES_DIR, load_pipeline

    config = load_pipeline(PIPELINES_DIR / "weekly_code_audit.yaml")
    assert config.system_prompt == "prompts/code_audit_rubric.md"  # prepare reads the file
    rubric = (INCLUDE_DIR / config.system_prompt).read_text(encoding="utf-8").strip()
    assert config.model == "claude-sonnet-4-6"
    # The emulator's count (ceil(utf8 bytes / 4)) of the system prompt alone, with a margin over
    # the model's minimum cacheable prefix of 1,024 tokens.
    assert math.ceil(len(rubric.encode("utf-8")) / 4) >= 1300
    for heading in ("## What to look for", "## Severity", "## What not to report", "## Output rules"):
        assert heading in rubric


def test_this_repositorys_own_files_for_the_week_of_its_last_commit():
    import datetime as dt
    import subprocess

    proc = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "log", "-1", "--format=%cs"], capture_output=True, text=True
    )
    last = dt.date.fromisoformat(proc.stdout.strip()) if proc.returncode == 0 else dt.date(2026, 11, 30)
    rows = code_week_files(last - dt.timedelta(days=last.weekday()))  # that week's Monday
    assert 0 < len(rows) <= 40
    assert all(
        r["path"].startswith("plugins/") and r["path"].endswith(".py") and r["text"].strip() for r in rows
    )
    assert "plugins/anthropic_batch/pricing.py" in {r["path"] for r in rows}
