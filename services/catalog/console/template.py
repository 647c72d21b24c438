"""A tiny template helper: every value is HTML-escaped unless it is already ``Markup``.

No template engine (and no dependency): pages are Python functions returning
``Markup`` built with ``html()``, so escaping cannot be forgotten.
"""

from __future__ import annotations

import html as _html
from collections.abc import Iterable
from typing import Any


class Markup(str):
    """Text that is already safe HTML (built by ``html`` or ``join``)."""


def escape(value: Any) -> Markup:
    if isinstance(value, Markup):
        return value
    return Markup(_html.escape("" if value is None else str(value), quote=True))


def html(template: str, **values: Any) -> Markup:
    """``template`` (trusted, in the code) with ``{name}`` replaced by escaped values.

    Values are strings by then: format them before (no ``{x:04X}`` in templates).
    """
    return Markup(template.format(**{k: escape(v) for k, v in values.items()}))


def join(parts: Iterable[Any], sep: str = "") -> Markup:
    return Markup(sep.join(escape(p) for p in parts))
