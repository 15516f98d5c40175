"""`python -m trainer` (and `torchrun ... -m trainer fit ...`)."""
from .cli import main

main(prog_name="trainer")
