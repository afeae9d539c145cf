"""Offline quality evaluation (`reranker eval`) and ranking-head training (`reranker train`).

Data format (tab separated, UTF-8, one header line each; see formats.py):
  items.tsv       item_id, text
  events.tsv      user_id, item_id, timestamp[, event_type]
  candidates.tsv  user_id, item_id, score[, label]   (optional; rows per user in retriever order)
"""
