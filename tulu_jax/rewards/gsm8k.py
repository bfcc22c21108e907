"""GSM8K verifier: the last number of the answer must equal the ground truth as a string (open-instruct
`ground_truth_utils.py` `verify_gsm8k_sample`; Tülu 3 §6).

The number pattern is open-instruct HEAD's `[-+]?(?:\\d*\\.\\d+|\\d+)`, which keeps the sign of integers
(the 2024 pattern `[-+]?\\d*\\.\\d+|\\d+` dropped it, so "-5" was read as "5").
"""

import re

# A comma between two digits is a thousands separator. Removing them all at once equals the reference's
# repeated `(\d),(\d)` -> `\1\2` until nothing changes: a comma next to another comma never gains digits on
# both sides, and one pass keeps 1 MB responses linear.
_THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d)")
_NUMBER = re.compile(r"[-+]?(?:\d*\.\d+|\d+)")


def drop_thousands_commas(text: str) -> str:
    """`text` without the commas that sit between two digits ("1,234,567" -> "1234567")."""
    return _THOUSANDS_COMMA.sub("", text)


def extract_gsm8k_answer(answer: str) -> str:
    """The last number of `answer` (sign and decimals kept, thousands commas removed), or the whole
    `answer` when it holds no number."""
    text = drop_thousands_commas(answer)
    last = None
    for last in _NUMBER.finditer(text):  # noqa: B007 - only the last match counts
        pass
    return text if last is None else last.group(0)


def gsm8k_ground_truth(answer_field: str) -> str:
    """The final answer of a GSM8K `answer` field: the text after its last `####`, stripped, thousands
    commas removed ("... #### 1,200" -> "1200"). A field without `####` is returned unchanged (it is
    already the answer, as in Tülu's RLVR-GSM data)."""
    if "####" not in answer_field:
        return answer_field
    return drop_thousands_commas(answer_field.rpartition("####")[2].strip())


def verify_gsm8k(answer: str, ground_truth: str) -> bool:
    """True iff the last number of `answer` (see `extract_gsm8k_answer`) equals the ground truth
    (see `gsm8k_ground_truth`) as a case-insensitive string: "18.0" does not match "18"."""
    return extract_gsm8k_answer(answer).lower() == gsm8k_ground_truth(ground_truth).lower()
