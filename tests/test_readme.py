"""The README's Python examples run as written, and every YAML example of README.md and docs/*.md is a valid config."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks() -> list[str]:
    """Every ```python block of README.md."""
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_codec_example_runs() -> None:
    """The codec API example, including the byte counts it prints in its comment."""
    block = next(b for b in python_blocks() if "build_codec" in b)
    namespace: dict = {}
    exec(compile(block, "README codec example", "exec"), namespace)
    payload = namespace["payload"]
    assert {k: v.nbytes for k, v in payload.items()} == {"int8": 3584, "float16": 56}
    assert namespace["approx"]["fc.weight"].shape == (512, 256)


@pytest.mark.slow
def test_simulation_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ≤ 15-line Python simulation example (rounds cut to 2 to stay quick)."""
    block = next(b for b in python_blocks() if "simulate(" in b)
    assert len(block.strip().splitlines()) <= 15
    block = block.replace('"train.rounds=5"', '"train.rounds=2", "data.num_clients=12"')
    monkeypatch.chdir(tmp_path)
    config_path = ROOT / "configs" / "quickstart.yaml"
    block = block.replace('"configs/quickstart.yaml"', repr(str(config_path)))
    namespace: dict = {}
    exec(compile(block, "README simulation example", "exec"), namespace)
    results = namespace["results"]
    from fedpower.config import load_config

    assert len(results.strategies) == len(load_config(config_path).strategies)
    assert all(len(s.rounds) == 2 for s in results.strategies.values())
    assert (tmp_path / "results" / "from-python" / "results.json").exists()
    assert os.environ.get("FLWR_HOME")


#: The user documentation: the README and the pages it links in docs/ (reference sections moved there).
DOC_PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def yaml_blocks() -> list[tuple[str, str]]:
    """(page, block) for every ```yaml block of the documentation pages."""
    return [(path.relative_to(ROOT).as_posix(), block) for path in DOC_PAGES
            for block in re.findall(r"```yaml\n(.*?)```", path.read_text(), flags=re.S)]


def test_moved_reference_pages_have_yaml_examples() -> None:
    """The reference pages split off the README are covered (a renamed page must not silently drop out)."""
    pages = {page for page, _ in yaml_blocks()}
    assert {"README.md", "docs/reference.md", "docs/failures.md", "docs/privacy.md", "docs/scaling.md"} <= pages


@pytest.mark.parametrize("page,block", yaml_blocks(), ids=[f"{page}-{i}" for i, (page, _) in enumerate(yaml_blocks())])
def test_yaml_examples_are_valid_configs(page: str, block: str) -> None:
    """Each YAML snippet, completed with a strategy where it has none, passes the config schema."""
    import yaml

    from fedpower.config import parse_config

    document = yaml.safe_load(block)
    if isinstance(document, list):  # a strategies list entry shown on its own
        document = {"strategies": document}
    assert isinstance(document, dict) and document
    document.setdefault("strategies", [{"name": "fedavg"}])
    parse_config(document)  # raises ConfigError naming the key if a page shows one that does not exist
