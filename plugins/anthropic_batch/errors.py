"""The library's exception base: ``except AnthropicBatchError`` catches every error we raise on purpose.

Each concrete error also derives from the builtin its callers caught before (``ValueError`` for bad
input, ``RuntimeError`` for a state we cannot go on from, ...), so existing handlers keep working.
No imports: every module, the DAG-parse-time ones included, can import this one.
"""

from __future__ import annotations


class AnthropicBatchError(Exception):
    """Base of every exception the anthropic_batch library defines."""
