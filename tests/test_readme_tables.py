"""The README's result tables are the benchmark JSON rendered (bench/readme_tables.py), not typed."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_readme_tables_match_the_benchmark_results():
    spec = importlib.util.spec_from_file_location("readme_tables", ROOT / "bench" / "readme_tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    text = (ROOT / "README.md").read_text()
    assert "<!-- bench:methods -->" in text
    assert tables.render(text) == text, "README tables are stale: run .venv/bin/python bench/readme_tables.py"
