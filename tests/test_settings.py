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
    assert "OPENAI_API_KEY: missing" in result.stderr


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
