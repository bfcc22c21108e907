"""Imported by the Scorer's forkserver: its forks (the workers) start with math-verify already set up."""

from tulu_jax.rewards.worker import warm_up

warm_up()
