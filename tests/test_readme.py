"""README.md: the reading order names files and functions that exist, and every command it gives
to run a folder (`python -m X`) finds its module."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def section(title: str) -> str:
    start = README.index(f"## {title}")
    return README[start:README.find("\n## ", start + 1)]


READING = section("Read the method in this order")
NAMES = sorted({n for n in re.findall(r"`([a-z_0-9]+(?:\.[A-Za-z_0-9]+)+)`", READING) if not n.endswith(".py")})
FILES = sorted(set(re.findall(r"`([a-z_0-9/]+\.py)`", READING)))


def test_the_reading_order_walks_the_five_steps_and_the_equations():
    steps = [line for line in READING.splitlines() if re.match(r"\| \d+ \|", line)]
    assert len(steps) >= 10 and "step 1" in READING and "step 5" in READING
    equations = {int(n) for group in re.findall(r"eq\. ([\d, ]+)", READING) for n in re.findall(r"\d+", group)}
    assert equations == {1, 2, 3, 4, 5, 6}
    assert len(NAMES) >= 20 and FILES


@pytest.mark.parametrize("name", NAMES)
def test_every_name_in_the_reading_order_exists(name):
    module, *attrs = name.split(".")
    thing = importlib.import_module(module)
    for attr in attrs:
        assert hasattr(thing, attr), f"README names {name}, but {module} has no {attr}"
        thing = getattr(thing, attr)


FOLDERS = "|".join(p.parent.name for p in ROOT.glob("*/__init__.py")) + "|bench|tests"


@pytest.mark.parametrize("path", FILES + sorted(set(re.findall(rf"`((?:{FOLDERS})/[a-z_0-9]+\.py)`", README))))
def test_every_file_it_names_exists(path):
    assert (ROOT / path).is_file() or any(ROOT.glob(f"*/{path}")), path


@pytest.mark.parametrize("module", sorted(set(re.findall(r"python -m ([a-z_.]+)", README))))
def test_every_python_m_command_finds_its_module(module):
    spec = importlib.util.find_spec(module + ".__main__") if (ROOT / module.replace(".", "/")).is_dir() \
        else importlib.util.find_spec(module)
    assert spec is not None, f"README runs `python -m {module}`, which does not exist"


def test_it_stays_short_and_cites_the_paper_not_a_path_outside_the_repository():
    assert len(README.splitlines()) <= 260  # issues 28-31 each asked the README for a paragraph
    assert "arXiv:2508.21313" in README and "Zhaofeng Zhong" in README and "../shared" not in README
