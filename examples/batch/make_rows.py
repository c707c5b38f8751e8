"""Write N rows (default 1,000) for the `lfm batch` worked example: entries of the demo model's own corpus (Python's
standard-library documentation), one JSON object per line: {"id": qualified name, "text": the entry, cut at 400
characters}. Deterministic: every k-th document of the corpus in its fixed order.

    python examples/batch/make_rows.py -n 1000 -o docs.jsonl
"""

from __future__ import annotations

import argparse
import itertools
import json

from lfm.train.demo.corpus import iter_documents


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=1000)
    p.add_argument("-o", "--output", default="docs.jsonl")
    p.add_argument("--every", type=int, default=6, help="take every k-th document (spread over the library)")
    a = p.parse_args()
    docs = (d for i, d in enumerate(iter_documents()) if i % a.every == 0)
    with open(a.output, "w", encoding="utf-8") as f:
        for d in itertools.islice(docs, a.n):
            f.write(json.dumps({"id": d["name"], "text": d["text"][:400]}, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
