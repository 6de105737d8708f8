"""The pieces `qlfast.train` composes: packing, SFT, rollout collection, policy update, checkpoints, logging, report."""
