"""Docs that run: every shell block of README.md and docs/*.md is executed or listed as not run.

The harness is `docs_blocks.py`; a failing documented command fails here with its file:line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from deploy_helpers import REPO_ROOT
from docs_blocks import (
    NOT_RUN_DOC,
    NOT_RUN_HEADING,
    Block,
    DocBlockError,
    DocSession,
    doc_files,
    not_run_table,
    shell_blocks,
)

BLOCKS = [block for path in doc_files() for block in shell_blocks(path)]
RUN_DOCS = sorted({b.doc for b in BLOCKS if b.kind == "run"})


def test_every_shell_block_is_marked_run_or_norun() -> None:
    unmarked = [b.where for b in BLOCKS if b.kind is None]
    assert not unmarked, (
        f"shell blocks without <!-- run: ... --> or <!-- norun: why -->: {unmarked}"
    )
    assert all(b.marker for b in BLOCKS if b.kind == "norun"), "a norun marker needs its reason"
    for block in BLOCKS:
        if block.kind == "run":
            block.options()  # raises on an unknown option or substitution


def test_the_docs_list_every_block_that_is_not_run() -> None:
    expected = not_run_table(BLOCKS)
    text = (REPO_ROOT / NOT_RUN_DOC).read_text(encoding="utf-8").split(f"## {NOT_RUN_HEADING}")
    assert len(text) == 2, f"{NOT_RUN_DOC} needs the section '## {NOT_RUN_HEADING}'"
    section = text[1].split("\n## ")[0]
    listed = [line for line in section.splitlines() if line.startswith("|")]
    assert listed == expected, "update the table in {}:\n{}".format(
        NOT_RUN_DOC, "\n".join(expected)
    )


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUN_DOCS)
def test_documented_commands_run(
    doc: str, tmp_path: Path, data_dir: Path, tiny_llama_dir: Path
) -> None:
    """The document's runnable blocks, in order, each as pasted into a fresh shell."""
    with DocSession(tmp_path, data_dir, tiny_llama_dir) as session:
        for block in BLOCKS:
            if block.doc == doc and block.kind == "run":
                session.run(block)


def _doc(tmp_path: Path, body: str) -> list[Block]:
    path = tmp_path / "broken.md"
    path.write_text(body)
    return shell_blocks(path, root=tmp_path)


def test_a_wrong_flag_fails_with_the_file_and_line_of_its_command(
    tmp_path: Path, data_dir: Path, tiny_llama_dir: Path
) -> None:
    blocks = _doc(
        tmp_path,
        "# Broken\n\nText.\n\n<!-- run: model=tiny -->\n```bash\n. .venv/bin/activate\n"
        "fedspallm fetch-model smollm2-135m\nfedspallm prune --no-such-flag 1 \\\n"
        "    --out pruned\necho never\n```\n",
    )
    with DocSession(tmp_path / "scratch", data_dir, tiny_llama_dir) as session:
        with pytest.raises(DocBlockError, match=r"^broken\.md:9: exited with status 2: fedspallm"):
            session.run(blocks[0])


def test_blocks_share_files_not_variables_and_leave_no_process_behind(
    tmp_path: Path, data_dir: Path, tiny_llama_dir: Path
) -> None:
    blocks = _doc(
        tmp_path,
        "<!-- run: -->\n```bash\nX=1; echo made > made.txt\nsleep 300 &\n"
        "setsid sleep 300 > /dev/null 2>&1 &\n```\n"
        '<!-- run: -->\n```bash\ntest -f made.txt && test -z "${X:-}"\n```\n'
        "<!-- run: timeout=2 -->\n```bash\nsleep 60\n```\n",
    )
    with pytest.raises(DocBlockError, match=r"^broken\.md:12: block did not finish within 2 s"):
        with DocSession(tmp_path / "scratch", data_dir, tiny_llama_dir) as session:
            session.run(blocks[0])
            session.run(blocks[1])
            session.run(blocks[2])
    assert not session.registry.tagged(), "a background process of a block survived"
