"""Service configuration: one dataclass per service, read once from flags and SPECSERVE_* variables.

Each field is documented with `doc(...)`; the flag is `--field-name` and the variable
`SPECSERVE_FIELD_NAME`. Precedence: flag, then environment, then the field's default.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from specserve.errors import InvalidArgument

C = TypeVar("C")

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SESSION_TTL_S = 600.0  # a session idle this long is evicted by the model services and the gateway
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: str | int = logging.INFO) -> None:
    """The one logging set-up of every process (services, gateway, CLI)."""
    logging.basicConfig(level=level, format=LOG_FORMAT)


def doc(default: Any, help: str) -> Any:
    """A dataclass field with a default and its documentation."""
    return dataclasses.field(default=default, metadata={"help": help})


def env_name(field: str) -> str:
    return "SPECSERVE_" + field.upper()


def _parse(kind: type, name: str, raw: str) -> Any:
    try:
        if kind is bool:
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(raw)
        return kind(raw)
    except ValueError:
        raise InvalidArgument(name, f"cannot read {raw!r} as {kind.__name__}") from None


def load(cls: type[C], argv: list[str] | None = None, env: Mapping[str, str] | None = None, prog: str | None = None) -> C:
    """Build `cls` from command-line flags and the environment, validating every value."""
    env = os.environ if env is None else env
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=cls.__doc__)
    for f in dataclasses.fields(cls):
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None,
                            help=f"{f.metadata.get('help', '')} (env {env_name(f.name)}, default {f.default!r})")
    args = parser.parse_args(argv or [])
    values = {}
    for f in dataclasses.fields(cls):
        raw = getattr(args, f.name)
        if raw is None:
            raw = env.get(env_name(f.name))
        if raw is not None:
            values[f.name] = _parse(hints[f.name], f.name, raw)
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if validate:
        validate()
    return config
