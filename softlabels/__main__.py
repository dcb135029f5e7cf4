"""``python -m softlabels`` runs the command line."""

from softlabels._cli import main

main()
