"""Make the tool-use data set: gold (and optionally teacher) traces with process-target spans.

    python scripts/make_tool_data.py --n 1000 --out data/tools   # = mlx_student.toolgen
    python scripts/make_tool_data.py --config configs/toolgen.yaml
"""

import mlx_student  # noqa: F401  (first: OpenBLAS before mlx loads)
from mlx_student.tools.toolgen import main

if __name__ == "__main__":
    main()
