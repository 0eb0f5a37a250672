"""Bounded YAML for spec files: a size cap, no aliases, and error text that never echoes a whole value.

A spec file is a few hundred bytes of keys and lists. YAML aliases let 357 bytes expand
into gigabytes ("billion laughs": each level repeats the previous one nine times), so
this loader refuses every alias before anything is built, and refuses files larger than
:data:`MAX_SPEC_BYTES` before parsing them. Only PyYAML and the standard library are
imported here: a spec is rejected before torch or Ray are loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from densitune.errors import ConfigError

#: Largest spec file read (bytes). Real specs are well under 4 KiB.
MAX_SPEC_BYTES = 256 * 1024
#: How many characters of a user's value an error message repeats.
ECHO_LIMIT = 200


def echo(value: Any, limit: int = ECHO_LIMIT) -> str:
    """``repr(value)`` for an error message: one line, cut to ``limit`` characters.

    Large containers are cut before ``repr`` builds their whole text.
    """
    if isinstance(value, (list, tuple)) and len(value) > limit:
        value = type(value)(value[:limit])
    if isinstance(value, dict) and len(value) > limit:
        value = dict(list(value.items())[:limit])
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that stops at the first alias (``*name``), before it is expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            mark = event.start_mark
            raise ConfigError(f"line {mark.line + 1}: YAML aliases (*{str(event.anchor)[:40]}) are not allowed in a spec; "
                              "write the values out")
        return super().compose_node(parent, index)


def load_yaml(path: Path, *, max_bytes: int = MAX_SPEC_BYTES) -> Any:
    """The YAML document in ``path``; :class:`ConfigError` naming the file if it is too large, has aliases or is invalid."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read(max_bytes + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the spec file: {e.strerror or type(e).__name__}") from None
    if len(raw) > max_bytes:
        raise ConfigError(f"{path}: spec file larger than {max_bytes // 1024} KiB; a search spec is a short list of keys")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8)") from None
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0][:ECHO_LIMIT]}") from None
    except RecursionError:
        raise ConfigError(f"{path}: YAML nested too deeply") from None
