"""Students: stream stores into a model and train it by distillation (or on hard labels).

Owns the streaming dataset and its epoch order, the KD losses over typed targets, the
trainer (loop, checkpoints, resume, DDP, schedule) and training runs as inputs. May import
:mod:`softlabels.teacher` (model specs) and everything below it.
"""
