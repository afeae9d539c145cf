"""User state: profile stores (in process, Redis), the user-model math, consumed items, event policy, snapshots, event streams."""
