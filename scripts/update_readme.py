"""Paste generated result tables into README.md and the docs/ pages that gather several (sinks.md, mixed.md).

Every `<!-- BEGIN name -->` ... `<!-- END name -->` block of those pages is replaced by docs/name.md, a file written
by a command (`hf-svdkv eval --markdown`, `hf-svdkv bench --markdown`, scripts/gpu_check.py), so no figure in the
README is typed by hand. Run it after re-running those commands:

    python scripts/update_readme.py
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- BEGIN (?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- END (?P=name) -->)", re.DOTALL)


PAGES = ("README.md", "docs/sinks.md", "docs/mixed.md")


def main() -> int:
    missing: list[str] = []
    for page in PAGES:
        fill_page(ROOT / page, missing)
    for path in missing:
        print(f"not found, block left as it was: {path}", file=sys.stderr)
    return 1 if missing else 0


def fill_page(page: Path, missing: list[str]) -> None:
    text = page.read_text(encoding="utf-8")

    def fill(match: re.Match) -> str:
        source = ROOT / "docs" / f"{match['name']}.md"
        if not source.is_file():
            missing.append(str(source))
            return match[0]
        return match[1] + source.read_text(encoding="utf-8").rstrip("\n") + "\n" + match[4]

    page.write_text(BLOCK.sub(fill, text), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
