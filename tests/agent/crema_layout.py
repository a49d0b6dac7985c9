"""A small CREMA-D layout in a temp dir, built from the six real sample clips and the official tables.

The six real clips of actor 1001 are symlinked under the names of several real actors
(``{actor}_DFA_{EMO}_XX``); the official ``summaryTable.csv`` and ``VideoDemographics.csv`` are filtered
to those names and actors, and a small ``finishedResponses.csv``-style per-rater file is written. The
videos are the same six for every actor, so this exercises the corpus *plumbing* (reader, labels, splits,
training, export), not accuracy.
"""

from __future__ import annotations

import csv
from pathlib import Path

EMOTIONS = ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")
LETTERS = {"ANG": "A", "DIS": "D", "FEA": "F", "HAP": "H", "NEU": "N", "SAD": "S"}


def build_crema_layout(root: Path, sample: Path, *, per_sex: int = 6) -> list[int]:
    """Write the layout under ``root``; returns the actor ids used (``per_sex`` women and men).

    ``per_sex = 6`` is the smallest count for which the default split fractions give every split an actor.
    """
    root.mkdir(parents=True, exist_ok=True)
    with (sample / "VideoDemographics.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        rows = [r for r in reader if r["ActorID"] != "1001"]
    chosen = [r for sex in ("Female", "Male") for r in [x for x in rows if x["Sex"] == sex][:per_sex]]
    with (root / "VideoDemographics.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, quoting=csv.QUOTE_NONNUMERIC)
        writer.writeheader()
        writer.writerows(chosen)
    actors = [int(r["ActorID"]) for r in chosen]
    names = {f"{a}_DFA_{e}_XX" for a in actors for e in EMOTIONS}
    with (sample / "summaryTable.csv").open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        fields = list(reader.fieldnames or [])
        table = [r for r in reader if r["FileName"] in names]
    assert len(table) == len(names), "the official table lacks some of the chosen clip names"
    with (root / "summaryTable.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, quoting=csv.QUOTE_ALL)
        writer.writeheader()
        writer.writerows(table)
    clips = root / "VideoFlash"
    clips.mkdir()
    for a in actors:
        for e in EMOTIONS:
            (clips / f"{a}_DFA_{e}_XX.flv").symlink_to(sample / f"1001_DFA_{e}_XX.flv")
    # Per-rater responses: for each clip 3 face votes for its acted emotion, 2 for the next one, 1 voice vote.
    with (root / "finishedResponses.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["", "localid", "pos", "ans", "ttr", "queryType", "numTries", "clipNum", "questNum",
                         "subType", "clipName", "sessionNums", "respEmo", "respLevel", "dispEmo", "dispVal",
                         "dispLevel"])  # fmt: skip
        n = 0
        for a in actors:
            for i, e in enumerate(EMOTIONS):
                other = EMOTIONS[(i + 1) % len(EMOTIONS)]
                name = f"{a}_DFA_{e}_XX"
                for query, emo in [("2", e)] * 3 + [("2", other)] * 2 + [("1", other)]:
                    n += 1
                    writer.writerow([n, f"r{n}", 1, f"{LETTERS[emo]}_50", 3000, query, 1, n, 1, 1, name, 1,
                                     LETTERS[emo], 50, LETTERS[e], 50, "XX"])  # fmt: skip
    return actors
