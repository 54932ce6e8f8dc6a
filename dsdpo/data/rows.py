"""One preference row: its fields, their validation, and its stable id.

A row is a mapping with `prompt`, `chosen` and `rejected` (plain text, or conversational lists of
{role, content} messages) and optional `id` and `preference_prob`. For SFT a row is `prompt` and
`completion` (or a preference row, of which the chosen side is read). Other fields (provenance, kinds)
are allowed and ignored. Every problem is a `RowError` with a reason, so a loader can either raise it
naming the file and line, or count it and skip the row.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

Text = str | list[dict]

REQUIRED_FIELDS = ("prompt", "chosen", "rejected")
# The roles chat templates know; another one ("wizard") is a typo or a different schema, and a
# template would render it silently wrong or fail deep inside the tokenizer.
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class PreferenceExample:
    id: str  # stable: the row's `id`, else a hash of prompt/chosen/rejected
    prompt: Text  # plain text, or conversational messages [{role, content}, ...]
    chosen: Text  # for SFT: the completion
    rejected: Text | None  # None for SFT rows
    preference_prob: float | None  # soft label P(chosen ≻ rejected) in [0, 1]
    source: str  # "file.jsonl:12", for error messages

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


class RowError(ValueError):
    """A row that cannot be used; `reason` is the key it is counted under when skipped."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def check_messages(field: str, messages: list) -> list[dict]:
    for number, message in enumerate(messages, 1):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise RowError("malformed", f'field "{field}" message {number} is not a {{role, content}} object')
        if not isinstance(message.get("content"), str):
            raise RowError("malformed", f'field "{field}" message {number} has no text "content"')
        if message["role"] not in ROLES:
            raise RowError(
                "bad_role",
                f'field "{field}" message {number} has role {message["role"]!r}; '
                f"use one of {', '.join(ROLES)}",
            )
        check_text(f"{field}", message["content"])
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def check_text(field: str, text: str) -> str:
    """Text a tokenizer can take: JSON's "\\ud800" escapes decode to lone surrogates, which are no
    characters (UTF-8 cannot encode them) and make tokenizers fail with a TypeError."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise RowError(
            "malformed", f'field "{field}" holds an invalid character {text[err.start]!r} (a lone surrogate)'
        ) from None
    return text


def check_prompt(value: Any) -> Text:
    if isinstance(value, str):
        return check_text("prompt", value)
    if isinstance(value, list) and value:
        return check_messages("prompt", value)
    raise RowError("malformed", 'field "prompt" must be text or a non-empty list of {role, content} messages')


def check_response(field: str, value: Any) -> Text:
    """Plain text, or a conversational response: exactly one assistant message."""
    if isinstance(value, list):
        messages = check_messages(field, value)
        if len(messages) != 1 or messages[0]["role"] != "assistant":
            raise RowError(
                "malformed", f'field "{field}" must hold exactly one message, with role "assistant"'
            )
        text = messages[0]["content"]
    elif isinstance(value, str):
        text = check_text(field, value)
    else:
        raise RowError("malformed", f'field "{field}" must be text or a list with one assistant message')
    if not text.strip():
        raise RowError("empty_response", f'field "{field}" is empty')
    return value if isinstance(value, str) else messages


def response_text(response: Text) -> str:
    """The text a response contributes: itself, or its assistant message's content."""
    return response if isinstance(response, str) else response[0]["content"]


def check_preference_prob(value: Any) -> float | None:
    if value is None:
        return None
    # bool is an int in Python, but `true` is no probability.
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
        raise RowError(
            "bad_preference_prob", f'field "preference_prob" must be a number in [0, 1], got {value!r}'
        )
    if math.isnan(value):
        raise RowError("bad_preference_prob", 'field "preference_prob" is NaN')
    return float(value)


def check_id(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int) or value == "":
        raise RowError("bad_id", f'field "id" must be a non-empty string or an integer, got {value!r}')
    return check_text("id", str(value))


def content_id(prompt: Text, chosen: Text, rejected: Text | None) -> str:
    """A hash of the content: the same row gets the same id in every run and on every rank."""
    text = json.dumps([prompt, chosen, rejected], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def examples_digest(examples: list[PreferenceExample]) -> str:
    """A hash of the examples' content in order (ids, texts, soft labels): a data file edited in
    place changes it, even with the same rows count."""
    digest = hashlib.sha256()
    for e in examples:
        row = [e.id, e.prompt, e.chosen, e.rejected, e.preference_prob]
        digest.update(json.dumps(row, sort_keys=True, ensure_ascii=False).encode() + b"\n")
    return digest.hexdigest()[:16]


def parse_row(row: Any, source: str) -> PreferenceExample:
    """A validated example from one raw row; raises RowError (without the source) when unusable."""
    if not isinstance(row, Mapping):
        raise RowError("malformed", f"the row is a {type(row).__name__}, not an object")
    for field in REQUIRED_FIELDS:
        if field not in row or row[field] is None:
            raise RowError("missing_field", f'field "{field}" is missing')
    prompt = check_prompt(row["prompt"])
    chosen = check_response("chosen", row["chosen"])
    rejected = check_response("rejected", row["rejected"])
    if response_text(chosen) == response_text(rejected):
        raise RowError("identical", "chosen and rejected are identical")
    given_id = check_id(row.get("id"))
    return PreferenceExample(
        id=given_id if given_id is not None else content_id(prompt, chosen, rejected),
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        preference_prob=check_preference_prob(row.get("preference_prob")),
        source=source,
    )


def parse_completion_row(row: Any, source: str) -> PreferenceExample:
    """An SFT example from a prompt/completion row or, failing a completion, a preference row's
    chosen side; raises RowError (without the source) when unusable."""
    if not isinstance(row, Mapping):
        raise RowError("malformed", f"the row is a {type(row).__name__}, not an object")
    field = "completion" if row.get("completion") is not None else "chosen"
    for required in ("prompt", field):
        if row.get(required) is None:
            missing = 'field "completion" (or "chosen")' if required == field else 'field "prompt"'
            raise RowError("missing_field", f"{missing} is missing")
    prompt = check_prompt(row["prompt"])
    completion = check_response(field, row[field])
    given_id = check_id(row.get("id"))
    return PreferenceExample(
        id=given_id if given_id is not None else content_id(prompt, completion, None),
        prompt=prompt,
        chosen=completion,
        rejected=None,
        preference_prob=None,
        source=source,
    )
