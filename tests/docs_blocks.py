"""Docs that run: find the shell blocks of README.md and docs/*.md and execute the runnable ones.

Every fenced shell block (```bash, ```sh, ```shell) has a marker on the line right above it:

    <!-- run: [model=tiny] [sub=NAME,...] [timeout=SECONDS] -->
    <!-- norun: why the tests cannot run it -->

A document's `run` blocks are executed in order, the way a user pastes them into a fresh
terminal in the project folder: each block in its own `bash -eEuo pipefail` process (shell
variables do not carry over from one block to the next; files and background processes do).
The project folder is a scratch copy of this checkout, with `.venv` linked to the environment
the tests run in and `../shared/data` linked to the corpora, so the documented paths hold. The
environment is that of a new shell: the venv is not on PATH, `FEDSPALLM_DATA` is unset,
`FLWR_HOME` and Flower's local-simulation ports are private to the run. Marker options:

- ``model=tiny``: the embedded ``smollm2-135m`` is a tiny random LLaMA (``FEDSPALLM_CACHE``
  points at a cache holding it), so documented commands take seconds instead of minutes;
- ``sub=NAME,...``: the literal replacements ``SUBSTITUTIONS[NAME]``, each of which must occur
  in the block (a stale one fails), none adding or removing lines;
- ``timeout=SECONDS``: the block's limit (default 120 s).

A command that fails, fails the test with the file and line of that command in the document.
Every process the blocks started, detached ones included, is ended when the document is done.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy_helpers import REPO_ROOT, VENV_BIN, ProcessRegistry, free_port, tail

SHELL_LANGUAGES = {"bash", "sh", "shell"}
DEFAULT_TIMEOUT_S = 120
RUN_OPTIONS = {"model", "sub", "timeout"}
NOT_RUN_HEADING = "Commands in these docs that the tests do not run"
NOT_RUN_DOC = "docs/deployment.md"

# The main job of the README on the tiny model, with small settings (its --run-config).
QUICK_RUN_CONFIG = "model='{tiny_model}' nsamples=8 seqlen=64 eval-max-windows=4"

SUBSTITUTIONS: dict[str, tuple[tuple[str, str], ...]] = {
    # the tests run in the environment setup.sh made: running it again would reinstall it
    "setup": (("scripts/setup.sh && ", ""),),
    # the README's main job: tiny model and small settings, passed on to `flwr run`
    "quick-run": (
        (
            "scripts/run_simulation.sh ",
            f'scripts/run_simulation.sh --run-config "{QUICK_RUN_CONFIG}" ',
        ),
    ),
    # `fedspallm eval` scores whole test splits (minutes on 2 cores): the first 8 windows here
    "eval-windows": (("fedspallm eval ", "fedspallm eval --max-windows 8 "),),
    # the README's test command: collect the suite (running it from inside itself would recurse)
    "collect": (("-m pytest -q", "-m pytest -q --collect-only"),),
    # the loopback walk-through: its folder inside the scratch folder, ports that are free
    "scratch": (("/tmp/fedspallm-try", "{scratch}/fedspallm-try"),),
    "ports": (
        ("-p 9093", "-p {link_port}"),
        ("127.0.0.1:9093", "127.0.0.1:{link_port}"),
        ("-p 919$i", "-p $(({node_port} + i))"),
    ),
}

# The script's first line (so that script line n is block line n - 1): a failing command writes
# its status and line number to $DOCS_BLOCK_ERR (the outermost, i.e. the block's, writes last).
ERR_TRAP = """trap 'echo "$? $LINENO" >"$DOCS_BLOCK_ERR"' ERR\n"""

_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
_MARKER = re.compile(r"^<!--\s*(run|norun):(.*?)-->\s*$")


class DocBlockError(AssertionError):
    """A documented command failed, timed out, or its block is marked wrongly."""


@dataclass(frozen=True)
class Block:
    """One fenced shell block of a document and its marker."""

    doc: str  # path relative to the repository, e.g. "docs/deployment.md"
    line: int  # line of the opening fence (1-based)
    code: str
    heading: str  # the nearest heading above the block
    kind: str | None  # "run", "norun" or None (no marker)
    marker: str  # the marker's text after "run:" / "norun:"

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def first_command(self) -> str:
        """The first line that is not the venv activation, without comment or continuation."""
        lines = [s for s in self.code.splitlines() if s.strip() and not s.startswith(". .venv")]
        return re.sub(r"(\s+#\s.*)?\s*\\?$", "", lines[0] if lines else "").strip()

    def options(self) -> dict[str, str]:
        """The `run` marker's options; DocBlockError on anything the harness does not know."""
        opts = {}
        for token in shlex.split(self.marker):
            key, sep, value = token.partition("=")
            if not sep or key not in RUN_OPTIONS:
                raise DocBlockError(f"{self.where}: unknown run option {token!r}")
            opts[key] = value
        if opts.get("model", "tiny") != "tiny":
            raise DocBlockError(f"{self.where}: model={opts['model']!r} (only model=tiny)")
        if not opts.get("timeout", "1").isdigit():
            raise DocBlockError(f"{self.where}: timeout must be whole seconds")
        for name in filter(None, opts.get("sub", "").split(",")):
            if name not in SUBSTITUTIONS:
                raise DocBlockError(f"{self.where}: unknown substitution {name!r}")
        return opts


