"""``python -m softlabels`` runs the command line."""

from softlabels.cli import main

main()
