"""GSM8K verifier: the last number of the answer must equal the ground truth as a string (open-instruct
`ground_truth_utils.py` `verify_gsm8k_sample`; Tülu 3 §6).

The number pattern is open-instruct HEAD's `[-+]?(?:\\d*\\.\\d+|\\d+)`, which keeps the sign of integers
(the 2024 pattern `[-+]?\\d*\\.\\d+|\\d+` dropped it, so "-5" was read as "5").
"""

import re

# The reference removes thousands commas with ONE non-overlapping `(\d),(\d)` -> `\1\2` pass. Groups of
# 2+ digits all merge ("1,000,000" -> "1000000"), but single digits do not: "2,3,5" -> "23,5" (last
# number 5), not "235". One pass of a simple pattern also stays linear on 1 MB responses.
_THOUSANDS_COMMA = re.compile(r"(\d),(\d)")
_NUMBER = re.compile(r"[-+]?(?:\d*\.\d+|\d+)")


def drop_thousands_commas(text: str) -> str:
    """`text` after one left-to-right, non-overlapping pass that deletes each comma between two digits, as
    the reference does: "1,234,567" -> "1234567", "12,345.67" -> "12345.67", "1,2,3" -> "12,3"."""
    return _THOUSANDS_COMMA.sub(r"\1\2", text)


def extract_gsm8k_answer(answer: str) -> str:
    """The last number of `answer` (sign and decimals kept, thousands commas removed by
    `drop_thousands_commas`), or the whole `answer` when it holds no number."""
    text = drop_thousands_commas(answer)
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - only the last match counts
        pass
    return text if last is None else last.group(0)


def gsm8k_ground_truth(answer_field: str) -> str:
    """The final answer of a GSM8K `answer` field: the text after its last `####` (the whole field when it
    has none, as in Tülu's RLVR-GSM data), stripped, thousands commas removed ("... #### 1,200" -> "1200",
    " 18 " -> "18")."""
    return drop_thousands_commas(answer_field.rpartition("####")[2].strip())


def check_gsm8k_ground_truth(answer_field: str) -> None:
    """Raises ValueError (one line) unless `gsm8k_ground_truth(answer_field)` is a whole number of the
    extraction pattern: anything else ("18 apples", "$18", "1,2") can never equal an extracted number, so
    every response would silently score 0."""
    truth = gsm8k_ground_truth(answer_field)
    if _NUMBER.fullmatch(truth) is None:
        raise ValueError(f"ground truth {truth!r:.100} is not a number the GSM8K rule can match")


def verify_gsm8k(answer: str, ground_truth: str) -> bool:
    """True iff the last number of `answer` (see `extract_gsm8k_answer`) equals the normalised ground truth
    (see `gsm8k_ground_truth`) as a case-insensitive string: "18.0" does not match "18"."""
    return extract_gsm8k_answer(answer).lower() == gsm8k_ground_truth(ground_truth).lower()
