"""One Orbax checkpoint per saved step holding the run's states *and* the data iterator's state, so a
resumed run sees exactly the batches, and therefore the losses, of a run that was never stopped.

The states are any pytree of arrays: one TrainState (SFT, DPO, RM: its `rng` key data rides along), or
e.g. `{"policy": TrainState, "value": TrainState, "rollout_rng": key_data}` for PPO. Restoring needs the
same tree as abstract shapes plus the shardings to place each array in (which may differ from the
saving run's: Orbax reshards on restore)."""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


def layout(tree) -> list[str]:
    """ "path shape dtype" of every array (or ShapeDtypeStruct) of `tree`: what a restore must match."""
    return [
        f"{jax.tree_util.keystr(path)} {tuple(x.shape)} {jax.numpy.dtype(x.dtype).name}"
        for path, x in jax.tree_util.tree_leaves_with_path(tree)
    ]


class Checkpointer:
    """Orbax checkpoints of any pytree of train states plus the data iterator's state and extras, under
    `directory`, keeping the newest `keep` (ValueError from Orbax for keep < 1). Saves are asynchronous:
    `wait` or `close` before reading them from another process."""

    def __init__(self, directory: str, keep: int):
        self.directory = os.path.abspath(directory)  # Orbax wants absolute paths
        self._mngr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        )

    def latest_step(self) -> int | None:
        """The newest saved step, or None when the directory holds no checkpoint."""
        return self._mngr.latest_step()

    def save(self, step: int, state, data_state: dict[str, Any], extra: dict[str, Any] | None = None) -> None:
        """Saves `state` (any pytree of jax arrays), the data iterator's JSON state and `extra` (JSON).

        Asynchronous: training goes on while the arrays are written. A step that was not finished when
        the process died is never committed, so it cannot be restored half-written."""
        self._mngr.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                extra=ocp.args.JsonSave({**(extra or {}), "layout": layout(state)}),
            ),
        )

    def restore(self, abstract_state, shardings, step: int | None = None):
        """Returns (state, data_state, extra) of `step` (default: the latest), the state placed directly in
        `shardings` (a pytree matching `abstract_state`, whose leaves give shapes and dtypes)."""
        step = self.latest_step() if step is None else step
        # Compare the saved arrays' layout first: a checkpoint of another model or optimizer is then a clear
        # ValueError before any array is read (a failed read leaves Orbax's workers to die noisily).
        saved = self._mngr.restore(step, args=ocp.args.Composite(extra=ocp.args.JsonRestore()))["extra"]
        ours = layout(abstract_state)
        if saved.get("layout") is not None and saved["layout"] != ours:
            diff = next((f"{a} saved, {b} here" for a, b in zip(saved["layout"], ours) if a != b), None)
            diff = diff or f"{len(saved['layout'])} arrays saved, {len(ours)} here"
            raise ValueError(f"the saved state differs: {diff}")
        target = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, shardings
        )
        out = self._mngr.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore(), extra=ocp.args.JsonRestore()
            ),
        )
        extra = {k: v for k, v in out["extra"].items() if k != "layout"}
        return out["state"], out["data"], extra

    def wait(self) -> None:
        """Blocks until every asynchronous save has been written."""
        self._mngr.wait_until_finished()

    def close(self) -> None:
        """Waits for pending saves, then releases the manager. Not usable afterwards."""
        self._mngr.wait_until_finished()
        self._mngr.close()
