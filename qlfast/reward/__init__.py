"""Rewards: rule-based verification (rule), the recipe's per-data-source families (dispatch), LLM judge with a circuit
breaker and a time budget (judge), reward = max(rule, judge) (hybrid), `build_reward` (factory).

docs/reward.md compares every rule with the QwenLong-L1 recipe's reward code and lists each deliberate difference."""
