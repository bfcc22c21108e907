"""`tulu-jax eval`: benchmark prompts (GSM8K, MATH, IFEval, the bundled tiny tasks or any file of RLVR rows)
answered through the rollout interface and scored by the RLVR reward's verifiers (Tülu 3 §6-7).

Modules: `prompts` (few-shot formats), `tasks` (file readers and layouts), `runner` (generation, scoring,
resumable result files, summary), `cli` (the `eval` subcommand)."""
