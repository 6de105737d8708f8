"""Rewards: rule-based verification (rule), LLM judge with fallback (judge), reward = max(rule, judge) (hybrid)."""
