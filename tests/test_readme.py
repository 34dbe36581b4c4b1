"""The README's commands as a newcomer types them: every `python -m swarmtune...` line of its shell blocks names a
command that exists, and its options parse (Hydra overrides compose against the configs, argparse flags
parse), placeholders such as `<the printed path>` aside. The quick start installs what its snippets use."""

from __future__ import annotations

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest
from hydra import compose
from omegaconf import OmegaConf

from swarmtune import eval as eval_entry
from swarmtune import launch

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
HYDRA_APPS = {"train": "config", "generate": "generate", "eval": "eval", "serve": "serve"}


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start:end if end > 0 else None]


def shell_commands(text: str) -> list[list[str]]:
    """The commands of the ```bash blocks in `text`: continuation lines joined, each `&&`, `&` or `;` part apart,
    comments and leading VAR=value assignments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in lines_of(block):
            words, current = shlex.split(re.sub(r"<[^<>\n]+>", "PLACEHOLDER", line), comments=True), []
            for word in [*words, "&&"]:
                if word in ("&&", "&", ";", "||"):
                    while current and re.fullmatch(r"[A-Z_]+=.*", current[0]):
                        current.pop(0)
                    if current:
                        commands.append(current)
                    current = []
                else:
                    current.append(word.rstrip("&") if word.endswith("&") and word != "&" else word)
    return commands


def lines_of(block: str) -> list[str]:
    """The shell lines of a block: continuations joined, and lines inside a quoted string."""
    lines, pending = [], ""
    for line in block.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # a quote still open
            continue
        lines.append(pending)
        pending = ""
    assert not pending, pending
    return lines


COMMANDS = [c for c in shell_commands(README) if c[:2] == ["python", "-m"] and c[2].startswith("swarmtune")]


class Parsed(Exception):
    """An argparse command line parsed: the command stops there."""


def argparse_parses(main, argv: list[str], monkeypatch) -> None:
    """`main(argv)` parses its arguments; where the README elides some (`...`), each flag it names is known."""
    parse, elided = argparse.ArgumentParser.parse_args, "..." in argv

    def parse_only(self, args=None, namespace=None):
        if not elided:
            parse(self, args, namespace)  # a bad option: SystemExit(2)
        else:
            unknown = [a for a in args if a.startswith("--") and a not in self._option_string_actions]
            assert not unknown, unknown
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
    with pytest.raises(Parsed):
        main(argv)


def hydra_composes(config_name: str, argv: list[str]) -> None:
    """The overrides parse and compose, and name keys of the config (a sweep's keys too)."""
    multirun = argv[:1] in (["-m"], ["--multirun"])
    overrides = argv[1:] if multirun else argv
    launch.check_command_line(config_name, argv)  # a key the config lacks: a UserError
    sweeps = [o for o in overrides if multirun and "," in o.split("=", 1)[1]]
    with launch.config_context():
        cfg = compose(config_name, overrides=[o for o in overrides if o not in sweeps])
    for sweep in sweeps:
        assert OmegaConf.select(cfg, sweep.split("=", 1)[0]) is not None, sweep


def test_the_readme_names_commands():
    modules = {c[2] for c in COMMANDS}
    assert {"swarmtune.train", "swarmtune.generate", "swarmtune.serve", "swarmtune.swarm", "swarmtune.eval",
            "swarmtune.server", "swarmtune.dht", "swarmtune.security"} <= modules, modules
    quick = {c[2] for c in shell_commands(section("Quick start")) if c[:2] == ["python", "-m"]}
    assert {"swarmtune.train", "swarmtune.generate", "swarmtune.swarm", "swarmtune.serve"} <= quick


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[2:])[:80])
def test_every_readme_command_exists_and_its_options_parse(command, monkeypatch):
    module, argv = command[2], command[3:]
    name = module.split(".", 1)[1]
    assert importlib.util.find_spec(module) is not None, module
    launch.register_recipes(eval_entry.GROUPS if name == "eval" else None)
    if name in HYDRA_APPS:
        hydra_composes(HYDRA_APPS[name], argv)
    elif name == "swarm" and argv[0] in ("up", "down"):
        if argv[0] == "up":
            hydra_composes("local_swarm", argv[1:])
        else:
            assert argv == ["down"]
    else:
        main = importlib.import_module(f"{module}.__main__" if name == "server" else module).main
        argparse_parses(main, argv, monkeypatch)


def test_the_quick_start_installs_what_it_uses():
    quick = section("Quick start")
    pyproject = (ROOT / "pyproject.toml").read_text()
    extras = pyproject[pyproject.index("[project.optional-dependencies]"):pyproject.index("[project.scripts]")]
    for extra in re.findall(r'pip install [^&\n]*?-e "?\.\[(\w+)\]', quick):
        assert re.search(rf"^{extra} = \[", extras, re.M), extra
    uses_openai = quick.index("from openai import")
    assert "pip install openai" in quick[:uses_openai]  # not in the base install: the first command would miss it


def test_the_test_tiers_are_documented_and_wired():
    development = section("Development")
    commands = [" ".join(c) for c in shell_commands(development)]
    assert "pytest -q" in commands and "pytest -q -m slow" in commands
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"slow: ' in pyproject and re.search(r"^addopts = .*-m 'not slow'", pyproject, re.M)
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pytest -q " in ci and "tier -m slow" in ci and "tier ||" in ci  # both tiers, each whatever the other did


def test_the_public_swarm_variable_is_documented_beside_the_recipes():
    recipes = README[README.index("### Fine-tuning with recipes"):README.index("Data parallelism is Lightning's")]
    assert "SWARMTUNE_INITIAL_PEERS" in recipes
    assert "SWARMTUNE_INITIAL_PEERS" in (ROOT / "conf" / "swarm" / "public.yaml").read_text()
