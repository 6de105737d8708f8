"""RL algorithm pieces: GRPO advantages, DAPO dynamic sampling and overlong shaping, curriculum phases,
difficulty-aware retrospective sampling."""
