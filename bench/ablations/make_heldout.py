"""Write the held-out text of the ablations: two books of the King James Bible (1611, public domain).

    apt-get install bible-kjv          # Debian's `bible` program and its KJV text (package bible-kjv-text)
    python3 bench/ablations/make_heldout.py

Writes `bench/ablations/data/kjv_genesis_john.jsonl.gz` (committed, so the ablations need no install):
one document per chapter, `{"title": "Genesis 1", "text": ...}`, verse numbers removed and each verse on
its own line. The text is not in the training corpus (the bundled Shakespeare) and is of the same period
of English, so its loss measures generalisation beyond the training works rather than a change of language.
"""
from __future__ import annotations

import gzip
import json
import pathlib
import re
import subprocess

OUT = pathlib.Path(__file__).resolve().parent / "data" / "kjv_genesis_john.jsonl.gz"
BOOKS = [("Genesis", "Ge1:1-Ge50:26"), ("John", "Joh1:1-Joh21:25")]


def chapters(book: str, spec: str) -> list[dict]:
    try:
        raw = subprocess.run(["bible", spec], capture_output=True, text=True, check=True).stdout
    except FileNotFoundError:
        raise SystemExit("the `bible` program is missing: apt-get install bible-kjv") from None
    docs, verses, title = [], [], None
    for line in raw.splitlines():
        head = re.fullmatch(rf"{book} (\d+)", line.strip())
        if head:
            if verses:
                docs.append({"title": title, "text": "\n".join(verses) + "\n"})
            title, verses = f"{book} {head.group(1)}", []
        elif re.match(r"\s+\d+ ", line):                # a new verse: "  12 And ..."
            verses.append(line.strip().split(" ", 1)[1])
        elif line.strip():                               # a verse's continuation line
            verses[-1] += " " + line.strip()
    docs.append({"title": title, "text": "\n".join(verses) + "\n"})
    return docs


def main() -> None:
    docs = [d for book, spec in BOOKS for d in chapters(book, spec)]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with gzip.GzipFile(OUT, "wb", mtime=0) as f:
        f.write("".join(json.dumps(d) + "\n" for d in docs).encode())
    chars = sum(len(d["text"]) for d in docs)
    print(f"wrote {OUT}: {len(docs)} chapters, {chars:,} characters")


if __name__ == "__main__":
    main()
