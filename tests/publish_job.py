"""One process of the weight-publish job that tests/test_weight_sync.py starts through tests/multihost_job.py
(or alone, with 8 devices): a tiny tied model with fixed random weights, sharded on a 2x2x2 mesh of the
job's 8 devices, published to OUT/publish in bfloat16, then pushed once through a `VLLMClient` whose server
calls are recorded instead of sent. Prints one line `RESULT {json}` with what this process saw.

    python tests/publish_job.py OUT
"""

import json
import os
import shutil
import sys

from tulu_jax import multihost

multihost.initialize()

import jax  # noqa: E402  (after joining the job)
import numpy as np  # noqa: E402

from tulu_jax.models.config import preset  # noqa: E402
from tulu_jax.models.loading import build_model, param_layout  # noqa: E402
from tulu_jax.rollout.vllm_client import RolloutServerError, VLLMClient  # noqa: E402
from tulu_jax.rollout.weight_sync import publish_weights  # noqa: E402
from tulu_jax.sharding import make_mesh  # noqa: E402

CFG = preset("tiny", tie_embeddings=True)


def host_params(seed: int = 0):
    """Fixed float32 weights as numpy arrays (the same on every process and for every mesh)."""
    abstract, _ = param_layout(build_model(CFG), make_mesh(devices=jax.devices()[:1]))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda a: rng.standard_normal(a.shape).astype(np.float32), abstract)


def main(out: str) -> None:
    mesh = make_mesh(2, 2, 2)
    _, shardings = param_layout(build_model(CFG), mesh)
    params = jax.tree.map(
        lambda h, s: jax.make_array_from_callback(h.shape, s, lambda idx, h=h: h[idx]), host_params(), shardings
    )
    assert not all(x.is_fully_addressable for x in jax.tree.leaves(params)) or jax.process_count() == 1
    publish_weights(params, CFG, os.path.join(out, "publish"), "bfloat16")

    loads = []  # (folder, version) of every load this process would have sent to a server
    client = VLLMClient(["http://127.0.0.1:9"], eos_token_id=0, pad_token_id=0, cfg=CFG)  # port 9: nobody there
    client._load_all = lambda folder, version, cfg: loads.append([folder, version])
    try:
        times = client.push_weights(params, "v1")  # weights_dir: the default, chosen by process 0
        folder = client._folders[-1]
        other = None
        if jax.process_index() == 1:  # off process 0 a load is a no-op: it must not try the dead server
            client.load_folder(os.path.join(out, "publish"), "v2")
            other = client.weight_version

        # A load that fails on process 0 fails the push on every process (none waits forever).
        def refuse(folder, version, cfg):
            raise RolloutServerError("refused by the test")

        client._load_all = refuse
        try:
            client.push_weights(params, "v3")
            failed = None
        except RolloutServerError as e:
            failed = str(e)
        # A folder process 0 cannot write (its parent is a file) fails the publish on every process, after
        # every process has joined all the gathers (none is left waiting in one).
        blocker = os.path.join(out, "blocker")
        if jax.process_index() == 0:
            open(blocker, "w").close()
        multihost.barrier("publish_job_blocker")
        try:
            publish_weights(params, CFG, os.path.join(blocker, "publish"), "bfloat16")
            write_failed = None
        except (OSError, RuntimeError) as e:
            write_failed = f"{type(e).__name__}: {e}"

        # Work process 0 leads that fails there raises on every process; payloads of any size come through.
        def lead_fails():
            if jax.process_index() == 0:
                raise KeyError("only on process 0")
            return "fine here"

        try:
            multihost.process_zero_result(lead_fails)
            lead_failed = None
        except Exception as e:  # noqa: BLE001 - the test checks which type each process raised
            lead_failed = f"{type(e).__name__}: {e}"
        sizes = [0, 5000, 70000]
        echoed = [len(multihost.broadcast_object("x" * n if jax.process_index() == 0 else None)) for n in sizes]
        multihost.barrier("publish_job_done")
        if jax.process_index() == 0:
            shutil.copytree(folder, os.path.join(out, "pushed"))
    finally:
        if jax.process_index() == 0 and client.weights_dir is not None:
            shutil.rmtree(client.weights_dir, ignore_errors=True)  # the default folder under /dev/shm
    result = dict(process=jax.process_index(), times=times, loads=loads, folder=folder,
                  weights_dir=client.weights_dir, other_version=other, failed=failed, write_failed=write_failed,
                  lead_failed=lead_failed, echoed=echoed)  # fmt: skip
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
