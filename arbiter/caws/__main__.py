"""`python -m arbiter.caws` runs the gate engine's CLI (mlx_student.caws_eval)."""

from . import main

main()