def doc_files(root: Path = REPO_ROOT) -> list[Path]:
    """The documents whose shell blocks are checked: README.md and docs/*.md."""
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def shell_blocks(path: Path, root: Path = REPO_ROOT) -> list[Block]:
    """Every fenced shell block of the Markdown file `path`, in order."""
    doc = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, heading, i = [], "", 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence:
            if lines[i].startswith("#"):
                heading = lines[i].lstrip("#").strip()
            i += 1
            continue
        end = next((j for j in range(i + 1, len(lines)) if lines[j] == fence.group(1)), len(lines))
        if fence.group(2) in SHELL_LANGUAGES:
            marker = _MARKER.match(lines[i - 1]) if i else None
            blocks.append(
                Block(
                    doc=doc,
                    line=i + 1,
                    code="\n".join(lines[i + 1 : end]) + "\n",
                    heading=heading,
                    kind=marker.group(1) if marker else None,
                    marker=marker.group(2).strip() if marker else "",
                )
            )
        i = end + 1
    return blocks


def not_run_table(blocks: list[Block]) -> list[str]:
    """The Markdown table rows that list the `norun` blocks (what NOT_RUN_DOC must hold)."""
    rows = ["| where | block | why it is not run |", "| --- | --- | --- |"]
    for b in blocks:
        if b.kind == "norun":
            command = b.first_command.replace("|", "\\|")
            rows.append(f"| {b.doc} § {b.heading} | `{command}` | {b.marker} |")
    return rows


def _free_port_run(count: int) -> int:
    """A port `p` such that p+1 .. p+count are free on 127.0.0.1 right now."""
    for _ in range(50):
        base = free_port()
        try:
            for port in range(base + 1, base + count + 1):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        return base
    raise RuntimeError(f"no run of {count} free ports found")


