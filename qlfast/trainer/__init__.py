"""The pieces `qlfast.train` composes: the run context and the state a checkpoint saves (context, state,
checkpoint), the process group and collectives (comm), what a run is built from (build), packing, SFT, rollout
collection and the policy update (rl_step, sp), held-out evaluation (heldout), logging and the report."""
