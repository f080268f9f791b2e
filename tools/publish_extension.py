"""Write the publication settings into the files the ExtensionsIndex reads.

    python tools/publish_extension.py           # after filling in Resources/ExtensionsIndex/publication.json
    python tools/publish_extension.py --check   # exit 1, naming each difference, when the files disagree with it

The repository URL, homepage, icon and screenshot URLs come only from Resources/ExtensionsIndex/publication.json
("repository": null until the extension is published): this writes them into the top-level CMakeLists.txt and
Resources/ExtensionsIndex/MiM.json (see slicer_static.publication).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from slicer_static.publication import check_publication, publish

ROOT = Path(__file__).resolve().parents[1]
INDEX_ENTRY = ROOT / "Resources" / "ExtensionsIndex" / "MiM.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=ROOT, help="the extension's source folder (default: this one)")
    parser.add_argument("--check", action="store_true", help="only compare; change nothing")
    args = parser.parse_args(argv)
    index_json = args.root / INDEX_ENTRY.relative_to(ROOT)
    problems = check_publication(args.root, index_json) if args.check else publish(args.root, index_json)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