def _copy_checkout(dest: Path) -> None:
    """This checkout's files as git sees them, new ones included: no venv, outputs or keys."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
            cwd=REPO_ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        skip = shutil.ignore_patterns(".git", ".venv", "runs", "outputs", "pruned-*", "*cache*")
        shutil.copytree(REPO_ROOT, dest, ignore=skip, symlinks=True)
        return
    for rel in filter(None, listed.split("\0")):
        if (REPO_ROOT / rel).is_file():  # a deleted tracked file is still listed
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / rel, dest / rel)


@dataclass
class DocSession:
    """One document's runnable blocks, run in order in one scratch copy of the project."""

    scratch: Path
    data_dir: Path
    tiny_model: Path
    registry: ProcessRegistry = field(init=False)
    repo: Path = field(init=False)
    values: dict[str, str] = field(init=False)
    sim_ports: tuple[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.repo = self.scratch / "repo"
        _copy_checkout(self.repo)
        (self.repo / ".venv").symlink_to(Path(sys.prefix), target_is_directory=True)
        (self.scratch / "shared").mkdir()
        (self.scratch / "shared" / "data").symlink_to(self.data_dir.resolve())
        models = self.scratch / "tiny-cache" / "models"
        models.mkdir(parents=True)
        (models / "smollm2-135m").symlink_to(self.tiny_model.resolve())
        (self.scratch / "blocks").mkdir()
        self.registry = ProcessRegistry(log_dir=self.scratch / "blocks")
        self.values = {
            "scratch": str(self.scratch),
            "tiny_model": str(self.tiny_model.resolve()),
            "link_port": str(free_port()),
            "node_port": str(_free_port_run(3)),
        }
        self.sim_ports = (str(free_port()), str(free_port()))  # `flwr run`'s local SuperLink

    def __enter__(self) -> DocSession:
        return self

    def __exit__(self, *exc: object) -> None:
        survivors = self.registry.stop_all()
        assert not survivors, f"processes survived the docs run: {survivors}"

    def env(self, block: Block) -> dict[str, str]:
        """A new user's shell: no venv on PATH, no FEDSPALLM_DATA, Flower state in scratch."""
        drop = ("FEDSPALLM_DATA", "FEDSPALLM_CACHE", "VIRTUAL_ENV", "PYTHONPATH", "FLWR_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        venv_bin = VENV_BIN.resolve()
        path = [p for p in env.get("PATH", "").split(os.pathsep) if Path(p).resolve() != venv_bin]
        env.update(
            PATH=os.pathsep.join(path),
            PYTHONPATH=str(self.repo),  # the code under test is the copy, not an installed one
            FLWR_HOME=str(self.scratch / "flwr-home"),
            FLWR_TELEMETRY_ENABLED="0",
            FLWR_DISABLE_UPDATE_CHECK="1",
            FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
            FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=self.sim_ports[0],
            FLWR_LOCAL_CONTROL_API_PORT=self.sim_ports[1],
        )
        if block.options().get("model") == "tiny":
            env["FEDSPALLM_CACHE"] = str(self.scratch / "tiny-cache")
        return env | {"DOCS_BLOCK_ERR": str(self._err_file(block))}

    def _err_file(self, block: Block) -> Path:
        """Where the block's ERR trap writes the status and line of the failing command."""
        return self.scratch / "blocks" / (re.sub(r"\W", "-", block.where) + ".err")

    def script(self, block: Block) -> str:
        """The block with its substitutions applied, line for line."""
        code = block.code
        for name in filter(None, block.options().get("sub", "").split(",")):
            for old, new in SUBSTITUTIONS[name]:
                if old not in code:
                    raise DocBlockError(f"{block.where}: substitution {name!r}: {old!r} not found")
                code = code.replace(old, new.format(**self.values))
        assert code.count("\n") == block.code.count("\n"), "a substitution changed the lines"
        return code

    def run(self, block: Block) -> None:
        """Run one block; DocBlockError names the failing command's file and line."""
        err = self._err_file(block)
        name = err.stem
        path = err.with_suffix(".sh")
        path.write_text(ERR_TRAP + self.script(block))
        timeout = int(block.options().get("timeout", DEFAULT_TIMEOUT_S))
        managed = self.registry.start(
            name, ["bash", "-eEuo", "pipefail", str(path)], self.env(block), cwd=self.repo
        )
        try:
            status = managed.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired as timed_out:
            self.registry.kill(managed, signal.SIGKILL)
            raise DocBlockError(
                f"{block.where}: block did not finish within {timeout} s\n{tail(managed.log)}"
            ) from timed_out
        if status == 0:
            return
        where, text = block.where, block.first_command
        lineno = int(err.read_text().split()[1]) - 1 if err.exists() else 0  # in the block
        if 1 <= lineno <= block.code.count("\n"):
            where, text = f"{block.doc}:{block.line + lineno}", block.code.splitlines()[lineno - 1]
        raise DocBlockError(
            f"{where}: exited with status {status}: {text.strip()}\n"
            f"(block {block.where} run in {self.repo})\n{tail(managed.log)}"
        )
