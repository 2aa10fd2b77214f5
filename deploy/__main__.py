"""`python -m deploy ...`: the `lineguard` command in this interpreter (what tests and child processes run)."""

from deploy.app import main

if __name__ == "__main__":   # not when a spawned child (the model process) imports the parent's main module
    main()
