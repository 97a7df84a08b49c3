"""The README's runnable example and its commands must stay true."""

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_masking_example_runs_and_shows_eviction(capsys):
    first_python_block = re.search(r"```python\n(.*?)```", README, re.S).group(1)
    exec(compile(first_python_block, "README.md", "exec"), {})
    printed = capsys.readouterr().out
    peak, num_tokens = map(int, re.search(r"peak=(\d+), auc=\d+, num_tokens=(\d+)", printed).groups())
    assert peak < num_tokens  # the example's block is evicted at its summary end


def test_readme_commands_name_existing_console_scripts_and_ci_runs_the_test_command():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    quickstart = re.search(r"## Quickstart\n\n```bash\n(.*?)```", README, re.S).group(1).splitlines()
    assert len(quickstart) == 2
    main_cmd = quickstart[0].split("&&")[1].split("#")[0].split()[0]
    assert main_cmd in scripts
    test_cmd = quickstart[1].split("#")[0].strip()
    ci = (ROOT / ".ci" / "run").read_text()
    *installs, run = (part.strip() for part in test_cmd.split("&&"))
    assert installs and run.startswith("python -m pytest")
    for install in installs:  # every install step of the README runs in CI, as written
        assert install.replace("pip install", "python -m pip install -q") in ci
    assert run in ci
