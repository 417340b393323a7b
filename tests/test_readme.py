"""README.md stays true: the commands it shows parse, its links resolve, docs/README.md indexes docs/.

Hermetic and fast: one subprocess imports torch once and runs every module the README shows with
`--help` (runpy, argparse exits before any work), then every flag the README passes to a module
must appear in that module's help. `bash speedrun_rag.sh --flag` lines are checked against the
script's own option parser. No model, KB or network is touched.
"""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = ROOT / "docs"
OUR_PACKAGES = {"scripts", "kb_tools", "tasks", "bench", "nanochat"}
README_MAX_BYTES = 20_000

# one process, every module's --help: argparse prints the help and raises SystemExit(0)
_HELP_RUNNER = r"""
import contextlib, io, json, runpy, sys
out = {}
for mod in sys.argv[1:]:
    buf = io.StringIO()
    argv = sys.argv
    sys.argv = [mod, "--help"]
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
            runpy.run_module(mod, run_name="__main__", alter_sys=True)
        out[mod] = {"ok": False, "help": buf.getvalue(), "error": "--help did not exit"}
    except SystemExit as e:
        out[mod] = {"ok": e.code in (0, None), "help": buf.getvalue(), "error": f"exit {e.code}"}
    except BaseException as e:
        out[mod] = {"ok": False, "help": buf.getvalue(), "error": f"{type(e).__name__}: {e}"}
    finally:
        sys.argv = argv
print("\n@@HELP@@" + json.dumps(out))
"""


def _readme_text():
    return README.read_text(encoding="utf-8")


def _code_lines(text):
    """Command lines the README shows: fenced bash/sh/plain blocks and inline `...` spans.
    Backslash continuations are joined and trailing `# comments` dropped."""
    lines = []
    for lang, body in re.findall(r"```([a-z]*)\n(.*?)```", text, flags=re.S):
        if lang in ("python",):
            continue
        body = re.sub(r"\\\n\s*", " ", body)
        lines += body.splitlines()
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    lines += re.findall(r"`([^`\n]+)`", prose)
    return [re.sub(r"\s+#.*$", "", line).strip() for line in lines]


def module_invocations(text):
    """[(module, [flags])] for every `python -m pkg.mod ...` / `torchrun ... -m pkg.mod ...`."""
    found = []
    for line in _code_lines(text):
        for m in re.finditer(r"(?:python3?|torchrun)\b[^|;&]*?\s-m\s+([A-Za-z_][\w.]*)([^|;&]*)", line):
            module, args = m.group(1), m.group(2)
            if module.split(".")[0] not in OUR_PACKAGES:
                continue
            args = re.sub(r"\"[^\"]*\"|'[^']*'", " ", args)   # quoted values are not flags
            flags = re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*|-[A-Za-z])(?![\w-])", args)
            found.append((module, flags))
    return found


def stage_paragraph_flags(text):
    """[(modules, flags)] for each paragraph of "## The stages": every `--flag` in its inline code
    must belong to one of the modules that paragraph runs."""
    section = text.split("\n## The stages", 1)[1].split("\n## ", 1)[0]
    out = []
    for para in section.split("\n\n"):
        modules = sorted({m for m, _ in module_invocations(para)})
        spans = " ".join(re.sub(r"^torchrun\b.*?\s-m\s", "", s)   # torchrun's own flags come before -m
                         for s in re.findall(r"`([^`\n]+)`", para))
        flags = re.findall(r"(?<![\w-])(--[A-Za-z][\w-]*)", spans)
        if modules:
            out.append((modules, flags))
    return out


def speedrun_flags(text):
    flags = set()
    for line in _code_lines(text):
        for m in re.finditer(r"speedrun_rag\.sh((?:\s+[^\s|;&]+)*)", line):
            flags.update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m.group(1)))
    return flags


def _relative_links(text):
    for target in re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        yield target.split("#", 1)[0]


def test_readme_size():
    size = README.stat().st_size
    assert size <= README_MAX_BYTES, f"README.md is {size} bytes (> {README_MAX_BYTES}): move detail to docs/<topic>.md"


def test_readme_commands_parse():
    calls = module_invocations(_readme_text())
    modules = sorted({m for m, _ in calls})
    assert {"scripts.chat_sft", "kb_tools.build_kb", "scripts.chat_web"} <= set(modules), modules
    proc = subprocess.run([sys.executable, "-c", _HELP_RUNNER, *modules], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert "@@HELP@@" in proc.stdout, proc.stderr[-3000:]
    helps = json.loads(proc.stdout.rsplit("@@HELP@@", 1)[1])
    problems = []
    for mod in modules:
        if not helps[mod]["ok"]:
            problems.append(f"python -m {mod} --help failed: {helps[mod]['error']}")
    for mod, flags in calls:
        if not helps[mod]["ok"]:
            continue
        known = set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", helps[mod]["help"]))
        for flag in flags:
            if flag not in known:
                problems.append(f"README: python -m {mod} ... {flag}: not in its --help")
    for mods, flags in stage_paragraph_flags(_readme_text()):
        known = set()
        for mod in mods:
            known |= set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", helps[mod]["help"]))
        problems += [f"README, The stages: {flag} is not a flag of {' or '.join(mods)}" for flag in flags if flag not in known]
    assert not problems, "\n".join(problems)


def test_readme_speedrun_flags_exist():
    script = (ROOT / "speedrun_rag.sh").read_text(encoding="utf-8")
    accepted = set(re.findall(r"^\s*(--[a-z][\w-]*)\)", script, flags=re.M))
    shown = speedrun_flags(_readme_text())
    assert shown, "the README shows no speedrun_rag.sh flags"
    assert shown <= accepted, f"speedrun_rag.sh does not accept {sorted(shown - accepted)}"


def test_readme_test_command_is_what_ci_runs():
    text = _readme_text()
    command = ".venv/bin/python -m pytest -q tests"
    assert f"`{command}`" in text
    quickstart = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    assert "bash speedrun_rag.sh" in quickstart and "bash .ci/run" in quickstart
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert command in [line.strip() for line in ci], ".ci/run must run the README's test command"


@pytest.mark.parametrize("md", [README, *sorted(DOCS.glob("*.md"))], ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    missing = [t for t in _relative_links(md.read_text(encoding="utf-8")) if t and not (md.parent / t).exists()]
    assert not missing, f"{md.relative_to(ROOT)} links to missing files: {missing}"


def test_docs_index_lists_every_doc():
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    listed = set(_relative_links(index))
    unlisted = [p.name for p in sorted(DOCS.glob("*.md")) if p.name != "README.md" and p.name not in listed]
    assert not unlisted, f"docs/README.md does not list {unlisted}"


def test_extraction_sees_flags():
    """The extractor itself: continuations, comments, env prefixes, torchrun and quoted values."""
    text = ("```bash\nNANOCHAT_BASE_DIR=x .venv/bin/python -m scripts.chat_cli --kb k \\\n  -p \"a --b\"  # --c\n"
            "torchrun --nproc_per_node=2 -m scripts.base_train -- --depth 4\n```\n"
            "Run `python -m kb_tools.make_qa --kb K` or `pip install -e .`.\n")
    assert module_invocations(text) == [("scripts.chat_cli", ["--kb", "-p"]),
                                        ("scripts.base_train", ["--depth"]),
                                        ("kb_tools.make_qa", ["--kb"])]
