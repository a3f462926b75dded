"""Forensics: what happened, answered from the streams alone (no agent re-run, no live state).

- `log`: read-only access to stored messages (bytes, stream sequence, stored time).
- `ledger`: verify each aggregate's hash chain, in the stream or in a stored copy.
- `explain`: one job's causal chain from request to outcome, assembled from `collect` (reading
  the job's subjects), `story` (attempts and proposals from the typed Job state), `causes` (the
  failure classes and their evidence), `sentences` (an event as a line), `render` and `phases`.
- `ids`: a unique id prefix (8+ characters) resolved to the full id, for every id-taking command.
- `timetravel`: jobs and agents as they stood at a stream sequence or a time.
- `backtest`: a new or changed invariant run over every past proposal.
- `dossier`: everything about one job in one JSON bundle.
"""
