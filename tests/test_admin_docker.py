"""docker/: the Dockerfile and compose file agree with the CLI, the settings and the repository
(no Docker engine runs here, so they are checked by reading)."""

import json
import re
import shlex
from pathlib import Path

from service.cli import build_parser
from service.config import Settings, load_settings

REPO = Path(__file__).resolve().parents[1]
DOCKER = REPO / "docker"


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [tuple(line.strip().split(None, 1)) for line in joined.splitlines() if line.strip()]


def _serve_args(argv: list[str]):
    args = build_parser().parse_args(argv)
    assert args.command == "serve"
    return args


def test_dockerfile_matches_the_cli():
    steps = _instructions((DOCKER / "Dockerfile").read_text())
    first = dict(reversed(steps))                       # first occurrence of each instruction
    last = dict(steps)
    assert first["FROM"] == "python:3.11-slim"
    assert "torch==2.13.0" in first["RUN"] and "whl/cpu" in first["RUN"]
    assert last["USER"] not in ("root", "0")
    assert json.loads(last["VOLUME"]) == ["/data"]
    defaults = Settings()
    assert set(last["EXPOSE"].split()) == {str(defaults.port), str(defaults.http_port)}
    assert json.loads(last["ENTRYPOINT"]) == ["voxarc"]
    args = _serve_args(json.loads(last["CMD"]))
    assert (args.data_dir, args.port, args.http_port) == ("/data", defaults.port,
                                                         defaults.http_port)
    assert f"127.0.0.1:{args.http_port}/healthz" in last["HEALTHCHECK"]
    for step, arguments in steps:
        if step == "COPY":
            for source in shlex.split(arguments)[:-1]:
                assert (REPO / source).exists() or source == "README.md", source
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text()
    assert "kernels.available()" in " ".join(a for s, a in steps if s == "RUN")
    for needed in ("pyproject.toml", "setup.py", "models/", "storage/", "service/"):
        assert f"!{needed}" in ignore


def test_compose_matches_the_cli_and_the_dockerfile():
    text = (DOCKER / "compose.yaml").read_text()
    assert "dockerfile: docker/Dockerfile" in text and "context: .." in text
    commands = [json.loads(m) for m in re.findall(r"^\s+command: (\[.*\])$", text, re.M)]
    assert len(commands) == 2
    embedded, postgres = (_serve_args(c) for c in commands)
    assert embedded.data_dir == "/data"
    for args in (embedded, postgres):
        assert f'"{args.port}:{args.port}"' in text
        assert f'"127.0.0.1:{args.http_port}:{args.http_port}"' in text
        assert args.http_host == "0.0.0.0"
    assert 'profiles: ["postgres"]' in text and "\n  postgres:\n" in text
    mount = re.search(r"- \./(\S+):(\S+):ro", text)
    assert mount.group(2) == postgres.config
    settings = load_settings(DOCKER / mount.group(1))
    assert settings.data_dir == "/data" and "@postgres:5432/" in settings.database_url
    assert re.search(r"POSTGRES_USER: (\S+)", text).group(1) in settings.database_url
    assert "VOXARC_HTTP_TOKEN" in text
    # both nodes hand fine-tuning samples through /dev/shm (models.tune_workers), not Docker's 64 MB
    assert re.findall(r"^    shm_size: (\S+)", text, re.M) == ["1gb", "1gb"]


def test_docker_readme_names_the_commands():
    readme = (DOCKER / "README.md").read_text()
    for phrase in ("docker build -f docker/Dockerfile", "--profile postgres", "VOXARC_HTTP_TOKEN",
                   "/healthz", "11112", "8042", "--shm-size"):
        assert phrase in readme, phrase
