"""Data curation (`tulu-jax data ...`): prompt mixing and deduplication, decontamination against evaluation
sets, persona-driven prompt synthesis, preference pairs from a model pool with an LLM judge, and
instruction-following RLVR prompts (Tülu 3 §3 and §5.2; open-instruct `decontamination/`,
`scripts/persona_driven_data_gen/`, `scripts/synth_pref/`)."""
