"""Training and evaluation of `sparseball.models` on `sparseball.tasks`:
`python -m sparseball train` and `python -m sparseball eval RUN`.

- `config`: the `Config` dataclass, its command-line options and checks;
- `data`: batches as a deterministic function of (stream, seed, rank, step);
- `loop`: model, optimizer, schedule and the loop itself (`train`);
- `checkpoint`, `metrics`, `distributed`: the run directory's checkpoint, log and plot, and
  torchrun's process group;
- `evaluate`: test metrics of a finished run (`evaluate_run`).
"""

from .config import Config, ConfigError
from .evaluate import evaluate_run
from .loop import TrainResult, train

__all__ = ["Config", "ConfigError", "TrainResult", "evaluate_run", "train"]
