"""Seeded demo data: daily partitions of messy support tickets, and a table of source files.

Tickets go to ``{root}/sources/support_tickets/date=YYYY-MM-DD/tickets.jsonl``; the same seed and
date always give the same file. Each day mixes short and long tickets, non-English text and emoji,
and a few records meant to be refused before any spend: an empty body, a missing ticket id, one
oversized body and a duplicated ticket id.

Source files for the weekly code audit go to ``{root}/sources/code_files/date=YYYY-MM-DD/files.jsonl``:
this repository's ``plugins/**/*.py`` as of the end of the week starting that date (git history;
the working tree without it), one row per file with its text, at most 40 files.

    python include/demo/generate_data.py --start 2026-11-01 --end 2026-11-07 --per-day 40 --root data
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

CHECKOUT_DIR = Path(__file__).resolve().parents[2]

PRODUCTS = [
    "Nimbus Router X2",
    "Atlas Desk App",
    "Pulse Smart Thermostat",
    "Orbit Cloud Backup",
    "Vela Earbuds",
]
CHANNELS = ["email", "chat", "web_form", "phone_transcript"]
TIERS = ["free", "pro", "enterprise"]
NAMES = ["Ana", "Björn", "Chloé", "Dmitri", "Eun-ji", "Farah", "Gustavo", "Hiroshi", "Ifeoma", "Jörg", "Zoë"]

# (category hint, subject templates, body templates); {p} = product, {n} = a number, {name} = a name.
TOPICS: list[tuple[str, list[str], list[str]]] = [
    (
        "billing",
        ["Charged twice for {p}", "Refund for order #{n}?", "Invoice shows wrong VAT"],
        [
            "Hi, I was charged twice this month for my {p} subscription (order #{n}). Please refund one.",
            "My invoice #{n} lists VAT at 25% but I'm in a 19% country. Can you reissue it? Thanks, {name}",
            "I cancelled {p} last week and still got billed €{n}.99 😡 This is the third time I write.",
        ],
    ),
    (
        "bug",
        ["{p} crashes on start", "Sync broken since update", "Error 0x{n} when saving"],
        [
            "Since the last update {p} crashes right after the splash screen. Reinstalling did not help.",
            "Getting error 0x{n} every time I save a file. Logs attached:\n"
            "```\nTraceback...\nKeyError: 'cfg'\n```",
            "The app freezes for ~{n} seconds whenever I open settings. Windows 11, latest version.",
        ],
    ),
    (
        "account",
        ["Can't log in", "Reset password link expired", "Delete my account"],
        [
            "The password reset link for my {p} account says expired immediately. Tried {n} times.",
            "Please delete my account and all my data (GDPR). Regards, {name}",
            "2FA codes are not arriving on my phone, I'm locked out of {p}.",
        ],
    ),
    (
        "feature_request",
        ["Dark mode please", "Export to CSV", "Feature idea for {p}"],
        [
            "Would love a dark mode in {p} 🌙 my eyes hurt at night.",
            "Could you add CSV export for the usage reports? We have {n} seats and need it monthly.",
            "It would be great if {p} could schedule backups at night instead of every hour.",
        ],
    ),
    (
        "shipping",
        ["Where is my {p}?", "Package arrived damaged", "Wrong item delivered"],
        [
            "Ordered {p} {n} days ago, tracking hasn't moved since Monday.",
            "The box was crushed and the {p} does not power on. Photos attached.",
            "I received a {p} but I ordered something else (order #{n}).",
        ],
    ),
    (
        "how_to",
        ["How do I pair {p}?", "Setting up on a second device", "Question about limits"],
        [
            "How do I pair the {p} with a second phone? The manual is not clear.",
            "Is there a limit on how many devices can use one {p} licence? We have {n}.",
            "¿Cómo puedo cambiar el idioma de {p} a español? Gracias.",
        ],
    ),
]

# Non-English or emoji-heavy bodies, to keep the pipeline honest about unicode.
UNICODE_BODIES = [
    "注文した{p}がまだ届きません。注文番号は{n}です。確認してください。",
    "Bonjour, mon {p} ne se connecte plus au Wi-Fi depuis la mise à jour. Pouvez-vous m'aider ?",
    "Guten Tag, die Rechnung für {p} ist doppelt abgebucht worden. Bitte um Rückerstattung. Grüße, {name}",
    "Привет! {p} перестал синхронизироваться после обновления.",
    "🔥🔥🔥 {p} overheats after {n} minutes 🔥🔥🔥 help!!!",
]

#: Characters in the oversized ticket body: far beyond any sensible single request.
OVERSIZED_CHARS = 400_000


def _fill(rng: random.Random, template: str) -> str:
    return template.format(p=rng.choice(PRODUCTS), n=rng.randint(2, 98_765), name=rng.choice(NAMES))


def _long_body(rng: random.Random) -> str:
    parts = [_fill(rng, body) for _, _, bodies in rng.sample(TOPICS, 3) for body in bodies]
    return "\n\n".join(["Long story, sorry.", *parts, "Anyway, please call me back."])


def generate_tickets(date: dt.date, per_day: int, seed: int) -> list[dict[str, Any]]:
    """The tickets of one day (deterministic for a given ``date`` and ``seed``)."""
    rng = random.Random(f"{seed}:{date.isoformat()}")
    day_start = dt.datetime.combine(date, dt.time(0, 0), tzinfo=dt.UTC)
    records: list[dict[str, Any]] = []
    for i in range(per_day):
        topic, subjects, bodies = rng.choice(TOPICS)
        roll = rng.random()
        if roll < 0.12:
            body = _fill(rng, rng.choice(UNICODE_BODIES))
        elif roll < 0.22:
            body = _long_body(rng)
        else:
            body = _fill(rng, rng.choice(bodies))
        records.append(
            {
                "ticket_id": f"T-{date:%Y%m%d}-{i:05d}",
                "created_at": (day_start + dt.timedelta(seconds=rng.randint(0, 86_399))).isoformat(),
                "channel": rng.choice(CHANNELS),
                "customer_tier": rng.choice(TIERS),
                "subject": _fill(rng, rng.choice(subjects)),
                "body": body,
                "topic_hint": topic,
            }
        )
    if per_day >= 10:
        # Records a careful pipeline refuses before spending anything.
        records[3]["body"] = ""
        records[5]["ticket_id"] = None
        records[7]["body"] = "x" * OVERSIZED_CHARS
        # A duplicate key: the same ticket exported twice (second copy slightly edited).
        dup = dict(records[1])
        dup["subject"] = dup["subject"] + " (resent)"
        records.append(dup)
    return records


def valid_ticket_ids(date: dt.date, per_day: int, seed: int) -> set[str]:
    """The ticket ids of a day that prepare accepts: present, unique, with a body under
    ``OVERSIZED_CHARS`` (the rest are rejected on purpose; tests check each side)."""
    records = generate_tickets(date, per_day, seed)
    counts: dict[str, int] = {}
    for r in records:
        counts[r["ticket_id"]] = counts.get(r["ticket_id"], 0) + 1
    return {
        r["ticket_id"]
        for r in records
        if r["ticket_id"] is not None
        and counts[r["ticket_id"]] == 1
        and (r["body"] or "").strip()
        and len(r["body"]) < OVERSIZED_CHARS
    }


def _local_dir(root: str | Path) -> Path:
    text = str(root)
    if text.startswith("file://"):
        text = text[len("file://") :]
    elif "://" in text:
        raise ValueError(f"the demo generator writes local files only, got {root}")
    return Path(text).expanduser().resolve()


def tickets_path(root: str | Path, date: dt.date) -> Path:
    return _local_dir(root) / "sources" / "support_tickets" / f"date={date.isoformat()}" / "tickets.jsonl"


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def write_tickets(root: str | Path, date: dt.date, per_day: int = 40, seed: int = 7) -> Path:
    """Write one day's tickets; return the file path."""
    return _write_jsonl(tickets_path(root, date), generate_tickets(date, per_day, seed))


