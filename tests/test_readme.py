"""Every Python snippet in README.md runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
SNIPPETS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_snippets() -> None:
    assert len(SNIPPETS) >= 2


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs(index: int, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(SNIPPETS[index], f"README.md[snippet {index}]", "exec"), {"__name__": "__readme__"})


def test_public_names_resolve_in_any_import_order() -> None:
    import lightning_adamw
    import lightning_adamw.monitor
    from lightning_adamw.update_split import update_split

    assert callable(update_split)
    assert lightning_adamw.update_split.update_split is update_split  # the submodule, whatever came first
    for name in lightning_adamw.__all__:
        assert getattr(lightning_adamw, name) is not None
