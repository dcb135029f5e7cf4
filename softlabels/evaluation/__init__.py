"""After training: evaluate a student against labels and its teacher, report a run, compress it.

May import :mod:`softlabels.student` and everything below it; nothing imports it but the CLI.
"""
