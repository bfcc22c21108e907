"""`tulu-jax generate` with the local backend: rows in, completions with token ids and log-probs out,
resumable after a kill (torn last line repaired, same file as an unbroken run), per-chunk seeds, a sharded
sampler equal to one device, bad prompt rows named by file, line and field, and the backend flags checked
up front (vLLM server URLs probed on /health)."""

import http.server
import json
import re
import threading

import jax
import numpy as np
import pytest

from tulu_jax.cli import main
from tulu_jax.data.chat import DataError
from tulu_jax.generate import chunk_seed, prompt_messages, resume_output
from tulu_jax.inputs import InputError, check_backend_flags, check_servers


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
        assert 1 <= len(c["token_ids"]) <= 12 and len(c["logps"]) == len(c["token_ids"])
        assert all(lp <= 0 for lp in c["logps"])
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


def _kill_mid_row(out, keep_rows):
    """What a kill leaves: `keep_rows` complete lines, then half of the next one (no newline)."""
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:keep_rows]) + lines[keep_rows][: len(lines[keep_rows]) // 2])


def test_killed_sampled_run_resumes_to_the_same_file(tmp_path, tiny_sft_export, capsys):
    """Sampling at temperature 1 with a seed: a run killed in the middle of chunk 1 (a torn row) and
    restarted writes exactly the file an uninterrupted run writes; the torn row is redone, not counted."""
    rows = [{"prompt": "Name a fruit.", "id": i} for i in range(5)]  # one prompt, so only seeds tell rows apart
    prompts = _write(tmp_path / "p.jsonl", rows)
    args = ("--seed", "7", "--chunk-size", "2")
    full = _gen(tiny_sft_export, prompts, tmp_path / "full.jsonl", *args)
    texts = [tuple(r["completions"][0]["token_ids"]) for r in full]
    assert texts[0:2] != texts[2:4], "chunks 0 and 1 hold the same prompts: equal output means one seed"

    out = tmp_path / "out.jsonl"
    out.write_text((tmp_path / "full.jsonl").read_text())
    _kill_mid_row(out, keep_rows=3)  # rows 0-2 done (chunk 1 half written), row 3 torn
    capsys.readouterr()
    again = _gen(tiny_sft_export, prompts, out, *args)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["already_done"] == 3 and summary["generated"] == 2 and summary["repaired_torn_row"] is True
    assert again == full


def test_resume_output_cuts_only_a_torn_tail(tmp_path):
    out = tmp_path / "o.jsonl"
    row = lambda i: json.dumps({"prompt": str(i), "prompt_token_ids": [i], "completions": []})  # noqa: E731
    out.write_text(f"{row(1)}\n{row(2)}\n{row(3)[:20]}")
    assert resume_output(str(out)) == (2, True) and out.read_text() == f"{row(1)}\n{row(2)}\n"
    assert resume_output(str(out)) == (2, False)
    out.write_text(f"{row(1)}\nnot json\n{row(3)}\n")
    with pytest.raises(DataError, match=r"o.jsonl line 2: not a row written by tulu-jax generate"):
        resume_output(str(out))
    # Some other JSONL (say, the prompts file itself given as --out) is never appended to.
    out.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(DataError, match=r"o.jsonl line 1: not a row written by tulu-jax generate"):
        resume_output(str(out))


def test_chunk_seeds_differ_and_are_stable():
    seeds = [chunk_seed(7, k) for k in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert chunk_seed(7, 3) == seeds[3] and chunk_seed(8, 3) != seeds[3]


def test_sharded_generate_equals_one_device(tmp_path, tiny_sft_export):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices; run with XLA_FLAGS=--xla_force_host_platform_device_count=8")
    prompts = _write(tmp_path / "p.jsonl", ROWS)
    args = ("--seed", "3", "--n", "2", "--chunk-size", "3")
    one = _gen(tiny_sft_export, prompts, tmp_path / "one.jsonl", *args)
    eight = _gen(tiny_sft_export, prompts, tmp_path / "eight.jsonl", *args, "--mesh", "2,2,2")
    for a, b in zip(one, eight, strict=True):
        for x, y in zip(a["completions"], b["completions"], strict=True):
            assert x["token_ids"] == y["token_ids"]
            # Sharded reductions add in another order: float32 rounding of sums of ~1e3 terms of size ~1.
            np.testing.assert_allclose(x["logps"], y["logps"], atol=1e-4)


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


class _Health(http.server.BaseHTTPRequestHandler):
    """A stand-in server: /health answers 200 on port A; every path answers 404 on port B."""

    def do_GET(self):  # noqa: N802 (the http.server name)
        ok = self.server.healthy and self.path == "/health"
        self.send_response(200 if ok else 404)
        self.end_headers()

    def log_message(self, *args):  # keep the test output quiet
        pass


@pytest.fixture
def health_servers():
    servers = []
    for healthy in (True, False):
        server = http.server.HTTPServer(("127.0.0.1", 0), _Health)
        server.healthy = healthy
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [f"http://127.0.0.1:{s.server_address[1]}" for s in servers]
    for s in servers:
        s.shutdown()
        s.server_close()


def test_check_servers_probes_health(health_servers):
    """Every URL is probed before any request: a server that answers /health passes (trailing slash dropped),
    one that does not is refused by URL; a malformed URL is refused before any probe."""
    good, bad = health_servers
    assert check_servers(f"{good}/, {good}") == [good, good]
    with pytest.raises(InputError, match=re.escape(f"--servers {bad}: GET /health answered HTTP 404")):
        check_servers(f"{good},{bad}")
    for url in ("notaurl", "127.0.0.1:8000", "http://", "file:///tmp/x"):
        with pytest.raises(InputError, match=re.escape(f"--servers {url.rstrip('/')}: not an http(s) URL")):
            check_servers(f"{url},{good}")


@pytest.mark.parametrize(
    "backend,servers,mesh,message",
    [
        ("vllm", None, None, "--backend vllm needs --servers"),
        ("vllm", "http://h:1", (1, 1, 1), "--mesh applies to --backend local only"),
        ("local", "http://h:1", None, "--servers http://h:1: needs --backend vllm"),
    ],
)
def test_backend_flags_that_do_not_go_together(backend, servers, mesh, message):
    with pytest.raises(InputError, match=re.escape(message)):
        check_backend_flags(backend, servers, mesh)
    check_backend_flags("vllm", "http://h:1", None)  # the combinations that go together pass
    check_backend_flags("local", None, (1, 1, 1))