def date_range(start: dt.date, end: dt.date) -> Iterator[dt.date]:
    day = start
    while day <= end:
        yield day
        day += dt.timedelta(days=1)


def code_files_path(root: str | Path, date: dt.date) -> Path:
    return _local_dir(root) / "sources" / "code_files" / f"date={date.isoformat()}" / "files.jsonl"


#: What the weekly audit reviews, relative to the repository, and how many files at most.
CODE_FILE_PATTERNS = ("plugins/**/*.py",)
MAX_CODE_FILES = 40
WEEK = dt.timedelta(days=7)


def _git(repo_dir: Path, *args: str) -> str | None:
    """``git -C repo_dir args`` stdout, or None when git or the repository is not there."""
    import subprocess

    try:
        proc = subprocess.run(
            ["git", "-C", str(repo_dir), *args],
            capture_output=True, encoding="utf-8", errors="replace", check=False, timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def _matches(path: str, patterns: tuple[str, ...]) -> bool:
    from fnmatch import fnmatchcase

    # fnmatch's ``*`` spans "/", so ``**/`` only has to match zero directories as well (plugins/x.py).
    return "__pycache__" not in path and any(
        fnmatchcase(path, p) or fnmatchcase(path, p.replace("**/", "")) for p in patterns
    )


def code_week_files(
    week: dt.date,
    repo_dir: Path = CHECKOUT_DIR,
    patterns: tuple[str, ...] = CODE_FILE_PATTERNS,
    max_files: int = MAX_CODE_FILES,
) -> list[dict[str, Any]]:
    """The source files of ``repo_dir`` as they were at the end of the week starting ``week``.

    With git history: the tree of the last commit before ``week + 7 days`` (00:00 UTC), the files
    changed by that week's commits first, then the others, each group by path, at most
    ``max_files``; no rows when the history starts after that week. Without git (an exported tree):
    the working tree's files by path (``revision`` "worktree", ``changed_this_week`` None). Same
    repository and week, same rows.
    """
    end = dt.datetime.combine(week + WEEK, dt.time(), tzinfo=dt.UTC)
    since = dt.datetime.combine(week, dt.time(), tzinfo=dt.UTC)
    has_history = _git(repo_dir, "rev-parse", "--verify", "-q", "HEAD") is not None
    revision = (_git(repo_dir, "rev-list", "-1", f"--before={end.isoformat()}", "HEAD") or "").strip()
    if has_history and not revision:
        return []  # the repository has no commit from before that week's end: nothing existed yet
    if revision:
        tree = _git(repo_dir, "ls-tree", "-r", "--name-only", revision) or ""
        log = _git(
            repo_dir, "log", f"--since={since.isoformat()}", f"--until={end.isoformat()}",
            "--name-only", "--format=", revision,
        ) or ""  # fmt: skip
        changed = {p for p in log.splitlines() if p}
        paths = sorted(p for p in tree.splitlines() if _matches(p, patterns))
        paths.sort(key=lambda p: p not in changed)  # stable: changed files first, each group by path

        def read(path: str) -> str | None:
            return _git(repo_dir, "show", f"{revision}:{path}")

        label: str = revision
    else:
        found = {f.relative_to(repo_dir).as_posix(): f for p in patterns for f in repo_dir.glob(p)}
        changed, paths, label = None, sorted(p for p in found if _matches(p, patterns)), "worktree"

        def read(path: str) -> str | None:
            return found[path].read_text(encoding="utf-8", errors="replace")

    records: list[dict[str, Any]] = []
    for path in paths:  # read lazily: only up to max_files files
        if len(records) == max_files:
            break
        text = read(path)
        if text is None or not text.strip():
            continue  # nothing to audit in an empty file
        records.append(
            {
                "path": path,
                "text": text,
                "n_lines": len(text.splitlines()),
                "language": "python",
                "revision": label,
                "changed_this_week": None if changed is None else path in changed,
            }
        )
    return records


def write_code_files(
    root: str | Path,
    date: dt.date,
    repo_dir: Path = CHECKOUT_DIR,
    patterns: tuple[str, ...] = CODE_FILE_PATTERNS,
    max_files: int = MAX_CODE_FILES,
) -> Path:
    """Write the weekly audit's input for the week starting ``date`` (``code_week_files``): one row
    per file with ``path``, ``text``, ``n_lines``, ``language``, ``revision``, ``changed_this_week``."""
    return _write_jsonl(code_files_path(root, date), code_week_files(date, repo_dir, patterns, max_files))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--start", type=dt.date.fromisoformat, required=True)
    parser.add_argument("--end", type=dt.date.fromisoformat, help="inclusive; default = start")
    parser.add_argument("--per-day", type=int, default=40)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--root", default=str(CHECKOUT_DIR / "data"), help="storage root (local path)")
    parser.add_argument("--code-files", action="store_true", help="also write the code-audit file table")
    args = parser.parse_args(argv)
    for day in date_range(args.start, args.end or args.start):
        print(write_tickets(args.root, day, args.per_day, args.seed))
        if args.code_files:
            print(write_code_files(args.root, day))


if __name__ == "__main__":
    main()
