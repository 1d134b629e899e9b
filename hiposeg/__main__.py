"""`python -m hiposeg` is the same as the `hiposeg` console script."""

from hiposeg.cli import main

if __name__ == "__main__":
    main()
