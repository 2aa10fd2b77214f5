"""`python -m deploy ...`: the `lineguard` command in this interpreter (what tests and child processes run)."""

from deploy.app import main

main()
