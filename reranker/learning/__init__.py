"""Learning from live traffic: the training log and the online metrics joined from it."""
