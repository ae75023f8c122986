"""Field checks shared by the gate config and the sparsity policy: one error type that names the
field, what was expected and what was found."""

from __future__ import annotations


class InvalidSetting(ValueError):
    """A configuration field holds a value that is not accepted.

    `owner` is the class the user built (`SeerAttentionConfig`, `SparsityPolicy`, ...), so the message
    names what the user typed: `SeerAttentionConfig.density: expected a number in (0, 1], found 7`.
    """

    def __init__(self, owner: str, field: str, expected: str, found):
        self.owner, self.field, self.expected, self.found = owner, field, expected, found
        super().__init__(f"{owner}.{field}: expected {expected}, found {found!r}")

    def for_owner(self, owner: str) -> "InvalidSetting":
        """The same error, named after the class that received the field."""
        return InvalidSetting(owner, self.field, self.expected, self.found)


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check(ok: bool, owner: str, field: str, expected: str, found) -> None:
    if not ok:
        raise InvalidSetting(owner, field, expected, found)


def reject_unknown(owner: str, given, known) -> None:
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"Unknown {owner} field(s) {unknown}; expected some of {sorted(known)}")
