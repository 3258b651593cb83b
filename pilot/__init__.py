"""The KD pilot: the main job end to end over every package (mlx_student, export, runtime).

It stands above them all (docs/architecture.md: imports run one way), so it lives here,
never inside mlx_student. `mlx_student.pilot --config configs/pilot.yaml` runs pilot.run.main.
"""
