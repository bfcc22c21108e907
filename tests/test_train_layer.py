"""The trainer layer every stage builds on: module boundaries, the metrics reporter's non-finite stop, a
checkpoint of any pytree of states, the run RNG, cadences, frozen models in the compute dtype, and the
held-out SFT loss over every conversation."""

import ast
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tulu_jax.train import cadence
from tulu_jax.train.checkpoint import Checkpointer
from tulu_jax.train.metrics import MetricsLogger
from tulu_jax.train.reporter import MetricsReporter, NonFiniteError
from tulu_jax.train.state import TrainState, step_key

REPO = Path(__file__).resolve().parent.parent
TRAIN = REPO / "tulu_jax" / "train"
TRAINERS = {"sft", "dpo", "rm"}  # stage trainers (the shells with a run_* entry point)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return out


def test_no_trainer_or_step_imports_another_stage():
    """Shared machinery lives in shared modules: no stage's trainer or pure step imports another stage's."""
    stages = {p.stem: _imports(p) for p in TRAIN.glob("*.py")}
    for name, imports in stages.items():
        stage = name.removesuffix("_step")
        others = {f"tulu_jax.train.{t}" for t in TRAINERS if t != stage}
        others |= {f"tulu_jax.train.{t}_step" for t in TRAINERS if t != stage}
        if name not in {"sft", "dpo", "rm", "sft_step", "dpo_step", "rm_step", "preference_run", "setup", "loop"}:
            continue
        if name in {"preference_run", "setup", "loop"}:  # shared: may import no stage at all
            others = {f"tulu_jax.train.{t}" for t in TRAINERS} | {f"tulu_jax.train.{t}_step" for t in TRAINERS}
        bad = sorted(i for i in imports if i in others)
        assert not bad, f"tulu_jax/train/{name}.py imports {bad}"
    # Pure steps receive the loss's parameters, never the experiment config.
    for step in ("sft_step", "dpo_step", "rm_step"):
        assert not any(i.startswith("tulu_jax.config") for i in stages[step]), step


