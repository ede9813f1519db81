"""`python -m bench.projection ...`: the same options and output as `rlhf-bench project`."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
