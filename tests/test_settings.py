"""Settings: one object from the environment; a bad one fails at start in one line naming it."""

import subprocess
import sys

from tests.processes import REPO


def serve_with(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "backend", "serve", "--port", "0"],
        cwd=REPO, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=60,
    )


def test_missing_api_key_fails_in_one_line_naming_it():
    result = serve_with({})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "no LLM key: set OPENAI_API_KEY" in result.stderr and "make demo" in result.stderr


def test_invalid_values_are_named_but_never_echoed():
    result = serve_with({"OPENAI_API_KEY": "k-very-secret-value", "OPENAI_BASE_URL": "localhost:1234", "LOG_LEVEL": "LOUD"})
    assert result.returncode == 2
    assert "OPENAI_BASE_URL" in result.stderr and "LOG_LEVEL" in result.stderr
    assert "k-very-secret-value" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_basic_auth_needs_both_halves():
    result = serve_with({"OPENAI_API_KEY": "x", "BASIC_AUTH_USER": "admin"})
    assert result.returncode == 2
    assert "BASIC_AUTH_USER and BASIC_AUTH_PASS" in result.stderr


def test_prompt_language_picks_the_zh_folder_of_the_prompts_dir_and_turns_hints_on(tmp_path):
    from backend.infra.settings import REPO_DIR, load_settings

    def load(**values):
        return load_settings(openai_api_key="x", _env_file=None, **values)

    english = load()
    assert (english.prompts_dir, english.occurrence_hints) == (REPO_DIR / "prompts", False)
    chinese = load(prompt_language="zh")
    assert (chinese.prompts_dir, chinese.occurrence_hints) == (REPO_DIR / "prompts" / "zh", True)
    # a copy of the whole prompts folder (the Docker image's /app/prompts): its zh/ folder
    (tmp_path / "all" / "zh").mkdir(parents=True)
    assert load(prompt_language="zh", prompts_dir=tmp_path / "all").prompts_dir == tmp_path / "all" / "zh"
    # a copy of the Chinese set alone: itself
    assert load(prompt_language="zh", prompts_dir=tmp_path / "mine").prompts_dir == tmp_path / "mine"
    assert load(prompt_language="zh", occurrence_hints=False).occurrence_hints is False


def test_an_unknown_prompt_language_fails_in_one_line_naming_it():
    result = serve_with({"OPENAI_API_KEY": "x", "PROMPT_LANGUAGE": "fr"})
    assert result.returncode == 2
    assert "PROMPT_LANGUAGE: Input should be 'en' or 'zh'" in result.stderr and "Traceback" not in result.stderr


def test_the_old_names_of_the_rq_part_settings_still_work_with_one_warning_line_each(monkeypatch):
    # "chunk" is a piece of a long text only: JOB_CHUNK and WORKER_CHUNKS became JOB_PART and WORKER_PARTS
    result = subprocess.run([sys.executable, "-m", "backend", "worker"], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "x", "JOB_CHUNK": "7", "WORKER_CHUNKS": "3"})
    lines = result.stderr.strip().splitlines()
    assert "JOB_CHUNK is deprecated: set JOB_PART instead (it means the same)" in lines
    assert "WORKER_CHUNKS is deprecated: set WORKER_PARTS instead (it means the same)" in lines
    assert len(lines) == 3 and "set REDIS_URL" in lines[2], result.stderr  # one line each, then the worker's own
    from backend.infra.settings import load_settings

    for name in ("JOB_PART", "WORKER_PARTS", "JOB_CHUNK", "WORKER_CHUNKS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OPENAI_API_KEY", "x")
    monkeypatch.setenv("JOB_CHUNK", "7")
    monkeypatch.setenv("WORKER_CHUNKS", "3")
    assert (load_settings().job_part, load_settings().worker_parts) == (7, 3)
    monkeypatch.setenv("JOB_PART", "9")  # the new name wins where both are set
    assert load_settings().job_part == 9
