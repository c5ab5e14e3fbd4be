"""`python -m plan [cdcda.py's options] [--buffer N] [--deploy]`: the run's size and time (plan.py)."""
import sys

from errors import InputError
from plan import plan

if __name__ == "__main__":
    try:
        plan.main()
    except InputError as e:
        sys.exit(f"python -m plan: error: {e}")