def test_config_module_imports_nothing_heavy():
    code = (
        "import sys, tulu_jax.config, tulu_jax.configlib;"
        "heavy = [m for m in sys.modules if m.split('.')[0] in ('jax', 'grain', 'flax', 'optax', 'orbax', 'torch')"
        " or m.startswith(('tulu_jax.train', 'tulu_jax.data', 'tulu_jax.losses', 'tulu_jax.models'))];"
        "print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


class _Logger(MetricsLogger):
    def __init__(self):
        self.enabled, self.rows = True, []

    def log(self, step, metrics):
        self.rows.append((step, dict(metrics)))

    def close(self):
        pass


@pytest.mark.parametrize("bad", [{"loss": float("nan")}, {"grad_norm": float("inf")}])
def test_reporter_defers_reads_and_stops_on_a_non_finite_loss_or_gradient(bad):
    logger = _Logger()
    rep = MetricsReporter(name="t", start=0, total_steps=5, logger=logger, last_good=lambda: "2 in /ckpt")
    good = {"loss": jnp.float32(1.5), "grad_norm": jnp.float32(0.5)}
    rep.submit(1, good, host={"tokens": 100.0, "packing_efficiency": 0.5}, extra={"eval/loss": 2.0})
    assert logger.rows == []  # step 1 is read only once step 2 is dispatched
    rep.submit(2, good)
    assert [s for s, _ in logger.rows] == [1]
    row = logger.rows[0][1]
    assert row["loss"] == 1.5 and row["eval/loss"] == 2.0 and row["packing_efficiency"] == 0.5
    assert row["tokens_per_s"] > 0 and "tokens" not in row
    rep.submit(3, {**good, **{k: jnp.float32(v) for k, v in bad.items()}})  # reports step 2: fine
    assert [s for s, _ in logger.rows] == [1, 2]
    with pytest.raises(NonFiniteError, match=rf"{next(iter(bad))} is (nan|inf) at step 3; .* is 2 in /ckpt"):
        rep.flush()  # reading step 3 (e.g. before checkpointing it) stops the run
    assert [s for s, _ in logger.rows] == [1, 2]
    rep.close()


def _state(seed: int, shape=(4, 3)) -> TrainState:
    params = {"w": jax.random.normal(jax.random.key(seed), shape)}
    tx = optax.adamw(1e-3)
    return TrainState(
        step=jnp.int32(seed),
        params=params,
        opt_state=tx.init(params),
        rng=jax.random.key_data(jax.random.key(seed)),
    )


def test_checkpoint_holds_any_pytree_of_states_with_data_and_rng(tmp_path):
    """A PPO-shaped checkpoint: policy and value states, a rollout RNG, and the data iterator's state."""
    states = {"policy": _state(1), "value": _state(2, (3, 1)), "rollout_rng": jax.random.key_data(jax.random.key(7))}
    ckpt = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    ckpt.save(3, states, {"epoch": 1, "next_index": 17}, extra={"note": "x"})
    ckpt.close()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), states)
    shardings = jax.tree.map(lambda x: jax.sharding.SingleDeviceSharding(jax.devices()[0]), states)
    again = Checkpointer(str(tmp_path / "ckpt"), keep=2)
    assert again.latest_step() == 3
    restored, data_state, extra = again.restore(abstract, shardings)
    again.close()
    assert data_state == {"epoch": 1, "next_index": 17} and extra == {"note": "x"}
    for a, b in zip(jax.tree.leaves(states), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_step_key_derives_from_the_checkpointed_rng_and_step():
    s = _state(5)
    k = step_key(s, purpose=1)
    assert np.array_equal(jax.random.key_data(k), jax.random.key_data(step_key(s, purpose=1)))  # reproducible
    assert not np.array_equal(jax.random.key_data(k), jax.random.key_data(step_key(s, purpose=0)))
    later = s.replace(step=s.step + 1)
    assert not np.array_equal(jax.random.key_data(k), jax.random.key_data(step_key(later, purpose=1)))
    restored = TrainState(step=jnp.int32(5), params=None, opt_state=None, rng=np.asarray(s.rng))  # from disk
    assert np.array_equal(jax.random.key_data(jax.jit(step_key, static_argnums=1)(restored, 1)), jax.random.key_data(k))


def test_cadences():
    assert [s for s in range(1, 11) if cadence.eval_due(s, 4, 10)] == [4, 8, 10]
    assert [s for s in range(1, 11) if cadence.eval_due(s, 0, 10)] == [10]
    assert [s for s in range(1, 11) if cadence.checkpoint_due(s, 3)] == [3, 6, 9]
    assert not any(cadence.checkpoint_due(s, 0) for s in range(1, 11))


def test_frozen_model_loads_in_the_compute_dtype(tmp_path):
    """A live DPO reference is never updated: it is held in the compute dtype, not float32 master weights."""
    from hf_models import make_hf_model

    from tulu_jax import configlib
    from tulu_jax.config import DPOConfig
    from tulu_jax.train import setup

    make_hf_model("llama", str(tmp_path / "m"))
    cfg = configlib.load_config(
        DPOConfig,
        None,
        [
            f"model.path={tmp_path / 'm'}",
            "model.dtype=bfloat16",
            "data.use_bundled=true",
            f"output_dir={tmp_path / 'out'}",
        ],
    )
    run = setup.prepare(cfg)
    master = run.load_or_init(cfg.model.path)
    frozen = run.load_or_init(cfg.model.path, dtype=run.model.dtype)
    assert {x.dtype for x in jax.tree.leaves(master)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(frozen)} == {jnp.dtype(jnp.bfloat16)}
    for a, b in zip(jax.tree.leaves(master), jax.tree.leaves(frozen)):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a.astype(jnp.bfloat16)), np.asarray(b))


