"""The answer part of a model output, as every RLVR verifier sees it (open-instruct
`ground_truth_utils.py`: each verifier first keeps the text after the last assistant header)."""

ASSISTANT_HEADER = "<|assistant|>\n"


def answer_text(model_output: str) -> str:
    """The text after the last `<|assistant|>\\n` of `model_output` (all of it when there is none),
    stripped of surrounding whitespace. Linear in the length of the output."""
    return model_output.rpartition(ASSISTANT_HEADER)[2].strip()
