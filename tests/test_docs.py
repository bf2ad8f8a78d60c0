"""Every Python block of the README and of docs/ runs as written, page by page, as a reader would run it.

A page's blocks run in order in one interpreter (a later block may use what an earlier one defined), in a fresh
folder. Shell blocks marked ```` ```bash run ```` run there too, in their place (e.g. `casa-hf export tiny casa-tiny`
before the Python that loads the folder); ```` ```bash background ```` starts a command (a server) and goes on once
it prints its first line to stdout, and stops it after the page. Other shell blocks (installs, long trainings) are
shown only; the commands they hold are tested elsewhere (tests/test_cli.py, .ci/run).
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(python|bash run|bash background)\n(.*?)^```$", re.MULTILINE | re.DOTALL)
PAGE_TIMEOUT_S = 600

# Runs a page's steps in one interpreter: Python blocks share a namespace, shell blocks run in the same folder.
DRIVER = r"""
import json, subprocess, sys
steps = json.load(open(sys.argv[1]))
namespace, servers = {"__name__": "__main__"}, []
try:
    for index, (kind, code) in enumerate(steps):
        if kind == "python":
            exec(compile(code, f"block {index + 1} (python)", "exec"), namespace)
        elif kind == "bash run":
            subprocess.run(["bash", "-euo", "pipefail", "-c", code], check=True)
        else:
            server = subprocess.Popen(["bash", "-c", "exec " + code.strip()], stdout=subprocess.PIPE, text=True)
            servers.append(server)
            if not server.stdout.readline():
                raise RuntimeError(f"block {index + 1} ({code.strip()!r}) exited before printing a line")
finally:
    for server in servers:
        server.terminate()
        server.wait(30)
"""


def page_steps(page: Path) -> list[tuple[str, str]]:
    return [(kind, code) for kind, code in BLOCK.findall(page.read_text())]


def test_every_page_with_code_is_collected():
    """The README and the docs pages hold Python to run (a renamed fence would otherwise drop them silently)."""
    assert ROOT / "README.md" in PAGES and len(PAGES) > 1
    assert sum(kind == "python" for page in PAGES for kind, _ in page_steps(page)) >= len(PAGES)
    for page in PAGES:  # every fenced Python block is matched: none is left out by a typo in its fence
        assert page.read_text().count("```python\n") == sum(kind == "python" for kind, _ in page_steps(page)), page


def test_the_readme_test_command_sets_up_what_the_tests_need():
    """The README's one test command is the CI script: on a fresh Debian machine it installs Chromium and its driver
    (for the live-captioning page test) before running the whole suite."""
    block = re.search(r"^## Tests\n\n```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.MULTILINE | re.DOTALL)
    assert block.group(1).strip() == "bash .ci/run"
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"apt-get install .*chromium chromium-driver", script), script
    assert script.strip().splitlines()[-1] == "python -m pytest tests"


def _page_param(page: Path):
    """A page that loads the real SmolLM2 (`casa-smollm2`) is slow."""
    slow = "casa-smollm2" in "".join(code for _, code in page_steps(page))
    return pytest.param(page, marks=pytest.mark.slow if slow else (), id=page.relative_to(ROOT).as_posix())


@pytest.mark.parametrize("page", [_page_param(p) for p in PAGES if page_steps(p)])
def test_page_runs_as_written(page, tmp_path):
    steps = tmp_path / "steps.json"
    steps.write_text(json.dumps(page_steps(page)))
    work = tmp_path / "work"
    work.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", DRIVER, str(steps)],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=PAGE_TIMEOUT_S,
    )
    assert done.returncode == 0, f"{page.name}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
