"""The product speaks of what things are, never of the tracker they came from: no file in the repository (code,
tests, bench output, saved results, docs) mentions an issue by number. Targets are stated as the figures they are
and sets are named for what they measure."""
from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ISSUE_NUMBER = re.compile(r"\bissue[ _-]?#?\d+", re.IGNORECASE)


def _repository_files() -> list[str]:
    """Tracked files and new files git does not ignore, relative to the root."""
    if shutil.which("git") is None or not os.path.exists(os.path.join(ROOT, ".git")):
        pytest.skip("not a git checkout: the scan lists files with git")
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout
    return sorted({p for p in out.decode().split("\0") if p and os.path.isfile(os.path.join(ROOT, p))})


def _text(path: str) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8)."""
    with open(os.path.join(ROOT, path), "rb") as f:
        data = f.read()
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


@pytest.mark.parametrize("text", ["see " + "issue" + " 12", "Issue" + " 2's targets", "the " + "issue" + "2 set",
                                  "ISSUE" + "_2", "issue" + " #15", "issue" + "-3"])
def test_the_pattern_finds_issue_numbers(text):
    assert ISSUE_NUMBER.search(text)


@pytest.mark.parametrize("text", ["an issue with 12 codes", "issues", "tissue 12", "reissued 3 times"])
def test_the_pattern_leaves_ordinary_words(text):
    assert not ISSUE_NUMBER.search(text)


def test_no_file_mentions_an_issue_number():
    found = []
    for path in _repository_files():
        text = _text(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            match = ISSUE_NUMBER.search(line)
            if match:
                found.append(f"{path}:{number}: {match.group(0)!r} in {line.strip()[:120]}")
    assert not found, "name things by what they are, not by the issue they came from:\n" + "\n".join(found)
