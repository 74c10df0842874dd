"""The docs stay honest where a machine can check them: a short README, links that resolve, every
setting documented, every module in the module map, every `llm-ner` command they name real, every
test, benchmark and module file they name present."""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from backend.infra.settings import Settings
from backend.tools.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
README_LINES = 300


def pages() -> list[Path]:
    found = [REPO / "README.md", REPO / "README.zh-CN.md", *sorted(DOCS.rglob("*.md"))]
    assert len(found) > 3, "docs/ has no pages"
    return found


def prose(text: str) -> str:
    """The text outside fenced code blocks (links and anchors in code are not links)."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = text.replace("`", "").lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LNM")
    return kept.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    for line in prose(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    text = prose(path.read_text(encoding="utf-8"))
    return re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)


def test_the_readme_is_short():
    lines = (REPO / "README.md").read_text(encoding="utf-8").count("\n")
    assert lines <= README_LINES, f"README.md has {lines} lines, more than {README_LINES}: move detail into docs/"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(page: Path):
    broken = []
    for target in links(page):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not ours to check
            continue
        file, _, anchor = target.partition("#")
        resolved = (page.parent / file).resolve() if file else page
        if not resolved.exists():
            broken.append(f"{target}: no such file")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{target}: no heading with anchor #{anchor} in {resolved.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_every_setting_is_in_the_configuration_page():
    page = (DOCS / "configuration.md").read_text(encoding="utf-8")
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", page))
    settings = {name.upper() for name in Settings.model_fields}
    assert len(settings) > 40
    missing = sorted(settings - documented)
    assert not missing, f"settings missing from docs/configuration.md: {missing}"


# settings whose default the page describes in words rather than as the literal value
DEFAULTS_IN_WORDS = {
    "OPENAI_API_KEY": "required, no default",
    "OPENAI_BASE_URL": "unset means OpenAI's own URL",
    "PROMPTS_DIR": "an absolute path into the checkout",
    "LLM_BATCH_ENDPOINT": "unset means a URL derived from OPENAI_BASE_URL",
}


def documented_defaults() -> dict[str, str]:
    """Each `| `NAME`[, `NAME2`] | default[, default2] | meaning |` row of the configuration page."""
    found = {}
    for line in (DOCS / "configuration.md").read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not cells[0].startswith("`"):
            continue
        names = re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0])
        literals = re.findall(r"`([^`]*)`", cells[1]) or [cells[1]]
        for i, name in enumerate(names):
            found[name] = literals[i] if len(literals) == len(names) else literals[0]
    return found


def as_documented(value: object) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    if isinstance(value, Path):
        return f"./{value}"
    return str(value)


def same_value(documented: str, code: str) -> bool:
    try:
        return float(documented) == float(code)  # 1.0 and 1 are one default
    except ValueError:
        return documented == code


def test_every_documented_default_is_the_code_default():
    documented = documented_defaults()
    wrong = []
    for name, field in Settings.model_fields.items():
        env = name.upper()
        if env in DEFAULTS_IN_WORDS or env not in documented:
            continue  # a missing row is test_every_setting_is_in_the_configuration_page's to report
        if not same_value(documented[env], as_documented(field.default)):
            wrong.append(f"{env}: the page says {documented[env]!r}, the code {as_documented(field.default)!r}")
    assert len(documented) > 40
    assert not wrong, "docs/configuration.md: " + "; ".join(wrong)


def module_map() -> str:
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    match = re.search(r"^## Module map\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "docs/architecture.md has no '## Module map' section"
    return match.group(1)


def test_every_backend_module_is_in_the_module_map():
    rows: dict[str, str] = {}
    for line in module_map().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            rows[cells[0].strip("`").rstrip("/")] = cells[-1]
    modules = sorted((REPO / "backend").rglob("*.py"))
    assert len(modules) > 50
    missing = []
    for module in modules:
        relative = module.relative_to(REPO / "backend")
        package = "backend" if len(relative.parts) == 1 else "/".join(relative.parts[:-1])
        if package != "backend" and module.name == "__init__.py":
            continue  # a package's empty marker
        row = rows.get(package)
        if row is None or f"`{module.name}`" not in row:
            missing.append(str(module.relative_to(REPO)))
    assert not missing, f"modules missing from docs/architecture.md's module map: {missing}"


def module_state() -> dict[str, set[str]]:
    """Each module's module-level state, by name: globals, thread-locals, ContextVars, lru_caches, metrics."""
    found: dict[str, set[str]] = {}
    for module in sorted((REPO / "backend").rglob("*.py")):
        text = module.read_text(encoding="utf-8")
        names = set(re.findall(r"^\s+global (\w+)", text, flags=re.M))
        names |= set(re.findall(r"^(\w+)(?:\s*:[^=\n]+)?\s*=\s*(?:threading\.local|(?:contextvars\.)?ContextVar)\(", text, flags=re.M))
        names |= set(re.findall(r"^@(?:functools\.)?(?:lru_cache|cache)\b.*\n(?:@.*\n)*def (\w+)", text, flags=re.M))
        if module.name != "metrics.py":  # metrics.py is the metrics' home; elsewhere each one is named
            names |= set(re.findall(r"^(\w+)\s*=\s*\w*(?:Counter|Gauge|Histogram|Summary)\(", text, flags=re.M))
        if names:
            found[str(module.relative_to(REPO / "backend"))] = names
    return found


