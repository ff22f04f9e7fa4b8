"""The README and the documentation site's pages (``docs/**/*.md``) as the tests read them: their code blocks."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
PAGES = [README, *sorted(DOCS.rglob("*.md"))]
# written on the line before a ```python block that needs the torchrec extra (tests/test_torchrec.py runs those)
TORCHREC = "<!-- torchrec -->"


def name(page: Path) -> str:
    """The page's path from the repository root, as a test id."""
    return page.relative_to(ROOT).as_posix()


def python_blocks(page: Path, torchrec: bool = False) -> list[str]:
    """The page's ```python blocks, in order: those marked as needing torchrec, or the others."""
    found = re.findall(rf"({re.escape(TORCHREC)}\n)?```python\n(.*?)```", page.read_text(), flags=re.DOTALL)
    return [block for marker, block in found if bool(marker) == torchrec]


def bash_blocks(page: Path) -> list[str]:
    """The page's ```bash blocks, in order."""
    return re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL)
