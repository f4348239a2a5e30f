"""A model card (``README.md`` with Hugging Face front matter) for the weights a run exports.

The card says what a person needs to use or judge the weights without the run that made them: the base
model, the method and paper, the data, the measured metrics and the full resolved config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from core.atomic_write import atomic_write_bytes


def write_model_card(folder: Path, title: str, summary: str, base_model: str | None = None,
                     data: dict[str, Any] | None = None, metrics: dict[str, float] | None = None,
                     config: dict[str, Any] | None = None, tags: list[str] | None = None,
                     usage: str | None = None, sections: dict[str, str] | None = None) -> Path:
    """Write ``folder/README.md`` and return its path.

    Args:
        folder: the export folder (created if missing).
        title: first heading.
        summary: a paragraph: what the weights are and how they were made.
        base_model: the model the weights adapt (Hugging Face id or local path), if any.
        data: the data settings (e.g. the data module's hyper-parameters).
        metrics: measured values at the end of the run.
        config: the run's resolved settings (written as YAML).
        tags: front-matter tags.
        usage: a code snippet that loads the weights.
        sections: further ``heading -> markdown`` sections (e.g. a per-task results table), after the metrics.
    """
    front = {"library_name": "litzoo", "tags": ["litzoo", *(tags or [])]}
    if base_model:
        front["base_model"] = base_model
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "", f"# {title}", "", summary, ""]
    if usage:
        lines += ["## Usage", "", "```python", usage.strip(), "```", ""]
    if data:
        lines += ["## Data", "", *(f"- `{k}`: {v}" for k, v in data.items()), ""]
    if metrics:
        lines += ["## Metrics (end of the run)", "", "| metric | value |", "|---|---|",
                  *(f"| `{k}` | {v:.4f} |" for k, v in sorted(metrics.items())), ""]
    for heading, body in (sections or {}).items():
        lines += [f"## {heading}", "", body.strip(), ""]
    if config:
        lines += ["## Configuration", "", "```yaml", yaml.safe_dump(json.loads(json.dumps(config, default=str)),
                                                                     sort_keys=False).strip(), "```", ""]
    return atomic_write_bytes(Path(folder) / "README.md", "\n".join(lines).encode("utf-8"))
