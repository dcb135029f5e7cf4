"""Jobs that write format-2 stores: a runner apart from the producers it drives.

- :mod:`softlabels.job.producer`: the :class:`Producer` protocol (what to compute);
- :mod:`softlabels.job.runner`: :func:`run_job` (lock, create/resume, plan, rank split,
  background writer, non-finite policy, repair, finish);
- :mod:`softlabels.job.classify`: the classifier-teacher producer (``sample`` and ``views``);
- :mod:`softlabels.job.tokens`: the language-model teacher producer (``tokens``);
- :mod:`softlabels.job.merge`: the ensemble producer (``softlabels merge``).
"""

from softlabels.job.producer import Producer
from softlabels.job.runner import JobResult, run_job

__all__ = ["JobResult", "Producer", "run_job"]
