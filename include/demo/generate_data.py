"""Seeded demo data: daily partitions of messy support tickets, and a table of source files.

Tickets go to ``{root}/sources/support_tickets/date=YYYY-MM-DD/tickets.jsonl``; the same seed and
date always give the same file. Each day mixes short and long tickets, non-English text and emoji,
and a few records meant to be refused before any spend: an empty body, a missing ticket id, one
oversized body and a duplicated ticket id.

Source files for the weekly code audit go to ``{root}/sources/code_files/date=YYYY-MM-DD/files.jsonl``
(one row per ``*.py`` file of a source tree, with its text).

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


def write_code_files(
    root: str | Path,
    date: dt.date,
    source_dir: Path = CHECKOUT_DIR / "plugins" / "anthropic_batch",
    max_files: int | None = None,
) -> Path:
    """Write the table of ``*.py`` files under ``source_dir`` (path, n_lines, text) for one date."""
    files = sorted(p for p in source_dir.rglob("*.py") if "__pycache__" not in p.parts)
    if max_files is not None:
        files = files[:max_files]
    records = []
    for file in files:
        text = file.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue  # nothing to audit in an empty file
        records.append(
            {
                "path": file.relative_to(source_dir.parent).as_posix(),
                "language": "python",
                "n_lines": text.count("\n") + 1,
                "text": text,
            }
        )
    return _write_jsonl(code_files_path(root, date), records)


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
