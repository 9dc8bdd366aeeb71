"""The README's commands and examples are executed, so they cannot drift from the code."""

import re
from pathlib import Path

README = (Path(__file__).parents[1] / "README.md").read_text()
CI_SCRIPT = (Path(__file__).parents[1] / ".ci" / "run").read_text()


def opening_commands():
    head = README.split("---")[0]
    return [line.strip() for line in head.splitlines() if line.startswith("    ")]


def setup_commands():
    return [c for c in opening_commands() if c.startswith("python -m venv .venv && ")]


def test_readme_opens_with_exactly_two_setup_commands_and_the_quick_subset():
    commands = opening_commands()
    assert len(setup_commands()) == 2 and commands[:2] == setup_commands()
    full_suite = setup_commands()[1].split(" && ")[-1]
    assert commands[2:] == [f'{full_suite} -m "not slow"']  # the edit loop's subset of the CI command


def test_ci_runs_the_readme_test_command_verbatim():
    assert setup_commands()[1] in CI_SCRIPT.splitlines()
    assert " && .venv/bin/ruff check . && " in setup_commands()[1]  # the tree is linted before the tests run


def test_main_command_runs_the_quickstart_recipe():
    main = setup_commands()[0]
    recipe = re.search(r"-m vitblocks\.train (\S+)$", main).group(1)
    assert recipe == "recipes/quickstart.py"
    assert (Path(__file__).parents[1] / recipe).is_file()  # its accuracy is checked in test_trainer.py


def test_python_examples_run():
    for block in re.findall(r"```python\n(.*?)```", README, flags=re.S):
        exec(compile(block, "README.md", "exec"), {})
