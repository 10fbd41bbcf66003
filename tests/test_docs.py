"""The docs stay true (issue #25). The TPU tables of docs/planner.md are exactly what `benchmarks/tpu_table.py
--markdown` prints from benchmarks/tpu_table.jsonl, and docs/step-time.md's table what `benchmarks/step_time_table.py
--markdown` prints from benchmarks/step_time.jsonl; and every `python train.py ...` or `python -m gpt2_jax.<tool>
...` command in README.md and docs/*.md names only sub-commands and --flags that the tool's own argparse parser
has, so that a renamed flag fails here rather than in a reader's shell. Nothing runs: the parsers are only built.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2_jax import evaluate, export, plot, sample
from gpt2_jax.data import cli as data_cli
from gpt2_jax.plan import cli as plan_cli
from gpt2_jax.training import settings

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# The tools a page may name, each with its parser (the same function its main() parses with).
PARSERS = {
    "train.py": settings.build_parser,
    "gpt2_jax.data": data_cli.build_parser,
    "gpt2_jax.plan": plan_cli.build_parser,
    "gpt2_jax.evaluate": evaluate.build_parser,
    "gpt2_jax.sample": sample.build_parser,
    "gpt2_jax.export": export.build_parser,
    "gpt2_jax.plot": plot.build_parser,
}

COMMAND = re.compile(r"\bpython3? +(?:(train\.py)|-m +(gpt2_jax(?:\.\w+)*))(?=\s|$)")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
INLINE = re.compile(r"`([^`]+)`")
# Where a command ends on its line: a shell comment, the next command, a pipe.
END = re.compile(r"\s#|&&|\|\||;|\s\|\s")


def snippets(markdown: str) -> list[str]:
    """The shell lines of a page: each line of its fenced code blocks, with `\\` continuations joined, and each
    inline code span of the rest (a span may wrap onto the next line)."""
    lines = []
    for block in FENCE.findall(markdown):
        lines += re.sub(r"\\\n\s*", " ", block).splitlines()
    prose = FENCE.sub("", markdown)
    return lines + [" ".join(span.split()) for span in INLINE.findall(prose)]


def commands(markdown: str) -> list[tuple[str, list[str]]]:
    """(tool, words after it) for every train.py / gpt2_jax tool command of a page. Quoted arguments and
    <placeholders> become one word each (a `--` inside a prompt is no flag); [optional] flags count."""
    found = []
    for line in snippets(markdown):
        for m in COMMAND.finditer(line):
            rest = line[m.end():]
            rest = re.sub(r"\"[^\"]*\"|'[^']*'|<[^<>\s]*>", "ARG", rest).replace("[", " ").replace("]", " ")
            rest = END.split(rest, maxsplit=1)[0]
            found.append((m.group(1) or m.group(2), rest.split()))
    return found


def _option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return set(parser._option_string_actions)  # argparse has no public list of a parser's options


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def problems(markdown: str) -> list[str]:
    """What a page's commands name that their tool does not have: unknown tools, sub-commands and flags."""
    out = []
    for tool, words in commands(markdown):
        if tool not in PARSERS:
            out.append(f"python -m {tool}: no such tool (known: {', '.join(PARSERS)})")
            continue
        parser, name = PARSERS[tool](), tool
        subcommands = _subcommands(parser)
        for word in words:
            if word.startswith("--"):
                if (flag := word.split("=", 1)[0]) not in _option_strings(parser):
                    out.append(f"{name}: {flag}")
            elif subcommands:  # the first word that is not a flag picks the sub-command
                if word not in subcommands:
                    out.append(f"{tool}: no sub-command {word!r} (known: {', '.join(subcommands)})")
                    break
                parser, name, subcommands = subcommands[word], f"{tool} {word}", {}
    return out


def test_every_documented_command_uses_flags_its_tool_has():
    found = {page.relative_to(ROOT).as_posix(): problems(page.read_text()) for page in PAGES}
    assert {page: p for page, p in found.items() if p} == {}


def test_the_docs_name_every_tool():
    """The check above is not vacuous: the pages hold commands of every tool, many of them with flags."""
    found = [c for page in PAGES for c in commands(page.read_text())]
    assert {tool for tool, _ in found} == set(PARSERS)
    assert sum(word.startswith("--") for _, words in found for word in words) > 50


