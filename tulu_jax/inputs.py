"""Checks of user inputs (paths and values named by a command-line flag or a config key), shared by the CLI,
the trainers' set-up and the vLLM launcher. Each problem is one InputError line naming the flag or key and
the path, raised before any compute. `name` is a flag ("--model": "--model /x: ...") or a config key
("model.path": "model.path: /x: ...")."""

from __future__ import annotations

import os

DATA_SUFFIXES = (".jsonl", ".parquet")


def where(name: str, path: str) -> str:
    """How an error names its input: `--flag PATH` or `config.key: PATH`."""
    return f"{name} {path}" if name.startswith("-") else f"{name}: {path}"


class InputError(ValueError):
    """A bad input named by its flag or config key (a path or a value): the CLI reports it as one
    `tulu-jax: error:` line and exits with code 2."""


def check_readable_file(path: str, flag: str) -> str:
    """`path` if it is a readable file; else InputError naming `flag` and `path`."""
    if not os.path.exists(path):
        raise InputError(f"{where(flag, path)}: no such file")
    if os.path.isdir(path):
        raise InputError(f"{where(flag, path)}: is a directory, expected a file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise InputError(f"{where(flag, path)}: cannot read it: {e.strerror or e}") from None
    return path


def check_data_path(path: str, flag: str) -> str:
    """`path` if it is an existing, readable data file or folder (JSONL, Parquet, save_to_disk); else
    InputError naming `flag` and `path`."""
    if not os.path.exists(path):
        raise InputError(f"{where(flag, path)}: no such file or directory")
    if not os.access(path, os.R_OK):
        raise InputError(f"{where(flag, path)}: not readable")
    if os.path.isfile(path) and not path.endswith(DATA_SUFFIXES):
        raise InputError(f"{where(flag, path)}: unsupported file type (expected .jsonl, .parquet or a datasets folder)")
    return path


def check_model_dir(path: str, flag: str = "--model", *, weights: bool = True) -> str:
    """`path` if it is a Hugging Face model folder (a config.json we can read and, with `weights`,
    model.safetensors or its index); else InputError naming `flag` and `path`."""
    if not os.path.exists(path):
        raise InputError(f"{where(flag, path)}: no such directory")
    if not os.path.isdir(path):
        raise InputError(f"{where(flag, path)}: not a directory; expected a Hugging Face model folder")
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        raise InputError(f"{where(flag, path)}: not a Hugging Face model folder (no config.json)")
    from tulu_jax.models import hf

    try:
        hf.load_hf_config(path)
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable, bad JSON, missing or wrong keys
        raise InputError(f"{where(flag, path)}: config.json is not a usable model config: {e}") from None
    names = ("model.safetensors", "model.safetensors.index.json")
    if weights and not any(os.path.isfile(os.path.join(path, n)) for n in names):
        raise InputError(f"{where(flag, path)}: no model.safetensors or model.safetensors.index.json")
    return path


def load_chat_tokenizer(path: str | None, flag: str = "--model"):
    """The tokenizer of the folder `path` (None: the bundled tiny tokenizer), checked for what the Tülu chat
    template needs: an EOS token that encodes to its own id (it ends every assistant turn). InputError naming
    `flag` and `path` otherwise."""
    from tulu_jax.data.tokenizer import load_tokenizer, tiny_tokenizer_dir

    shown = str(tiny_tokenizer_dir()) if path is None else path
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError, TypeError) as e:  # transformers' "not a tokenizer folder" errors are OSErrors
        text = " ".join(str(e).split())  # transformers' messages span lines: keep them whole, on one line
        text = text if len(text) <= 300 else text[:297] + "..."
        raise InputError(f"{where(flag, shown)}: cannot load its tokenizer: {text or type(e).__name__}") from None
    ids = tokenizer(tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    if ids != [tokenizer.eos_token_id]:
        raise InputError(
            f"{where(flag, shown)}: the tokenizer's eos_token {tokenizer.eos_token!r} encodes to {ids}, not to its "
            f"id {tokenizer.eos_token_id}: the chat template's end of turn would not be the EOS token"
        )
    return tokenizer


def check_writable_output(path: str, flag: str) -> str:
    """`path` if it is (or can be created as) a writable file; else InputError naming `flag` and `path`."""
    if os.path.isdir(path):
        raise InputError(f"{where(flag, path)}: is a directory, expected a file")
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise InputError(f"{where(flag, path)}: cannot create its folder: {e.strerror or e}") from None
    target = path if os.path.exists(path) else parent
    if not os.access(target, os.W_OK):
        raise InputError(f"{where(flag, path)}: not writable")
    # Some folders pass the access check yet refuse new files (/sys, /proc; read-only mounts as root):
    # open for appending, and remove the file again if this check created it.
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise InputError(f"{where(flag, path)}: cannot be written: {e.strerror or e}") from None
    if not existed:
        os.remove(path)
    return path


def parse_mesh(text: str | None, flag: str = "--mesh") -> tuple[int, int, int] | None:
    """ "data,fsdp,tensor" (e.g. "2,2,2" or "-1,1,1", at most one -1 for the rest of the devices) -> a tuple."""
    if text is None:
        return None
    try:
        sizes = tuple(int(x) for x in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise InputError(f"{where(flag, text)}: expected three comma-separated integers data,fsdp,tensor")
    import jax

    from tulu_jax.sharding import resolve_mesh_shape

    try:
        return resolve_mesh_shape(*sizes, jax.device_count())
    except ValueError as e:
        raise InputError(f"{where(flag, text)}: {e}") from None


def check_backend_flags(backend: str, servers: str | None, mesh) -> None:
    """The rollout-backend flags of `generate` and `eval` agree: `--backend vllm` needs `--servers` and takes
    no `--mesh`; `--servers` needs `--backend vllm` (a local run would silently ignore the servers).
    InputError naming the flag otherwise."""
    if backend == "vllm" and not servers:
        raise InputError("--backend vllm needs --servers URL[,URL...] (start one with `tulu-jax vllm --model DIR`)")
    if backend == "vllm" and mesh:
        raise InputError("--mesh applies to --backend local only (vLLM servers shard themselves)")
    if backend != "vllm" and servers:
        raise InputError(f"--servers {servers}: needs --backend vllm (the {backend} backend would ignore it)")


SERVER_PROBE_TIMEOUT_S = 5.0  # a vLLM server answers /health at once once its model is loaded


def check_servers(servers: str, flag: str = "--servers", timeout_s: float = SERVER_PROBE_TIMEOUT_S) -> list[str]:
    """The comma-separated vLLM server URLs of `servers`, each checked to be an http(s) URL with a host and to
    answer GET URL/health (HTTP 200) within `timeout_s` seconds, so a wrong or dead server fails at once
    instead of after the rollout client's retry deadline. InputError naming `flag` and the URL otherwise."""
    import urllib.error
    import urllib.parse
    import urllib.request

    urls = [u.strip().rstrip("/") for u in servers.split(",") if u.strip()]
    if not urls:
        raise InputError(f"{where(flag, servers)}: no server URL")
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"{where(flag, url)}: not an http(s) URL")
    for url in urls:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=timeout_s) as r:
                r.read()
        except urllib.error.HTTPError as e:
            raise InputError(
                f"{where(flag, url)}: GET /health answered HTTP {e.code}, not a ready vLLM server "
                "(start one with tulu-jax vllm --model DIR)"
            ) from None
        except (urllib.error.URLError, OSError, ValueError) as e:  # refused, unknown host, timed out
            reason = getattr(e, "reason", e)
            text = getattr(reason, "strerror", None) or str(reason) or type(e).__name__
            raise InputError(
                f"{where(flag, url)}: no vLLM server answers ({text.lower()}); start one with tulu-jax vllm --model DIR"
            ) from None
    return urls
