"""What a row and a batch are, per position kind: the part of streaming and training that differs.

A store's positions decide what a student learns from: ``sample`` and ``views``
(:mod:`.sample`) give one target per input, a classifier's batch of inputs and labels;
``tokens`` (:mod:`.tokens`) give one target per token, a language model's padded sequences
with next-token targets and loss masks. Each kind is one module with a *rows* class: how
its ranks share an epoch (``share``), how many units a window shuffles (``window``), how a
unit read whole becomes rows (``unit_rows``: a views store's view of the epoch is picked
here), and how rows of several units become batches joined with their inputs (``batches``).
The streaming dataset (:mod:`softlabels.student.dataset`) and the trainer are the same for
every kind. A new kind is one module and one entry in the dataset's ``ROWS``.
"""