def test_an_invented_flag_or_sub_command_fails():
    page = "\n".join([
        "Run `python -m gpt2_jax.plan --target=v5e-8 --presets=gpt2` first.",
        "```bash",
        "python train.py --preset=gpt2 --data=DIR \\",
        "    --max_step=10 --out_dir=out   # --not_a_flag in a comment is no flag",
        'python -m gpt2_jax.sample --init_from=gpt2 --prompt "an --inside_a_prompt" [--top_p 0.9] [--top_q 0.9]',
        "python -m gpt2_jax.evaluate loss --limit 10 && python -m gpt2_jax.evaluate hellaswag --limit 10",
        "python -m gpt2_jax.evaluate accuracy --init_from=gpt2",
        "python -m gpt2_jax.data text a.txt --out d --val_fraction=0.1 --tokeniser char",
        "python -m gpt2_jax.train --preset=gpt2",
        "```",
    ])
    assert problems(page) == [
        "train.py: --max_step",  # on a continuation line
        "gpt2_jax.sample: --top_q",
        "gpt2_jax.evaluate loss: --limit",  # a flag of the other sub-command
        "gpt2_jax.evaluate: no sub-command 'accuracy' (known: loss, hellaswag)",
        "gpt2_jax.data text: --tokeniser",
        "python -m gpt2_jax.train: no such tool (known: " + ", ".join(PARSERS) + ")",
        "gpt2_jax.plan: --presets",  # an inline span in prose
    ]


def test_every_cli_main_parses_with_its_build_parser(monkeypatch):
    """The parsers checked above are the ones the tools run: each main() (train.py's parse_flags) rejects a
    made-up flag through its build_parser(), before it does any work."""
    built = []

    def counting(build):
        def build_and_count(*args, **kwargs):
            built.append(build)
            return build(*args, **kwargs)
        return build_and_count

    for module in (settings, data_cli, plan_cli, evaluate, sample, export, plot):
        monkeypatch.setattr(module, "build_parser", counting(module.build_parser))
    entries = [settings.parse_flags, data_cli.main, plan_cli.main, evaluate.main, sample.main, export.main, plot.main]
    for entry in entries:
        with pytest.raises(SystemExit) as e:
            entry(["--made_up_flag"])
        assert e.value.code == 2
    assert len(built) == len(entries)


def _benchmark(name: str):
    """The script benchmarks/NAME.py as a module (the benchmarks folder is no package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _generated(page: str, begin: str, end: str) -> str:
    """What docs/PAGE holds between its two marker comments, each there once."""
    text = (ROOT / "docs" / page).read_text()
    assert text.count(begin) == 1 and text.count(end) == 1, f"docs/{page}: each marker comment once"
    return text.split(begin)[1].split(end)[0]


@pytest.mark.parametrize("script", ["tpu_table", "step_time_table"])
def test_markdown_prints_the_tables_without_jax(script):
    """benchmarks/SCRIPT.py --markdown prints the page's table(s) from the stored rows, without importing JAX."""
    code = (f"import runpy, sys; sys.argv = ['{script}.py', '--markdown']; "
            f"runpy.run_path('benchmarks/{script}.py', run_name='__main__'); "
            f"assert 'jax' not in sys.modules, '{script}.py --markdown imported JAX'")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    module = _benchmark(script)
    assert r.stdout == module.markdown(module.read_rows(module.ROWS)) + "\n"


def test_planner_page_holds_the_generated_tpu_tables():
    tpu_table = _benchmark("tpu_table")
    held = _generated("planner.md", "<!-- tpu_table.py --markdown: begin -->", "<!-- tpu_table.py --markdown: end -->")
    assert held == "\n" + tpu_table.markdown(tpu_table.read_rows(tpu_table.ROWS)) + "\n", (
        "docs/planner.md's TPU tables differ from benchmarks/tpu_table.jsonl: paste the output of "
        "`python benchmarks/tpu_table.py --markdown` between the markers")
    # Every slice and size at both remat policies, each a searched row of the file.
    assert held.count("| fsdp:") == 2 * len(tpu_table.TARGETS) * len(tpu_table.SIZES)


def test_step_time_page_holds_the_generated_table():
    table = _benchmark("step_time_table")
    held = _generated("step-time.md", "<!-- step-time table: begin -->", "<!-- step-time table: end -->")
    rows = table.read_rows(table.ROWS)
    assert held == "\n" + table.markdown(rows) + "\n", (
        "docs/step-time.md's table differs from benchmarks/step_time.jsonl: paste the output of "
        "`python benchmarks/step_time_table.py --markdown` between the markers")
    # Every target once, in order, and each compiled with a command the page lists.
    assert [r["target"] for r in rows] == list(table.TARGETS)
    page = (ROOT / "docs" / "step-time.md").read_text()
    assert [r["command"] for r in rows if r["command"] not in page] == []


LINK = re.compile(r"\]\(([^()\s]+)\)")


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    """Every relative link of README.md and docs/*.md names a file that exists, and a #section that it has."""
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"[a-z]+://", target):
                continue
            path, _, section = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            if not linked.exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
            elif section and linked.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", FENCE.sub("", linked.read_text()), re.MULTILINE)
                if section not in {_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {target} (no such section)")
    assert broken == []
