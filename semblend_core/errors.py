"""SemBlend's small exception hierarchy.

Configuration problems raise :class:`ConfigError` (a ``ValueError``) at start-up. Everything that can go wrong
while planning is turned into a declined plan with a reason instead of an exception (rule 5: never fail inference);
the errors below are raised only by explicit management calls (``register_donor``) and by adapters' start-up.
"""

from __future__ import annotations


class SemBlendError(Exception):
    """Base class of every error SemBlend raises on purpose."""


class ConfigError(SemBlendError, ValueError):
    """A configuration key or value is not allowed; the message names the allowed ones."""


class InvalidInputError(SemBlendError, ValueError, TypeError):
    """An argument of a management call has the wrong type or value (a ``text`` that is not a string, a
    ``namespace`` that is not a ``CacheNamespace``...); the message names what was expected."""


class InvalidTokensError(InvalidInputError):
    """Token ids are empty, negative, too large, booleans, or not integers."""


class DuplicateDonorError(SemBlendError, KeyError):
    """A donor id is already registered in this namespace with different tokens."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else "duplicate donor"


class StoreFullError(SemBlendError, RuntimeError):
    """The donor store is at capacity and every resident donor is pinned by an in-flight load."""


class MissingDependencyError(SemBlendError, ImportError):
    """An optional dependency is needed; the message says which extra installs it."""
