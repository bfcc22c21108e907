"""Publishing weights for vLLM (`weight_sync.publish_weights`, `hf.write_hf_folder`, `safetensors_files`):
the bf16 folder loads in transformers and holds exactly the trainer's params cast to bf16; chunked
conversion and several files change nothing; the pre-laid-out safetensors files read back; the default
folder is /dev/shm when it has room; and a 2-process x 4-device job publishes the same bytes as one
process with 8 devices, with only process 0 loading and every process returning the same timings."""

import json
import os
import threading

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import transformers
from conftest import REPO
from multihost_job import run as run_job
from publish_job import CFG, host_params
from safetensors import safe_open

from tulu_jax.models import hf
from tulu_jax.models.loading import build_model, param_layout
from tulu_jax.models.safetensors_files import SafetensorsWriter, TensorSpec, file_names, split_files
from tulu_jax.rollout import weight_sync
from tulu_jax.rollout.weight_sync import check_folder, expected_tensors, publish_weights
from tulu_jax.sharding import make_mesh

BF16 = ml_dtypes.bfloat16


def _hf_layout(params, cfg) -> dict[str, np.ndarray]:
    """Our float32 params in transformers' Llama names and [out, in] layouts, written out by hand with NumPy
    (independent of the rules table), untied: lm_head is the embedding."""
    d, lay = cfg.hidden_size, params["layers"]
    out = {"model.embed_tokens.weight": params["embed"], "model.norm.weight": params["final_norm"]["scale"]}
    out["lm_head.weight"] = params["embed"] if cfg.tie_embeddings else params["lm_head"].T
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        attn, mlp = lay["self_attn"], lay["mlp"]
        for x in "qkv":
            out[p + f"self_attn.{x}_proj.weight"] = attn[f"{x}_kernel"][i].reshape(d, -1).T
        out[p + "self_attn.o_proj.weight"] = attn["o_kernel"][i].reshape(-1, d).T
        for x in ("gate", "up", "down"):
            out[p + f"mlp.{x}_proj.weight"] = mlp[f"{x}_kernel"][i].T
        out[p + "input_layernorm.weight"] = lay["input_layernorm"]["scale"][i]
        out[p + "post_attention_layernorm.weight"] = lay["post_attention_layernorm"]["scale"][i]
    return out


def _sharded(host, mesh):
    _, shardings = param_layout(build_model(CFG), mesh)
    return jax.tree.map(lambda h, s: jax.device_put(h, s), host, shardings)


def _tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), framework="numpy") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.fixture(scope="module")
def host():
    return jax.tree.map(np.asarray, host_params(seed=3))


