"""README.md names only files that are in the repository."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
#: A path-like token: letters, digits and ``._-/``, with at least one ``/`` or a file extension.
TOKEN = re.compile(r"(?<![\w./-])([\w.-]+(?:/[\w.-]*)+|[\w-]+\.(?:py|md|yaml|yml|toml|txt|jsonl|png|svg|pdf|cfg))(?![\w/-])")


def repo_paths(text: str) -> set[str]:
    """Tokens of ``text`` that point into the repository: link targets, and names whose first component is a
    top-level entry of it.

    Paths of a user's run (``RUN/...``, ``densitune-demo/...``) and of files the user brings start with
    names the repository does not have, so they are not taken.
    """
    top = {p.name for p in ROOT.iterdir() if p.name not in (".git", ".venv", "build")}
    fenced = re.compile(r"^```[^\n]*\n(.*?)^```", flags=re.S | re.M)
    spans = fenced.findall(text)
    prose = fenced.sub("", text)
    spans += re.findall(r"`([^`\n]+)`", prose)
    # a link or image target is a repository path unless it is a URL
    found = {t for t in re.findall(r"\]\(([^)#\s]+)\)", prose) if not re.match(r"[a-z]+:", t)}
    for span in spans:
        for tok in TOKEN.findall(span):
            tok = tok.rstrip(".")
            if tok.split("/")[0] in top or (("/" not in tok) and tok in top):
                found.add(tok)
    return found


def test_every_repository_path_in_the_readme_exists():
    paths = repo_paths((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len(paths) > 20  # the README does point into the repository (Layout, Methods, ...)
    missing = sorted(p for p in paths if not (ROOT / p).exists())
    assert not missing, f"README.md names files that are not in the repository: {missing}"


def test_the_check_finds_a_missing_file():
    assert repo_paths("see `search/no_such_module.py` and [fig](docs/none.png); `RUN/models/x` is a run's") == {
        "search/no_such_module.py", "docs/none.png"}
