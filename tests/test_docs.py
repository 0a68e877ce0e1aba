"""The documentation cannot rot: every Python code block in ``docs/`` is executed.

Conventions (documented in ``docs/writing-docs.md``):

- A fence whose info string starts with ``python`` or ``py`` is run. The blocks of one page run in
  order in one namespace (a page is a story: later blocks use what earlier ones defined), in a fresh
  temporary working directory that is also on ``sys.path``. A ``DDNWarning`` is an error: an
  example that expects one catches it explicitly.
- A Python block with a title, ```` ```python title="my_nodes.py" ````, is also written to that file
  in the working directory first, so that later blocks and the command line can import it.
- A page that tells the reader to paste its blocks into one file (``PASTED``: the tutorial) is
  run that way instead: its untitled Python blocks, in order, make one script, each titled block
  is saved as the file it names beside it, and ``python <script>`` runs in a fresh process in
  that folder (a ``DDNWarning`` is an error there too), followed by the page's command lines.
- Other fences (``text``, ``bash``, ``console``, ...) are not run, except that a line of a ``bash``
  block that starts with ``python -m ddnlib`` is run in the page's working directory after all of
  the page's Python blocks, and must exit with status 0.
- Every public name of ``ddnlib``, ``ddnlib.nodes`` and ``ddnlib.testing`` has a ``::: module.name``
  entry in ``docs/api.md`` (or ``::: module.sub.name`` for a name the module re-exports lazily).
- The plot scripts of ``docs/scripts/`` run and make exactly the figures the node reference shows.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from ddnlib.errors import DDNWarning

DOCS = Path(__file__).resolve().parent.parent / "docs"
_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>[^`]*)$")
_TITLE = re.compile(r"""title\s*=\s*["']([^"']+)["']""")


@dataclass
class Block:
    """One fenced code block: its language, title, first line (1-based) and source."""

    lang: str
    title: str | None
    line: int
    source: str


def code_blocks(text: str) -> list[Block]:
    """The fenced code blocks of a Markdown text, dedented to their fence's indentation."""
    blocks, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        indent, fence, info = opening["indent"], opening["fence"], opening["info"].strip()
        body, j = [], i + 1
        while j < len(lines):
            closing = _FENCE.match(lines[j])
            if (closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence)
                    and not closing["info"].strip()):
                break
            body.append(lines[j][len(indent):] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        lang = info.split()[0].lstrip(".").lower() if info else ""
        title = _TITLE.search(info)
        blocks.append(Block(lang, title[1] if title else None, i + 2, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _is_python(block: Block) -> bool:
    return block.lang in ("python", "py")


def _cli_lines(block: Block) -> list[str]:
    if block.lang != "bash":
        return []
    return [s.strip() for s in block.source.splitlines() if s.strip().startswith("python -m ddnlib")]


PAGES = sorted(DOCS.rglob("*.md"))
PASTED = [DOCS / "tutorial.md"]  # "paste the blocks into one file": run as a reader would


def test_parser_finds_blocks_and_titles():
    text = ("intro\n```python\na = 1\n```\n\n!!! note\n    ```py title=\"m.py\"\n    b = 2\n    ```\n"
            "```text\nnot run\n```\n````bash\npython -m ddnlib gradcheck m:N\n````\n")
    blocks = code_blocks(text)
    assert [(b.lang, b.title, b.line) for b in blocks] == [
        ("python", None, 3), ("py", "m.py", 8), ("text", None, 11), ("bash", None, 14)]
    assert blocks[1].source == "b = 2\n"
    assert [_is_python(b) for b in blocks] == [True, True, False, False]
    assert _cli_lines(blocks[3]) == ["python -m ddnlib gradcheck m:N"]


def test_docs_have_python_blocks():
    assert PAGES, f"no Markdown pages under {DOCS}"
    pages = [code_blocks(page.read_text(encoding="utf-8")) for page in PAGES]
    assert any(_is_python(b) for blocks in pages for b in blocks), \
        "no page has a Python code block: the collector would test nothing"


IN_PROCESS = [p for p in PAGES if p not in PASTED]


@pytest.mark.parametrize("page", IN_PROCESS, ids=[str(p.relative_to(DOCS)) for p in IN_PROCESS])
def test_page_code_runs(page: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    blocks = code_blocks(page.read_text(encoding="utf-8"))
    python = [b for b in blocks if _is_python(b)]
    commands = [c for b in blocks for c in _cli_lines(b)]
    if not python and not commands:
        pytest.skip("no executable code on this page")
    pytest.importorskip("matplotlib").use("Agg")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    namespace: dict = {"__name__": f"docs_{page.stem.replace('-', '_')}"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DDNWarning)
        for block in python:
            if block.title:
                (tmp_path / block.title).write_text(block.source, encoding="utf-8")
                sys.modules.pop(Path(block.title).stem, None)  # not a stale copy from another run
                importlib.invalidate_caches()
            # Pad so that tracebacks name the Markdown file and its line numbers.
            code = compile("\n" * (block.line - 1) + block.source, str(page), "exec")
            exec(code, namespace)
    for command in commands:
        result = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path,
                                capture_output=True, text=True, timeout=300,
                                env=_env_with_path(tmp_path))
        assert result.returncode == 0, (
            f"{page.name}: `{command}` exited with {result.returncode}\n"
            f"{result.stdout}\n{result.stderr}")


@pytest.mark.parametrize("page", PASTED, ids=[p.name for p in PASTED])
def test_pasted_page_runs_as_one_script(page: Path, tmp_path: Path):
    blocks = code_blocks(page.read_text(encoding="utf-8"))
    pasted = []
    for block in filter(_is_python, blocks):
        if block.title:  # "saved as my_nodes.py": a file of its own, not part of the script
            (tmp_path / block.title).write_text(block.source, encoding="utf-8")
        else:
            pasted.append(f"# {page.name}, line {block.line}\n{block.source}")
    script = tmp_path / f"{page.stem}.py"
    script.write_text("\n".join(pasted), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["MPLBACKEND"] = "Agg"
    result = subprocess.run([sys.executable, "-W", "error::ddnlib.errors.DDNWarning", script.name],
                            cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, f"{script} (pasted from {page.name}):\n{result.stderr}"
    for command in (c for b in blocks for c in _cli_lines(b)):
        ran = subprocess.run([sys.executable, *shlex.split(command)[1:]], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300, env=env)
        assert ran.returncode == 0, f"{page.name}: `{command}`\n{ran.stdout}\n{ran.stderr}"


def test_the_tutorial_says_how_to_paste_it():
    text = " ".join((DOCS / "tutorial.md").read_text(encoding="utf-8").split())
    titled = [b.title for b in code_blocks((DOCS / "tutorial.md").read_text(encoding="utf-8"))
              if b.title]
    assert titled == ["my_nodes.py"]
    assert "paste the Python blocks, in order, into one file" in text
    assert "save as `my_nodes.py` next to it" in text


def _two_commands(text: str) -> list[str]:
    """The ``pip install`` command lines of the "The two commands" section of a page."""
    section = text.split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for b in code_blocks(section) if b.lang == "bash"
            for line in b.source.splitlines() if line.startswith("pip install")]


def test_the_getting_started_page_names_the_readme_commands():
    readme = (DOCS.parent / "README.md").read_text(encoding="utf-8")
    index = (DOCS / "index.md").read_text(encoding="utf-8")
    assert len(_two_commands(readme)) == 2
    assert _two_commands(index) == _two_commands(readme)


def _env_with_path(path: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path), env.get("PYTHONPATH")]))
    return env


_API_ENTRY = re.compile(r"^:::\s*([\w.]+)", re.MULTILINE)


@pytest.mark.parametrize("module", ["ddnlib", "ddnlib.nodes", "ddnlib.testing"])
def test_api_reference_lists_every_public_name(module: str):
    mod = pytest.importorskip(module)
    documented = set(_API_ENTRY.findall((DOCS / "api.md").read_text(encoding="utf-8")))
    # A name re-exported lazily (module __getattr__) may be documented at its home submodule.
    missing = [name for name in getattr(mod, "__all__", [])
               if not any(entry == f"{module}.{name}"
                          or (entry.startswith(f"{module}.") and entry.endswith(f".{name}"))
                          for entry in documented)]
    assert not missing, f"docs/api.md lacks `::: {module}.<name>` entries for {missing}"


SCRIPTS = DOCS / "scripts"


@pytest.mark.parametrize("script, figures", [
    ("plot_penalties.py", {f"penalty_{name}.png" for name in (
        "quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic", "general")}),
    ("plot_projections.py", {"projections.png"}),
])
def test_plot_scripts_make_the_figures_the_pages_show(script: str, figures: set, tmp_path: Path):
    pytest.importorskip("matplotlib")
    spec = importlib.util.spec_from_file_location(script.removesuffix(".py"), SCRIPTS / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.OUT = tmp_path if module.OUT.suffix == "" else tmp_path / module.OUT.name
    module.main()
    assert {p.name for p in tmp_path.iterdir()} == figures
    page = (DOCS / "nodes.md").read_text(encoding="utf-8")
    shown = set(re.findall(r"\]\(img/([\w.]+\.png)\)", page))
    assert figures <= shown, f"nodes.md does not show {sorted(figures - shown)}"
    assert all((DOCS / "img" / name).is_file() for name in figures), "figures not committed"
