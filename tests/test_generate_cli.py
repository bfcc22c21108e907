"""`tulu-jax generate` with the local backend: rows in, completions with token ids and log-probs out,
resumable, and bad prompt rows named by file, line and field."""

import json
import re

import pytest

from tulu_jax.cli import main
from tulu_jax.data.chat import DataError
from tulu_jax.generate import prompt_messages


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [
    {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "id": "a"},
    {"prompt": "What color is snow?", "id": "b"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse 'cat'."}]},
]


def _gen(model, prompts, out, *extra):
    argv = ["generate", "--model", str(model), "--prompts", str(prompts), "--out", str(out), "--max-tokens", "12"]
    assert main([*argv, *extra]) == 0
    return [json.loads(line) for line in out.read_text().splitlines()]


def test_generate_writes_completions_and_resumes(tmp_path, tiny_sft_export, tiny_tokenizer, capsys):
    prompts = _write(tmp_path / "p.jsonl", ROWS)
    out = tmp_path / "out.jsonl"
    rows = _gen(tiny_sft_export, prompts, out, "--temperature", "0", "--chunk-size", "2")
    assert [r.get("id") for r in rows] == ["a", "b", None]  # input order, input fields kept
    for r in rows:
        (c,) = r["completions"]
        assert 1 <= len(c["token_ids"]) <= 12 and len(c["logprobs"]) == len(c["token_ids"])
        assert all(lp <= 0 for lp in c["logprobs"])
        assert c["finish_reason"] == ("stop" if c["token_ids"][-1] == tiny_tokenizer.eos_token_id else "length")
        assert c["text"] == tiny_tokenizer.decode(c["token_ids"], skip_special_tokens=True)
    want = tiny_tokenizer("<|user|>\nWhat color is snow?\n<|assistant|>\n", add_special_tokens=False)["input_ids"]
    assert rows[1]["prompt_token_ids"] == want

    # A run cut after its first chunk: the restart completes only the missing rows, greedy gives the same.
    out.write_text("\n".join(out.read_text().splitlines()[:2]) + "\n")
    capsys.readouterr()
    again = _gen(tiny_sft_export, prompts, out, "--temperature", "0", "--chunk-size", "2")
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["already_done"] == 2
    assert again == rows


def test_generate_n_samples_per_prompt(tmp_path, tiny_sft_export):
    prompts = _write(tmp_path / "p.jsonl", ROWS[:1])
    rows = _gen(tiny_sft_export, prompts, tmp_path / "o.jsonl", "--n", "4", "--seed", "3", "--temperature", "1.5")
    samples = rows[0]["completions"]
    assert len(samples) == 4 and len({tuple(s["token_ids"]) for s in samples}) > 1


@pytest.mark.parametrize(
    "row,field",
    [
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}, "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role"),
        ({"prompt": ""}, "prompt"),
        ({"text": "hi"}, "messages"),
    ],
)
def test_bad_prompt_rows_name_file_line_and_field(row, field):
    with pytest.raises(DataError, match=re.escape(f"p.jsonl line 3: field '{field}'")):
        prompt_messages(row, "p.jsonl line 3")