def test_every_piece_of_module_state_is_in_the_process_state_table():
    text = (DOCS / "architecture.md").read_text(encoding="utf-8")
    match = re.search(r"^## Process state.*?\n(.*?)(?=^## )", text, flags=re.M | re.S)
    assert match, "docs/architecture.md has no '## Process state' section"
    table = match.group(1)
    state = module_state()
    assert "protocol/rqworker.py" in state and "infra/settings.py" in state
    missing = [f"{module}: {name}" for module, names in state.items() for name in sorted(names)
               if f"`{module}`" not in table or not re.search(rf"`{re.escape(name)}(\(\))?`", table)]
    assert not missing, f"module-level state missing from docs/architecture.md's process-state table: {missing}"


def subcommands() -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")  # argparse keeps subparsers here only
    return set(action.choices)


def test_every_llm_ner_command_named_in_the_docs_exists():
    commands = subcommands()
    assert {"serve", "prelabel", "connect", "doctor"} <= commands
    unknown = set()
    for page in pages():
        for name in re.findall(r"\bllm-ner ([a-z][a-z-]*)", page.read_text(encoding="utf-8")):
            if name not in commands:
                unknown.add(f"{page.relative_to(REPO)}: llm-ner {name}")
    assert not unknown, f"no such llm-ner command: {sorted(unknown)}"


def test_every_flag_the_docs_give_a_command_exists():
    parsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    flags = {name: {o for a in sub._actions for o in a.option_strings} for name, sub in parsers.items()}
    unknown = set()
    checked = 0
    for page in pages():
        for match in re.finditer(r"\bllm-ner ([a-z][a-z-]*)([^`\n]*)", page.read_text(encoding="utf-8")):
            command, rest = match.group(1), match.group(2).split(" #")[0]  # a shell comment is not the command's
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
                checked += 1
                if command in flags and flag not in flags[command]:
                    unknown.add(f"{page.relative_to(REPO)}: llm-ner {command} {flag}")
    assert checked > 50
    assert not unknown, f"flags the commands do not have: {sorted(unknown)}"


def test_every_metric_is_documented_and_every_documented_metric_exists():
    code = {m for module in (REPO / "backend").rglob("*.py")
            for m in re.findall(r'"(llm_ner_[a-z_]+)"', module.read_text(encoding="utf-8"))}
    assert len(code) > 15
    named = {m for page in pages() for m in re.findall(r"\b(llm_ner_[a-z_]+)", page.read_text(encoding="utf-8"))}
    assert not named - code, f"metrics the docs name that no module defines: {sorted(named - code)}"
    listed = set(re.findall(r"\b(llm_ner_[a-z_]+)", (DOCS / "llm-endpoints.md").read_text(encoding="utf-8")))
    assert not code - listed, f"metrics missing from docs/llm-endpoints.md's list: {sorted(code - listed)}"


def test_every_file_the_docs_name_exists():
    missing = set()
    for page in pages():
        text = page.read_text(encoding="utf-8")
        for path in re.findall(r"`((?:tests|benchmarks|backend|prompts|requirements)/[\w./-]+\.(?:py|j2|txt|in|md))", text):
            if not (REPO / path).exists():
                missing.add(f"{page.relative_to(REPO)}: {path}")
    assert not missing, f"files named in the docs that do not exist: {sorted(missing)}"


def test_every_make_target_the_docs_name_exists():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(encoding="utf-8"), flags=re.M))
    named = set()
    for page in pages():
        text = page.read_text(encoding="utf-8")
        found = re.findall(r"`make ([a-z][a-z-]*)", text)  # in a code span
        found += re.findall(r"^(?:\$ )?(?:[A-Z_]+=\S+ )*make ([a-z][a-z-]*)", text, flags=re.M)  # a shell line
        named |= {(str(page.relative_to(REPO)), target) for target in found}
    assert {target for _, target in named} >= {"serve", "test", "demo", "llama", "label-studio", "lock"}
    unknown = sorted(f"{page}: make {target}" for page, target in named if target not in targets)
    assert not unknown, f"no such Makefile target: {unknown}"
