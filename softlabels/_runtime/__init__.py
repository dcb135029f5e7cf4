"""Process plumbing every stage shares: start-up and stop signals, progress lines, the rule that
``--out`` never touches an input, the device and CPU threads, and the process group.

Owns no data and knows no stage: it may import only :mod:`softlabels.errors` (and torch).
"""
