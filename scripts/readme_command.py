"""Prints the README's command marked `<!-- command: NAME -->` (the code block right after the marker): .ci/run runs
the README's commands exactly as a newcomer pastes them."""
from __future__ import annotations

import re
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def command(name: str, text: str) -> str:
    match = re.search(rf"<!-- command: {re.escape(name)} -->\s*```[a-z]*\n(.*?)\n```", text, re.S)
    if match is None:
        raise SystemExit(f"README.md has no command marked <!-- command: {name} -->")
    return match.group(1).strip()


if __name__ == "__main__":
    print(command(sys.argv[1], README.read_text()))