def test_bf16_push_loads_in_transformers_and_equals_the_params_cast(host, tmp_path):
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    folder = publish_weights(_sharded(host, make_mesh(2, 2, 2)), CFG, str(tmp_path / "push"), "bfloat16")
    config = json.load(open(os.path.join(folder, "config.json")))
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "bfloat16"
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    got = {k: v.float().numpy() for k, v in model.state_dict().items()}
    want = _hf_layout(host, CFG)
    assert sorted(got) == sorted(want)
    assert next(model.parameters()).dtype == torch.bfloat16
    for name, w in want.items():
        # ml_dtypes rounds to nearest even, as XLA's convert does: bit-equal, no tolerance.
        np.testing.assert_array_equal(got[name], w.astype(BF16).astype(np.float32), err_msg=name)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_chunks_threads_and_files_change_nothing(host, tmp_path, dtype):
    """One layer per chunk, one writer thread, a file per few tensors, a 1-device mesh: the same tensors as
    the defaults on a sharded mesh, and exactly the params (float32) or their bf16 rounding."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices")
    config = {"model_type": "llama"}
    rules = hf.param_rules(CFG)
    copies = {"lm_head.weight": "model.embed_tokens.weight"}
    small = hf.write_hf_folder(
        _sharded(host, make_mesh(devices=jax.devices()[:1])), rules, CFG, config, str(tmp_path / "small"),
        dtype=dtype, max_shard_bytes=300_000, copies=copies, fetch_bytes=1, threads=1,
    )  # fmt: skip
    big = hf.write_hf_folder(
        _sharded(host, make_mesh(1, 4, 2)), rules, CFG, config, str(tmp_path / "big"), dtype=dtype, copies=copies
    )
    assert os.path.exists(os.path.join(small, "model.safetensors.index.json"))
    index = json.load(open(os.path.join(small, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 3
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in _tensors(small).values())
    a, b, want = _tensors(small), _tensors(big), _hf_layout(host, CFG)
    assert sorted(a) == sorted(b) == sorted(want)
    for name, w in want.items():
        expected = w.astype(np.float32 if dtype == "float32" else BF16)
        np.testing.assert_array_equal(a[name], expected, err_msg=name)
        np.testing.assert_array_equal(b[name], expected, err_msg=name)
    assert check_folder(big, expected_tensors(CFG)) == []


def test_writer_fills_preplanned_files_from_threads(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "a": rng.standard_normal((3, 5)).astype(np.float32),
        "b": rng.standard_normal((7,)).astype(BF16),
        "c": rng.standard_normal((2, 3, 4)).astype(np.float16),
        "d": rng.standard_normal((1, 9)).astype(BF16),
        "e": np.asfortranarray(rng.standard_normal((4, 6)).astype(np.float32)),  # not C-ordered: copied
    }
    dtypes = {np.dtype(np.float32): "float32", np.dtype(BF16): "bfloat16", np.dtype(np.float16): "float16"}
    specs = [TensorSpec(k, v.shape, dtypes[v.dtype]) for k, v in arrays.items()]
    files = split_files(specs, max_file_bytes=64)
    assert [[s.name for s in f] for f in files] == [["a"], ["b", "c"], ["d"], ["e"]]  # 60 | 14+48 | 18 | 96 bytes
    with SafetensorsWriter(str(tmp_path), list(zip(file_names(len(files)), files)), {"format": "pt"}) as w:
        assert w.missing() == ["a", "b", "c", "d", "e"]
        workers = [threading.Thread(target=w.write, args=(k, arrays[k])) for k in reversed(arrays)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        assert w.missing() == []
        with pytest.raises(ValueError, match=r"tensor a: got float32\[5, 3\], declared float32\[3, 5\]"):
            w.write("a", arrays["a"].T)
    got = _tensors(str(tmp_path))
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype
        np.testing.assert_array_equal(got[k], v)
    with safe_open(str(tmp_path / "model-00002-of-00004.safetensors"), framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}


def test_scratch_dir_is_shm_when_it_has_room(tmp_path, monkeypatch):
    shm = tmp_path / "shm"
    shm.mkdir()
    monkeypatch.setattr(weight_sync.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    assert os.path.dirname(weight_sync.scratch_weights_dir(1 << 20, shm=str(shm))) == str(shm)
    free = os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize
    too_big = weight_sync.scratch_weights_dir(free + (1 << 40), shm=str(shm))
    assert os.path.dirname(too_big) == str(tmp_path / "tmp")
    assert os.path.dirname(weight_sync.scratch_weights_dir(1, shm=str(tmp_path / "none"))) == str(tmp_path / "tmp")


def test_push_bytes_counts_the_untied_model():
    d, v = CFG.hidden_size, CFG.vocab_size
    assert weight_sync.push_bytes(CFG, "bfloat16") == 2 * (CFG.num_params + v * d)  # tied: the head is extra
    assert weight_sync.push_bytes(CFG, "float32") == 2 * weight_sync.push_bytes(CFG, "bfloat16")


def _job(tmp_path, processes, devices):
    out = tmp_path / f"{processes}x{devices}"
    out.mkdir()
    results = run_job([os.path.join(os.path.dirname(__file__), "publish_job.py"), str(out)], processes, devices, 600)
    for code, log in results:
        assert code == 0, log[-3000:]
    lines = [next(ln for ln in log.splitlines() if ln.startswith("RESULT ")) for _, log in results]
    return out, [json.loads(ln[len("RESULT ") :]) for ln in lines]


def test_two_processes_publish_the_same_bytes_as_one(tmp_path):
    one, (solo,) = _job(tmp_path, 1, 8)
    two, (first, second) = _job(tmp_path, 2, 4)
    for sub in ("publish", "pushed"):
        names = sorted(os.listdir(one / sub))
        assert names == sorted(os.listdir(two / sub)) == ["config.json", "model.safetensors"]
        for name in names:
            assert (one / sub / name).read_bytes() == (two / sub / name).read_bytes(), (sub, name)
    want = _hf_layout(jax.tree.map(np.asarray, host_params()), CFG)
    got = _tensors(two / "publish")
    for name, w in want.items():
        np.testing.assert_array_equal(got[name], w.astype(BF16), err_msg=name)
    assert _tensors(two / "pushed").keys() == got.keys()
    # Only process 0 loads; every process returns its timings, and both chose the folder process 0 made.
    assert solo["loads"] == [[solo["folder"], "v1"]]
    assert first["loads"] == [[first["folder"], "v1"]] and second["loads"] == []
    assert first["times"] == second["times"] and first["times"]["total_s"] > 0
    assert first["weights_dir"] == second["weights_dir"] and first["folder"] == second["folder"]
    assert second["other_version"] == "v2"  # a no-op load off process 0 still records the version
    assert not os.path.exists(first["weights_dir"])
    assert first["failed"] == "refused by the test"
    assert second["failed"] == "weight push 'v3' failed on process 0: RolloutServerError: refused by the test"
    # Process 0's failures reach every process (each raised, none hung), and any payload size broadcasts.
    assert first["write_failed"].startswith(("FileExistsError", "NotADirectoryError")), first["write_failed"]
    assert second["write_failed"].startswith("RuntimeError: process 0 could not write"), second["write_failed"]
    assert first["write_failed"].split(":")[0] in second["write_failed"]
    assert first["lead_failed"] == "KeyError: 'only on process 0'"
    assert second["lead_failed"] == "ProcessZeroError: process 0 failed: KeyError: 'only on process 0'"
    assert first["echoed"] == second["echoed"] == [0, 5000, 70000]


def test_bench_push_rows(tmp_path, capsys):
    """scripts/bench_push.py on the tiny preset: one row per dtype and folder, in the {"rows": [...]} shape,
    whose rates are the median time over the bytes and parameters the row names."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_push", REPO / "scripts" / "bench_push.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "push.json"
    argv = ["--preset", "tiny", "--dtype", "bfloat16", "float32", "--dir", str(tmp_path), "--reps", "1"]
    assert bench.main([*argv, "--devices", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["dir"]) for r in rows] == [("bfloat16", str(tmp_path)), ("float32", str(tmp_path))]
    tiny = bench.sized_config("tiny", None)
    for r in rows:
        assert r["params"] == tiny.num_params and r["write_s"] > 0
        assert r["gb"] == weight_sync.push_bytes(tiny, r["dtype"]) / 1e9
        assert r["s_per_gb"] == pytest.approx(r["write_s"] / r["gb"])
        assert r["s_per_1b_params"] == pytest.approx(r["write_s"] / (r["params"] / 1e9))
    assert "| write bfloat16 " in capsys.readouterr().out
    assert os.listdir(tmp_path) == ["push.json"]  # the pushes were cleaned up
    # --params picks the bench-1b layer count closest to the request.
    from tulu_jax.models.config import preset

    per_layer = preset("bench-1b", num_layers=2).num_params - preset("bench-1b", num_layers=1).num_params
    for want in (0.5e9, 1.24e9, 3e9):
        assert abs(bench.sized_config(None, want).num_params - want) <= per_layer / 2
