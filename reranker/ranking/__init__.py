"""Ranking: pure numpy scoring, the trained head, A/B decisions, experiment arms and head hot reload."""
