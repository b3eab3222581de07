"""mkdocs hooks.

- The site's home page is the README, so the two can never disagree.
- Method pages link to their measured tables and figures in ``benchmarks/results/``, which live
  outside ``docs/`` so that benchmark scripts write them in one place; the site includes them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
RESULTS = ROOT / "benchmarks" / "results"


def on_files(files: Files, config: Any, **_: Any) -> Files:
    for path in sorted(RESULTS.glob("*")):
        if path.suffix in {".md", ".png", ".json", ".csv"}:
            files.append(
                File(
                    f"benchmarks/results/{path.name}",
                    src_dir=str(ROOT),
                    dest_dir=config["site_dir"],
                    use_directory_urls=config["use_directory_urls"],
                )
            )
    return files


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == "index.md":
        markdown = re.sub(r"\]\(docs/", "](", README.read_text(encoding="utf-8"))
    if page.file.src_uri.startswith("benchmarks/"):
        return markdown
    # docs/x.md links ../benchmarks/results/y; in the site both sit under one root
    return markdown.replace("](../benchmarks/results/", "](benchmarks/results/")
