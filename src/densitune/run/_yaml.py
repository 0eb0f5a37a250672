"""Bounded YAML: PyYAML's SafeLoader that refuses every alias before it is expanded.

YAML aliases let 357 bytes expand into gigabytes ("billion laughs": each level repeats the previous one nine
times), so :func:`load_yaml_text` refuses the first alias. Size, UTF-8 and depth are checked by the one reader
of documents, :func:`densitune.run.files.parse_document`.
"""

from __future__ import annotations

from typing import Any

import yaml


class _NoAlias(ValueError):
    pass


class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that stops at the first alias (``*name``), before it is expanded."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _NoAlias(f"line {event.start_mark.line + 1}: YAML aliases (*{str(event.anchor)[:40]}) are not "
                           "allowed; write the values out")
        return super().compose_node(parent, index)


def load_yaml_text(text: str) -> Any:
    """The YAML document in ``text`` (ValueError for aliases and invalid YAML)."""
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader subclass
    except _NoAlias:
        raise
    except yaml.YAMLError as e:
        raise ValueError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
