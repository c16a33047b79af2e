"""Conda envs pin what requirements.lock pins; every rule declares conda, log and threads."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ENVS = sorted((ROOT / "envs").glob("*.yaml"))
RULE_FILES = sorted((ROOT / "workflow" / "rules").glob("*.smk"))
TORCH = "2.13.0"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;#]+)$")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path = ROOT / "requirements.lock") -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = PIN.match(line)
        assert match, f"{path.name}: not an exact pin: {line!r}"
        name = normalise(match[1])
        assert name not in pins, f"{path.name}: {name} pinned twice"
        pins[name] = match[2]
    return pins


def pip_entries(env: Path) -> list[str]:
    spec = yaml.safe_load(env.read_text())
    pips = [d["pip"] for d in spec["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pips) == 1, f"{env.name}: expected one pip: section, found {len(pips)}"
    return pips[0]


def env_pins(env: Path) -> dict[str, str]:
    pins = {}
    for entry in pip_entries(env):
        if entry.startswith("-e "):
            continue
        match = PIN.match(entry.strip())
        assert match, f"{env.name}: pip entry {entry!r} is not an exact name==version pin"
        pins[normalise(match[1])] = match[2]
    return pins


def test_there_are_envs_and_rules():
    assert {p.name for p in ENVS} >= {"torch.yaml", "eval.yaml", "plot.yaml"}
    assert RULE_FILES


def test_lock_pins_torch_exactly():
    lock = read_lock()
    assert lock["torch"] == TORCH
    constraint = read_lock(ROOT / "torch-constraint.txt")
    assert constraint == {"torch": TORCH}


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_pins_equal_the_lock(env):
    lock = read_lock()
    pins = env_pins(env)
    assert pins, f"{env.name} pins nothing"
    missing = sorted(set(pins) - set(lock))
    assert not missing, f"{env.name} pins packages requirements.lock does not: {missing}"
    differ = {n: (v, lock[n]) for n, v in pins.items() if v != lock[n]}
    assert not differ, f"{env.name} (env, lock) versions differ: {differ}"


@pytest.mark.parametrize("env", ENVS, ids=lambda p: p.name)
def test_env_is_well_formed(env):
    spec = yaml.safe_load(env.read_text())
    assert spec["name"] == f"vlmlayers-{env.stem}"
    assert "nodefaults" in spec["channels"]
    conda = [d for d in spec["dependencies"] if isinstance(d, str)]
    assert "python=3.11" in conda and "pip" in conda
    # The package itself goes in from the repository root (pip runs next to the env file).
    editable = [e.removeprefix("-e ").strip() for e in pip_entries(env) if e.startswith("-e ")]
    assert len(editable) == 1, editable
    assert (env.parent / editable[0] / "pyproject.toml").resolve() == ROOT / "pyproject.toml"


def test_torch_env_pins_torch_and_the_package_dependencies():
    pins = env_pins(ROOT / "envs" / "torch.yaml")
    assert pins["torch"] == TORCH
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^dependencies = \[(.*?)^\]", text, re.S | re.M)[1]
    needed = {
        normalise(re.match(r"[A-Za-z0-9._-]+", d)[0]) for d in re.findall(r'"([^"]+)"', block)
    }
    plotting = {"seaborn", "tabulate"}  # the figures and report tables run in the plot env
    assert needed - plotting - set(pins) == set()
    assert "torch==2.13.0" in text


def test_eval_env_is_the_torch_env_plus_lmms_eval():
    torch_pins = env_pins(ROOT / "envs" / "torch.yaml")
    eval_pins = env_pins(ROOT / "envs" / "eval.yaml")
    assert eval_pins.pop("lmms-eval") == read_lock()["lmms-eval"]
    assert eval_pins == torch_pins


def test_plot_env_has_no_torch():
    pins = env_pins(ROOT / "envs" / "plot.yaml")
    assert "torch" not in pins
    assert {"seaborn", "matplotlib", "pandas", "pyarrow", "tabulate"} <= set(pins)


def rules(path: Path) -> dict[str, str]:
    """name -> body of every ``rule NAME:`` / ``checkpoint NAME:`` at column 0 in ``path``."""
    found: dict[str, str] = {}
    name, body = None, []
    for line in path.read_text().splitlines():
        start = re.match(r"(?:rule|checkpoint)\s+(\w+)\s*:", line)
        at_column_0 = line[:1] not in ("", " ", "\t", "#")
        if start or (name and at_column_0):
            if name:
                found[name] = "\n".join(body)
            name, body = (start[1], []) if start else (None, [])
            continue
        if name:
            body.append(line)
    if name:
        found[name] = "\n".join(body)
    return found


def directive(body: str, key: str) -> str | None:
    """The value of ``key:`` in a rule body: on the same line, or the next indented line."""
    lines = body.splitlines()
    for i, line in enumerate(lines):
        # Directives sit at 4 spaces; deeper ``key:`` lines belong to something nested.
        match = re.match(rf"^(    ){re.escape(key)}:\s*(.*)$", line)
        if not match:
            continue
        if match[2].strip():
            return match[2].strip()
        for following in lines[i + 1 :]:
            if following.strip():
                return (
                    following.strip()
                    if len(following) - len(following.lstrip()) > len(match[1])
                    else None
                )
    return None


ALL_RULES = [(path, name, body) for path in RULE_FILES for name, body in rules(path).items()]


def test_rule_parser_finds_the_pipeline():
    names = {name for _, name, _ in ALL_RULES}
    assert {"world", "stage1", "stage2", "evaluate", "extract", "probe", "geometry"} <= names
    assert len(names) == len(ALL_RULES), "a rule name is used twice"


def test_rule_parser_on_a_known_text(tmp_path):
    smk = tmp_path / "x.smk"
    smk.write_text(
        "rule a:\n    output:\n        'o',\n    log:\n        'logs/a.log',\n"
        "    threads: 2\n    conda:\n        '../envs/e.yaml'\n    shell:\n        'x'\n\n\n"
        "def helper():\n    threads: 1\n\n\ncheckpoint b:\n    output: 'p'\n    shell: 'y'\n"
    )
    found = rules(smk)
    assert list(found) == ["a", "b"]
    assert directive(found["a"], "conda") == "'../envs/e.yaml'"
    assert directive(found["a"], "threads") == "2"
    assert directive(found["a"], "log") == "'logs/a.log',"
    assert directive(found["b"], "threads") is None
    assert directive(found["b"], "conda") is None


@pytest.mark.parametrize(
    ("path", "name", "body"), ALL_RULES, ids=[f"{p.stem}:{n}" for p, n, _ in ALL_RULES]
)
def test_rule_declares_conda_log_and_threads(path, name, body):
    where = f"{path.name}: rule {name}"
    conda = directive(body, "conda")
    assert conda, f"{where} has no conda: directive"
    env = conda.rstrip(",").strip().strip("'\"")
    target = (path.parent / env).resolve()
    assert target.parent == ROOT / "envs", f"{where}: conda env {env} is not under envs/"
    assert target.exists(), f"{where}: conda env {env} does not exist"
    log = directive(body, "log")
    assert log, f"{where} has no log: directive"
    assert log.strip("f'\"").startswith("logs/"), f"{where}: log {log} is not under logs/"
    threads = directive(body, "threads")
    assert threads, f"{where} has no threads: directive"
    assert re.fullmatch(r"\d+|THREADS", threads), f"{where}: threads: {threads}"