@pytest.mark.parametrize("pack", [False, True])
def test_sft_eval_counts_every_conversation_once(tmp_path, pack, tiny_tokenizer):
    """12 held-out conversations with batch 8: all 12 count (not the first 8), packed or not, and the summed
    NLL equals a per-conversation float64 reference on the same parameters."""
    from tulu_jax import configlib
    from tulu_jax.config import SFTConfig
    from tulu_jax.data import bundled_file
    from tulu_jax.losses import token_logps
    from tulu_jax.train import setup
    from tulu_jax.train.sft import Evaluator

    lines = Path(bundled_file("eval")).read_text().splitlines()[:12]
    (tmp_path / "eval.jsonl").write_text("\n".join(lines) + "\n")
    cfg = configlib.load_config(
        SFTConfig,
        str(REPO / "configs/sft/tiny.yaml"),
        [
            f"output_dir={tmp_path / 'out'}",
            "data.use_bundled=false",
            f"data.train_files={bundled_file('train')}",
            f"data.eval_files={tmp_path / 'eval.jsonl'}",
            f"data.pack={str(pack).lower()}",
        ],
    )
    run = setup.prepare(cfg)
    run.add_optimizer(10)
    params = run.load_or_init(None)
    got = Evaluator(run)(params)

    # Reference: each conversation alone, unpadded, NLL of its labelled next tokens in float64.
    from tulu_jax.data import encode_chat

    encoded = [encode_chat(json.loads(line)["messages"], run.tokenizer, cfg.data.max_seq_len)[:2] for line in lines]
    width = max(len(ids) for ids, _ in encoded)
    ids_BxT = np.zeros((len(encoded), width), np.int32)
    seg_BxT = np.zeros((len(encoded), width), np.int32)  # 0 = padding after each conversation (causal: unseen)
    for i, (ids, _) in enumerate(encoded):
        ids_BxT[i, : len(ids)], seg_BxT[i, : len(ids)] = ids, 1
    logits = run.model.apply({"params": params}, jnp.asarray(ids_BxT), None, jnp.asarray(seg_BxT))
    lp = np.asarray(token_logps(logits[:, :-1], jnp.asarray(ids_BxT[:, 1:])), np.float64)
    nll, tokens = 0.0, 0
    for i, (ids, mask) in enumerate(encoded):
        w = np.asarray(mask[1:], np.float64)
        nll, tokens = nll - float((lp[i, : len(ids) - 1] * w).sum()), tokens + int(w.sum())
    assert got["eval/nll_per_token"] == pytest.approx(nll / tokens, rel=1e-5)
    assert got["eval/loss"] == pytest.approx(nll / 12, rel=1e-5)  # Tülu's sum reduction: per conversation


def test_reporter_runs_an_evaluation_outside_every_steps_time():
    """`late` (an evaluation) joins its step's row, and its time counts towards neither that step's nor the
    next step's tokens_per_s."""
    import time

    logger = _Logger()
    rep = MetricsReporter(name="t", start=0, total_steps=3, logger=logger)
    good = {"loss": jnp.float32(1.0), "grad_norm": jnp.float32(1.0)}

    def slow_eval():
        time.sleep(0.5)
        return {"eval/loss": 2.5}

    rep.submit(1, good, host={"tokens": 1.0}, late=slow_eval)
    rep.flush()
    rep.submit(2, good, host={"tokens": 1.0})
    rep.flush()
    rows = dict(logger.rows)
    assert rows[1]["eval/loss"] == 2.5 and rep.last["step"] == 2
    # 1 token over well under the 0.5 s the evaluation slept: > 2 tokens/s for both steps.
    assert rows[1]["tokens_per_s"] > 2 and rows[2]["tokens_per_s"] > 2
    rep.close()


def test_export_tokenizer_carries_the_template_the_run_trained_in(tiny_tokenizer):
    import copy

    from tulu_jax.data.chat import TULU_CHAT_TEMPLATE, render_tulu
    from tulu_jax.train.loop import trained_template_tokenizer

    tokenizer = copy.deepcopy(tiny_tokenizer)  # the fixture is shared by the session
    chatml = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    )
    tokenizer.chat_template = chatml
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    exported = trained_template_tokenizer(tokenizer, "tulu")
    assert exported is not tokenizer and tokenizer.chat_template == chatml  # the run's own is untouched
    assert exported.chat_template == TULU_CHAT_TEMPLATE
    assert exported.apply_chat_template(chat, tokenize=False) == render_tulu(chat, tokenizer.eos_token)
    assert trained_template_tokenizer(tokenizer, "model") is tokenizer  # trained in its own format


def test_config_yaml_describes_the_run_that_made_the_checkpoints(tmp_path):
    """A new folder gets config.yaml; a folder with checkpoints keeps it when a later invocation (a resume, a
    rerun with other settings) differs, and that invocation's config goes to config.resumed.yaml."""
    import yaml

    from tulu_jax.train.setup import record_config

    first = {"optim": {"lr": 1e-4}, "train": {"max_steps": 10}}
    record_config(str(tmp_path), first)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text()) == first
    record_config(str(tmp_path), {"optim": {"lr": 5e-4}, "train": {"max_steps": 10}})  # no checkpoint yet: a new run
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    (tmp_path / "checkpoints" / "3").mkdir(parents=True)
    record_config(str(tmp_path), {"optim": {"lr": 5e-4}, "train": {"max_steps": 10}})  # same config: nothing new
    assert not (tmp_path / "config.resumed.yaml").exists()
    later = {"optim": {"lr": 9e-4}, "train": {"max_steps": 20}}
    record_config(str(tmp_path), later)
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["optim"]["lr"] == 5e-4
    assert yaml.safe_load((tmp_path / "config.resumed.yaml").read_text()) == later
