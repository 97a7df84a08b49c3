"""The design lives in the repository: every citation of docs/architecture.md names a section it has."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ARCH = ROOT / "docs" / "architecture.md"


def _sections() -> set[str]:
    return set(re.findall(r"^## (\d+)\. ", ARCH.read_text(), flags=re.M))


def test_every_design_citation_names_a_section_of_docs_architecture():
    files = subprocess.check_output(["git", "ls-files", "*.py", "*.md"], cwd=ROOT, text=True).split()
    sections, cited, bad = _sections(), 0, []
    for name in files:
        text = (ROOT / name).read_text(encoding="utf-8")
        old = "DESIGN" + ".md"  # the out-of-repo design file the citations used to point at
        assert old not in text, f"{name} cites {old}, which is not in the repository"
        for m in re.finditer(r"docs/architecture\.md((?:,? ?§\d+)+)", text):
            for n in re.findall(r"§(\d+)", m.group(1)):
                cited += 1
                if n not in sections:
                    bad.append(f"{name}: §{n}")
    assert cited >= 10 and not bad, bad


def test_architecture_defines_the_rule_the_layers_the_engine_contract_and_the_decisions():
    text = ARCH.read_text()
    for heading in ("The visibility rule", "Layers, and where each concept lives", "The engine contract", "Decisions"):
        assert re.search(rf"^## \d+\. {re.escape(heading)}", text, flags=re.M), heading
    for term in ("kill_row", "Malformed streams", "prompt_len", "keep_last_block_for_answer"):
        assert term in text
